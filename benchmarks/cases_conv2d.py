"""Fused conv2d ``act(F.conv2d(x, W, b) + r)``: cases, implementations, FLOPs and bytes.

Cases: the convolutions of two image networks at a 224 x 224 input, every distinct layer
once (named after the first torchvision module that has it), at batch N in {64, 256}, in
bfloat16 and float16, forward alone and forward+backward:

- ResNet-50 (torchvision's v1.5: the stride of a downsampling bottleneck is in its 3x3),
  24 shapes: the stem ``conv1`` (7x7/2, 3 → 64, 224 → 112), and per stage (``layer1`` to
  ``layer4``, 64 to 512 channels wide at 56, 28, 14 and 7) the first block's 1x1 ``conv1``,
  its 3x3 ``conv2`` (stride 2 from ``layer2`` on: 56 → 28, 28 → 14, 14 → 7), its 1x1
  expansion ``conv3`` and its 1x1 projection ``downsample.0`` (stride 1 in ``layer1``,
  stride 2 after), then the later blocks' 1x1 ``conv1`` (4·width → width) and stride-1 3x3
  ``conv2``; padding R // 2. The epilogue is the one the network has once its BatchNorm is
  folded into the convolution: bias + ReLU; bias + residual + ReLU for ``conv3`` (the
  bottleneck's sum with its shortcut, then ReLU); bias alone for ``downsample.0`` (the
  projection is conv + BatchNorm with no activation: its output is the shortcut).
- MobileNetV2's depthwise 3x3 convolutions (groups == channels, padding 1), 10 shapes: every
  distinct (channels, input size, stride) of its inverted-residual blocks, from
  ``features.1`` (32 channels at 112, stride 1) to ``features.15`` (960 at 7). Epilogue
  bias + ReLU: the network has ReLU6, which is not in fusedops' activation set, so ReLU
  stands in (the same bytes and work; only the clamp at 6 is missing).

Every tensor is channels_last (NHWC in memory): the input, the weight, the residual and
grad_out, as a model converted with ``.to(memory_format=torch.channels_last)`` has them.
fusedops' Triton tier reads NHWC, so its NCHW -> NHWC conversion is a no-op here and no
implementation pays for a layout copy; an NCHW model would pay one copy of the input per
call in fusedops, which this benchmark does not show.

Forward+backward is ``torch.autograd.grad`` of the output against a fixed random
channels_last ``grad_out``, with respect to the input, the weight, the bias and (in the
``conv3`` cases) the residual, so no ``.grad`` accumulates inside the timed call. The stem's
input gradient is computed too (a real network does not need it).

``--quick`` keeps four cases at N=64, bfloat16: ``layer2.1.conv2`` (3x3, 128 → 128 at 28)
forward and forward+backward, ``layer2.0.conv3`` (1x1, 128 → 512 at 28, with the residual)
forward, and ``features.3.conv.1.0`` (depthwise 3x3, 144 channels at 56) forward.

Implementations (each skipped, with the reason, where it cannot run):

- ``fusedops-triton``, ``fusedops-cuda``: ``fusedops.conv2d(x, w, b, stride, padding,
  groups=..., activation=..., residual=...)`` under ``fusedops.use_backend(tier)``.
  Skipped where ``fusedops.backends()`` reports the tier unavailable, where
  ``fusedops.conv2d`` does not exist, where a tiny forced forward+backward (3x3, bias,
  residual, relu) raises ``NotImplementedError`` (the tier has no convolution), and per
  case where a tiny call with the case's kernel size, stride, grouping, channel alignment,
  dtype, epilogue and mode raises it.
- ``cudnn``: ``F.conv2d(x, w, None, stride, padding, 1, groups)``: the convolution alone,
  no bias, residual or activation (its forward+backward differentiates x and W only). The
  rate of cuDNN on the shape, which the fused op is held to: target ``× cudnn`` ≥ 0.8. For
  channels_last depthwise convolutions torch's dispatch calls cuDNN too (not its native
  depthwise kernel, which reads NCHW).
- ``cudnn+eager``: ``F.conv2d(x, w, b, ...)``, then ``+ r`` and the activation as separate
  eager ops: what an unfused model runs. Target ``× cudnn+eager`` ≥ 1.0.
- ``torch.compile``: the ``cudnn+eager`` function under ``torch.compile(mode=
  "max-autotune-no-cudagraphs", dynamic=False)`` (Inductor may pick a Triton convolution
  template or cuDNN, and fuses the epilogue). Minutes of autotuning: not in ``--quick``.

``torch.backends.cudnn.benchmark`` is True around every timed call of this family (each
implementation's callable sets it and puts the previous value back; the runner has no
per-family hook), so cuDNN picks its algorithms by timing them in the untimed first call.

FLOPs (the multiply-adds of the convolution; bias, residual and activation, a few
operations per output element, are not counted: under 2% of a dense layer's count, ~15% of
a depthwise layer's 18 per output, which is memory-bound anyway): forward
2·N·K·OH·OW·(C/groups)·R·S; the backward
is 2× the forward (the input gradient and the weight gradient, one forward's worth each);
forward+backward 3×. TFLOP/s are reported with ``% matmul``, the percentage of the bf16
8192³ cuBLAS matmul measured in the same run, and the ratios ``× cudnn+eager`` and
``× cudnn`` against the baselines measured side by side.

Bytes (the fewest the op must move, e = 2 for bf16 and fp16; X = N·C·H·W·e, Wt =
K·(C/groups)·R·S·e, B = K·e, Y = N·K·OH·OW·e):

    forward   read x, W, b (and r), write the output          X + Wt + B (+ Y) + Y
    fwd+bwd   the forward, plus the saved pre-activation z written (Y, gelu/gelu_tanh/silu
              only), then read grad_out (Y) and what act' needs (Y: z, or the output for
              relu; nothing without an activation), read x and W again (X + Wt), write
              grad_input, grad_weight, grad_bias (X + Wt + B) and grad_residual (Y, with a
              residual)

(the same accounting as the fused linear's, except that relu's derivative is counted as one
read of the output in the backward). Which figure to read: the harness has one ``bound`` per
family ("compute" here: the plots draw the matmul ceiling), so each case records its own in
``params["bound"]``, "memory" below ``RIDGE_FLOPS_PER_BYTE`` = 250 FLOPs per byte (an H100's
measured ridge). The ResNet 3x3s (forward: 230–1950 FLOPs per byte at N=256; the two at 56
in, ``layer1.0.conv2`` at 288 and ``layer2.0.conv2`` at 230, sit on the ridge: read both)
and ``layer4``'s 1x1s are compute-bound: read TFLOP/s, ``% matmul`` and the ratios. The
other 1x1s (28–210: a short reduction over C) and the stem (124) are memory-bound, and so is
every depthwise case (9 multiply-adds per output element: 2–4 FLOPs per byte): read GB/s
and ``% copy`` (the 1 GiB device-to-device copy of the same run).

Quick-profile estimate on an H100: the quick cases are small (the 3x3 at N=64 is 14.8 GFLOP,
~30 µs; the depthwise case moves ~116 MB, ~45 µs), so each of the 4 x 4 measurements
(fusedops' two tiers, cudnn, cudnn+eager) is ~1 s of inputs, do_bench and the peak memory
→ ~20 s, plus the first calls: cuDNN's algorithm search per shape and direction (~1–5 s in
all), Triton JIT and autotuning of fusedops' kernels (the implicit-GEMM forward and input
gradient over 4 tile configurations each, the weight gradient's one, the depthwise
forward's few: ~30–60 s): about 1–1.5 minutes. The per-family estimates add up to 7–9.5
minutes for the whole --quick, against a budget of 8: see NOTES.md.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .common import (
    bind_epilogue_op,
    compile_epilogue_op,
    eager_epilogue,
    element_bytes,
    epilogue_op_leaves,
    fusedops_case_unsupported,
    fusedops_implementation,
    fusedops_tier_unavailable,
    needs_cuda,
    needs_grad,
    probe_device,
    rotating_over,
    saves_preactivation,
    torch_dtype,
)
from .registry import Case, Family, Implementation

BATCHES = (64, 256)
DTYPES = ("bfloat16", "float16")
MODES = ("fwd", "fwd+bwd")
IMAGE_SIZE = 224

# Every distinct convolution of torchvision's ResNet-50, named after its first module:
# (layer, in channels C, out channels K, kernel R (= S), stride, input size H (= W),
# activation, residual). Bias everywhere (BatchNorm folded into the convolution).
RESNET50 = (
    ("conv1", 3, 64, 7, 2, 224, "relu", False),
    ("layer1.0.conv1", 64, 64, 1, 1, 56, "relu", False),
    ("layer1.0.conv2", 64, 64, 3, 1, 56, "relu", False),
    ("layer1.0.conv3", 64, 256, 1, 1, 56, "relu", True),
    ("layer1.0.downsample.0", 64, 256, 1, 1, 56, None, False),
    ("layer1.1.conv1", 256, 64, 1, 1, 56, "relu", False),
    ("layer2.0.conv1", 256, 128, 1, 1, 56, "relu", False),
    ("layer2.0.conv2", 128, 128, 3, 2, 56, "relu", False),
    ("layer2.0.conv3", 128, 512, 1, 1, 28, "relu", True),
    ("layer2.0.downsample.0", 256, 512, 1, 2, 56, None, False),
    ("layer2.1.conv1", 512, 128, 1, 1, 28, "relu", False),
    ("layer2.1.conv2", 128, 128, 3, 1, 28, "relu", False),
    ("layer3.0.conv1", 512, 256, 1, 1, 28, "relu", False),
    ("layer3.0.conv2", 256, 256, 3, 2, 28, "relu", False),
    ("layer3.0.conv3", 256, 1024, 1, 1, 14, "relu", True),
    ("layer3.0.downsample.0", 512, 1024, 1, 2, 28, None, False),
    ("layer3.1.conv1", 1024, 256, 1, 1, 14, "relu", False),
    ("layer3.1.conv2", 256, 256, 3, 1, 14, "relu", False),
    ("layer4.0.conv1", 1024, 512, 1, 1, 14, "relu", False),
    ("layer4.0.conv2", 512, 512, 3, 2, 14, "relu", False),
    ("layer4.0.conv3", 512, 2048, 1, 1, 7, "relu", True),
    ("layer4.0.downsample.0", 1024, 2048, 1, 2, 14, None, False),
    ("layer4.1.conv1", 2048, 512, 1, 1, 7, "relu", False),
    ("layer4.1.conv2", 512, 512, 3, 1, 7, "relu", False),
)

# Every distinct depthwise 3x3 of torchvision's MobileNetV2: (layer, channels, input size,
# stride). Bias + ReLU (standing in for ReLU6).
MOBILENETV2_DEPTHWISE = (
    ("features.1.conv.0.0", 32, 112, 1),
    ("features.2.conv.1.0", 96, 112, 2),
    ("features.3.conv.1.0", 144, 56, 1),
    ("features.4.conv.1.0", 144, 56, 2),
    ("features.5.conv.1.0", 192, 28, 1),
    ("features.7.conv.1.0", 192, 28, 2),
    ("features.8.conv.1.0", 384, 14, 1),
    ("features.12.conv.1.0", 576, 14, 1),
    ("features.14.conv.1.0", 576, 14, 2),
    ("features.15.conv.1.0", 960, 7, 1),
)
DEPTHWISE_ACTIVATION = "relu"  # ReLU6 is not in fusedops' activation set

# (mode, layer) of the --quick cases, at QUICK_BATCH and QUICK_DTYPE
QUICK = {("fwd", "layer2.1.conv2"), ("fwd+bwd", "layer2.1.conv2"), ("fwd", "layer2.0.conv3"),
         ("fwd", "features.3.conv.1.0")}
QUICK_BATCH = 64
QUICK_DTYPE = "bfloat16"

# FLOPs per byte above which a case counts as compute-bound on an H100 (~700 TFLOP/s bf16
# matmul over ~2.8 TB/s copy, the ceilings this harness measures there); recorded per case as
# params["bound"], the figure to read: TFLOP/s and % matmul, or GB/s and % copy.
RIDGE_FLOPS_PER_BYTE = 250

PROBE_BATCH = 2  # the tiny calls that probe whether an implementation runs a case
PROBE_CHANNELS = 16
PROBE_SIZE = 16

_SHORT_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def make_case(mode: str, batch: int, channels: int, out_channels: int, size: int, kernel: int,
              stride: int = 1, *, groups: int = 1, padding: int | None = None,
              activation: str | None = "relu", residual: bool = False, bias: bool = True,
              dtype: str = QUICK_DTYPE, net: str = "", layer: str = "",
              quick: bool = False) -> Case:
    """One case: an N x C x size x size input, K filters of R x R (C / groups deep); the
    padding defaults to R // 2. ``net`` tags the id ("rn50" ResNet-50, "mnv2" MobileNetV2),
    ``layer`` is the torchvision module the shape comes from; ``cases`` decides ``quick``."""
    padding = kernel // 2 if padding is None else padding
    out = output_size(size, kernel, stride, padding)
    depthwise = groups > 1 and groups == channels
    params = {"mode": mode, "net": net, "layer": layer, "N": batch, "C": channels,
              "K": out_channels, "H": size, "W": size, "R": kernel, "S": kernel,
              "stride": stride, "padding": padding, "groups": groups, "OH": out, "OW": out,
              "dtype": dtype, "bias": bias, "activation": activation, "residual": residual}
    intensity = flops(Case("", "", params)) / bytes_moved(Case("", "", params))
    params["bound"] = "compute" if intensity >= RIDGE_FLOPS_PER_BYTE else "memory"
    epilogue = "_".join([activation or "none"] + ["res"] * residual + ["nobias"] * (not bias))
    grouping = "_dw" if depthwise else (f"_g{groups}" if groups > 1 else "")
    case_id = (f"{mode}_{net or 'conv'}_N{batch}_C{channels}_K{out_channels}_H{size}_"
               f"R{kernel}_s{stride}{grouping}_{dtype}_{epilogue}")
    shape = (f"dw{kernel}x{kernel}" + (f"/{stride}" if stride > 1 else "") + f" {channels}"
             if depthwise else
             f"{kernel}x{kernel}" + (f"/{stride}" if stride > 1 else "")
             + f" {channels}→{out_channels}")
    tags = (" +res" if residual else "") + (" no-act" if activation is None else "")
    label = f"{shape} @{size} N={batch} {_SHORT_DTYPE.get(dtype, dtype)}{tags}"
    return Case(id=case_id, label=label, params=params, quick=quick)


def resnet_case(mode: str, spec: tuple, batch: int, dtype: str) -> Case:
    layer, c, k, r, stride, size, activation, residual = spec
    quick = (mode, layer) in QUICK and batch == QUICK_BATCH and dtype == QUICK_DTYPE
    return make_case(mode, batch, c, k, size, r, stride, activation=activation,
                     residual=residual, dtype=dtype, net="rn50", layer=layer, quick=quick)


def depthwise_case(mode: str, spec: tuple, batch: int, dtype: str) -> Case:
    layer, c, size, stride = spec
    quick = (mode, layer) in QUICK and batch == QUICK_BATCH and dtype == QUICK_DTYPE
    return make_case(mode, batch, c, c, size, 3, stride, groups=c,
                     activation=DEPTHWISE_ACTIVATION, dtype=dtype, net="mnv2",
                     layer=layer, quick=quick)


def cases(quick: bool) -> list[Case]:
    out = []
    for mode in MODES:
        for dtype in DTYPES:
            for batch in BATCHES:
                out += [resnet_case(mode, spec, batch, dtype) for spec in RESNET50]
                out += [depthwise_case(mode, spec, batch, dtype)
                        for spec in MOBILENETV2_DEPTHWISE]
    return [c for c in out if c.quick or not quick]


# --- counts -----------------------------------------------------------------------------


def forward_flops(case: Case) -> int:
    """2·N·K·OH·OW·(C/groups)·R·S: one multiply-add per tap, channel and output element."""
    p = case.params
    return 2 * p["N"] * p["K"] * p["OH"] * p["OW"] * (p["C"] // p["groups"]) * p["R"] * p["S"]


def flops(case: Case) -> int:
    """The forward's count x 1 (fwd) or x 3 (fwd+bwd: the input and weight gradients are one
    forward's worth each)."""
    return forward_flops(case) * (1 if case.params["mode"] == "fwd" else 3)


def _sizes(case: Case) -> tuple[int, int, int, int]:
    """Bytes of (input X, weight Wt, bias B, output Y)."""
    p, e = case.params, element_bytes(case)
    x = p["N"] * p["C"] * p["H"] * p["W"] * e
    w = p["K"] * (p["C"] // p["groups"]) * p["R"] * p["S"] * e
    b = p["K"] * e if p["bias"] else 0
    y = p["N"] * p["K"] * p["OH"] * p["OW"] * e
    return x, w, b, y


def bytes_moved(case: Case) -> int:
    """The fewest bytes the op must move (see the module docstring for the formula)."""
    x, w, b, y = _sizes(case)
    r = y if case.params["residual"] else 0
    forward = x + w + b + r + y
    if case.params["mode"] == "fwd":
        return forward
    saved = y if saves_preactivation(case) else 0  # z, written by the forward
    derivative = y if case.params["activation"] is not None else 0  # z, or relu's output
    backward = (y + derivative  # read grad_out and what act' needs
                + x + w  # read x and W again
                + x + w + b + r)  # write grad_input, grad_weight, grad_bias, grad_residual
    return forward + saved + backward


def input_bytes(case: Case) -> int:
    x, w, b, y = _sizes(case)
    total = x + w + b + (y if case.params["residual"] else 0)
    return total + (y if needs_grad(case) else 0)  # grad_out


# --- inputs and the timed callables -----------------------------------------------------


def make_inputs(case: Case, device) -> dict:
    """Random channels_last x, W (scaled by (C/groups·R·S)^-1/2, so the outputs are O(1)),
    b, r and grad_out."""
    p = case.params
    dtype = torch_dtype(p["dtype"])
    train = needs_grad(case)

    def randn(*shape):
        return torch.empty(shape, device=device, dtype=dtype,
                           memory_format=torch.channels_last).normal_()

    fan_in = (p["C"] // p["groups"]) * p["R"] * p["S"]
    out_shape = (p["N"], p["K"], p["OH"], p["OW"])
    inputs = {
        "input": randn(p["N"], p["C"], p["H"], p["W"]),
        "weight": randn(p["K"], p["C"] // p["groups"], p["R"], p["S"]).mul_(fan_in ** -0.5),
        "bias": (torch.randn(p["K"], device=device, dtype=dtype) if p["bias"] else None),
        "residual": randn(*out_shape) if p["residual"] else None,
        "grad_out": randn(*out_shape) if train else None,
    }
    if train:
        for leaf in epilogue_op_leaves(inputs):
            leaf.requires_grad_(True)
    return inputs


def _conv(case: Case, x, w, b):
    p = case.params
    return F.conv2d(x, w, b, p["stride"], p["padding"], 1, p["groups"])


def reference(case: Case, inputs: dict):
    """What every implementation computes, in eager torch: act(conv(x, W) + b + r)."""
    z = _conv(case, inputs["input"], inputs["weight"], inputs["bias"])
    return eager_epilogue(z, inputs["residual"], case.params["activation"])


@contextlib.contextmanager
def cudnn_benchmark():
    """``torch.backends.cudnn.benchmark = True`` inside, the previous value afterwards."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def _bind(forward, case: Case, inputs: dict):
    """The timed callable: the output, or the gradients of <output, grad_out> with respect to
    x, W, b and r (those the inputs have), with cuDNN's benchmark mode on during the call."""
    call = bind_epilogue_op(forward, case, inputs)

    def timed():
        with cudnn_benchmark():
            return call()

    return timed


_rotating = rotating_over(_bind)


def _describe(case: Case) -> str:
    p = case.params
    what = {"fwd": "forward", "fwd+bwd": "forward+backward"}[p["mode"]]
    depthwise = p["groups"] > 1 and p["groups"] == p["C"]
    kind = "depthwise" if depthwise else f"groups={p['groups']}"
    epilogue = "+".join(["bias"] * p["bias"] + ["residual"] * p["residual"]
                        + [p["activation"] or "no activation"])
    return (f"{p['R']}x{p['S']}/{p['stride']} {kind} C={p['C']} {p['dtype']} {epilogue} "
            f"{what}")


def probe_case(case: Case) -> Case:
    """A tiny case with the same kernel size, stride, padding, grouping, dtype, epilogue and
    mode; fewer than PROBE_CHANNELS input channels (the stem's 3) are kept as they are."""
    p = case.params
    c = p["C"] if p["C"] < PROBE_CHANNELS else PROBE_CHANNELS
    depthwise = p["groups"] > 1 and p["groups"] == p["C"]
    k = c if depthwise else min(p["K"], PROBE_CHANNELS)
    return make_case(p["mode"], PROBE_BATCH, c, k, PROBE_SIZE, p["R"], p["stride"],
                     groups=c if depthwise else 1, padding=p["padding"],
                     activation=p["activation"], residual=p["residual"], bias=p["bias"],
                     dtype=p["dtype"], net="probe")


# what the tiny calls found, per (implementation, probe case)
_case_probes: dict[tuple, str | None] = {}


# --- fusedops tiers ---------------------------------------------------------------------


def _fusedops_forward(tier: str, case: Case):
    import fusedops

    p = case.params

    def forward(inputs):
        with fusedops.use_backend(tier):
            return fusedops.conv2d(inputs["input"], inputs["weight"], inputs["bias"],
                                   p["stride"], p["padding"], 1, p["groups"],
                                   activation=p["activation"], residual=inputs["residual"])

    return forward


_probed: dict[str, str | None] = {}


def fusedops_unavailable(tier: str) -> str | None:
    """Why ``fusedops.conv2d`` cannot be timed on ``tier`` (a tiny forced 3x3 forward+backward
    with bias, residual and relu probes it)."""

    def probe():
        case = make_case("fwd+bwd", PROBE_BATCH, PROBE_CHANNELS, PROBE_CHANNELS, PROBE_SIZE, 3,
                         residual=True, net="probe")
        _bind(_fusedops_forward(tier, case), case, make_inputs(case, probe_device()))()

    return fusedops_tier_unavailable(tier, "conv2d", probe, _probed)


def fusedops_unsupported(tier: str, case: Case) -> str | None:
    """Why the tier does not run this case: a tiny forced call like it (``probe_case``)
    raises NotImplementedError."""
    small = probe_case(case)

    def call():
        _bind(_fusedops_forward(tier, small), small, make_inputs(small, probe_device()))()

    return fusedops_case_unsupported(tier, "conv2d", _describe(case), call,
                                     (f"fusedops-{tier}", small.id), _case_probes)


def _fusedops_tier(tier: str) -> Implementation:
    def setup(case, input_sets):
        return _rotating(_fusedops_forward(tier, case), case, input_sets)

    return fusedops_implementation(tier, setup,
                                   unavailable=lambda: fusedops_unavailable(tier),
                                   unsupported=lambda case: fusedops_unsupported(tier, case),
                                   note=", channels_last")


# --- baselines --------------------------------------------------------------------------


def cudnn_unavailable() -> str | None:
    reason = needs_cuda()
    if reason is not None:
        return reason
    if not torch.backends.cudnn.is_available():
        return "cuDNN is not available in this torch build"
    return None


def _cudnn_setup(case, input_sets):
    def forward(inputs):  # the convolution alone: cuDNN's rate on this shape
        return _conv(case, inputs["input"], inputs["weight"], None)

    # grad_out meets the convolution's output directly: no bias, residual or activation.
    own = [{**inputs, "bias": None, "residual": None} for inputs in input_sets]
    return _rotating(forward, case, own)


def _cudnn_eager_setup(case, input_sets):
    return _rotating(lambda inputs: reference(case, inputs), case, input_sets)


def eager_function(case: Case):
    """``(x, w, b, r) -> act(conv(x, w, b) + r)``, the function torch.compile is given."""
    activation = case.params["activation"]

    def eager(x, w, b, r):
        return eager_epilogue(_conv(case, x, w, b), r, activation)

    return eager


def _compile_setup(case, input_sets):
    return compile_epilogue_op(eager_function(case), case, input_sets, _rotating)


IMPLEMENTATIONS = (
    _fusedops_tier("triton"),
    _fusedops_tier("cuda"),
    Implementation(name="cudnn", setup=_cudnn_setup, unavailable=cudnn_unavailable,
                   note="F.conv2d(x, w, None, ...): cuDNN, the convolution alone (no bias, "
                        "residual or activation), channels_last, cudnn.benchmark"),
    Implementation(name="cudnn+eager", setup=_cudnn_eager_setup, unavailable=cudnn_unavailable,
                   note="F.conv2d(x, w, b, ...) + r, then the activation, eager ops"),
    Implementation(name="torch.compile", setup=_compile_setup, quick=False,
                   note='torch.compile(cudnn+eager, mode="max-autotune-no-cudagraphs")'),
)

FORMULAS = (
    "FLOPs: forward 2·N·K·OH·OW·(C/groups)·R·S; backward 2× the forward (input gradient and "
    "weight gradient), forward+backward 3×; bias, residual and activation not counted. "
    "`% matmul` is against the bf16 8192³ cuBLAS ceiling, `× cudnn+eager` against F.conv2d "
    "with its bias then eager residual add and activation, `× cudnn` against the cuDNN "
    "convolution alone, all measured in this run (cudnn.benchmark on, channels_last). Bytes "
    "(e = 2; X = N·C·H·W·e, Wt = K·(C/groups)·R·S·e, B = K·e, Y = N·K·OH·OW·e): forward "
    "X + Wt + B + Y (+ Y residual); forward+backward adds the saved z (Y, gelu/silu only), "
    "reads grad_out and z or relu's output (2·Y), x and W again, and writes the input, "
    "weight, bias (and residual) gradients. The depthwise (MobileNetV2) rows are "
    "memory-bound: read their GB/s and % copy; ReLU stands in for its ReLU6."
)

FAMILY = Family(
    name="conv2d",
    description="fused conv2d act(conv(x, W) + b + r), channels_last, bf16 and fp16: "
                "ResNet-50 layers (bias + relu, + residual) and MobileNetV2 depthwise 3x3",
    cases=cases,
    implementations=IMPLEMENTATIONS,
    make_inputs=make_inputs,
    bytes_moved=bytes_moved,
    flops=flops,
    input_bytes=input_bytes,
    bound="compute",
    ratio_baselines=("cudnn+eager", "cudnn"),
    panel_key="mode",
    formulas=FORMULAS,
)
