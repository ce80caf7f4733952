"""The conv2d benchmark family without a GPU: no timings.

FLOP and byte formulas, the case grid (re-derived here from the two networks' architectures)
and the ``--quick`` contents, the registry and ``--list``, the skip reasons of unavailable
implementations (and of cases a tier does not run), cuDNN's benchmark mode around each
call, and the timed callables of the baselines on small CPU tensors: they compute the
fused op, or its gradients, against float64.
"""

from __future__ import annotations

import importlib

import bench_helpers as helpers
import pytest
import torch
import torch.nn.functional as F
from bench_package import load

registry = load("registry")
cv = load("cases_conv2d")
runner_mod = load("runner")
store_mod = load("store")

NAMES = ["fusedops-triton", "fusedops-cuda", "cudnn", "cudnn+eager", "torch.compile"]
CL = torch.channels_last

# Small float32 geometries, each like one kind of case of the grid:
# (make_case positional arguments after the mode, keyword arguments)
SMALL = {
    "3x3/2+res": ((2, 6, 8, 9, 3, 2), {"residual": True}),
    "dw3x3/2": ((2, 6, 6, 9, 3, 2), {"groups": 6}),
    "stem7x7/2": ((2, 3, 8, 15, 7, 2), {}),
    "1x1/2-proj": ((2, 6, 8, 9, 1, 2), {"activation": None}),
}


def _small(mode, kind):
    args, kwargs = SMALL[kind]
    case = cv.make_case(mode, *args, dtype="float32", **kwargs)
    return case, cv.make_inputs(case, "cpu")


def _reference64(case, inputs, epilogue=True):
    """float64 act(conv(x, W) + b + r) of the same inputs (the convolution alone when not
    ``epilogue``), and the leaves to differentiate."""
    p, leaf = case.params, helpers.float64_leaf
    x, w = leaf(inputs["input"]), leaf(inputs["weight"])
    b, r = (leaf(inputs["bias"]), leaf(inputs["residual"])) if epilogue else (None, None)
    z = F.conv2d(x, w, b, p["stride"], p["padding"], 1, p["groups"])
    if r is not None:
        z = z + r
    if epilogue and p["activation"] == "relu":
        z = F.relu(z)
    return z, [t for t in (x, w, b, r) if t is not None]


def _check(case, inputs, out, epilogue=True, rtol=1e-5):
    ref, leaves = _reference64(case, inputs, epilogue)
    if case.params["mode"] == "fwd":
        got, want = [out], [ref]
    else:
        got, want = out, torch.autograd.grad(ref, leaves, inputs["grad_out"].double())
    assert all(g.dtype == torch.float32 for g in got)
    helpers.assert_all_close64(got, want, rtol)


# --- the two networks, derived from their architectures -------------------------------


def _resnet50_convs():
    """Every convolution of torchvision's ResNet-50 (v1.5) at 224 x 224, in module order:
    (module, C, K, R, stride, input size, activation, residual)."""
    convs = [("conv1", 3, 64, 7, 2, 224, "relu", False)]
    channels, size = 64, 56  # after the stem and its 3x3/2 max-pool
    for stage, blocks in enumerate((3, 4, 6, 3)):
        width = 64 * 2**stage
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            name = f"layer{stage + 1}.{block}"
            out_size = (size + 2 - 3) // stride + 1
            convs += [(f"{name}.conv1", channels, width, 1, 1, size, "relu", False),
                      (f"{name}.conv2", width, width, 3, stride, size, "relu", False),
                      (f"{name}.conv3", width, 4 * width, 1, 1, out_size, "relu", True)]
            if block == 0:
                convs.append((f"{name}.downsample.0", channels, 4 * width, 1, stride, size,
                              None, False))
            channels, size = 4 * width, out_size
    return convs


def _mobilenetv2_depthwise():
    """Every depthwise convolution of torchvision's MobileNetV2 at 224 x 224:
    (module, channels, input size, stride), from its (t, c, n, s) table."""
    table = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
             (6, 160, 3, 2), (6, 320, 1, 1))
    convs, channels, size, index = [], 32, 112, 1  # after the 3x3/2 stem
    for expansion, out_channels, repeats, first_stride in table:
        for i in range(repeats):
            stride = first_stride if i == 0 else 1
            position = 0 if expansion == 1 else 1  # after the 1x1 expansion, if any
            convs.append((f"features.{index}.conv.{position}.0", channels * expansion, size,
                          stride))
            size = (size + 2 - 3) // stride + 1
            channels, index = out_channels, index + 1
    return convs


def _distinct(convs):
    first = {}
    for name, *shape in convs:
        first.setdefault(tuple(shape), name)
    return [(name, *shape) for shape, name in first.items()]


def test_the_networks_layers():
    resnet = _resnet50_convs()
    assert len(resnet) == 53
    assert _distinct(resnet) == list(cv.RESNET50)
    assert len(cv.RESNET50) == 24
    depthwise = _mobilenetv2_depthwise()
    assert len(depthwise) == 17 and depthwise[-1] == ("features.17.conv.1.0", 960, 7, 1)
    assert _distinct(depthwise) == list(cv.MOBILENETV2_DEPTHWISE)
    assert len(cv.MOBILENETV2_DEPTHWISE) == 10


# --- counts -----------------------------------------------------------------------------


def test_flops():
    n, c, k, size = 64, 128, 128, 28
    forward = 2 * n * k * size * size * c * 9
    assert forward == 14_797_504_512
    fwd = cv.make_case("fwd", n, c, k, size, 3)
    assert cv.flops(fwd) == forward
    assert cv.flops(cv.make_case("fwd+bwd", n, c, k, size, 3)) == 3 * forward  # + dgrad, wgrad
    stem = cv.make_case("fwd", 256, 3, 64, 224, 7, 2)
    assert (stem.params["OH"], stem.params["OW"], stem.params["padding"]) == (112, 112, 3)
    assert cv.flops(stem) == 2 * 256 * 64 * 112 * 112 * 3 * 49
    # depthwise: C / groups = 1 channel per filter
    dw = cv.make_case("fwd", 64, 144, 144, 56, 3, 2, groups=144)
    assert dw.params["OH"] == 28
    assert cv.flops(dw) == 2 * 64 * 144 * 28 * 28 * 9
    assert cv.flops(cv.make_case("fwd+bwd", 64, 144, 144, 56, 3, 2, groups=144)) == \
        3 * cv.flops(dw)
    # stride 2 1x1 projection: 56 -> 28
    proj = cv.make_case("fwd", 64, 256, 512, 56, 1, 2, activation=None)
    assert proj.params["OH"] == 28 and cv.flops(proj) == 2 * 64 * 512 * 28 * 28 * 256


def test_bytes_forward():
    n, c, k, size, e = 64, 128, 512, 28, 2
    x, w, b, y = n * c * size * size * e, k * c * e, k * e, n * k * size * size * e
    assert cv.bytes_moved(cv.make_case("fwd", n, c, k, size, 1)) == x + w + b + y
    assert cv.bytes_moved(cv.make_case("fwd", n, c, k, size, 1, residual=True)) == \
        x + w + b + 2 * y  # + read the residual
    # depthwise 3x3/2 in fp16: one 3x3 filter per channel, a quarter-size output
    dw = cv.make_case("fwd", 2, 16, 16, 8, 3, 2, groups=16, dtype="float16")
    assert cv.bytes_moved(dw) == 2 * (2 * 16 * 64 + 16 * 9 + 16 + 2 * 16 * 16)
    # float32, no bias
    plain = cv.make_case("fwd", 1, 4, 8, 5, 3, bias=False, dtype="float32")
    assert cv.bytes_moved(plain) == 4 * (4 * 25 + 8 * 4 * 9 + 8 * 25)


def test_bytes_forward_backward():
    n, c, k, size, e = 64, 128, 128, 28, 2
    x, w, b, y = n * c * size * size * e, k * c * 9 * e, k * e, n * k * size * size * e
    forward = x + w + b + y
    gradients = x + w + b  # write grad_input, grad_weight, grad_bias

    def moved(**kwargs):
        return cv.bytes_moved(cv.make_case("fwd+bwd", n, c, k, size, 3, **kwargs))

    # relu: read grad_out and the output (relu'), x and W again; write the gradients
    assert moved() == forward + (2 * y + x + w) + gradients
    # with a residual: read it in the forward, write its gradient
    assert moved(residual=True) == forward + y + (2 * y + x + w) + gradients + y
    # no activation: nothing to read for act'
    assert moved(activation=None) == forward + (y + x + w) + gradients
    # gelu: the pre-activation z is written in the forward and read back
    assert moved(activation="gelu") == forward + y + (2 * y + x + w) + gradients


def test_input_bytes():
    case = cv.make_case("fwd+bwd", 2, 4, 8, 5, 3, residual=True)
    x, w, b, y = 2 * 4 * 25 * 2, 8 * 4 * 9 * 2, 8 * 2, 2 * 8 * 25 * 2
    assert cv.input_bytes(case) == x + w + b + y + y  # and grad_out
    assert cv.input_bytes(cv.make_case("fwd", 2, 4, 8, 5, 3)) == x + w + b


# --- cases ------------------------------------------------------------------------------


def test_case_grid():
    full = cv.cases(False)
    per = len(cv.RESNET50) + len(cv.MOBILENETV2_DEPTHWISE)
    assert len(full) == per * 2 * 2 * 2 == 272  # x batches x dtypes x modes
    assert len({c.id for c in full}) == len(full)
    assert {(c.params["mode"], c.params["dtype"], c.params["N"]) for c in full} == {
        (m, d, n) for m in ("fwd", "fwd+bwd") for d in ("bfloat16", "float16")
        for n in (64, 256)}
    resnet = {spec[0]: spec for spec in cv.RESNET50}
    depthwise = {spec[0]: spec for spec in cv.MOBILENETV2_DEPTHWISE}
    for c in full:
        p = c.params
        assert p["bias"] and p["padding"] == p["R"] // 2 and p["H"] == p["W"]
        assert str(p["N"]) in c.label and {"bfloat16": "bf16", "float16": "fp16"}[
            p["dtype"]] in c.label
        if p["net"] == "rn50":
            _, ch, k, r, stride, size, activation, residual = resnet[p["layer"]]
            assert (p["C"], p["K"], p["R"], p["stride"], p["H"], p["groups"]) == \
                (ch, k, r, stride, size, 1)
            assert (p["activation"], p["residual"]) == (activation, residual)
            intensity = cv.flops(c) / cv.bytes_moved(c)
            assert p["bound"] == ("compute" if intensity >= 250 else "memory")
            if r == 3 and stride == 1 and size <= 28:  # the deep 3x3s: compute-bound
                assert p["bound"] == "compute"
            if r == 1 and k <= 4 * ch and size >= 28:  # short reductions, large outputs
                assert p["bound"] == "memory"
            assert ("+res" in c.label) == residual
            # the residual only in the bottlenecks' expansions, no activation in projections
            assert residual == p["layer"].endswith("conv3")
            assert (activation is None) == ("downsample" in p["layer"])
        else:
            assert p["net"] == "mnv2"
            _, ch, size, stride = depthwise[p["layer"]]
            assert (p["C"], p["K"], p["groups"], p["R"], p["H"], p["stride"]) == \
                (ch, ch, ch, 3, size, stride)
            assert p["activation"] == "relu" and not p["residual"]  # relu for ReLU6
            assert p["bound"] == "memory" and c.label.startswith("dw3x3")


def test_quick():
    quick = cv.cases(True)
    assert [c.id for c in quick] == [
        "fwd_rn50_N64_C128_K512_H28_R1_s1_bfloat16_relu_res",
        "fwd_rn50_N64_C128_K128_H28_R3_s1_bfloat16_relu",
        "fwd_mnv2_N64_C144_K144_H56_R3_s1_dw_bfloat16_relu",
        "fwd+bwd_rn50_N64_C128_K128_H28_R3_s1_bfloat16_relu",
    ]
    assert all(c.quick for c in quick)
    assert {c.params["layer"] for c in quick} == {"layer2.1.conv2", "layer2.0.conv3",
                                                  "features.3.conv.1.0"}
    assert {c.id for c in quick} < {c.id for c in cv.cases(False)}
    assert not cv.make_case("fwd", 64, 128, 128, 28, 3).quick  # off the grid: never quick
    assert not cv.probe_case(quick[1]).quick
    family = registry.get_family("conv2d")
    assert [i.name for i in family.implementations if not i.quick] == ["torch.compile"]


def test_registry():
    assert "conv2d" in registry.family_names()
    family = registry.get_family("conv2d")
    assert family is cv.FAMILY and family.name == "conv2d"
    assert [i.name for i in family.implementations] == NAMES
    assert [i.name for i in family.implementations if not i.baseline] == NAMES[:2]
    assert family.ratio_baselines == ("cudnn+eager", "cudnn")
    assert family.bound == "compute" and family.panel_key == "mode"
    assert "2·N·K·OH·OW·(C/groups)·R·S" in family.formulas and "3×" in family.formulas
    assert "% copy" in family.formulas  # how to read the memory-bound depthwise rows


def test_make_inputs_on_cpu():
    case, inputs = _small("fwd+bwd", "3x3/2+res")
    assert inputs["input"].shape == (2, 6, 9, 9) and inputs["weight"].shape == (8, 6, 3, 3)
    assert inputs["residual"].shape == inputs["grad_out"].shape == (2, 8, 5, 5)
    for name in ("input", "weight", "residual", "grad_out"):  # all channels_last (NHWC)
        assert inputs[name].is_contiguous(memory_format=CL)
        assert not inputs[name].is_contiguous()
    assert inputs["bias"].shape == (8,)
    assert all(inputs[k].requires_grad for k in ("input", "weight", "bias", "residual"))
    assert not inputs["grad_out"].requires_grad
    assert inputs["input"].std() > 0.5  # random, never zeros
    fwd = cv.make_inputs(cv.make_case("fwd", 2, 3, 8, 15, 7, 2), "cpu")
    assert fwd["grad_out"] is None and fwd["residual"] is None
    assert not fwd["input"].requires_grad and fwd["input"].dtype == torch.bfloat16
    dw = cv.make_inputs(cv.make_case("fwd", 2, 6, 6, 9, 3, groups=6, dtype="float16"), "cpu")
    assert dw["weight"].shape == (6, 1, 3, 3) and dw["weight"].dtype == torch.float16
    # W scaled by (C·R·S)^-1/2: pre-activations of standard deviation ~1 (bias aside)
    big = cv.make_case("fwd", 4, 64, 32, 12, 3, bias=False, activation=None, dtype="float32")
    inputs = cv.make_inputs(big, "cpu")
    assert 0.7 < cv.reference(big, inputs).std().item() < 1.3


# --- the timed callables on CPU ---------------------------------------------------------


@pytest.mark.parametrize("kind", list(SMALL))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_cudnn_eager_callable(mode, kind):
    case, inputs = _small(mode, kind)
    out = cv.FAMILY.implementation("cudnn+eager").setup(case, [inputs])()
    _check(case, inputs, out)
    assert inputs["input"].grad is None  # autograd.grad: nothing accumulates


@pytest.mark.parametrize("kind", list(SMALL))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_cudnn_callable_is_the_convolution_alone(mode, kind):
    """No bias, residual or activation, even in a case that has them; its backward gives
    the input and weight gradients only."""
    case, inputs = _small(mode, kind)
    out = cv.FAMILY.implementation("cudnn").setup(case, [inputs])()
    _check(case, inputs, out, epilogue=False)
    if mode == "fwd+bwd":
        assert len(out) == 2


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_torch_compile_callable(monkeypatch, mode):
    """The function handed to torch.compile, with the options the family asks for (the
    compilation itself is replaced: max-autotune takes minutes)."""
    seen = []

    def fake_compile(fn, **kwargs):
        seen.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    case, inputs = _small(mode, "3x3/2+res")
    _check(case, inputs, cv.FAMILY.implementation("torch.compile").setup(case, [inputs])())
    assert seen == [{"mode": "max-autotune-no-cudagraphs", "dynamic": False}]


@pytest.mark.skipif(importlib.util.find_spec("fusedops") is None, reason="needs fusedops")
@pytest.mark.parametrize("kind", list(SMALL))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_fusedops_callable_on_the_torch_tier(mode, kind):
    """The fusedops implementations' callable, forced onto the torch tier (CPU)."""
    import fusedops

    if not hasattr(fusedops, "conv2d"):
        pytest.skip("fusedops.conv2d does not exist yet")
    case, inputs = _small(mode, kind)
    out = cv._fusedops_tier("torch").setup(case, [inputs])()
    _check(case, inputs, out, rtol=1e-4)
    if mode == "fwd":
        assert out.is_contiguous(memory_format=CL)  # channels_last in, channels_last out


@pytest.mark.parametrize("before", [False, True])
def test_cudnn_benchmark_is_on_during_each_call_only(monkeypatch, before):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", before)
    case = _small("fwd", "dw3x3/2")[0]
    sets = [cv.make_inputs(case, "cpu") for _ in range(2)]
    seen = []

    def forward(inputs):
        seen.append((torch.backends.cudnn.benchmark, inputs["input"]))
        return cv.reference(case, inputs)

    fn = cv._rotating(forward, case, sets)
    assert torch.backends.cudnn.benchmark is before  # making the callable changes nothing
    fn(), fn(), fn()
    assert [flag for flag, _ in seen] == [True] * 3
    assert [x is s["input"] for (_, x), s in zip(seen, sets + sets)] == [True] * 3  # rotated
    assert torch.backends.cudnn.benchmark is before

    def failing(inputs):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cv._bind(failing, case, sets[0])()
    assert torch.backends.cudnn.benchmark is before


# --- skip reasons -----------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="the reasons given without a GPU")
def test_without_cuda_the_cudnn_baselines_skip():
    for name in ("cudnn", "cudnn+eager"):
        assert cv.FAMILY.implementation(name).unavailable() == "needs a CUDA device"


def test_unavailable_tier_gives_the_backends_reason():
    helpers.assert_unavailable_tiers_give_the_backends_reason(cv.FAMILY)


@pytest.mark.parametrize("tier", ["triton", "cuda"])
def test_missing_or_unimplemented_conv2d_is_skipped(monkeypatch, tier):
    helpers.assert_missing_or_unimplemented_op_is_skipped(
        monkeypatch, cv, "conv2d", tier,
        raises=f"backend {tier!r} was forced but cannot run this call: the {tier} tier has no "
               f"fused convolution yet",
        says="no fused convolution")


def test_unsupported_case_of_a_tier_is_skipped(monkeypatch):
    """A tier that covers dense convolutions but not depthwise ones skips those cases alone,
    probing each kind once with a tiny call forced onto the tier; the probe keeps the
    stem's 3 input channels."""
    import fusedops

    seen = []

    def conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1, *, activation=None,
               residual=None):
        seen.append((tuple(x.shape), tuple(w.shape), stride, groups))
        if groups > 1:
            raise NotImplementedError("no depthwise kernel yet")
        z = F.conv2d(x, w, b, stride, padding, dilation, groups)
        z = z + residual if residual is not None else z
        return F.relu(z) if activation == "relu" else z

    monkeypatch.setattr(fusedops, "conv2d", conv2d, raising=False)
    monkeypatch.setattr(cv, "_case_probes", {})
    impl = cv.FAMILY.implementation("fusedops-triton")
    dw = cv.depthwise_case("fwd+bwd", cv.MOBILENETV2_DEPTHWISE[3], 256, "float16")
    reason = impl.unsupported(dw)
    assert reason == ("fusedops.conv2d does not run 3x3/2 depthwise C=144 float16 bias+relu "
                      "forward+backward on triton: no depthwise kernel yet")
    assert seen == [((2, 16, 16, 16), (16, 1, 3, 3), 2, 16)]  # a tiny call
    assert impl.unsupported(dw) == reason and len(seen) == 1  # probed once
    stem = cv.resnet_case("fwd", cv.RESNET50[0], 64, "bfloat16")
    assert impl.unsupported(stem) is None
    assert seen[-1] == ((2, 3, 16, 16), (16, 3, 7, 7), 2, 1)
    assert impl.unsupported(cv.resnet_case("fwd+bwd", cv.RESNET50[3], 64, "bfloat16")) is None


def test_runner_records_the_skips(tmp_path):
    """Through the runner: a baseline that cannot run here is a skipped record, with the
    reason."""
    store = store_mod.ResultsStore(tmp_path / "c.json", "conv2d", "cpu", fresh=True)
    runner = helpers.cpu_runner(cv.FAMILY, store, quick=True)
    import fusedops

    case = cv.cases(True)[0]
    for impl in cv.FAMILY.implementations:
        tier = impl.name.removeprefix("fusedops-")
        if not impl.baseline and fusedops.backends()[tier] is None:
            continue  # it would be probed (slowly, in Triton's interpreter) and measured
        reason = impl.unavailable()
        if reason is None:
            continue  # it would be measured: not this test's business
        record = runner._one(case, impl, [], None, runner_mod.Outcome())
        assert record["status"] == "skipped" and record["reason"] == reason


# --- the CLI and the writers ------------------------------------------------------------


def test_list_shows_conv2d(capsys):
    text, quick = helpers.listings(capsys, "conv2d")
    assert "\nconv2d: " in text
    assert "fwd+bwd_mnv2_N256_C960_K960_H7_R3_s1_dw_float16_relu" in text
    assert quick.count("[quick]") == 4
    assert "torch.compile (not in --quick)" in quick
    assert "_N256_" not in quick and "_float16_" not in quick


def test_markdown_shows_both_cudnn_ratios():
    case = cv.cases(True)[1]  # layer2.1.conv2, forward
    medians_ms = {"cudnn": 0.030, "cudnn+eager": 0.045, "fusedops-triton": 0.040}
    records, text = helpers.markdown_of(cv.FAMILY, case, medians_ms)
    assert "× cudnn+eager" in text and "× cudnn |" in text
    assert "1.12×" in text and "0.75×" in text  # 0.045 / 0.040 and 0.030 / 0.040
    row = next(r for r in records if r["implementation"] == "fusedops-triton")
    assert row["tflops"] == pytest.approx(14_797_504_512 / 0.040e-3 / 1e12)
    assert row["pct_matmul"] == pytest.approx(100 * row["tflops"] / 700.0)
