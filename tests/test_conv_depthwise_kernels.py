"""Kernel-level tests of the depthwise convolution (triton_kernels/conv_depthwise.py), calling
``depthwise_fwd_launch`` / ``depthwise_bwd_launch`` directly.

The reference is torch's own ``F.conv2d(..., groups=C)`` and autograd in float64 on the same
inputs upcast, with the padding made explicit (top/left as given, bottom/right as far as the
asked output size needs, then cropped), so asymmetric padding and any output size compare
exactly. Every output is NaN-poisoned before the launch, so an element no program writes
fails. On a machine without CUDA the kernels run in Triton's interpreter (conftest), where
the sizes stay tiny: it pays per program instance.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, HAS_CUDA
from reference import assert_close

pytest.importorskip("triton")
depthwise = pytest.importorskip("fusedops.triton_kernels.conv_depthwise")

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")
SAVES_Z = ("gelu", "gelu_tanh", "silu")  # backward reads z; relu reads out; "none" nothing
TORCH_ACT = {"none": lambda z: z, "relu": F.relu, "gelu": F.gelu,
             "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "silu": F.silu}
GRADS = ("grad_input", "grad_weight", "grad_bias", "grad_preact")


@dataclass(frozen=True)
class Case:
    batch: int = 2
    channels: int = 5
    multiplier: int = 1
    size: tuple[int, int] = (9, 13)
    kernel: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (1, 1)   # (top, left)
    dilation: tuple[int, int] = (1, 1)
    out_size: tuple[int, int] | None = None  # None: symmetric padding's natural size
    channels_last: bool = False
    dtype: torch.dtype = torch.float32
    activation: str = "gelu"
    bias: bool = True
    residual: bool = True

    def output_size(self) -> tuple[int, int]:
        if self.out_size is not None:
            return self.out_size
        return tuple((size + 2 * pad - dil * (k - 1) - 1) // step + 1 for size, pad, dil, k, step
                     in zip(self.size, self.padding, self.dilation, self.kernel, self.stride))


def randn(*shape, dtype, channels_last=False):
    t = torch.randn(*shape, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    return t.to(memory_format=torch.channels_last) if channels_last else t


def poisoned(*shape, dtype, channels_last=False):
    t = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    return t.to(memory_format=torch.channels_last) if channels_last else t


def make_inputs(case: Case):
    out_channels = case.channels * case.multiplier
    out_h, out_w = case.output_size()
    x = randn(case.batch, case.channels, *case.size, dtype=case.dtype,
              channels_last=case.channels_last)
    w = randn(out_channels, 1, *case.kernel, dtype=case.dtype)
    b = randn(out_channels, dtype=case.dtype) if case.bias else None
    # The residual in the other memory format than the input: any strides must do.
    r = (randn(case.batch, out_channels, out_h, out_w, dtype=case.dtype,
               channels_last=not case.channels_last) if case.residual else None)
    g = randn(case.batch, out_channels, out_h, out_w, dtype=case.dtype,
              channels_last=case.channels_last)
    return x, w, b, r, g


def reference(case: Case, x, w, b, r, grad_out):
    """out, z and every gradient in float64 through torch's autograd."""
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    (pad_h, pad_w), (out_h, out_w) = case.padding, case.output_size()
    (kernel_h, kernel_w), (step_h, step_w) = case.kernel, case.stride
    reach_h = (out_h - 1) * step_h + case.dilation[0] * (kernel_h - 1) + 1
    reach_w = (out_w - 1) * step_w + case.dilation[1] * (kernel_w - 1) + 1
    padded = F.pad(x64, (pad_w, max(0, reach_w - x.shape[3] - pad_w),
                         pad_h, max(0, reach_h - x.shape[2] - pad_h)))
    z = F.conv2d(padded, w64, None, case.stride, 0, case.dilation,
                 groups=case.channels)[:, :, :out_h, :out_w]
    if b is not None:
        z = z + b.double()[:, None, None]
    if r is not None:
        z = z + r.double()
    z.retain_grad()
    out = TORCH_ACT[case.activation](z)
    out.backward(grad_out.double())
    return {"out": out.detach(), "z": z.detach(), "grad_input": x64.grad,
            "grad_weight": w64.grad, "grad_bias": z.grad.sum((0, 2, 3)), "grad_preact": z.grad}


def geometry(case: Case):
    return case.stride, case.padding, case.dilation


def forward(case: Case, x, w, b, r, store_z=None, out=None):
    out_h, out_w = case.output_size()
    shape = (case.batch, w.shape[0], out_h, out_w)
    if out is None:
        out = poisoned(*shape, dtype=case.dtype, channels_last=case.channels_last)
    store_z = case.activation in SAVES_Z if store_z is None else store_z
    z = poisoned(*shape, dtype=case.dtype, channels_last=case.channels_last) if store_z \
        else None
    depthwise.depthwise_fwd_launch(x, w, b, r, *geometry(case), case.activation, out, z)
    return out, z


def backward(case: Case, grad_out, x, w, saved, needs=(True, True, True, True)):
    grads = {
        "grad_input": torch.full_like(x, float("nan")),
        "grad_weight": torch.full_like(w, float("nan")),
        "grad_bias": poisoned(w.shape[0], dtype=case.dtype),
        "grad_preact": torch.full_like(grad_out, float("nan")),
    }
    grads = {name: grad if needed else None
             for needed, (name, grad) in zip(needs, grads.items(), strict=True)}
    depthwise.depthwise_bwd_launch(grad_out, x, w, saved, *geometry(case), case.activation,
                                   *grads.values())
    return grads


def saved_for_backward(case: Case, out, z, x):
    if case.activation == "relu":
        return out
    if case.activation in SAVES_Z:
        return z
    return x.new_empty((0,))  # what the dispatch passes for "none"


def check(case: Case, needs=(True, True, True, True), factor=1.0):
    x, w, b, r, g = make_inputs(case)
    out, z = forward(case, x, w, b, r)
    ref = reference(case, x, w, b, r, g)
    assert out.shape == ref["out"].shape
    assert_close(out, ref["out"], case.dtype, "out", factor)
    if z is not None:
        assert_close(z, ref["z"], case.dtype, "z", factor)
    grads = backward(case, g, x, w, saved_for_backward(case, out, z, x), needs)
    for name, grad in grads.items():
        if grad is not None:
            assert grad.dtype == case.dtype, name
            assert_close(grad, ref[name], case.dtype, name, factor)
    return out, grads


BASE = Case()


@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False),
                                                 (torch.float16, True)])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations(activation, dtype, channels_last):
    """3x3, stride 1, padding 1 on 2 x 5 x 9 x 13, bias and residual, every activation."""
    check(replace(BASE, activation=activation, dtype=dtype, channels_last=channels_last))


GEOMETRIES = {
    # Stride 2 and multiplier 2 with a 5x5 filter, 12 channels, channels_last, fp16.
    "5x5_s2_p2_m2_c12": Case(channels=12, multiplier=2, kernel=(5, 5), stride=(2, 2),
                             padding=(2, 2), channels_last=True, dtype=torch.float16,
                             activation="gelu_tanh"),
    # Stride 2, no padding, batch 1, NCHW; no bias.
    "3x3_s2_p0_b1": Case(batch=1, stride=(2, 2), padding=(0, 0), activation="silu",
                         bias=False),
    # Dilation 2 (padding 2 keeps the size), 12 channels, channels_last.
    "3x3_d2_p2_c12": Case(channels=12, dilation=(2, 2), padding=(2, 2), channels_last=True,
                          activation="relu"),
    # Dilation and stride together, multiplier 2 on 5 channels, fp16, no residual.
    "3x3_s2_d2_p1_m2": Case(multiplier=2, stride=(2, 2), dilation=(2, 2), padding=(1, 1),
                            dtype=torch.float16, activation="silu", residual=False),
    # Asymmetric padding (top 0, left 2) and an output that needs an extra zero row at the
    # bottom and column at the right (8 x 14 where the top/left padding alone gives 7 x 13).
    "asymmetric_pad_grown_out": Case(padding=(0, 2), out_size=(8, 14), activation="gelu"),
    # TensorFlow "same" for stride 2 (top/left 0, the extra row/col at the bottom/right).
    "same_s2_even": Case(size=(10, 12), stride=(2, 2), padding=(0, 0), out_size=(5, 6),
                         channels_last=True, dtype=torch.float16, activation="relu"),
    # An output smaller than the padding would allow: the kernel must crop, not run over.
    "cropped_out": Case(padding=(2, 1), out_size=(6, 10), activation="none"),
    # A non-square filter with its own padding per axis; 20 channels: two channel blocks
    # (of 16 under the interpreter) in every kernel.
    "3x5_p1_2_c20": Case(kernel=(3, 5), padding=(1, 2), channels=20, channels_last=True,
                         activation="silu"),
    # 7x7 (two tap blocks in the weight gradient), channels_last, fp16.
    "7x7_p3": Case(kernel=(7, 7), padding=(3, 3), channels_last=True, dtype=torch.float16,
                   activation="gelu"),
    # 5x5 stride 1, multiplier 2, NCHW, no activation.
    "5x5_p2_m2": Case(kernel=(5, 5), padding=(2, 2), multiplier=2, activation="none"),
    # 1x1 with stride 2: most input pixels get no gradient at all (and must get zeros).
    "1x1_s2": Case(kernel=(1, 1), stride=(2, 2), padding=(0, 0), channels=12,
                   activation="relu"),
    # Batch 1, one channel, an odd 1-wide image.
    "1_channel_tall": Case(batch=1, channels=1, size=(11, 1), padding=(1, 1),
                           activation="gelu_tanh"),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_geometry(name):
    check(GEOMETRIES[name])


NEEDS_CASES = [
    (True, False, False, False), (False, True, False, False), (False, False, True, False),
    (False, False, False, True), (True, False, False, True), (False, True, True, False),
    (False, False, False, False),
]


@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
@pytest.mark.parametrize("needs", NEEDS_CASES, ids=lambda n: "".join("iwbp"[i] if v else "-"
                                                                      for i, v in enumerate(n)))
def test_needs_flags(needs, activation):
    """Each gradient alone and in pairs: the gather's three sources of dz (grad_preact, the
    recomputed cheap derivative, the weight kernel's scratch dz) all give the same."""
    case = replace(BASE, batch=1, size=(7, 9), stride=(2, 1), activation=activation,
                   multiplier=2)
    check(case, needs=needs)


def test_non_contiguous():
    """Strided views everywhere: input, weight, bias, residual, grad_out, out and the grads."""
    case = replace(BASE, channels=12, activation="silu")
    out_h, out_w = case.output_size()
    n, c, k = case.batch, case.channels, case.channels
    dtype = case.dtype
    x = randn(n, c, 9, 26, dtype=dtype)[:, :, :, ::2]                      # strided columns
    w = randn(3, 3, k, 1, dtype=dtype).permute(2, 3, 0, 1)                 # K innermost
    b = randn(2 * k, dtype=dtype)[::2]
    r = randn(n, out_w, out_h, k, dtype=dtype).permute(0, 3, 2, 1)         # (N, W, H, K)
    g = randn(n, k, out_h, out_w + 3, dtype=dtype)[..., 1:out_w + 1]
    assert not any(t.is_contiguous() for t in (x, w, b, r, g))
    out = torch.full((n, k + 4, out_h, out_w), float("nan"), dtype=dtype, device=DEVICE)
    out = out[:, 2:k + 2]                                                  # a channel slice
    out, z = forward(case, x, w, b, r, out=out)
    ref = reference(case, x, w, b, r, g)
    assert_close(out, ref["out"], dtype, "out")
    assert_close(z, ref["z"], dtype, "z")
    grads = {
        "grad_input": torch.full((n, c, 9, 2 * out_w), float("nan"), dtype=dtype,
                                 device=DEVICE)[..., ::2],
        "grad_weight": torch.full((3, 3, k, 1), float("nan"), dtype=dtype,
                                  device=DEVICE).permute(2, 3, 0, 1),
        "grad_bias": torch.full((2 * k,), float("nan"), dtype=dtype, device=DEVICE)[::2],
        "grad_preact": torch.full((n, out_h, out_w, k), float("nan"), dtype=dtype,
                                  device=DEVICE).permute(0, 3, 1, 2),
    }
    depthwise.depthwise_bwd_launch(g, x, w, z, *geometry(case), case.activation,
                                   *grads.values())
    for name, grad in grads.items():
        assert_close(grad, ref[name], dtype, name)


def test_forward_without_z():
    """z is optional even where backward would want it (inference)."""
    case = replace(BASE, activation="gelu")
    x, w, b, r, _ = make_inputs(case)
    out, z = forward(case, x, w, b, r, store_z=False)
    assert z is None
    assert_close(out, reference(case, x, w, b, r, torch.zeros_like(out))["out"], case.dtype,
                 "out")


def test_empty_batch():
    """No output pixels: nothing to write forward; the weight and bias sums are zero."""
    case = replace(BASE, batch=0)
    x, w, b, r, g = make_inputs(case)
    out, z = forward(case, x, w, b, r)
    assert out.shape[0] == 0 and z.shape[0] == 0
    grads = backward(case, g, x, w, z)
    assert grads["grad_input"].numel() == 0 and grads["grad_preact"].numel() == 0
    assert torch.equal(grads["grad_weight"], torch.zeros_like(w))
    assert torch.equal(grads["grad_bias"], torch.zeros_like(b))


def test_weight_gradient_is_deterministic():
    """Partial sums per split, summed after: the same bits on every run."""
    case = replace(BASE, activation="silu", size=(11, 13))
    x, w, b, r, g = make_inputs(case)
    out, z = forward(case, x, w, b, r)
    first = backward(case, g, x, w, z, needs=(False, True, True, False))
    second = backward(case, g, x, w, z, needs=(False, True, True, False))
    assert torch.equal(first["grad_weight"], second["grad_weight"])
    assert torch.equal(first["grad_bias"], second["grad_bias"])


def test_too_many_pixels_is_refused():
    """Pixel indices are 32-bit inside the kernels: the launcher says so instead of wrapping."""
    x = torch.empty((1, 1, 1, 1), device="meta")
    w = torch.empty((1, 1, 1, 1), device="meta")
    out = torch.empty((1, 1, 2**16, 2**15), device="meta")
    with pytest.raises(ValueError, match="32 bits"):
        depthwise.depthwise_fwd_launch(x, w, None, None, (1, 1), (0, 0), (1, 1), "none", out,
                                       None)


# --- GPU: every dtype, the aligned fast path at realistic sizes -----------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel,stride,multiplier", [((3, 3), (1, 1), 1), ((5, 5), (2, 2), 1),
                                                      ((7, 7), (1, 1), 2)])
def test_gpu_channels_last(dtype, kernel, stride, multiplier):
    """64 / 96 channels channels_last: the 128-bit path, autotuned, several splits."""
    pad = (kernel[0] // 2, kernel[1] // 2)
    for channels, activation in ((64, "gelu"), (96, "relu")):
        check(Case(batch=4, channels=channels, multiplier=multiplier, size=(29, 35),
                   kernel=kernel, stride=stride, padding=pad, channels_last=True, dtype=dtype,
                   activation=activation))


@pytest.mark.gpu
@pytest.mark.large
def test_gpu_more_than_2_31_elements():
    """An input and output of more than 2**31 elements: offsets must be 64-bit. The last
    rows (whose offsets pass 2**31) are compared with cuDNN on the matching input rows."""
    if not HAS_CUDA or torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs a GPU with 40 GB")
    channels, height, width = 64, 2**12 + 3, 2**13 + 1  # 64 * 4099 * 8193 > 2**31
    x = torch.randn(1, channels, height, width, device="cuda", dtype=torch.float16)
    x = x.to(memory_format=torch.channels_last)
    w = torch.randn(channels, 1, 3, 3, device="cuda", dtype=torch.float16)
    out = torch.empty_like(x)
    depthwise.depthwise_fwd_launch(x, w, None, None, (1, 1), (1, 1), (1, 1), "none", out,
                                   None)
    rows = x[:, :, -9:].float()
    ref = F.conv2d(F.pad(rows, (1, 1, 0, 1)), w.float(), groups=channels)  # last 8 rows
    assert_close(out[:, :, -8:], ref, torch.float16, "out (last rows)")
    grad_input = torch.empty_like(x)
    depthwise.depthwise_bwd_launch(out, x, w, None, (1, 1), (1, 1), (1, 1), "none",
                                   grad_input, None, None, None)
    # The input gradient of the last rows: a full correlation with the flipped filter.
    grad_rows = out[:, :, -9:].float()
    ref = F.conv2d(F.pad(grad_rows, (1, 1, 0, 1)), w.float().flip(2, 3), groups=channels)
    assert_close(grad_input[:, :, -8:], ref, torch.float16, "grad_input (last rows)")

