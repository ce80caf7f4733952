"""The attention benchmark family without a GPU: no timings.

FLOP and byte formulas, the case grid and the ``--quick`` contents, the registry and
``--list``, the skip reasons of unavailable implementations (and of cases an implementation
does not run), and the timed callables of the baselines on small CPU tensors: they compute
attention, or its gradients, and the bwd mode times the backward alone.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types
import warnings

import bench_helpers as helpers
import pytest
import torch
import torch.nn.functional as F
from bench_package import load

registry = load("registry")
att = load("cases_attention")
runner_mod = load("runner")
store_mod = load("store")

NAMES = ["fusedops-triton", "fusedops-triton-deterministic", "fusedops-cuda", "sdpa-flash",
         "sdpa-cudnn", "sdpa-efficient", "flex-attention", "eager-math", "flash-attn-4"]


def _small(mode, causal, seqlen=37, head_dim=16, batch=2, heads=3):
    """A tiny float32 case (S not a multiple of any block size) and its inputs on CPU."""
    case = att.make_case(mode, seqlen, head_dim, causal, batch=batch, heads=heads,
                         dtype="float32")
    return case, att.make_inputs(case, "cpu")


def _reference64(inputs, causal):
    """float64 attention of the same inputs, upcast, and the leaves to differentiate."""
    q, k, v = (inputs[n].detach().double().requires_grad_(True) for n in ("q", "k", "v"))
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if causal:
        s = q.shape[-2]
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v, (q, k, v)


def _check(case, inputs, out, rtol=1e-5, layout=lambda t: t):
    """``out`` (what a timed call returned) against float64 attention: the output (fwd) or
    the gradients with respect to q, k and v (bwd, fwd+bwd). ``layout`` maps a returned
    tensor back to (B, H, S, D)."""
    ref, leaves = _reference64(inputs, case.params["causal"])
    if case.params["mode"] == "fwd":
        helpers.assert_close64(layout(out), ref, rtol)
        return
    want = torch.autograd.grad(ref, leaves, inputs["grad_out"].double())
    assert len(out) == 3
    for g, w in zip(out, want):
        helpers.assert_close64(layout(g), w, rtol)


# --- counts -----------------------------------------------------------------------------


def test_flops():
    b, h, s, d = 4, 16, 4096, 128
    forward = 4 * b * h * s * s * d  # q·kᵀ and P·v, 2·B·H·S²·D each
    assert forward == 549_755_813_888
    assert att.flops(att.make_case("fwd", s, d, False)) == forward
    assert att.flops(att.make_case("bwd", s, d, False)) == forward * 5 // 2  # 5 matmuls vs 2
    assert att.flops(att.make_case("fwd+bwd", s, d, False)) == forward * 7 // 2
    for mode in ("fwd", "bwd", "fwd+bwd"):  # causal counts half
        assert 2 * att.flops(att.make_case(mode, s, d, True)) == \
            att.flops(att.make_case(mode, s, d, False))
    # B·S and H·D fixed: the forward is 4·16384·2048·S whatever D
    for d in att.HEAD_DIMS:
        assert att.flops(att.make_case("fwd", 1024, d, False)) == 4 * 16384 * 2048 * 1024


def test_bytes():
    b, h, s, d, e = 4, 16, 4096, 128, 2
    n, rows = b * h * s * d, b * h * s
    assert n * e == 64 * 2**20  # every tensor of the grid is 16384 x 2048 bf16
    forward = 4 * n * e  # read q, k, v; write out
    backward = 5 * n * e + 4 * rows + 3 * n * e  # read q, k, v, out, dO, lse; write dq, dk, dv
    for causal in (False, True):  # masking does not change the floor
        assert att.bytes_moved(att.make_case("fwd", s, d, causal)) == forward
        assert att.bytes_moved(att.make_case("bwd", s, d, causal)) == backward
        assert att.bytes_moved(att.make_case("fwd+bwd", s, d, causal)) == \
            forward + 4 * rows + backward  # the forward writes the lse too
    small = att.make_case("fwd+bwd", 8, 4, False, batch=1, heads=2, dtype="float32")
    assert att.bytes_moved(small) == 12 * 64 * 4 + 8 * 16


def test_input_and_score_bytes():
    fwd, bwd = att.make_case("fwd", 4096, 128, False), att.make_case("bwd", 4096, 128, True)
    assert att.input_bytes(fwd) == 3 * 64 * 2**20  # q, k, v
    assert att.input_bytes(bwd) == 4 * 64 * 2**20  # and grad_out
    assert att.score_matrix_bytes(fwd) == 4 * 16 * 4096 * 4096 * 2
    assert att.score_matrix_bytes(att.make_case("fwd", 16384, 64, False)) == 16 * 2**30


# --- cases ------------------------------------------------------------------------------


def test_case_grid():
    full = att.cases(False)
    assert len(full) == 3 * 6 * 2 * 3
    assert len({c.id for c in full}) == len(full)
    assert {(c.params["D"], c.params["S"]) for c in full} == {
        (d, s) for d in (64, 128, 256) for s in (512, 1024, 2048, 4096, 8192, 16384)}
    assert {c.params["mode"] for c in full} == {"fwd", "bwd", "fwd+bwd"}
    assert {c.params["causal"] for c in full} == {False, True}
    for c in full:
        p = c.params
        assert p["B"] * p["S"] == 16384 and p["H"] * p["D"] == 2048
        assert p["dtype"] == "bfloat16"
        assert str(p["S"]) in c.label and str(p["D"]) in c.label
        assert ("causal" in c.label) == p["causal"]


def test_quick():
    quick = att.cases(True)
    assert len(quick) <= 4  # the whole quick profile must stay under 8 minutes
    assert {(c.params["mode"], c.params["causal"]) for c in quick} == {
        (m, causal) for m in ("fwd", "fwd+bwd") for causal in (False, True)}
    for c in quick:
        assert c.quick and (c.params["D"], c.params["S"], c.params["B"], c.params["H"]) == \
            (128, 4096, 4, 16)
    assert {c.id for c in quick} < {c.id for c in att.cases(False)}
    # a case off the grid (a probe's) is never in --quick
    assert not att.make_case("fwd", 4096, 128, False, batch=1, heads=2).quick
    family = registry.get_family("attention")
    assert [i.name for i in family.implementations if not i.quick] == [
        "fusedops-triton-deterministic", "flex-attention", "flash-attn-4"]


def test_registry():
    assert "attention" in registry.family_names()
    family = registry.get_family("attention")
    assert family.name == "attention" and family is att.FAMILY
    assert [i.name for i in family.implementations] == NAMES
    assert [i.name for i in family.implementations if not i.baseline] == NAMES[:3]
    assert family.ratio_baselines == ("sdpa-flash", "sdpa-cudnn")
    assert family.bound == "compute" and family.panel_key == "mode"
    assert "4·B·H·S²·D" in family.formulas and "2.5×" in family.formulas


def test_make_inputs_on_cpu():
    case, inputs = _small("bwd", True)
    for name in ("q", "k", "v"):
        assert inputs[name].shape == (2, 3, 37, 16) and inputs[name].requires_grad
        assert inputs[name].dtype == torch.float32
        assert inputs[name].std() > 0.5  # random, never zeros
    assert inputs["grad_out"].shape == (2, 3, 37, 16) and not inputs["grad_out"].requires_grad
    _, fwd = _small("fwd", False)
    assert fwd["grad_out"] is None and not fwd["q"].requires_grad
    bf16 = att.make_inputs(att.make_case("fwd", 64, 32, False, batch=1, heads=2), "cpu")
    assert bf16["q"].dtype == torch.bfloat16


# --- the timed callables on CPU ---------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
def test_eager_math_callable(mode, causal):
    case, inputs = _small(mode, causal)
    fn = att.FAMILY.implementation("eager-math").setup(case, [inputs])
    _check(case, inputs, fn())
    assert inputs["q"].grad is None  # autograd.grad: nothing accumulates between calls
    if mode == "bwd":
        _check(case, inputs, fn())  # the kept graph serves every call


def test_reference_causal_mask():
    """Query i sees keys j <= i: the first query attends to the first key alone, and a
    change to the last key moves only the last query's output."""
    _, inputs = _small("fwd", True)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    mask = att.causal_mask(37, "cpu")
    assert mask.sum() == 37 * 36 // 2 and not mask.diagonal().any()
    out = att.reference(q, k, v, mask)
    assert torch.allclose(out[:, :, 0], v[:, :, 0], atol=1e-6)
    k2 = k.clone()
    k2[:, :, -1] += 1.0
    out2 = att.reference(q, k2, v, mask)
    assert torch.equal(out[:, :, :-1], out2[:, :, :-1])
    assert not torch.equal(out[:, :, -1], out2[:, :, -1])


def test_bwd_mode_times_the_backward_alone():
    """The forward runs once, when the callable is made; every call is one backward over
    the kept graph, and rotation keeps one graph per input set."""
    calls = []

    def forward(q, k, v):
        calls.append(1)
        return att.reference(q, k, v)

    case = _small("bwd", False)[0]
    sets = [att.make_inputs(case, "cpu") for _ in range(2)]
    fn = att._rotating(forward, case, sets)
    assert len(calls) == 2  # one forward per input set, made untimed
    first, second, third = fn(), fn(), fn()
    assert len(calls) == 2
    _check(case, sets[0], first)
    _check(case, sets[1], second)
    for g, h in zip(first, third):
        assert torch.equal(g, h)
    fwdbwd = att._bind(forward, att.make_case("fwd+bwd", 37, 16, False, batch=2, heads=3,
                                              dtype="float32"), sets[0])
    fwdbwd()
    assert len(calls) == 3  # fwd+bwd runs the forward inside every call


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
def test_sdpa_flash_callable(mode, causal):
    """SDPA forced onto its flash backend, on CPU (torch's CPU flash kernel: the same
    call the CUDA backend gets; is_causal means the same mask)."""
    case, inputs = _small(mode, causal)
    _check(case, inputs, att.FAMILY.implementation("sdpa-flash").setup(case, [inputs])(),
           rtol=1e-4)


def test_sdpa_probe_reports_a_backend_that_cannot_run():
    """A forced SDPA backend that has no kernel for a call is a skip with torch's reasons;
    one that runs it is no reason at all."""
    case = att.make_case("fwd+bwd", 4096, 128, True, dtype="float32")
    reason = att.sdpa_probe_reason("EFFICIENT_ATTENTION", case, "cpu")  # no CPU kernel
    assert reason.startswith("SDPA's EFFICIENT_ATTENTION backend does not run D=128 float32 "
                             "causal forward+backward")
    assert att.sdpa_probe_reason("FLASH_ATTENTION", case, "cpu") is None


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flex_attention_forward(causal):
    """flex_attention with the case's block mask (uncompiled: on CPU it has no backward
    and compiling takes a while; the benchmark compiles the same call)."""
    case, inputs = _small("fwd", causal)
    forward = att.flex_forward(case, "cpu", compiled=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention warns when it is not compiled
        out = att._bind(forward, case, inputs)()
    _check(case, inputs, out, rtol=1e-5)


@pytest.fixture
def fake_flash_attn_4(monkeypatch):
    """A stand-in ``flash_attn.cute.interface``: FlashAttention's (B, S, H, D) layout, the
    (out, lse) return, computed by float32 torch."""
    calls = []

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, **kwargs):
        assert q.is_contiguous() and q.shape[1] == 37  # (B, S, H, D), not a strided view
        calls.append(causal)
        mask = att.causal_mask(q.shape[1], q.device) if causal else None
        out = att.reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        return out.transpose(1, 2), torch.zeros(q.shape[0], q.shape[2], q.shape[1])

    modules = {}
    for name in ("flash_attn", "flash_attn.cute", "flash_attn.cute.interface"):
        modules[name] = types.ModuleType(name)
        modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, modules[name])
    modules["flash_attn.cute.interface"].flash_attn_func = flash_attn_func
    return calls


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
def test_flash_attn_4_callable_layout(fake_flash_attn_4, mode, causal):
    case, inputs = _small(mode, causal)
    out = att.FAMILY.implementation("flash-attn-4").setup(case, [inputs])()
    assert fake_flash_attn_4 == [causal]
    _check(case, inputs, out, layout=lambda t: t.transpose(1, 2))
    assert inputs["q"].grad is None  # it worked on its own copies


def test_flash_attn_4_installed_needs_cuda(fake_flash_attn_4):
    reason = att.FAMILY.implementation("flash-attn-4").unavailable()
    assert reason == (None if torch.cuda.is_available() else "needs a CUDA device")


# --- skip reasons -----------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="the reasons given without a GPU")
def test_without_cuda_only_eager_and_fusedops_can_run():
    import fusedops

    for name in ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex-attention"):
        assert att.FAMILY.implementation(name).unavailable().startswith("needs a CUDA device")
    assert att.FAMILY.implementation("eager-math").unavailable() is None
    if importlib.util.find_spec("flash_attn") is None:
        assert att.FAMILY.implementation("flash-attn-4").unavailable() == \
            "flash-attn-4 is not installed"
    for tier in ("triton", "cuda"):
        if fusedops.backends()[tier] is not None:
            assert att.FAMILY.implementation(f"fusedops-{tier}").unavailable() == \
                fusedops.backends()[tier]


def test_flash_attn_4_missing_gives_the_package():
    if importlib.util.find_spec("flash_attn") is None:
        assert att.FAMILY.implementation("flash-attn-4").unavailable() == \
            "flash-attn-4 is not installed"


def test_eager_math_skips_huge_score_matrices():
    impl = att.FAMILY.implementation("eager-math")
    skipped = [c for c in att.cases(False) if impl.unsupported(c) is not None]
    # 2^26·S/D bytes per score matrix: over 8 GiB only at D=64, S=16384 (16 GiB)
    assert {(c.params["D"], c.params["S"]) for c in skipped} == {(64, 16384)}
    assert len(skipped) == 6  # 3 modes x full, causal
    reason = impl.unsupported(skipped[0])
    assert "16 GiB" in reason and "8 GiB" in reason and "score matrix" in reason
    assert impl.unsupported(att.make_case("fwd+bwd", 16384, 128, True)) is None  # 8 GiB


@pytest.mark.parametrize("tier", ["triton", "cuda"])
def test_missing_or_unimplemented_attention_is_skipped(monkeypatch, tier):
    helpers.assert_missing_or_unimplemented_op_is_skipped(
        monkeypatch, att, "attention", tier,
        raises=f"backend {tier!r} was forced but has no attention", says="has no attention")


def test_unsupported_case_of_a_tier_is_skipped(monkeypatch):
    """A tier that covers attention but not one head dimension skips those cases alone,
    probing each (D, dtype, masking, mode) once, with a tiny call forced onto the tier."""
    import fusedops

    seen = []

    def attention(q, k, v, *, causal=False, **kwargs):
        seen.append((q.shape, causal))
        if q.shape[-1] == 256:
            raise NotImplementedError("D=256 is not in the Triton kernels")
        return att.reference(q.float(), k.float(), v.float()).to(q.dtype)

    monkeypatch.setattr(fusedops, "attention", attention, raising=False)
    monkeypatch.setattr(att, "_case_probes", {})
    impl = att.FAMILY.implementation("fusedops-triton")
    big = att.make_case("fwd+bwd", 4096, 256, True)
    reason = impl.unsupported(big)
    assert reason == ("fusedops.attention does not run D=256 bfloat16 causal "
                      "forward+backward on triton: D=256 is not in the Triton kernels")
    assert seen == [((1, att.PROBE_HEADS, att.PROBE_SEQLEN, 256), True)]  # a tiny call
    assert impl.unsupported(big) == reason and len(seen) == 1  # probed once
    assert impl.unsupported(att.make_case("fwd", 4096, 128, False)) is None


@pytest.mark.skipif(importlib.util.find_spec("fusedops") is None, reason="needs fusedops")
def test_fusedops_callable_matches_eager_on_the_torch_tier():
    """The fusedops implementations' callable, forced onto the torch tier (CPU)."""
    import fusedops

    if not hasattr(fusedops, "attention"):
        pytest.skip("fusedops.attention does not exist yet")
    for mode in ("fwd", "bwd", "fwd+bwd"):
        case, inputs = _small(mode, True)
        _check(case, inputs, att._fusedops_tier("torch").setup(case, [inputs])(), rtol=1e-4)


# --- the CLI and the writers ------------------------------------------------------------


def test_list_shows_attention(capsys):
    text, quick = helpers.listings(capsys, "attention")
    assert "\nattention: " in text
    assert "bwd_B1_H8_S16384_D256_causal_bfloat16" in text
    assert quick.count("[quick]") == 4
    assert "fwd+bwd_B4_H16_S4096_D128_causal_bfloat16 " in quick
    assert "bwd_B4" not in quick.replace("fwd+bwd_B4", "")
    assert "flex-attention (not in --quick)" in quick
    assert "flash-attn-4 (not in --quick)" in quick


def test_markdown_shows_the_flash_and_cudnn_ratios():
    case = att.make_case("fwd", 4096, 128, False)
    medians_ms = {"sdpa-flash": 1.6, "sdpa-cudnn": 1.0, "fusedops-triton": 1.28}
    records, text = helpers.markdown_of(att.FAMILY, case, medians_ms)
    assert "× sdpa-flash" in text and "× sdpa-cudnn" in text
    assert "1.25×" in text and "0.78×" in text  # 1.6 / 1.28 and 1.0 / 1.28
    row = next(r for r in records if r["implementation"] == "fusedops-triton")
    assert row["tflops"] == pytest.approx(4 * 4 * 16 * 4096 * 4096 * 128 / 1.28e-3 / 1e12)


def test_runner_skips_with_the_reasons(tmp_path):
    """Through the runner: a baseline that cannot run here is a skipped record with its
    reason, and so is eager-math on a case whose score matrix is too big."""
    records = {}
    impls = [i for i in att.FAMILY.implementations if i.baseline and i.name != "eager-math"]
    store = store_mod.ResultsStore(tmp_path / "a.json", "attention", "cpu", fresh=True)
    runner = helpers.cpu_runner(att.FAMILY, store, quick=False)
    outcome = runner_mod.Outcome()
    huge = att.make_case("fwd", 16384, 64, False)
    for impl in impls + [att.FAMILY.implementation("eager-math")]:
        if impl.unavailable() is None and impl.name != "eager-math":
            continue  # it would be measured: not this test's business
        records[impl.name] = runner._one(huge, impl, [], None, outcome)
    assert all(r["status"] == "skipped" and r["reason"] for r in records.values())
    assert "score matrix" in records["eager-math"]["reason"]
    if not torch.cuda.is_available():
        assert records["sdpa-flash"]["reason"] == "needs a CUDA device"


def test_sdpa_math_agrees_with_the_reference():
    """The semantics every implementation is held to: SDPA's default scale and is_causal."""
    _, inputs = _small("fwd", True)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    want = att.reference(q, k, v, att.causal_mask(37, "cpu"))
    got = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (got - want).norm() <= 1e-5 * want.norm()
