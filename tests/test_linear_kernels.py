"""Kernel-level tests of the Triton tier's fused linear: ``linear_fwd`` / ``linear_bwd``.

Compared with torch's own ops (F.linear, the activations, autograd) in float64 on the same
inputs upcast. On a machine without CUDA they run in Triton's interpreter (conftest), where
only float32 and float16 are meaningful (bfloat16 tl.dot is wrong there) and the sizes stay
tiny: the interpreter pays per program instance. Every output is NaN-poisoned before the
launch (conftest), so an element no program writes fails.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, HAS_CUDA
from reference import assert_close

import fusedops

pytestmark = pytest.mark.skipif(fusedops.backends()["triton"] is not None,
                                reason=f"triton tier unavailable: "
                                       f"{fusedops.backends()['triton']}")

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")
DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if HAS_CUDA else ())
TORCH_ACT = {"none": lambda z: z, "relu": F.relu, "gelu": F.gelu,
             "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "silu": F.silu}


def tier():
    from fusedops.dispatch import triton as triton_tier

    return triton_tier


def randn(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=DEVICE, dtype=dtype)


def reference(x, w, b, r, activation, grad_out):
    """out, z and every gradient in float64 through torch's autograd."""
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    b64 = b.detach().double().requires_grad_() if b is not None else None
    z = F.linear(x64, w64, b64)
    if r is not None:
        z = z + r.double()
    z.retain_grad()
    out = TORCH_ACT[activation](z)
    out.backward(grad_out.double())
    return {"out": out.detach(), "z": z.detach(), "grad_input": x64.grad,
            "grad_weight": w64.grad, "grad_bias": z.grad.sum(0), "grad_preact": z.grad}


def run(x, w, b, r, activation, grad_out, needs=(True, True, True, True), allow_tf32=False):
    t = tier()
    out, saved = t.linear_fwd(x, w, b, r, activation, allow_tf32)
    kept = out if activation == "relu" else saved
    grads = t.linear_bwd(grad_out, x, w, kept, activation, allow_tf32, *needs)
    return out, saved, dict(zip(("grad_input", "grad_weight", "grad_bias", "grad_preact"),
                                grads, strict=True))


def check(x, w, b, r, activation, grad_out, dtype, factor=1.0, **kwargs):
    out, saved, grads = run(x, w, b, r, activation, grad_out, **kwargs)
    ref = reference(x, w, b, r, activation, grad_out)
    assert out.dtype == dtype and out.shape == ref["out"].shape and out.is_contiguous()
    assert_close(out, ref["out"], dtype, "out", factor)
    if activation in ("gelu", "gelu_tanh", "silu"):
        assert saved.dtype == dtype
        assert_close(saved, ref["z"], dtype, "saved z", factor)
    else:
        assert saved.shape == (0,)
    for name, grad in grads.items():
        assert_close(grad, ref[name], dtype, name, factor)
    return out, grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias,residual", [(False, False), (True, False), (True, True),
                                           (False, True)])
def test_forward_backward(dtype, activation, bias, residual):
    m, n, k = 33, 17, 40
    x, w, g = randn(m, k, dtype=dtype), randn(n, k, dtype=dtype), randn(m, n, dtype=dtype)
    b = randn(n, dtype=dtype) if bias else None
    r = randn(m, n, dtype=dtype) if residual else None
    _, grads = check(x, w, b, r, activation, g, dtype)
    assert grads["grad_weight"].dtype == dtype and grads["grad_bias"].dtype == dtype


@pytest.mark.parametrize("m,n,k", list(itertools.product((0, 1, 17, 33), repeat=3)))
def test_odd_sizes(m, n, k):
    dtype = torch.float32
    x, w, g = randn(m, k, dtype=dtype), randn(n, k, dtype=dtype), randn(m, n, dtype=dtype)
    check(x, w, randn(n, dtype=dtype), randn(m, n, dtype=dtype), "silu", g, dtype)


@pytest.mark.parametrize("needs", list(itertools.product((False, True), repeat=4)))
def test_needs_flags(needs):
    dtype = torch.float16
    m, n, k = 17, 33, 17
    x, w, g = randn(m, k, dtype=dtype), randn(n, k, dtype=dtype), randn(m, n, dtype=dtype)
    b = randn(n, dtype=dtype)
    _, _, grads = run(x, w, b, None, "gelu", g, needs=needs)
    ref = reference(x, w, b, None, "gelu", g)
    for needed, (name, grad) in zip(needs, grads.items(), strict=True):
        if needed:
            assert grad.dtype == dtype, name
            assert_close(grad, ref[name], dtype, name)
        else:
            assert grad.shape == (0,), name


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_non_contiguous(activation):
    dtype = torch.float32
    m, n, k = 17, 33, 17
    x = randn(m, 2 * k, dtype=dtype)[:, ::2]                  # strided columns
    w = randn(k, n, dtype=dtype).t()                          # column-major weight
    b = randn(2 * n, dtype=dtype)[::2]                        # strided bias
    r = randn(n, m, dtype=dtype).t()                          # transposed residual
    g = randn(n, m, dtype=dtype).t()                          # transposed grad_out
    assert not any(t.is_contiguous() for t in (x, w, b, r, g))
    check(x, w, b, r, activation, g, dtype)


def test_non_contiguous_saved():
    dtype = torch.float32
    m, n, k = 17, 33, 17
    x, w, g = randn(m, k, dtype=dtype), randn(n, k, dtype=dtype), randn(m, n, dtype=dtype)
    t = tier()
    _, z = t.linear_fwd(x, w, None, None, "gelu_tanh", False)
    z_t = z.t().contiguous().t()  # same values, column-major
    grads = t.linear_bwd(g, x, w, z_t, "gelu_tanh", False, True, True, True, True)
    ref = reference(x, w, None, None, "gelu_tanh", g)
    for name, grad in zip(("grad_input", "grad_weight", "grad_bias", "grad_preact"), grads,
                          strict=True):
        assert_close(grad, ref[name], dtype, name)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu", "relu"])
def test_saturating_activations_stay_finite(activation):
    """|z| ~ 1e3: the exps inside the activations must neither overflow nor give NaN."""
    dtype = torch.float32
    m, n, k = 17, 17, 17
    x, w = randn(m, k, dtype=dtype, scale=30.0), randn(n, k, dtype=dtype, scale=30.0)
    g = randn(m, n, dtype=dtype)
    # z ~ 1e3 carries ~1e-4 absolute float32 rounding whatever the kernel does, and act'(z)
    # near z = 0 turns it into ~1e-4 relative error in dz: the point here is finiteness.
    out, grads = check(x, w, None, None, activation, g, dtype, factor=10.0)
    assert torch.isfinite(out).all() and all(torch.isfinite(v).all() for v in grads.values())


def test_allow_tf32():
    dtype = torch.float32
    m, n, k = 33, 17, 33
    x, w, g = randn(m, k, dtype=dtype), randn(n, k, dtype=dtype), randn(m, n, dtype=dtype)
    check(x, w, randn(n, dtype=dtype), None, "gelu", g, dtype, factor=50.0, allow_tf32=True)


def test_unsupported_reasons():
    t = tier()
    x = torch.randn(3, 4, device=DEVICE)
    w = torch.randn(5, 4, device=DEVICE)
    assert t.linear_unsupported(x, w, None, None, "gelu") is None
    assert "float64" in t.linear_unsupported(x.double(), w.double(), None, None, "gelu")
    assert t.linear_unsupported(x, w.half(), None, None, "none") is not None
    assert t.linear_unsupported(x, w, None, None, "tanh") is not None


@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_opcheck(activation):
    t = tier()
    dtype = torch.float32
    m, n, k = 3, 5, 4
    x, w, g = randn(m, k, dtype=dtype), randn(n, k, dtype=dtype), randn(m, n, dtype=dtype)
    b, r = randn(n, dtype=dtype), randn(m, n, dtype=dtype)
    torch.library.opcheck(t.linear_fwd, (x, w, b, r, activation, False))
    out, saved = t.linear_fwd(x, w, b, r, activation, False)
    kept = out if activation == "relu" else saved
    torch.library.opcheck(t.linear_bwd, (g, x, w, kept, activation, False, True, True, True,
                                         True))
    torch.library.opcheck(t.linear_bwd, (g, x, w, kept, activation, False, False, True, False,
                                         True))
    torch.library.opcheck(t.linear_weight_grad_accumulate,
                          (g, x, torch.zeros(n, k), torch.zeros(n), False))


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", [(17, 33, 9), (1, 5, 1), (0, 4, 3), (6, 0, 5)],
                         ids=lambda s: "x".join(map(str, s)))
def test_weight_grad_accumulate_adds_in_place(shape, with_bias):
    t = tier()
    m, n, k = shape
    dtype = torch.float16
    grad_weight = randn(n, k, dtype=torch.float32)
    grad_bias = randn(n, dtype=torch.float32) if with_bias else None
    expected_w = grad_weight.double().clone()
    expected_b = grad_bias.double().clone() if with_bias else None
    for _ in range(2):  # two chunks, each added on top
        g, x = randn(m, n, dtype=dtype), randn(m, k, dtype=dtype)
        t.linear_weight_grad_accumulate(g, x, grad_weight, grad_bias, False)
        expected_w += g.double().T @ x.double()
        if with_bias:
            expected_b += g.double().sum(dim=0)
    assert grad_weight.dtype == torch.float32
    assert_close(grad_weight, expected_w, dtype, "accumulated grad_weight")
    if with_bias:
        assert_close(grad_bias, expected_b, dtype, "accumulated grad_bias")
