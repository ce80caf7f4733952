"""The CUDA tier's convolution kernels (csrc/conv/) on a GPU: the sm_80 implicit GEMM
(forward, input and weight gradients) with channel counts that are not multiples of 8 (the
zero-padded path), strides and dilations, and the depthwise kernel with a channel
multiplier, against float64 torch and against the Triton tier.

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
