"""The training-step benchmark family without a GPU: no timings.

FLOP, parameter and byte counts (checked against the real models), the case grid and the
``--quick`` contents, the registry and ``--list``, the skip reasons, and the timed callables
running real training steps of tiny configurations on CPU: the same initial weights for
every implementation, parameters that move, gradients released after each step.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from bench_package import load

registry = load("registry")
training = load("cases_training")
models = load("models")
report = load("report")

NAMES = ["eager", "torch.compile", "fusedops", "fusedops-triton", "fusedops+torch.compile",
         "fusedops-triton+torch.compile"]
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny CPU steps: one thread avoids OpenMP's spin-waits on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_gpt(dtype="float32"):
    return training.make_gpt_case(2, 16, layers=2, width=32, heads=2, vocab=97, dtype=dtype)


def _tiny_resnet(dtype="float32"):
    return training.make_resnet_case(2, 32, classes=10, dtype=dtype)


def _step(name, case, sets=1):
    inputs = [training.make_inputs(case, "cpu") for _ in range(sets)]
    return training.FAMILY.implementation(name).setup(case, inputs), inputs


# --- counts -----------------------------------------------------------------------------


def test_gpt_flops():
    case = training.make_gpt_case()
    n = 12 * 12 * 768 ** 2 + 50257 * 768  # q, k, v, proj, fc, fc2 and the tied head
    assert training.gpt_matmul_weights(case) == n == 123_532_032
    tokens = 8 * 1024
    attention = 12 * 12 * 12 * 64 * 1024 ** 2 * 8  # 12·L·H·D·S² per sequence, 8 sequences
    assert training.flops(case) == 6 * n * tokens + attention == 6_999_559_372_800
    tiny = _tiny_gpt()
    assert training.flops(tiny) == 6 * (12 * 2 * 32 ** 2 + 97 * 32) * 32 + 12 * 2 * 32 * 16 * 32


def test_gpt_parameters_match_the_model():
    for case in (training.make_gpt_case(), _tiny_gpt()):
        p = case.params
        with torch.device("meta"):
            model = models.GPT(models.GPTConfig(vocab_size=p["vocab"], block_size=p["seq"],
                                                n_layer=p["layers"], n_head=p["heads"],
                                                n_embd=p["width"]))
        assert training.gpt_parameters(case) == model.num_parameters()
    assert training.gpt_parameters(training.make_gpt_case()) == 124_439_808


def test_resnet50_counts():
    case = training.make_resnet_case()
    assert training.resnet50_macs() == 4_089_184_256  # the "4.1 GFLOPs" of ResNet-50
    assert training.resnet50_parameters() == 25_557_032
    assert training.flops(case) == 3 * 2 * 4_089_184_256 * 64
    stem = training.resnet50_convs(224)[0]
    assert stem == (3, 64, 7, 112 * 112) and len(training.resnet50_convs(224)) == 53


@pytest.mark.skipif(not HAS_TORCHVISION, reason="needs torchvision")
def test_resnet50_counts_match_torchvision():
    """Multiply-adds counted by hooks on the real model, at two image sizes."""
    from torchvision.models import resnet50

    for image, classes in ((224, 1000), (64, 10)):
        model = resnet50(weights=None, num_classes=classes)
        macs = []

        def count(module, inputs, output, macs=macs):
            if isinstance(module, torch.nn.Conv2d):
                k = module.kernel_size[0] * module.kernel_size[1]
                macs.append(output[0].numel() * module.in_channels * k // module.groups)
            else:
                macs.append(module.in_features * module.out_features)

        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.register_forward_hook(count)
        with torch.device("meta"):
            model.to("meta")(torch.empty(1, 3, image, image))
        assert sum(macs) == training.resnet50_macs(image, classes)
        assert sum(p.numel() for p in model.parameters()) == \
            training.resnet50_parameters(classes)


def test_bytes_and_input_bytes():
    gpt, resnet = training.make_gpt_case(), training.make_resnet_case()
    batch = 2 * 8 * 1024 * 8  # int64 ids and targets
    assert training.bytes_moved(gpt) == 36 * 124_439_808 + batch
    images = 64 * (3 * 224 * 224 * 4 + 8)
    assert training.bytes_moved(resnet) == 36 * 25_557_032 + images
    # a step works on its training state (16 B per parameter): never a case for rotation
    assert training.input_bytes(gpt) == batch + 16 * 124_439_808
    assert training.input_bytes(resnet) == images + 16 * 25_557_032
    h100_l2 = 50 * 2**20
    for case in (gpt, resnet):
        assert load("timing").input_sets_needed(training.input_bytes(case), h100_l2) == 1


def test_throughput():
    gpt, resnet = training.make_gpt_case(), training.make_resnet_case()
    assert training.items_per_step(gpt) == 8192 and training.items_per_step(resnet) == 64
    assert training.throughput(gpt, 100.0) == pytest.approx(81920.0)
    assert training.throughput(resnet, 50.0) == pytest.approx(1280.0)
    assert training.throughput_unit(gpt) == "tokens/s"
    assert training.throughput_unit(resnet) == "images/s"
    assert training.FAMILY.extra["throughput"] is training.throughput
    assert "8192 tok" in gpt.label and "64 img" in resnet.label


# --- cases and registry -----------------------------------------------------------------


def test_case_grid_and_quick():
    full = training.cases(False)
    assert [c.params["model"] for c in full] == ["gpt", "resnet50"]
    gpt, resnet = full
    assert gpt.params == {"model": "gpt", "batch": 8, "seq": 1024, "layers": 12, "width": 768,
                          "heads": 12, "vocab": 50257, "dtype": "bfloat16"}
    assert resnet.params == {"model": "resnet50", "batch": 64, "image": 224, "classes": 1000,
                             "dtype": "bfloat16"}
    assert len({c.id for c in full}) == 2
    quick = training.cases(True)
    assert [c.id for c in quick] == [gpt.id]  # --quick: the GPT step alone
    assert not _tiny_gpt().quick
    family = registry.get_family("training")
    in_quick = [i.name for i in family.implementations if i.quick]
    assert in_quick == ["eager", "fusedops"]  # 1 case x 2 implementations
    assert len(quick) * len(in_quick) <= 2


def test_registry():
    assert "training" in registry.family_names()
    family = registry.get_family("training")
    assert family is training.FAMILY
    assert [i.name for i in family.implementations] == NAMES
    assert [i.name for i in family.implementations if i.baseline] == ["eager", "torch.compile"]
    assert family.ratio_baselines == ("eager", "torch.compile")
    assert family.bound == "compute" and family.panel_key == "model"
    assert "6·N·T" in family.formulas and "Peak memory" in family.formulas


def test_list_shows_training(capsys):
    assert report.main(["--list", "--family", "training"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("training: ")
    assert "gpt_L12_C768_H12_V50257_B8_S1024_bfloat16" in text and "resnet50_B64" in text
    assert report.main(["--list", "--quick", "--family", "training"]) == 0
    quick = capsys.readouterr().out
    assert "resnet50_B64" not in quick and "torch.compile (not in --quick)" in quick


# --- skip reasons -----------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="the reasons given without a GPU")
def test_without_cuda_every_implementation_skips():
    for impl in training.FAMILY.implementations:
        assert impl.unavailable().startswith("needs a CUDA device")


def test_forced_tier_gives_the_tier_reason(monkeypatch):
    import fusedops

    monkeypatch.setattr(training, "_needs_cuda", lambda: None)
    monkeypatch.setattr(fusedops, "backends", lambda: {"torch": None, "triton": "no triton",
                                                       "cuda": None})
    family = training.FAMILY
    assert family.implementation("fusedops-triton").unavailable() == "no triton"
    assert family.implementation("fusedops-triton+torch.compile").unavailable() == "no triton"
    assert family.implementation("fusedops").unavailable() is None  # auto needs no tier
    assert family.implementation("eager").unavailable() is None


def test_resnet_skips_without_torchvision(monkeypatch):
    monkeypatch.setattr(training, "_torchvision_missing",
                        lambda: "torchvision is not installed")
    impl = training.FAMILY.implementation("fusedops")
    assert impl.unsupported(training.make_resnet_case()) == (
        "torchvision is not installed (ResNet-50 is torchvision.models.resnet50)")
    assert impl.unsupported(training.make_gpt_case()) is None
    monkeypatch.setattr(training, "_torchvision_missing", lambda: None)
    assert impl.unsupported(training.make_resnet_case()) is None


# --- the timed callables on CPU ---------------------------------------------------------


def _first_parameter(step_fn):
    """The model's first parameter, found through the step's closure (AdamW holds them)."""
    (optimizer,) = [c.cell_contents for c in step_fn.__closure__
                    if isinstance(c.cell_contents, torch.optim.Optimizer)]
    return optimizer.param_groups[0]["params"][0]


def test_gpt_step_eager_and_fusedops_on_cpu():
    """One step each from the same weights: the same loss (fusedops' torch tier on CPU),
    parameters that change, gradients set to None after the step."""
    case = _tiny_gpt()
    inputs = [training.make_inputs(case, "cpu")]
    eager = training.FAMILY.implementation("eager").setup(case, inputs)
    fused = training.FAMILY.implementation("fusedops").setup(case, inputs)
    before = _first_parameter(eager).detach().clone()
    assert torch.equal(before, _first_parameter(fused))  # same seed, same weights
    loss_eager, loss_fused = eager(), fused()
    assert loss_eager.shape == () and torch.isfinite(loss_eager)
    assert loss_eager.item() == pytest.approx(loss_fused.item(), rel=1e-5)
    assert loss_eager.item() == pytest.approx(torch.log(torch.tensor(97.0)).item(), rel=0.05)
    weight = _first_parameter(eager)
    assert not torch.equal(weight, before) and weight.grad is None
    assert eager().item() < loss_eager.item()  # the same batch again: lower loss


def test_gpt_step_rotates_batches():
    case = _tiny_gpt()
    step, inputs = _step("eager", case, sets=2)
    first, second = step(), step()
    assert torch.isfinite(first) and torch.isfinite(second)
    assert inputs[0]["idx"].shape == (2, 16) and inputs[0]["idx"].max() < 97


def test_gpt_step_bf16_autocast_eager():
    step, _ = _step("eager", _tiny_gpt("bfloat16"))
    loss = step()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_gpt_step_bf16_autocast_fusedops():
    """Under autocast a bf16 activation meets float32 parameters in the patched layers (the
    benchmark's mixed precision)."""
    step, _ = _step("fusedops", _tiny_gpt("bfloat16"))
    loss = step()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.skipif(not HAS_TORCHVISION, reason="needs torchvision")
def test_resnet_step_eager_and_fusedops_on_cpu():
    case = _tiny_resnet()
    inputs = [training.make_inputs(case, "cpu")]
    assert inputs[0]["images"].is_contiguous(memory_format=torch.channels_last)
    eager = training.FAMILY.implementation("eager").setup(case, inputs)
    fused = training.FAMILY.implementation("fusedops").setup(case, inputs)
    loss_eager, loss_fused = eager(), fused()
    assert torch.isfinite(loss_eager)
    assert loss_eager.item() == pytest.approx(loss_fused.item(), rel=1e-4)


def test_compiled_implementations_compile_the_model(monkeypatch):
    """torch.compile(model, dynamic=False) of the unpatched or the patched model (the compile
    itself is stubbed: compiling a model on CPU takes too long for this suite)."""
    import fusedops

    compiled = []

    def fake_compile(model, **kwargs):
        compiled.append((model, kwargs))
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    case = _tiny_gpt()
    for name, patched in (("torch.compile", False), ("fusedops+torch.compile", True)):
        step, _ = _step(name, case)
        assert torch.isfinite(step())
        model, kwargs = compiled[-1]
        assert kwargs == {"dynamic": False}
        assert isinstance(model.blocks[0].attn.qkv, fusedops.nn.FusedLinear) == patched
    assert len(compiled) == 2
