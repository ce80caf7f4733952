"""The linear and linear_cross_entropy benchmark families without a GPU: no timings.

FLOP and byte formulas, the case grids and the ``--quick`` contents, the registry and
``--list``, the skip reasons of unavailable implementations, and the timed callables of
the baselines on small CPU tensors (they compute the op, or its gradients).
"""

from __future__ import annotations

import importlib

import bench_helpers as helpers
import pytest
import torch
import torch.nn.functional as F
from bench_package import load

registry = load("registry")
lin = load("cases_linear")
lce = load("cases_linear_cross_entropy")
report = load("report")


# --- linear: counts ---------------------------------------------------------------------


def test_linear_flops():
    m, k, n = 16384, 4096, 14336
    assert lin.flops(lin.make_case("fwd", m, k, n)) == 2 * m * n * k
    # backward: grad input (2·M·N·K) + grad weight (2·M·N·K)
    assert lin.flops(lin.make_case("fwd+bwd", m, k, n)) == 6 * m * n * k
    assert lin.flops(lin.make_case("fwd+bwd", m, k, n, residual=True)) == 6 * m * n * k


def test_linear_bytes_forward():
    m, k, n, e = 4096, 14336, 4096, 2
    # read x, W, b; write the output
    assert lin.bytes_moved(lin.make_case("fwd", m, k, n)) == m * k * e + n * k * e + n * e \
        + m * n * e
    # + read the residual
    assert lin.bytes_moved(lin.make_case("fwd", m, k, n, residual=True)) == \
        m * k * e + n * k * e + n * e + 2 * m * n * e
    # float32 doubles everything; no bias drops its term
    assert lin.bytes_moved(lin.make_case("fwd", 8, 16, 32, dtype="float32", bias=False)) == \
        4 * (8 * 16 + 32 * 16 + 8 * 32)


def test_linear_bytes_forward_backward():
    m, k, n, e = 16384, 4096, 4096, 2
    forward = m * k * e + n * k * e + n * e + m * n * e
    z = m * n * e  # the pre-activation gelu' needs, written in the forward, read back
    backward = (m * n * e + z) + (m * k * e + n * k * e) + (m * k * e + n * k * e + n * e)
    assert lin.bytes_moved(lin.make_case("fwd+bwd", m, k, n)) == forward + z + backward
    with_residual = lin.bytes_moved(lin.make_case("fwd+bwd", m, k, n, residual=True))
    assert with_residual == forward + z + backward + 2 * m * n * e  # read r, write grad r
    # relu and no activation keep no pre-activation
    plain = lin.bytes_moved(lin.make_case("fwd+bwd", m, k, n, activation=None))
    assert plain == forward + backward - z


def test_linear_input_bytes():
    case = lin.make_case("fwd+bwd", 8, 16, 32, residual=True)
    assert lin.input_bytes(case) == 2 * (8 * 16 + 32 * 16 + 32 + 8 * 32 + 8 * 32)
    assert lin.input_bytes(lin.make_case("fwd", 8, 16, 32)) == 2 * (8 * 16 + 32 * 16 + 32)


# --- linear: cases ----------------------------------------------------------------------


def test_linear_case_grid():
    full = lin.cases(False)
    shapes = {(m, k, n) for m in (4096, 16384)
              for k, n in ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192))}
    gemm_only = [c for c in full if not c.params["bias"]]  # the plain 8192³ GEMM, forward
    assert [(c.params["mode"], c.params["M"], c.params["K"], c.params["N"],
             c.params["activation"], c.quick) for c in gemm_only] == [
        ("fwd", 8192, 8192, 8192, None, True)]
    full = [c for c in full if c.params["bias"]]
    plain = [c for c in full if not c.params["residual"]]
    assert len(plain) == 2 * len(shapes) and len(full) == len(plain) + 2
    assert {(c.params["M"], c.params["K"], c.params["N"]) for c in plain} == shapes
    assert {c.params["mode"] for c in full} == {"fwd", "fwd+bwd"}
    for c in full:
        assert c.params["dtype"] == "bfloat16"
        assert c.params["activation"] == "gelu_tanh"
    residual = [c for c in full if c.params["residual"]]
    assert {c.params["mode"] for c in residual} == {"fwd", "fwd+bwd"}
    assert len({c.id for c in full}) == len(full)


def test_linear_quick():
    quick = lin.cases(True)
    assert {c.id for c in quick} < {c.id for c in lin.cases(False)}
    assert all(c.quick for c in quick)
    for mode in ("fwd", "fwd+bwd"):  # the brief's minimum: M=16384, K=N=4096, both modes
        assert any(c.params["mode"] == mode and not c.params["residual"]
                   and (c.params["M"], c.params["K"], c.params["N"]) == (16384, 4096, 4096)
                   for c in quick)
    assert len(quick) <= 5  # the whole quick profile must stay under 8 minutes
    family = registry.get_family("linear")
    assert [i.name for i in family.implementations if not i.quick] == ["torch.compile"]


def test_linear_registry():
    family = registry.get_family("linear")
    names = [i.name for i in family.implementations]
    assert names == ["fusedops-triton", "fusedops-cuda", "addmm", "addmm_activation", "eager",
                     "torch.compile"]
    assert [i.name for i in family.implementations if not i.baseline] == names[:2]
    assert family.bound == "compute" and family.ratio_baselines[0] == "addmm"
    assert set(family.ratio_baselines) <= set(names)


# --- linear: the timed callables on CPU -------------------------------------------------


def _small_linear(mode, residual=False):
    case = lin.make_case(mode, 24, 40, 16, residual=residual, dtype="float32")
    return case, lin.make_inputs(case, "cpu")


def _reference64(inputs, activation="gelu_tanh", bias=True, residual=True):
    leaf = helpers.float64_leaf
    x, w = leaf(inputs["input"]), leaf(inputs["weight"])
    b = leaf(inputs["bias"]) if bias else None
    r = leaf(inputs["residual"]) if residual else None
    z = F.linear(x, w, b) + (r if r is not None else 0)
    if activation == "gelu_tanh":
        z = F.gelu(z, approximate="tanh")
    return z, [t for t in (x, w, b, r) if t is not None]


def test_linear_make_inputs_on_cpu():
    case, inputs = _small_linear("fwd+bwd", residual=True)
    assert inputs["input"].shape == (24, 40) and inputs["weight"].shape == (16, 40)
    assert inputs["bias"].shape == (16,) and inputs["residual"].shape == (24, 16)
    assert inputs["grad_out"].shape == (24, 16) and not inputs["grad_out"].requires_grad
    assert all(inputs[k].requires_grad for k in ("input", "weight", "bias", "residual"))
    assert inputs["input"].std() > 0.5  # random, never zeros
    fwd = lin.make_inputs(lin.make_case("fwd", 4, 8, 8, dtype="float32"), "cpu")
    assert fwd["grad_out"] is None and fwd["residual"] is None
    assert not fwd["input"].requires_grad


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_linear_eager_callable(mode, residual):
    case, inputs = _small_linear(mode, residual)
    out = lin.FAMILY.implementation("eager").setup(case, [inputs])()
    ref, leaves = _reference64(inputs, residual=residual)
    if mode == "fwd":
        helpers.assert_close64(out, ref, 1e-5)
        return
    want = torch.autograd.grad(ref, leaves, inputs["grad_out"].double())
    helpers.assert_all_close64(out, want, 1e-5)  # x, W, b (and r)
    assert inputs["input"].grad is None  # autograd.grad: nothing accumulates


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_linear_addmm_callable(mode):
    """addmm is the bare GEMM + bias, even in the residual case: the cuBLAS rate."""
    case, inputs = _small_linear(mode, residual=True)
    out = lin.FAMILY.implementation("addmm").setup(case, [inputs])()
    ref, leaves = _reference64(inputs, activation=None, residual=False)
    if mode == "fwd":
        helpers.assert_close64(out, ref, 1e-5)
    else:
        want = torch.autograd.grad(ref, leaves, inputs["grad_out"].double())
        helpers.assert_all_close64(out, want, 1e-5)


@pytest.mark.parametrize("residual", [False, True])
def test_linear_addmm_activation_callable(residual):
    case, inputs = _small_linear("fwd", residual)
    out = lin.FAMILY.implementation("addmm_activation").setup(case, [inputs])()
    ref, _ = _reference64(inputs, residual=residual)
    # CUDA's epilogue is the tanh GELU; the CPU kernel uses the erf GELU (they differ < 1e-3)
    assert (out.double() - ref).abs().max() < 2e-3


def test_linear_addmm_activation_is_forward_only():
    case, inputs = _small_linear("fwd+bwd")
    assert "forward only" in lin.addmm_activation_unsupported(case)
    with pytest.raises(NotImplementedError, match="no autograd derivative"):
        lin.FAMILY.implementation("addmm_activation").setup(case, [inputs])
    assert lin.addmm_activation_unsupported(lin.make_case("fwd", 8, 8, 8)) is None
    assert "silu" in lin.addmm_activation_unsupported(
        lin.make_case("fwd", 8, 8, 8, activation="silu"))


# --- fusedops tiers: skip reasons -------------------------------------------------------


@pytest.mark.parametrize("module", [lin, lce], ids=["linear", "linear_cross_entropy"])
def test_unavailable_tier_gives_the_backends_reason(module):
    helpers.assert_unavailable_tiers_give_the_backends_reason(module.FAMILY)


@pytest.mark.parametrize("module, op", [(lin, "linear"), (lce, "linear_cross_entropy")],
                         ids=["linear", "linear_cross_entropy"])
def test_missing_or_unimplemented_op_is_skipped(monkeypatch, module, op):
    helpers.assert_missing_or_unimplemented_op_is_skipped(
        monkeypatch, module, op, "triton",
        raises="backend 'triton' was forced but cannot run this call", says="forced")


def test_missing_libraries_give_reasons():
    if importlib.util.find_spec("liger_kernel") is None:
        assert "not installed" in lce.FAMILY.implementation("liger").unavailable()
    if importlib.util.find_spec("cut_cross_entropy") is None:
        for name in ("cce", "cce-filtered"):
            assert "cut-cross-entropy is not installed" == \
                lce.FAMILY.implementation(name).unavailable()


# --- linear_cross_entropy: counts, cases, callables -------------------------------------


def test_lce_counts():
    t, h, v, e = 16384, 4096, 128256, 2
    fwd, both = lce.make_case("fwd"), lce.make_case("fwd+bwd")
    assert lce.flops(fwd) == 2 * t * h * v + 4 * t * v
    assert lce.flops(both) == 6 * t * h * v + 8 * t * v
    forward = t * h * e + v * h * e + 8 * t + 4 * t
    assert lce.bytes_moved(fwd) == forward
    assert lce.bytes_moved(both) == forward + 2 * (t * h * e + v * h * e)
    assert lce.input_bytes(fwd) == t * h * e + v * h * e + 8 * t


def test_lce_memory_reference():
    case = lce.make_case("fwd+bwd")
    assert lce.logits_bytes(case) == 16384 * 128256 * 2
    assert lce.memory_fraction(case, lce.logits_bytes(case) // 4) == pytest.approx(0.25)
    family = registry.get_family("linear_cross_entropy")
    assert family.extra["memory_reference_bytes"](case) == lce.logits_bytes(case)
    assert "logits" in family.description and "peak" in family.formulas.lower()


def test_lce_cases_and_registry():
    full = lce.cases(False)
    assert [c.params["mode"] for c in full] == ["fwd", "fwd+bwd"]
    for c in full:
        assert (c.params["T"], c.params["H"], c.params["V"]) == (16384, 4096, 128256)
        assert c.params["dtype"] == "bfloat16" and c.params["reduction"] == "mean"
    assert [c.id for c in lce.cases(True)] == ["fwd+bwd_T16384_H4096_V128256_bfloat16"]
    family = registry.get_family("linear_cross_entropy")
    names = [i.name for i in family.implementations]
    assert names == ["fusedops-triton", "fusedops-cuda", "eager", "torch.compile", "liger",
                     "cce", "cce-filtered"]
    assert [i.name for i in family.implementations if not i.baseline] == names[:2]
    assert [i.name for i in family.implementations if not i.quick] == ["cce-filtered"]
    assert set(family.ratio_baselines) <= set(names)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_lce_eager_callable(mode):
    case = lce.make_case(mode, 300, 24, 97, dtype="float32")
    inputs = lce.make_inputs(case, "cpu")
    x, w, t = inputs["input"], inputs["weight"], inputs["target"]
    assert x.requires_grad == w.requires_grad == (mode != "fwd")
    kept = t[t != lce.IGNORE_INDEX]
    assert kept.min() >= 0 and kept.max() < 97
    x64, w64 = (a.detach().double().requires_grad_(True) for a in (x, w))
    ref = F.cross_entropy(x64 @ w64.T, t, ignore_index=lce.IGNORE_INDEX)
    out = lce.FAMILY.implementation("eager").setup(case, [inputs])()
    if mode == "fwd":
        assert abs(out.item() - ref.item()) <= 1e-5 * abs(ref.item())
    else:
        helpers.assert_all_close64(out, torch.autograd.grad(ref, (x64, w64)), 1e-5)
        assert x.grad is None and w.grad is None


def test_lce_make_inputs_logit_scale():
    case = lce.make_case("fwd", 512, 256, 1000, dtype="float32")
    inputs = lce.make_inputs(case, "cpu")
    logits = inputs["input"] @ inputs["weight"].T
    assert 0.7 < logits.std().item() < 1.4  # W scaled by H^-1/2
    ignored = (inputs["target"] == lce.IGNORE_INDEX).float().mean().item()
    assert ignored < 0.05  # ~1% ignore_index
    big = lce.make_inputs(lce.make_case("fwd", 20000, 8, 50, dtype="float32"), "cpu")
    assert 0.005 < (big["target"] == lce.IGNORE_INDEX).float().mean().item() < 0.02


# --- the CLI and the writers ------------------------------------------------------------


def test_list_shows_the_new_families(capsys):
    assert report.main(["--list"]) == 0
    text = capsys.readouterr().out
    assert "\nlinear: " in text and "\nlinear_cross_entropy: " in text
    assert "fwd+bwd_M16384_K14336_N4096_bfloat16_gelu_tanh" in text
    assert "fwd_T16384_H4096_V128256_bfloat16" in text
    assert report.main(["--list", "--quick"]) == 0
    quick = capsys.readouterr().out
    assert "fwd_M16384_K4096_N4096_bfloat16_gelu_tanh " in quick
    assert "fwd+bwd_M16384_K4096_N4096_bfloat16_gelu_tanh " in quick
    assert "M=4096 K=8192" not in quick and "fwd_T16384" not in quick
    assert "torch.compile (not in --quick)" in quick and "cce-filtered (not in --quick)" in quick
    assert report.main(["--list", "--family", "linear_cross_entropy"]) == 0
    assert "linear:" not in capsys.readouterr().out.replace("linear_cross_entropy:", "")


def test_linear_markdown_shows_the_cublas_ratio(tmp_path):
    case = lin.make_case("fwd", 16384, 4096, 4096)
    medians_ms = {"addmm": 0.9, "eager": 1.5, "fusedops-triton": 1.0}
    records, text = helpers.markdown_of(lin.FAMILY, case, medians_ms, peak_memory_bytes=2**27)
    assert "× addmm" in text and "0.90×" in text  # 90% of cuBLAS on the same shape
    assert "2·M·N·K" in text
    row = next(r for r in records if r["implementation"] == "fusedops-triton")
    assert row["tflops"] == pytest.approx(2 * 16384 * 4096 * 4096 / 1e-3 / 1e12)


@pytest.mark.parametrize("module, op", [(lin, "linear"), (lce, "linear_cross_entropy")],
                         ids=["linear", "linear_cross_entropy"])
def test_fusedops_callables_match_eager_on_the_torch_tier(module, op):
    """The fusedops implementations' callables, forced onto the torch tier (CPU)."""
    import fusedops

    if not hasattr(fusedops, op):
        pytest.skip(f"fusedops.{op} does not exist yet")
    if module is lin:
        case = lin.make_case("fwd+bwd", 24, 40, 16, residual=True, dtype="float32")
    else:
        case = lce.make_case("fwd+bwd", 64, 32, 100, dtype="float32")
    inputs = module.make_inputs(case, "cpu")
    got = module._fusedops_tier("torch").setup(case, [inputs])()
    want = module.FAMILY.implementation("eager").setup(case, [inputs])()
    helpers.assert_all_close64(got, [w.double() for w in want], 1e-4)
