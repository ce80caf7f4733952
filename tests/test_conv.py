"""fusedops.conv2d on every tier that has it, against float64 F.conv2d with autograd.

``fusedops.conv2d(x, w, b, stride, padding, dilation, groups, activation=a, residual=r)``
must equal ``a(F.conv2d(x, w, b, stride, padding, dilation, groups) + r)``: the output and
the gradients of all four tensors are compared with the same computation in float64 on the
same (low-precision) inputs, upcast; the output's memory format with F.conv2d's on the same
inputs. Tiers with no fused convolution skip; a kernel tier runs the cases its kernels
cover and raises NotImplementedError, when forced, for those they decline.

Under Triton's CPU interpreter every program instance and every loop step costs time: the
shapes here stay tiny (a handful of output pixels and channels), and the cases are a list
of representative combinations, not the cross product of every option.
"""

import importlib.util
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, HAS_CUDA
from reference import assert_close

import fusedops
from fusedops.ops import conv as conv_op

ACTIVATIONS = [None, "relu", "gelu", "gelu_tanh", "silu"]
CL = torch.channels_last
# torch's own note on an even kernel with "same" padding (its padded copy), not ours.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
HALF_DTYPES = [torch.float16]
if HAS_CUDA:
    HALF_DTYPES.append(torch.bfloat16)


@pytest.fixture(autouse=True)
def _full_precision(cudnn_full_precision_float32):
    """Every test here compares float32 at 1e-5 (see conftest)."""


def skip_unsupported(tier, dtype, groups=1, channels=None):
    if tier == "triton" and dtype == torch.bfloat16 and DEVICE.type == "cpu":
        pytest.skip("bfloat16 tl.dot is wrong in Triton's interpreter; covered on the GPU")
    if tier == "cuda" and dtype == torch.float32 and not (groups != 1 and groups == channels):
        pytest.skip("the CUDA implicit-GEMM kernels multiply float32 only in tf32, which these "
                    "full-precision tests switch off (test_conv_cuda.py runs tf32)")
    if (tier == "triton" and groups != 1 and groups == channels
            and importlib.util.find_spec("fusedops.triton_kernels.conv_depthwise") is None):
        pytest.skip("the Triton depthwise kernel has not landed yet")


def tier_float(tier):
    """The dtype of the tests below that use float32: float16 on the CUDA tier, whose
    implicit-GEMM kernels multiply float32 only in tf32, off here (compared at float16's
    tolerance there)."""
    return torch.float16 if tier == "cuda" else torch.float32


class Case(NamedTuple):
    name: str
    shape: tuple               # input (N, C, H, W), or (C, H, W) unbatched
    out_channels: int
    kernel: object             # int or (kH, kW)
    stride: object = 1
    padding: object = 0
    dilation: object = 1
    groups: int = 1
    activation: str | None = "gelu"
    bias: bool = True
    residual: bool = True
    input_cl: bool = False     # the input in channels_last
    weight_cl: bool = False    # the weight in channels_last


# Kernels 1, 3, 5, 7 and rectangular; strides 1, 2 and (2, 1); padding 0, int, pair, "same"
# (odd kernel, even kernel with uneven splits, dilated), "valid"; dilation 2; odd spatial
# sizes; channel counts 3, 5, 13; batch 1, 2 and unbatched; depthwise with multipliers 1
# and 2; all four combinations of NCHW and channels_last input and weight (the output's
# layout checked against F.conv2d's, the residual always in the other format); every
# activation somewhere; with and without bias and residual.
CASES = [
    Case("1x1-batch1-15x7", (1, 13, 15, 7), 5, 1, activation="gelu"),
    Case("1x1-stride2-cl-9x13", (2, 5, 9, 13), 3, 1, stride=2, activation="relu",
         input_cl=True),
    Case("3x3-pad1", (1, 5, 5, 7), 13, 3, padding=1, activation="relu"),
    Case("3x3-stride2-pair-pad", (1, 3, 11, 7), 5, 3, stride=2, padding=(1, 0),
         activation="silu", bias=False),
    Case("3x3-dilation2", (1, 5, 7, 7), 5, 3, padding=2, dilation=2, activation=None),
    Case("3x3-valid", (2, 3, 5, 7), 5, 3, padding="valid", activation="gelu_tanh",
         residual=False),
    Case("3x3-same-cl", (1, 5, 5, 7), 3, 3, padding="same", input_cl=True, weight_cl=True),
    Case("4x2-same-uneven", (1, 3, 5, 7), 5, (4, 2), padding="same", dilation=(1, 3),
         activation="silu"),
    Case("2x2-same-dilation3", (2, 3, 5, 7), 3, 2, padding="same", dilation=3,
         activation="relu", bias=False, residual=False),
    Case("5x5-stride21", (1, 3, 5, 7), 5, 5, stride=(2, 1), padding=2,
         activation="gelu_tanh", residual=False),
    Case("7x7-stride2-stem", (1, 3, 5, 5), 5, 7, stride=2, padding=3, activation="relu",
         input_cl=True),
    Case("1x5-pair-pad", (2, 5, 5, 7), 3, (1, 5), padding=(0, 2), activation="gelu",
         weight_cl=True),
    Case("unbatched-3x3", (5, 5, 7), 3, 3, padding=1, activation="gelu"),
    Case("unbatched-1x1-no-bias", (13, 5, 7), 5, 1, activation=None, bias=False),
    Case("depthwise-3x3", (2, 13, 5, 7), 13, 3, padding=1, groups=13, activation="relu",
         input_cl=True),
    Case("depthwise-x2-stride2-9x13", (2, 5, 9, 13), 10, 3, stride=2, padding=1, groups=5,
         activation="silu"),
    Case("depthwise-5x5-same-dil2", (1, 3, 9, 7), 3, 5, padding="same", dilation=2,
         groups=3, activation=None, bias=False),
    Case("depthwise-unbatched", (5, 5, 7), 5, 3, padding=1, groups=5, activation="gelu",
         residual=False),
]
CASE_IDS = [case.name for case in CASES]


def activate(z, activation):
    if activation is None:
        return z
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    return {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[activation](z)


def layout(t):
    """(contiguous, channels_last): how a conv output is laid out (3-D: as its 4-D view)."""
    t = t.unsqueeze(0) if t.dim() == 3 else t
    return t.is_contiguous(), t.is_contiguous(memory_format=CL)


def in_other_layout(t, like):
    """``t`` stored in the other memory format than ``like`` (a 3-D one: channel-last)."""
    if t.dim() == 3:
        return t.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    if like.is_contiguous():
        return t.to(memory_format=CL)
    return t.contiguous()


def make_inputs(case, dtype):
    """x, weight, bias, residual (in ``dtype``) and the expected F.conv2d output layout."""
    channels = case.shape[-3]
    kernel = (case.kernel, case.kernel) if isinstance(case.kernel, int) else case.kernel
    fan_in = channels // case.groups * kernel[0] * kernel[1]
    x = torch.randn(case.shape, device=DEVICE).to(dtype)
    weight = (torch.randn(case.out_channels, channels // case.groups, *kernel, device=DEVICE)
              / fan_in ** 0.5).to(dtype)
    if case.input_cl:
        x = x.to(memory_format=CL)
    if case.weight_cl:
        weight = weight.to(memory_format=CL)
    bias = torch.randn(case.out_channels, device=DEVICE).to(dtype) if case.bias else None
    expected = F.conv2d(x, weight, bias, case.stride, case.padding, case.dilation, case.groups)
    residual = None
    if case.residual:
        residual = in_other_layout(torch.randn(expected.shape, device=DEVICE).to(dtype),
                                   expected)
    return x, weight, bias, residual, expected


def run(tier, case, dtype, *, backend=None, factor=1.0):
    """Run ``case`` on ``tier`` and compare the output and every gradient with float64."""
    x, weight, bias, residual, expected = make_inputs(case, dtype)
    ours = [t if t is None else t.detach().clone().requires_grad_()
            for t in (x, weight, bias, residual)]
    theirs = [t if t is None else t.detach().double().requires_grad_()
              for t in (x, weight, bias, residual)]
    with fusedops.use_backend(backend or tier):
        out = fusedops.conv2d(*ours[:3], case.stride, case.padding, case.dilation, case.groups,
                              activation=case.activation, residual=ours[3])
    xr, wr, br, rr = theirs
    z = F.conv2d(xr, wr, br, case.stride, case.padding, case.dilation, case.groups)
    ref = activate(z if rr is None else z + rr, case.activation)
    assert out.dtype == dtype and out.shape == ref.shape
    assert layout(out) == layout(expected), (
        f"output strides {out.stride()} but F.conv2d gives {expected.stride()}")
    assert_close(out, ref, dtype, "output", factor)

    upstream = torch.randn(ref.shape, device=DEVICE).to(dtype)
    out.backward(upstream)
    ref.backward(upstream.double())
    for name, mine, expected_leaf in zip(("input", "weight", "bias", "residual"), ours, theirs):
        if mine is None:
            continue
        assert mine.grad is not None, f"no gradient for {name}"
        assert mine.grad.dtype == dtype and mine.grad.shape == mine.shape, name
        assert_close(mine.grad, expected_leaf.grad, dtype, f"grad of {name}", factor)
    return out


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_values_and_gradients_float32(conv_tier, case):
    skip_unsupported(conv_tier, torch.float32, case.groups, case.shape[-3])
    run(conv_tier, case, torch.float32)


HALF_CASES = [case for case in CASES if case.name in (
    "1x1-stride2-cl-9x13", "3x3-stride2-pair-pad", "4x2-same-uneven",
    "depthwise-x2-stride2-9x13", "unbatched-3x3")]


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("case", HALF_CASES, ids=[case.name for case in HALF_CASES])
def test_values_and_gradients_half(conv_tier, case, dtype):
    skip_unsupported(conv_tier, dtype, case.groups, case.shape[-3])
    run(conv_tier, case, dtype)


ACTIVATION_CASE = Case("3x3-every-activation", (1, 3, 5, 5), 3, 3, padding=1)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_every_activation(conv_tier, activation, dtype):
    skip_unsupported(conv_tier, dtype)
    run(conv_tier, ACTIVATION_CASE._replace(activation=activation, input_cl=True), dtype)


def test_non_contiguous_views(conv_tier):
    """Sliced (strided) input, weight and residual views: read through their strides."""
    dtype = tier_float(conv_tier)
    x = torch.randn(1, 5, 5, 14, device=DEVICE, dtype=dtype)[..., ::2]  # (1, 5, 5, 7)
    weight = torch.randn(5, 8, 3, 3, device=DEVICE, dtype=dtype).transpose(0, 1)[:6] / 5
    residual = torch.randn(1, 6, 7, 5, device=DEVICE, dtype=dtype).transpose(2, 3)  # (1, 6, 5, 7)
    # weight: (6, 5, 3, 3)
    assert not any(t.is_contiguous() for t in (x, weight, residual))
    leaves = [t.requires_grad_() for t in (x, weight, residual)]
    with fusedops.use_backend(conv_tier):
        out = fusedops.conv2d(x, weight, padding=1, activation="gelu", residual=residual)
    reference = [t.detach().double().requires_grad_() for t in leaves]
    ref = F.gelu(F.conv2d(reference[0], reference[1], padding=1) + reference[2])
    assert layout(out) == layout(F.conv2d(x.detach(), weight.detach(), padding=1))
    assert_close(out, ref, dtype, "output")
    upstream = torch.randn(ref.shape, device=DEVICE, dtype=dtype)
    out.backward(upstream)
    ref.backward(upstream.double())
    for name, mine, expected in zip(("input", "weight", "residual"), leaves, reference):
        assert_close(mine.grad, expected.grad, dtype, f"grad of {name}")


# A convolution F.conv2d reads as channels_last although is_contiguous() is also true (a
# 1x1 or depthwise weight, a single input channel), or an unbatched input whose 4-D view
# torch does not read as channels_last: the output must still be laid out as F.conv2d's.
LAYOUT_CORNERS = [
    pytest.param((2, 5, 9, 13), False, (7, 5, 1, 1), True, 1,
                 id="1x1-weight-cl-input-nchw"),
    pytest.param((2, 5, 9, 13), False, (5, 1, 3, 3), True, 5,
                 id="depthwise-weight-cl-input-nchw"),
    pytest.param((2, 1, 9, 13), True, (4, 1, 3, 3), False, 1,
                 id="one-channel-input-cl"),
    pytest.param((2, 5, 9, 13), True, (7, 5, 1, 1), True, 1, id="1x1-weight-cl-input-cl"),
    pytest.param((1, 5, 9, 13), True, (4, 5, 3, 3), False, 1, id="batch1-input-cl"),
]


@pytest.mark.parametrize("x_shape,input_cl,w_shape,weight_cl,groups", LAYOUT_CORNERS)
def test_ambiguous_layouts_follow_f_conv2d(x_shape, input_cl, w_shape, weight_cl, groups):
    x = torch.randn(x_shape, device=DEVICE)
    weight = torch.randn(w_shape, device=DEVICE)
    # .to() restrides even a tensor that is_contiguous() in both formats, as
    # model.to(memory_format=torch.channels_last) does; .contiguous() would leave it.
    x = x.to(memory_format=CL) if input_cl else x
    weight = weight.to(memory_format=CL) if weight_cl else weight
    expected = F.conv2d(x, weight, padding=1, groups=groups)
    out = fusedops.conv2d(x, weight, padding=1, groups=groups)
    assert_close(out, expected.double(), torch.float32, "output")
    assert layout(out) == layout(expected), (
        f"output strides {out.stride()} but F.conv2d gives {expected.stride()}")


def test_unbatched_channel_last_input_layout_follows_f_conv2d():
    x = torch.randn(9, 13, 5, device=DEVICE).permute(2, 0, 1)   # (C, H, W), C innermost
    weight = torch.randn(4, 5, 3, 3, device=DEVICE)
    expected = F.conv2d(x, weight)
    out = fusedops.conv2d(x, weight)
    assert_close(out, expected.double(), torch.float32, "output")
    assert out.stride() == expected.stride()


def test_batch_of_one_and_every_gradient_optional(conv_tier):
    """Batch 1, and each leaf on its own requiring grad (the others get none)."""
    dtype = tier_float(conv_tier)
    case = Case("batch1", (1, 5, 7, 9), 3, 3, stride=2, padding=1, activation="gelu")
    x, weight, bias, residual, _ = make_inputs(case, dtype)
    tensors = (x, weight, bias, residual)
    for index in range(4):
        leaves = [t.detach().clone().requires_grad_(i == index) for i, t in enumerate(tensors)]
        with fusedops.use_backend(conv_tier):
            out = fusedops.conv2d(*leaves[:3], 2, 1, activation="gelu", residual=leaves[3])
        (grad,) = torch.autograd.grad(out.square().sum(), (leaves[index],))
        reference = [t.detach().double().requires_grad_(i == index)
                     for i, t in enumerate(tensors)]
        ref = F.gelu(F.conv2d(*reference[:3], 2, 1) + reference[3])
        (ref_grad,) = torch.autograd.grad(ref.square().sum(), (reference[index],))
        assert_close(grad, ref_grad, dtype, f"grad of leaf {index} alone")


def test_groups_neither_one_nor_channels(conv_tier):
    """groups=2 (not 1, not C): the torch tier computes it; a kernel tier declines it when
    forced (NotImplementedError naming the reason), and auto hands it to the torch tier."""
    case = Case("groups2", (2, 6, 7, 9), 4, 3, padding=1, groups=2, activation="relu",
                input_cl=True)
    if conv_tier == "torch":
        run(conv_tier, case, torch.float32)
        return
    x, weight, bias, residual, _ = make_inputs(case, torch.float32)
    with fusedops.use_backend(conv_tier), pytest.raises(
            NotImplementedError, match=r"forced but cannot run this call: .*groups"):
        fusedops.conv2d(x, weight, bias, 1, 1, 1, 2, activation="relu", residual=residual)
    run(conv_tier, case, torch.float32, backend="auto")


def test_empty_batch(conv_tier):
    """N = 0: an empty output, and weight and bias gradients that are exactly zero (never
    the NaN the outputs are poisoned with), as F.conv2d gives."""
    dtype = tier_float(conv_tier)
    x = torch.randn(0, 5, 7, 9, device=DEVICE, dtype=dtype, requires_grad=True)
    weight = torch.randn(3, 5, 3, 3, device=DEVICE, dtype=dtype, requires_grad=True)
    bias = torch.randn(3, device=DEVICE, dtype=dtype, requires_grad=True)
    with fusedops.use_backend(conv_tier):
        out = fusedops.conv2d(x, weight, bias, padding=1, activation="gelu")
    assert out.shape == (0, 3, 7, 9)
    grads = torch.autograd.grad(out.sum(), (x, weight, bias))
    expected = torch.autograd.grad(F.gelu(F.conv2d(x, weight, bias, padding=1)).sum(),
                                   (x, weight, bias))
    for name, got, want in zip(("input", "weight", "bias"), grads, expected):
        assert got.shape == want.shape and torch.equal(got, want), name


def test_float64_on_the_torch_tier():
    case = Case("f64", (2, 5, 7, 9), 3, 3, stride=2, padding=(1, 2), activation="silu")
    run("torch", case, torch.float64)


def test_no_grad_builds_no_graph(conv_tier):
    dtype = tier_float(conv_tier)
    case = Case("no_grad", (1, 5, 5, 7), 3, 3, padding=1, activation="gelu")
    x, weight, bias, residual, _ = make_inputs(case, dtype)
    weight.requires_grad_()
    with fusedops.use_backend(conv_tier), torch.no_grad():
        out = fusedops.conv2d(x, weight, bias, padding=1, activation="gelu", residual=residual)
    assert out.grad_fn is None and not out.requires_grad
    ref = F.gelu(F.conv2d(x.double(), weight.detach().double(), bias.double(), padding=1)
                 + residual.double())
    assert_close(out, ref, dtype, "no_grad output")


def autocast_dtype(tier):
    # bfloat16 tl.dot is wrong in Triton's interpreter: float16 autocast there.
    return torch.float16 if tier == "triton" and DEVICE.type == "cpu" else torch.bfloat16


def test_autocast_gives_conv2ds_dtype(conv_tier):
    dtype = autocast_dtype(conv_tier)
    x = torch.randn(1, 5, 5, 7, device=DEVICE)
    weight = torch.randn(3, 5, 3, 3, device=DEVICE, requires_grad=True)
    bias = torch.randn(3, device=DEVICE, requires_grad=True)
    residual = torch.randn(1, 3, 5, 7, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=dtype), fusedops.use_backend(conv_tier):
        ours = fusedops.conv2d(x, weight, bias, padding=1, activation="silu", residual=residual)
        theirs = F.conv2d(x, weight, bias, padding=1)
    assert ours.dtype == theirs.dtype == dtype
    ref = F.silu(F.conv2d(*(t.detach().to(dtype).double() for t in (x, weight, bias)),
                          padding=1) + residual.to(dtype).double())
    assert_close(ours, ref, dtype, "autocast output")
    ours.float().sum().backward()
    assert weight.grad.dtype == bias.grad.dtype == torch.float32
    assert torch.isfinite(weight.grad).all() and torch.isfinite(bias.grad).all()


def test_autocast_accepts_mixed_input_dtypes():
    x = torch.randn(2, 5, 7, 9, device=DEVICE).bfloat16()   # the previous layer's output
    weight = torch.randn(3, 5, 3, 3, device=DEVICE, requires_grad=True)
    bias = torch.randn(3, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        theirs = F.conv2d(x, weight, bias, padding=1)
        ours = fusedops.conv2d(x, weight, bias, padding=1, activation="relu")
    assert ours.dtype == theirs.dtype
    assert_close(ours, F.relu(theirs.double()), torch.bfloat16, "autocast output")


def test_tf32_follows_cudnn_allow_tf32(monkeypatch):
    """The tf32 flag reaching the tiers is torch.backends.cudnn.allow_tf32 (for float32 CUDA
    tensors only: torch's CPU convs never use tf32), and float32 on the torch tier equals
    F.conv2d under either setting."""
    seen = []
    original = conv_op.ConvFunction.apply

    def spy(*args):
        seen.append(args[-1])
        return original(*args)

    monkeypatch.setattr(conv_op.ConvFunction, "apply", spy)
    x = torch.randn(2, 5, 7, 9, device=DEVICE)
    weight = torch.randn(3, 5, 3, 3, device=DEVICE)
    previous = torch.backends.cudnn.allow_tf32
    try:
        for allowed in (False, True):
            torch.backends.cudnn.allow_tf32 = allowed
            with fusedops.use_backend("torch"):
                out = fusedops.conv2d(x, weight, padding=1)
            assert seen[-1] is (allowed and DEVICE.type == "cuda")
            factor = 100.0 if allowed and DEVICE.type == "cuda" else 1.0   # tf32: ~5e-4
            assert_close(out, F.conv2d(x, weight, padding=1).double(), torch.float32,
                         f"allow_tf32={allowed}", factor)
            fusedops.conv2d(x.half(), weight.half(), padding=1)   # tf32 is about float32
            assert seen[-1] is False
    finally:
        torch.backends.cudnn.allow_tf32 = previous


def test_cuda_tier_takes_float32_only_with_tf32():
    """The CUDA tier's conv2d_unsupported: float32 through the implicit GEMM (tf32 only) is
    declined, naming torch.backends.cudnn.allow_tf32, unless that allows tf32; depthwise
    float32 (exact) and the 16-bit types are never declined for their dtype."""
    cuda = fusedops.dispatch.TIERS["cuda"]
    x = torch.randn(1, 8, 5, 5)
    w = torch.randn(4, 8, 3, 3)
    depthwise_w = torch.randn(8, 1, 3, 3)
    previous = torch.backends.cudnn.allow_tf32
    try:
        for allowed in (False, True):
            torch.backends.cudnn.allow_tf32 = allowed
            reason = cuda.conv2d_unsupported(x, w, None, None, 1, "none")
            assert ("allow_tf32" in reason) is not allowed, reason
            for args in ((x, depthwise_w, None, None, 8, "relu"),
                         (x.half(), w.half(), None, None, 1, "none")):
                reason = cuda.conv2d_unsupported(*args)
                assert "allow_tf32" not in reason and "float" not in reason, reason
        # Only the device keeps these CPU tensors from the tier once tf32 is allowed.
        assert "not on a CUDA device" in cuda.conv2d_unsupported(x, w, None, None, 1, "none")
    finally:
        torch.backends.cudnn.allow_tf32 = previous


# --- custom ops and torch.compile -------------------------------------------------------


def _ops(tier):
    module = fusedops.dispatch.TIERS[tier]
    if tier == "cuda":
        module.load()
    return (getattr(torch.ops.fusedops, f"conv2d_fwd_{tier}").default,
            getattr(torch.ops.fusedops, f"conv2d_bwd_{tier}").default)


# (x shape, channels_last, weight shape, bias, residual, geometry, groups, activation, needs):
# geometry = (stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, out_h, out_w).
OPCHECK_CASES = {
    "3x3-stride2-gelu-cl": ((1, 3, 5, 7), True, (4, 3, 3, 3), True, True,
                            (2, 2, 1, 1, 1, 1, 3, 4), 1, "gelu", (True, True, True, True)),
    "uneven-same-none": ((1, 3, 5, 5), False, (4, 3, 4, 2), False, True,
                         (1, 1, 1, 1, 1, 3, 5, 5), 1, "none", (True, False, False, True)),
    "depthwise-relu": ((1, 6, 5, 5), False, (12, 1, 3, 3), True, False,
                       (1, 1, 1, 1, 1, 1, 5, 5), 6, "relu", (False, True, True, False)),
}


@pytest.mark.parametrize("case", list(OPCHECK_CASES), ids=str)
def test_opcheck(conv_tier, case):
    (x_shape, channels_last, w_shape, with_bias, with_residual, geometry, groups, activation,
     needs) = OPCHECK_CASES[case]
    skip_unsupported(conv_tier, torch.float32, groups, x_shape[1])
    fwd_op, bwd_op = _ops(conv_tier)
    x = torch.randn(x_shape, device=DEVICE)
    if channels_last:
        x = x.to(memory_format=CL)
    weight = torch.randn(w_shape, device=DEVICE) / 3
    out_shape = (x_shape[0], w_shape[0], *geometry[-2:])
    bias = torch.randn(w_shape[0], device=DEVICE) if with_bias else None
    residual = torch.randn(out_shape, device=DEVICE) if with_residual else None
    fwd_args = (x, weight, bias, residual, *geometry, groups, activation, channels_last, False)
    torch.library.opcheck(fwd_op, fwd_args)
    out, saved = fwd_op(*fwd_args)
    assert out.shape == out_shape and layout(out)[1] == channels_last
    if activation == "relu":
        saved = out   # what ConvFunction keeps for relu
    torch.library.opcheck(bwd_op, (torch.randn_like(out), x, weight, saved, *geometry, groups,
                                   activation, False, *needs))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiles_without_graph_breaks(conv_tier, backend):
    torch._dynamo.reset()
    dtype = tier_float(conv_tier)
    x = torch.randn(1, 3, 5, 7, device=DEVICE, dtype=dtype).to(memory_format=CL)
    x.requires_grad_()
    weight = (torch.randn(4, 3, 3, 3, device=DEVICE, dtype=dtype) / 5).requires_grad_()
    bias = torch.randn(4, device=DEVICE, dtype=dtype, requires_grad=True)
    residual = torch.randn(1, 4, 3, 4, device=DEVICE, dtype=dtype, requires_grad=True)
    leaves = (x, weight, bias, residual)

    def step(x, weight, bias, residual):
        with fusedops.use_backend(conv_tier):
            out = fusedops.conv2d(x, weight, bias, stride=2, padding=1, activation="silu",
                                  residual=residual)
        return out.square().sum()

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    expected_loss = step(*leaves)
    expected = torch.autograd.grad(expected_loss, leaves)
    assert_close(loss, expected_loss, dtype, "compiled loss")
    for name, got, want in zip(("input", "weight", "bias", "residual"), grads, expected):
        assert_close(got, want, dtype, f"compiled grad of {name}")


# --- GPU only ---------------------------------------------------------------------------

RESNET_CASES = [
    Case("resnet-3x3-64", (8, 64, 56, 56), 64, 3, padding=1, activation="relu", input_cl=True,
         weight_cl=True),
    Case("resnet-1x1-256to64", (8, 256, 56, 56), 64, 1, activation="relu", residual=False,
         input_cl=True, weight_cl=True),
    Case("resnet-3x3-stride2-128", (8, 128, 28, 28), 128, 3, stride=2, padding=1,
         activation="gelu", bias=False),
    Case("depthwise-3x3-96-at-112", (8, 96, 112, 112), 96, 3, padding=1, groups=96,
         activation="silu", input_cl=True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", RESNET_CASES, ids=[case.name for case in RESNET_CASES])
def test_resnet_sized_bfloat16(conv_tier, case):
    skip_unsupported(conv_tier, torch.bfloat16, case.groups, case.shape[-3])
    run(conv_tier, case, torch.bfloat16)


@pytest.mark.gpu
def test_cuda_graph_capture(conv_tier):
    """Forward and backward captured after a warm-up call (autotuning happens outside the
    capture); a replay on new input values matches an eager step on them."""
    x = torch.randn(4, 32, 28, 28, device=DEVICE, dtype=torch.bfloat16)
    x = x.contiguous(memory_format=CL).requires_grad_()
    weight = (torch.randn(64, 32, 3, 3, device=DEVICE) / 17).bfloat16().requires_grad_()
    bias = torch.randn(64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    residual = torch.randn(4, 64, 28, 28, device=DEVICE, dtype=torch.bfloat16,
                           requires_grad=True)
    grad_out = torch.randn(4, 64, 28, 28, device=DEVICE, dtype=torch.bfloat16)
    leaves = (x, weight, bias, residual)

    def step():
        with fusedops.use_backend(conv_tier):
            out = fusedops.conv2d(x, weight, bias, padding=1, activation="gelu",
                                  residual=residual)
        return (out, *torch.autograd.grad(out, leaves, grad_out))

    step()  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        for leaf in leaves:
            leaf.copy_(torch.randn_like(leaf) * (0.2 if leaf is weight else 1.0))
        grad_out.copy_(torch.randn_like(grad_out))
    graph.replay()
    torch.cuda.synchronize()
    expected = step()
    for name, got, want in zip(("out", "input", "weight", "bias", "residual"), captured,
                               expected):
        assert torch.isfinite(got).all(), name
        assert_close(got, want, torch.bfloat16, f"replayed {name}")
