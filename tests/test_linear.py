"""fusedops.linear and FusedLinear on every tier that has them, against float64 torch."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, HAS_CUDA
from reference import assert_close

import fusedops
from fusedops.ops import linear as linear_op

ACTIVATIONS = [None, "relu", "gelu", "gelu_tanh", "silu"]
# (M, K, N): size 1, odd sizes, zero-sized M and K.
SHAPES = [(1, 1, 1), (17, 33, 5), (5, 0, 3), (0, 4, 3), (9, 17, 33)]
if HAS_CUDA:
    SHAPES += [(4097, 1031, 257), (1, 4097, 17)]


def reference(x, weight, bias, residual, activation):
    z = F.linear(x, weight, bias)
    if residual is not None:
        z = z + residual
    if activation is None:
        return z
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    return {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[activation](z)


@pytest.fixture
def linear_tier(tier):
    """Tiers that implement the fused linear (the others skip, saying so)."""
    if not hasattr(fusedops.dispatch.TIERS[tier], "linear_fwd"):
        pytest.skip(f"the {tier} tier has no fused linear yet")
    return tier


def dtype_for_tier(tier, dtype):
    """The CUDA tier multiplies float32 only in tf32, and these tests keep torch's default
    full-precision float32: its runs of the float32 cases use float16 inputs instead,
    compared at float16's tolerance (test_linear_cuda_gemm.py tests tf32)."""
    return torch.float16 if tier == "cuda" and dtype == torch.float32 else dtype


def check(tier, shape, dtype, activation, with_bias, with_residual, *, batch=(), factor=1.0,
          transpose_input=False, positive=False):
    rows, inner, features = shape
    dtype = dtype_for_tier(tier, dtype)

    def make(*size):
        values = torch.randn(*size, device=DEVICE)
        return (values.abs() + 0.5 if positive else values).to(dtype)

    if transpose_input:
        x = make(*batch, inner, rows).transpose(-1, -2)
    else:
        x = make(*batch, rows, inner)
    weight = make(features, inner) / max(inner, 1) ** 0.5
    bias = make(features) if with_bias else None
    residual = make(*batch, rows, features) if with_residual else None
    leaves = [t for t in (x, weight, bias, residual) if t is not None]
    ours = [t.detach().clone().requires_grad_() for t in leaves]
    theirs = [t.detach().double().requires_grad_() for t in leaves]

    def unpack(tensors):
        it = iter(tensors)
        x_, w_ = next(it), next(it)
        b_ = next(it) if with_bias else None
        r_ = next(it) if with_residual else None
        return x_, w_, b_, r_

    xo, wo, bo, ro = unpack(ours)
    with fusedops.use_backend(tier):
        out = fusedops.linear(xo, wo, bo, activation=activation, residual=ro)
    ref = reference(*unpack(theirs), activation)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, "output", factor)
    upstream = torch.randn_like(ref)
    ref.backward(upstream)
    out.backward(upstream.to(dtype))
    for name, mine, expected in zip(("input", "weight", "bias", "residual"),
                                    (xo, wo, bo, ro), unpack(theirs)):
        if mine is None:
            continue
        assert mine.grad.dtype == dtype, name
        assert_close(mine.grad, expected.grad, dtype, f"grad of {name}", factor)


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["no_residual", "residual"])
def test_values_and_gradients_float32(linear_tier, shape, activation, with_bias,
                                      with_residual):
    # A lone element whose z cancels (x*w + b + r ~ 0) or sits where act'(z) ~ 0 has a
    # relative error that means nothing; positive inputs keep 1x1x1 well conditioned.
    check(linear_tier, shape, torch.float32, activation, with_bias, with_residual,
          positive=shape == (1, 1, 1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_half_precision(linear_tier, dtype, activation):
    if linear_tier == "triton" and dtype == torch.bfloat16 and not HAS_CUDA:
        pytest.skip("bf16 tl.dot is wrong in Triton's interpreter; covered on the GPU")
    check(linear_tier, (17, 33, 9), dtype, activation, True, True)


def test_many_rows(linear_tier):
    # M = 4097: more row blocks than any tile size divides (one combination: the interpreter
    # pays per program instance).
    check(linear_tier, (4097, 17, 5), torch.float32, "gelu", True, True)


def test_leading_batch_dimensions_and_transposed_input(linear_tier):
    check(linear_tier, (5, 7, 3), torch.float32, "silu", True, True, batch=(2, 3))
    check(linear_tier, (6, 9, 4), torch.float32, "gelu", True, False, transpose_input=True)


def test_one_dimensional_input(linear_tier):
    dtype = dtype_for_tier(linear_tier, torch.float32)
    x = torch.randn(7, device=DEVICE, dtype=dtype, requires_grad=True)
    weight = torch.randn(4, 7, device=DEVICE, dtype=dtype, requires_grad=True)
    with fusedops.use_backend(linear_tier):
        out = fusedops.linear(x, weight, activation="relu")
    assert out.shape == (4,)
    ref = F.relu(F.linear(x.double(), weight.double()))
    assert_close(out, ref, dtype, "1-D output")


def test_tf32_follows_torch(monkeypatch):
    seen = []
    original = linear_op.LinearFunction.apply

    def spy(*args):
        seen.append(args[-1])
        return original(*args)

    monkeypatch.setattr(linear_op.LinearFunction, "apply", spy)
    x, weight = torch.randn(3, 4, device=DEVICE), torch.randn(5, 4, device=DEVICE)
    previous = torch.get_float32_matmul_precision()
    try:
        for precision, expected in (("highest", False), ("high", True), ("medium", True)):
            torch.set_float32_matmul_precision(precision)
            fusedops.linear(x, weight)
            assert seen[-1] is expected, precision
        torch.set_float32_matmul_precision("high")
        fusedops.linear(x.half(), weight.half())  # tf32 is about float32 only
        assert seen[-1] is False
    finally:
        torch.set_float32_matmul_precision(previous)


def test_autocast_gives_linears_dtype():
    x = torch.randn(5, 8, device=DEVICE)
    weight = torch.randn(3, 8, device=DEVICE, requires_grad=True)
    residual = torch.randn(5, 3, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        ours = fusedops.linear(x, weight, activation="gelu", residual=residual)
        theirs = F.linear(x, weight)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    ref = F.gelu(F.linear(x.bfloat16().double(), weight.bfloat16().double())
                 + residual.bfloat16().double())
    assert_close(ours, ref, torch.bfloat16, "autocast output")
    ours.float().sum().backward()
    assert weight.grad.dtype == torch.float32


BAD_CALLS = {
    "in_features": (dict(weight=torch.randn(3, 5)), ValueError, "in_features"),
    "weight 1-D": (dict(weight=torch.randn(4)), ValueError, "2-D"),
    "dtype": (dict(weight=torch.randn(3, 4, dtype=torch.float64)), TypeError, "dtype"),
    "bias shape": (dict(bias=torch.randn(4)), ValueError, r"bias must have shape \(3,\)"),
    "residual shape": (dict(residual=torch.randn(2, 4)), ValueError, "residual must have"),
    "activation": (dict(activation="tanh"), ValueError, "activation must be one of"),
    "activation type": (dict(activation=1), TypeError, "activation"),
    "integer input": (dict(input=torch.ones(2, 4, dtype=torch.int32)), TypeError, "input"),
    "device": (dict(bias=torch.randn(3, device="meta")), ValueError, "bias is on"),
    "not a tensor": (dict(weight=[[1.0] * 4] * 3), TypeError, "weight must be a Tensor"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS), ids=str)
def test_bad_input_is_a_clear_error(case):
    overrides, error, message = BAD_CALLS[case]
    kwargs = dict(input=torch.randn(2, 4), weight=torch.randn(3, 4))
    kwargs.update(overrides)
    with pytest.raises(error, match=message):
        fusedops.linear(kwargs.pop("input"), kwargs.pop("weight"), **kwargs)


def test_fused_linear_module_is_an_nn_linear():
    plain = torch.nn.Linear(7, 5, device=DEVICE)
    fused = fusedops.nn.FusedLinear(7, 5, device=DEVICE, activation="gelu_tanh")
    assert isinstance(fused, torch.nn.Linear)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(3, 7, device=DEVICE)
    assert_close(fused(x), F.gelu(plain(x), approximate="tanh").double(), torch.float32, "module")
    assert "activation='gelu_tanh'" in repr(fused)
    with pytest.raises(ValueError, match="activation"):
        fusedops.nn.FusedLinear(3, 4, activation="swish")


def test_from_linear_shares_parameters():
    plain = torch.nn.Linear(6, 4, bias=False, device=DEVICE)
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.1)
    fused = fusedops.nn.FusedLinear.from_linear(plain, activation="relu")
    assert fused.weight is plain.weight and fused.bias is None
    assert fused.activation == "relu"
    before = plain.weight.detach().clone()
    fused(torch.randn(3, 6, device=DEVICE)).sum().backward()
    optimizer.step()  # the optimizer built before still owns the parameter that moved
    assert not torch.equal(plain.weight, before)
    with pytest.raises(TypeError, match="nn.Linear"):
        fusedops.nn.FusedLinear.from_linear(torch.nn.Conv2d(1, 1, 1))


def test_torch_tier_linear_ops_pass_opcheck():
    from fusedops.dispatch import torch_ref

    x, weight = torch.randn(5, 7), torch.randn(3, 7)
    bias, residual = torch.randn(3), torch.randn(5, 3)
    for activation in ("none", "relu", "silu"):
        torch.library.opcheck(torch_ref.linear_fwd,
                              (x, weight, bias, residual, activation, False))
        torch.library.opcheck(torch_ref.linear_bwd,
                              (torch.randn(5, 3), x, weight, torch.randn(5, 3), activation, False,
                               True, True, True, True))
    torch.library.opcheck(torch_ref.linear_weight_grad_accumulate,
                          (torch.randn(5, 3), x, torch.zeros(3, 7), torch.zeros(3), False))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiles_without_graph_breaks(backend):
    torch._dynamo.reset()
    module = fusedops.nn.FusedLinear(8, 6, activation="silu").to(DEVICE)
    x = torch.randn(4, 8, device=DEVICE, requires_grad=True)
    residual = torch.randn(4, 6, device=DEVICE)
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    out = compiled(x, residual)
    out.sum().backward()
    x64 = x.detach().double().requires_grad_()
    ref = F.silu(F.linear(x64, module.weight.double(), module.bias.double()) + residual.double())
    ref.sum().backward()
    assert_close(out, ref, torch.float32, "compiled output")
    assert_close(x.grad, x64.grad, torch.float32, "compiled input grad")
