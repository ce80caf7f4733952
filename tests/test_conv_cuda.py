"""The CUDA tier's convolution kernels (csrc/conv/) on a GPU: the sm_80 implicit GEMM
(forward, input and weight gradients) with channel counts that are not multiples of 8 (the
zero-padded path), strides and dilations, and the depthwise kernel with a channel
multiplier, against float64 torch and against the Triton tier; float32 through the implicit
GEMM in tf32 when torch.backends.cudnn.allow_tf32 allows it, and refused when it does not.

test_conv.py and test_conv_module.py run the whole convolution suite on the CUDA tier
through the `tier` fixture; this file covers what is particular to its kernels.
"""

import pytest
import torch
import torch.nn.functional as F
from reference import assert_close

import fusedops

pytestmark = pytest.mark.gpu

CL = torch.channels_last
# (N, C, H, W), K, kernel, stride, padding, dilation, groups
CASES = [
    ((2, 3, 17, 19), 5, 3, 1, 1, 1, 1),      # C, K not multiples of 8
    ((2, 16, 15, 15), 24, 3, 2, 1, 1, 1),    # stride 2: input pixels some taps miss
    ((1, 8, 20, 21), 16, (3, 5), (2, 1), (2, 0), (2, 1), 1),
    ((3, 64, 14, 14), 128, 1, 2, 0, 1, 1),   # 1x1, stride 2 (ResNet downsample)
    ((2, 12, 13, 11), 24, 3, 1, 1, 1, 12),   # depthwise, multiplier 2
    ((2, 32, 16, 16), 32, 5, 2, 2, 1, 32),   # depthwise 5x5, stride 2
    # dgrad's stride phases (conv_gather.cuh): 1x1 stride 4 (15 of 16 phases have no tap:
    # zeroed by one memset), stride 3 with dilation 2, and a 1x1 stride-4 pad-1 layer on a
    # 3x3 input where no input pixel meets a tap at all.
    ((1, 16, 13, 13), 8, 1, 4, 0, 1, 1),
    ((2, 8, 17, 16), 16, 3, 3, 2, 2, 1),
    ((1, 8, 3, 3), 8, 1, 4, 1, 1, 1),
]


@pytest.fixture
def cuda_tier():
    reason = fusedops.backends()["cuda"]
    if reason is not None:
        pytest.skip(f"the CUDA tier is unavailable: {reason}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-K{c[1]}-k{c[2]}-s{c[3]}-g{c[6]}")
def test_against_float64_and_triton(cuda_tier, case, dtype):
    shape, features, kernel, stride, padding, dilation, groups = case
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = torch.randn(shape, device="cuda", dtype=dtype).to(memory_format=CL)
    fan_in = shape[1] // groups * kernel[0] * kernel[1]
    w = (torch.randn(features, shape[1] // groups, *kernel, device="cuda") / fan_in**0.5)
    w = w.to(dtype)
    b = torch.randn(features, device="cuda", dtype=dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    with fusedops.use_backend("cuda"):
        out = fusedops.conv2d(*leaves, stride, padding, dilation, groups, activation="silu")
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = F.silu(F.conv2d(*leaves64, stride, padding, dilation, groups))
    assert_close(out, ref, dtype, "output")
    upstream = torch.randn_like(ref)
    out.backward(upstream.to(dtype))
    ref.backward(upstream)
    for name, mine, theirs in zip(("input", "weight", "bias"), leaves, leaves64):
        assert_close(mine.grad, theirs.grad, dtype, f"grad of {name}")
    if fusedops.backends()["triton"] is None:
        with fusedops.use_backend("triton"):
            other = fusedops.conv2d(x, w, b, stride, padding, dilation, groups,
                                    activation="silu")
        assert_close(out, other.double(), dtype, "against the Triton tier", factor=2)


def test_depthwise_float32(cuda_tier):
    x = torch.randn(2, 24, 9, 10, device="cuda").to(memory_format=CL).requires_grad_()
    w = torch.randn(24, 1, 3, 3, device="cuda", requires_grad=True)
    with fusedops.use_backend("cuda"):
        out = fusedops.conv2d(x, w, padding=1, groups=24, activation="relu")
    ref = F.relu(F.conv2d(x.double(), w.double(), padding=1, groups=24))
    assert_close(out, ref, torch.float32, "depthwise float32 output")


# --- float32: tf32 on the implicit GEMM, only where torch.backends.cudnn.allow_tf32 allows it

# tf32 keeps 10 of float32's 23 mantissa bits (operands rounded to nearest): about 5e-4
# relative error per product, less in norm over a sum. A real bug (a wrong or missing element,
# a dropped tap or k block, a misplaced accumulator) costs 1e-2 or more in norm.
TF32_FACTOR = 500.0  # x float32's 1e-5: 5e-3

# (N, C, H, W), K, kernel, stride, padding, dilation: groups == 1 only.
TF32_CASES = [
    ((2, 3, 17, 19), 5, 3, 1, 1, 1),                 # C, K not multiples of 8: padded
    ((2, 20, 15, 13), 12, 3, 2, 1, 2),               # stride 2 with dilation 2
    ((1, 8, 20, 21), 16, (3, 5), (2, 1), (2, 0), (2, 1)),
    ((3, 64, 14, 14), 136, 1, 2, 0, 1),              # 1x1 stride 2, K past one tile
    ((2, 72, 23, 17), 40, 3, 1, 1, 1),               # depth 648: many k blocks, several taps
    ((4, 32, 30, 30), 64, 3, 1, 1, 1),               # 3600 pixels: wgrad split over them
]


@pytest.fixture
def tf32_allowed():
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32 = previous


@pytest.fixture
def tf32_off():
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = previous


@pytest.mark.parametrize("channels_last", [True, False], ids=["cl", "nchw"])
@pytest.mark.parametrize("case", TF32_CASES, ids=lambda c: f"{c[0]}-K{c[1]}-k{c[2]}-s{c[3]}")
def test_float32_in_tf32_against_float64(cuda_tier, tf32_allowed, case, channels_last):
    """Forward (bias, residual, activation), grad_input, grad_weight and grad_bias of float32
    on the forced CUDA tier, against float64 torch on the same inputs."""
    shape, features, kernel, stride, padding, dilation = case
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = torch.randn(shape, device="cuda")
    if channels_last:
        x = x.to(memory_format=CL)
    fan_in = shape[1] * kernel[0] * kernel[1]
    w = torch.randn(features, shape[1], *kernel, device="cuda") / fan_in**0.5
    b = torch.randn(features, device="cuda")
    out_shape = F.conv2d(x[:1, :, :, :], w, None, stride, padding, dilation).shape[2:]
    r = torch.randn(shape[0], features, *out_shape, device="cuda")
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, r)]
    with fusedops.use_backend("cuda"):
        out = fusedops.conv2d(*leaves[:3], stride, padding, dilation, activation="gelu",
                              residual=leaves[3])
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, b, r)]
    ref = F.gelu(F.conv2d(*leaves64[:3], stride, padding, dilation) + leaves64[3])
    assert out.dtype == torch.float32
    assert_close(out, ref, torch.float32, "tf32 output", TF32_FACTOR)
    upstream = torch.randn_like(ref)
    out.backward(upstream.float())
    ref.backward(upstream)
    for name, mine, theirs in zip(("input", "weight", "bias", "residual"), leaves, leaves64):
        assert mine.grad.dtype == torch.float32, name
        assert_close(mine.grad, theirs.grad, torch.float32, f"tf32 grad of {name}", TF32_FACTOR)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "dgrad-wgrad"])
def test_float32_tf32_rounds_operands(cuda_tier, tf32_allowed, monkeypatch, backward):
    """The sm_80 kernels round float32 operands to tf32 to nearest (cvt.rna) before the
    tensor cores see them: 1 + 3 * 2**-12 (3/4 of tf32's last place past 1) becomes
    1 + 2**-10, so a 1x1 convolution of 8 such channels with ones gives 8 + 2**-7 exactly,
    where float32 would give 8 + 3 * 2**-9 and truncation 8. The same for the gradients:
    grad_input sums 8 output channels of dz * w, grad_weight 16 pixels of dz * x."""
    monkeypatch.setenv("FUSEDOPS_CONV_PATH", "sm80")
    value = 1 + 3 * 2**-12
    x = torch.full((1, 8, 4, 4), value, device="cuda", requires_grad=backward)
    w = torch.full((8, 8, 1, 1), value if backward else 1.0, device="cuda",
                   requires_grad=backward)
    with fusedops.use_backend("cuda"):
        out = fusedops.conv2d(x, w)
    rounded = 1 + 2**-10
    if not backward:
        assert torch.equal(out, torch.full_like(out, 8 * rounded))
        return
    out.backward(torch.full_like(out, value))
    assert torch.equal(x.grad, torch.full_like(x, 8 * rounded * rounded))
    assert torch.equal(w.grad, torch.full_like(w, 16 * rounded * rounded))


def test_float32_without_tf32_is_declined(cuda_tier, tf32_off):
    """With torch.backends.cudnn.allow_tf32 off the implicit GEMM declines float32: forced,
    the tier raises NotImplementedError naming the setting; the ops themselves refuse
    allow_tf32=False; auto passes the call on; the depthwise kernel (exact) still runs."""
    x = torch.randn(2, 8, 9, 9, device="cuda")
    w = torch.randn(16, 8, 3, 3, device="cuda")
    with fusedops.use_backend("cuda"), pytest.raises(
            NotImplementedError, match=r"forced but cannot run this call: .*allow_tf32"):
        fusedops.conv2d(x, w, padding=1)
    fusedops.dispatch.TIERS["cuda"].load()
    with pytest.raises(NotImplementedError, match="allow_tf32"):
        torch.ops.fusedops.conv2d_fwd_cuda(x, w, None, None, 1, 1, 1, 1, 1, 1, 9, 9, 1, "none",
                                            False, False)
    with pytest.raises(NotImplementedError, match="allow_tf32"):
        torch.ops.fusedops.conv2d_bwd_cuda(torch.randn(2, 16, 9, 9, device="cuda"), x, w,
                                            x.new_empty((0,)), 1, 1, 1, 1, 1, 1, 9, 9, 1,
                                            "none", False, True, True, False, False)
    with fusedops.use_backend("auto"):
        out = fusedops.conv2d(x, w, padding=1)
    assert_close(out, F.conv2d(x.double(), w.double(), padding=1), torch.float32, "auto")
    dw = torch.randn(8, 1, 3, 3, device="cuda")
    with fusedops.use_backend("cuda"):
        out = fusedops.conv2d(x, dw, padding=1, groups=8)
    assert_close(out, F.conv2d(x.double(), dw.double(), padding=1, groups=8), torch.float32,
                 "depthwise float32 without tf32")


# (N, C, H, W), K, kernel, stride, padding, dilation: implicit-GEMM cases (groups == 1) for
# the sm_90a vs sm_80 comparison; several k blocks and more than one tile both ways.
PATH_CASES = [
    ((2, 64, 15, 17), 136, 3, 1, 1, 1),
    ((2, 40, 16, 15), 72, 3, 2, 1, 1),
    ((1, 24, 19, 18), 40, (3, 5), (2, 1), (2, 0), (2, 1)),
]


def run_on_path(monkeypatch, path, x, w, b, stride, padding, dilation):
    """Forward (bias + gelu) and the three gradients on one forced implicit-GEMM path."""
    monkeypatch.setenv("FUSEDOPS_CONV_PATH", path)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    with fusedops.use_backend("cuda"):
        out = fusedops.conv2d(*leaves, stride, padding, dilation, activation="gelu")
    torch.manual_seed(1)
    out.backward(torch.randn_like(out))
    return out.detach(), *(t.grad for t in leaves)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", PATH_CASES, ids=lambda c: f"{c[0]}-K{c[1]}-k{c[2]}-s{c[3]}")
def test_sm90_against_sm80_and_float64(cuda_tier, monkeypatch, case, dtype):
    """The sm_90a (wgmma) kernels against float64 and against the forced sm_80 ones."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm_90a convolution kernels need an sm_90 device")
    shape, features, kernel, stride, padding, dilation = case
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    torch.manual_seed(0)
    x = torch.randn(shape, device="cuda", dtype=dtype).to(memory_format=CL)
    fan_in = shape[1] * kernel[0] * kernel[1]
    w = (torch.randn(features, shape[1], *kernel, device="cuda") / fan_in**0.5).to(dtype)
    b = torch.randn(features, device="cuda", dtype=dtype)
    sm90 = run_on_path(monkeypatch, "sm90", x, w, b, stride, padding, dilation)
    sm80 = run_on_path(monkeypatch, "sm80", x, w, b, stride, padding, dilation)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = F.gelu(F.conv2d(*leaves64, stride=stride, padding=padding, dilation=dilation))
    torch.manual_seed(1)
    ref.backward(torch.randn_like(sm90[0]).double())
    names = ("output", "grad of input", "grad of weight", "grad of bias")
    for name, mine, theirs, expected in zip(names, sm90, sm80,
                                            (ref.detach(), *(t.grad for t in leaves64))):
        assert_close(mine, expected, dtype, f"sm_90a {name}")
        assert_close(mine, theirs.double(), dtype, f"sm_90a vs sm_80 {name}", factor=2)


def test_forced_sm90_refuses_what_it_does_not_cover(cuda_tier, tf32_allowed, monkeypatch):
    """float32's gradients have no sm_90a kernel (wgmma has no transposed tf32 operand): forced,
    the path says so; on auto they run on sm_80."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm_90a convolution kernels need an sm_90 device")
    x = torch.randn(1, 8, 9, 9, device="cuda", requires_grad=True)
    w = torch.randn(8, 8, 3, 3, device="cuda", requires_grad=True)
    monkeypatch.setenv("FUSEDOPS_CONV_PATH", "sm90")
    with fusedops.use_backend("cuda"):
        out = fusedops.conv2d(x, w, padding=1)  # the tf32 forward is covered
        with pytest.raises(RuntimeError, match="FUSEDOPS_CONV_PATH=sm90"):
            out.sum().backward()
