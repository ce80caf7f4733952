"""One training step of a whole model: cases, implementations, FLOP and byte counts.

A step is the forward (under bf16 autocast), the loss, the backward and an AdamW step
(``fused=True`` on CUDA), then ``zero_grad(set_to_none=True)``; the timed callable runs one
step and returns the detached loss. Every implementation builds its own model from the same
seed, so they all start from the same weights; the parameters are float32 (autocast's mixed
precision), and the batch is random tokens or random images with random labels.

Cases:

- ``gpt``: GPT-2 small (``fusedops.benchmarks.models.GPT``: 12 layers, 768 wide, 12 heads of
  64, vocabulary 50257, the lm head tied to the token embedding), batch 8 x sequence 1024 =
  8192 tokens per step. In --quick.
- ``resnet50``: torchvision's ResNet-50 (``weights=None``: nothing is downloaded), batch 64 of
  224x224 images, model and images channels_last, 1000 classes. Skipped, saying so, where
  torchvision is not installed.

Implementations (all skipped, with the reason, without a CUDA device):

- ``eager``: the unpatched model; the GPT's loss is ``F.cross_entropy`` of the materialised
  logits (8192 x 50257 in bf16 = 823 MB, plus autocast's float32 copy), its attention
  ``F.scaled_dot_product_attention`` (SDPA's own choice of backend).
- ``fusedops``: the same model after ``fusedops.patch`` (Linear -> FusedLinear with the MLP's
  GELU in the epilogue, Conv2d -> FusedConv2d), the step inside ``fusedops.fused_sdpa()``, and
  the loss through fusedops: ``fusedops.linear_cross_entropy(hidden, wte.weight, targets)``
  for the GPT (no logits), ``fusedops.cross_entropy`` for ResNet-50. Backend ``auto``: what
  a user of ``fusedops.patch`` gets on this GPU (the torch tier wherever dispatch's auto
  table has no kernel tier for the op and architecture yet).
- ``fusedops-triton``: the same with ``fusedops.use_backend("triton")`` forced: every fused
  op on the Triton kernels (skipped where the Triton tier is unavailable; an op the tier
  does not cover raises, and the measurement records the error).
- ``torch.compile``, ``fusedops+torch.compile``, ``fusedops-triton+torch.compile``: the model
  of the row without the suffix under ``torch.compile(model, dynamic=False)`` (default mode;
  the optimizer step stays eager, AdamW's fused kernel). Compiling a whole model takes a
  minute or more: left out of --quick.

Throughput is tokens (GPT) or images (ResNet-50) per step divided by the median step time:
``items_per_step`` and ``throughput`` here (``FAMILY.extra`` carries both); the case labels
say how many per step. Peak memory is the runner's: ``torch.cuda.max_memory_allocated()``
during one step minus what was allocated before it. Between steps only the parameters, the
AdamW state and the batch are allocated (the gradients are set to None at the end of every
step), so the peak counts the activations, the gradients, the logits and every workspace: the
memory a fused implementation is meant to save.

FLOPs (2 per multiply-add; the forward once, the backward twice):

- GPT, PaLM's (and nanoGPT's MFU) convention: 6·N·T + 12·L·C·S·T per step, where T = B·S
  tokens and N = 12·L·C² + V·C the weights that multiply activations (q, k, v, the output
  projection, the two MLP matrices, the tied head); embeddings, biases and LayerNorms are left
  out. The attention term is 12·L·H·D·S² per sequence (H·D = C: q·kᵀ and P·v, 2·2·S²·C per
  layer forward, times 3) and counts the full S x S scores: a causal kernel does about half
  of it, so the count credits it with ~6.6% more than it does here. GPT-2 small at B = 8,
  S = 1024: N = 123.5M, 7.00 TFLOP per step (6.07 of them the matmuls, 0.93 attention).
- ResNet-50: 3 x the forward, the forward 2 x its multiply-adds (4.09 G per 224² image:
  the "4.1 GFLOPs" usually quoted for it counts multiply-adds), so 24.5 GFLOP per image,
  1.57 TFLOP per step at B = 64; the multiply-adds are counted layer by layer here
  (``resnet50_macs``). The backward of the stem is counted although its input needs no
  gradient (0.118 G of the 4.09 G multiply-adds: under 2%).

Bytes (a floor, compute-bound: GB/s is only context): the parameter traffic no step avoids,
36·P for P float32 parameters — the forward reads them (4·P), the backward writes their
gradients (4·P), AdamW reads parameter, gradient and both moments and writes parameter and
moments (28·P) — plus reading the batch. Activations are not counted: how many bytes they
move is what the implementations differ in.

Quick-profile estimate on an H100: 1 case (GPT) x 2 implementations (eager, fusedops). Each
builds GPT-2 small on the GPU (~1 s), takes an untimed first step (cuBLAS and SDPA
initialisation; the fused path's first call of each op, ~1–5 s), then do_bench's ~20–40 steps of
~30–40 ms and one more for the peak memory (~2 s): about 15–30 s for the family.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .common import (
    fresh_dynamo_cache,
    needs_cuda,
    package_missing,
    tier_unavailable,
    torch_dtype,
)
from .registry import Case, Family, Implementation

DTYPE = "bfloat16"
SEED = 0
LR = 3e-4
WEIGHT_DECAY = 0.1
GPT_SIZES = {"layers": 12, "width": 768, "heads": 12, "vocab": 50257}  # GPT-2 small
GPT_BATCH, GPT_SEQ = 8, 1024
RESNET_BATCH, RESNET_IMAGE, RESNET_CLASSES = 64, 224, 1000
INDEX_BYTES = 8  # int64 token ids and labels
TRAINING_STATE_BYTES = 16  # per parameter: float32 value, gradient and two AdamW moments
PARAMETER_TRAFFIC = 36  # bytes per parameter per step (see the module docstring)

# ResNet-50 (torchvision's, v1.5: the stride of a downsampling block is in its 3x3)
RESNET_STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (width, blocks, stride)
RESNET_EXPANSION = 4


# --- cases ------------------------------------------------------------------------------


def make_gpt_case(batch: int = GPT_BATCH, seq: int = GPT_SEQ, *, layers: int = 12,
                  width: int = 768, heads: int = 12, vocab: int = 50257,
                  dtype: str = DTYPE) -> Case:
    params = {"model": "gpt", "batch": batch, "seq": seq, "layers": layers, "width": width,
              "heads": heads, "vocab": vocab, "dtype": dtype}
    standard = (batch, seq, dtype) == (GPT_BATCH, GPT_SEQ, DTYPE) and all(
        params[k] == v for k, v in GPT_SIZES.items())
    name = "GPT-2 small" if standard else f"GPT {layers}x{width}"
    return Case(id=f"gpt_L{layers}_C{width}_H{heads}_V{vocab}_B{batch}_S{seq}_{dtype}",
                label=f"{name} B={batch} S={seq} ({batch * seq} tok)", params=params,
                quick=standard)


def make_resnet_case(batch: int = RESNET_BATCH, image: int = RESNET_IMAGE, *,
                     classes: int = RESNET_CLASSES, dtype: str = DTYPE) -> Case:
    params = {"model": "resnet50", "batch": batch, "image": image, "classes": classes,
              "dtype": dtype}
    return Case(id=f"resnet50_B{batch}_{image}px_C{classes}_{dtype}",
                label=f"ResNet-50 B={batch} {image}x{image} ({batch} img)", params=params)


def cases(quick: bool) -> list[Case]:
    out = [make_gpt_case(), make_resnet_case()]
    return [c for c in out if c.quick or not quick]


# --- counts -----------------------------------------------------------------------------


def gpt_matmul_weights(case: Case) -> int:
    """N = 12·L·C² + V·C: the weights that multiply activations (the tied head included)."""
    p = case.params
    return 12 * p["layers"] * p["width"] ** 2 + p["vocab"] * p["width"]


def gpt_parameters(case: Case) -> int:
    """All distinct parameters of ``models.GPT`` (the tied head counted once)."""
    p = case.params
    c = p["width"]
    per_layer = 2 * 2 * c + (3 * c * c + 3 * c) + (c * c + c) + (4 * c * c + 4 * c) + (
        4 * c * c + c)
    return p["vocab"] * c + p["seq"] * c + p["layers"] * per_layer + 2 * c


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def resnet50_convs(image: int) -> list[tuple[int, int, int, int]]:
    """(in channels, out channels, kernel, output pixels) of every convolution of ResNet-50
    on an ``image`` x ``image`` input."""
    size = _conv_out(image, 7, 2, 3)
    convs = [(3, 64, 7, size * size)]
    size = _conv_out(size, 3, 2, 1)  # max pool
    channels = 64
    for width, blocks, stride in RESNET_STAGES:
        for block in range(blocks):
            s = stride if block == 0 else 1
            out = _conv_out(size, 3, s, 1)
            convs += [(channels, width, 1, size * size), (width, width, 3, out * out),
                      (width, width * RESNET_EXPANSION, 1, out * out)]
            if block == 0:
                convs.append((channels, width * RESNET_EXPANSION, 1, out * out))
            channels, size = width * RESNET_EXPANSION, out
    return convs


def resnet50_macs(image: int = RESNET_IMAGE, classes: int = RESNET_CLASSES) -> int:
    """Multiply-adds of one forward of one image (convolutions and the classifier)."""
    convs = sum(c_in * c_out * k * k * pixels for c_in, c_out, k, pixels in
                resnet50_convs(image))
    return convs + 512 * RESNET_EXPANSION * classes


def resnet50_parameters(classes: int = RESNET_CLASSES) -> int:
    """Convolution weights, BatchNorm scales and shifts, the classifier's weight and bias."""
    convs = sum(c_in * c_out * k * k + 2 * c_out for c_in, c_out, k, _ in resnet50_convs(224))
    return convs + 512 * RESNET_EXPANSION * classes + classes


def items_per_step(case: Case) -> int:
    """Tokens (GPT) or images (ResNet-50) one step trains on."""
    p = case.params
    return p["batch"] * p["seq"] if p["model"] == "gpt" else p["batch"]


def throughput(case: Case, median_ms: float) -> float:
    """Tokens or images per second at a step time of ``median_ms``."""
    return items_per_step(case) / (median_ms * 1e-3)


def throughput_unit(case: Case) -> str:
    return "tokens/s" if case.params["model"] == "gpt" else "images/s"


def flops(case: Case) -> int:
    """See the module docstring: 6·N·T + 12·L·C·S·T (GPT), 6·MACs per image (ResNet-50)."""
    p = case.params
    if p["model"] == "gpt":
        tokens = p["batch"] * p["seq"]
        return 6 * gpt_matmul_weights(case) * tokens + 12 * p["layers"] * p["width"] * \
            p["seq"] * tokens
    return 3 * 2 * resnet50_macs(p["image"], p["classes"]) * p["batch"]


def parameters(case: Case) -> int:
    p = case.params
    return gpt_parameters(case) if p["model"] == "gpt" else resnet50_parameters(p["classes"])


def batch_bytes(case: Case) -> int:
    """The batch a step reads: token ids and targets, or float32 images and labels."""
    p = case.params
    if p["model"] == "gpt":
        return 2 * p["batch"] * p["seq"] * INDEX_BYTES
    return p["batch"] * (3 * p["image"] ** 2 * 4 + INDEX_BYTES)


def bytes_moved(case: Case) -> int:
    """36·P (parameters, gradients, AdamW's moments) + the batch: a floor, see above."""
    return PARAMETER_TRAFFIC * parameters(case) + batch_bytes(case)


def input_bytes(case: Case) -> int:
    """The batch and the training state a step works on (float32 parameters, gradients and
    AdamW's two moments: 16·P): over 4x an H100's L2 for both real cases, so the runner
    makes one input set (a step is never L2-resident; rotating batches would change
    nothing)."""
    return batch_bytes(case) + TRAINING_STATE_BYTES * parameters(case)


def make_inputs(case: Case, device) -> dict:
    """A random batch: token ids and next-token targets, or channels_last images and labels."""
    p = case.params
    if p["model"] == "gpt":
        shape = (p["batch"], p["seq"])
        return {"idx": torch.randint(0, p["vocab"], shape, device=device),
                "targets": torch.randint(0, p["vocab"], shape, device=device)}
    images = torch.randn(p["batch"], 3, p["image"], p["image"], device=device)
    return {"images": images.contiguous(memory_format=torch.channels_last),
            "labels": torch.randint(0, p["classes"], (p["batch"],), device=device)}


# --- models and the step ----------------------------------------------------------------


def build_model(case: Case, device) -> torch.nn.Module:
    """The case's model, float32, on ``device``, from the fixed seed."""
    p = case.params
    torch.manual_seed(SEED)
    if p["model"] == "gpt":
        from .models import GPT, GPTConfig

        config = GPTConfig(vocab_size=p["vocab"], block_size=p["seq"], n_layer=p["layers"],
                           n_head=p["heads"], n_embd=p["width"])
        with torch.device(device):
            return GPT(config)
    from torchvision.models import resnet50

    with torch.device(device):
        model = resnet50(weights=None, num_classes=p["classes"])
    return model.to(memory_format=torch.channels_last)


def _loss(case: Case, model, inputs: dict, fused: bool) -> torch.Tensor:
    if case.params["model"] == "gpt":
        return model(inputs["idx"], inputs["targets"], fused_loss=fused)[1]
    logits = model(inputs["images"])
    if fused:
        import fusedops

        return fusedops.cross_entropy(logits, inputs["labels"])
    return F.cross_entropy(logits, inputs["labels"])


def make_step(case: Case, input_sets, *, fused: bool, tier: str = "auto",
              compiled: bool = False):
    """The timed callable: one training step per call, rotating through ``input_sets``."""
    from .timing import rotate

    device = next(t for t in input_sets[0].values()).device
    model = build_model(case, device)
    if fused:
        import fusedops

        fusedops.patch(model)
    forward_model = model
    if compiled:
        fresh_dynamo_cache()
        forward_model = torch.compile(model, dynamic=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY,
                                  fused=device.type == "cuda")
    autocast_dtype = torch_dtype(case.params["dtype"])

    def contexts() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if autocast_dtype != torch.float32:
            stack.enter_context(torch.autocast(device.type, dtype=autocast_dtype))
        if fused:
            import fusedops

            stack.enter_context(fusedops.use_backend(tier))
            stack.enter_context(fusedops.fused_sdpa())
        return stack

    def step_on(inputs):
        def step():
            with contexts():
                loss = _loss(case, forward_model, inputs, fused)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        return step

    model.train()
    return rotate([step_on(inputs) for inputs in input_sets])


# --- implementations --------------------------------------------------------------------


def _needs_cuda() -> str | None:
    return needs_cuda(because="a training step at these sizes is GPU work")


def _fusedops_unavailable(tier: str):
    def unavailable() -> str | None:
        reason = _needs_cuda()
        if reason is None and tier != "auto":
            reason = tier_unavailable(tier)
        return reason

    return unavailable


_torchvision_missing = package_missing("torchvision", "torchvision")


def model_unsupported(case: Case) -> str | None:
    """ResNet-50 comes from torchvision: without it the case is skipped, saying so."""
    if case.params["model"] == "resnet50":
        reason = _torchvision_missing()
        if reason is not None:
            return f"{reason} (ResNet-50 is torchvision.models.resnet50)"
    return None


def _implementation(name: str, *, fused: bool, tier: str = "auto", compiled: bool = False,
                    note: str) -> Implementation:
    def setup(case, input_sets):
        return make_step(case, input_sets, fused=fused, tier=tier, compiled=compiled)

    return Implementation(name=name, setup=setup,
                          unavailable=(_fusedops_unavailable(tier) if fused
                                       else lambda: _needs_cuda()),
                          unsupported=model_unsupported, baseline=not fused,
                          quick=not compiled and tier == "auto", note=note)


_PATCHED = ("fusedops.patch(model), fused_sdpa(), fused loss (linear_cross_entropy for the "
            "GPT, cross_entropy for ResNet-50)")

IMPLEMENTATIONS = (
    _implementation("eager", fused=False,
                    note="the unpatched model: F.cross_entropy of the logits, SDPA"),
    _implementation("torch.compile", fused=False, compiled=True,
                    note="torch.compile(model, dynamic=False), eager AdamW step"),
    _implementation("fusedops", fused=True, note=_PATCHED + ", backend auto"),
    _implementation("fusedops-triton", fused=True, tier="triton",
                    note=_PATCHED + ', use_backend("triton")'),
    _implementation("fusedops+torch.compile", fused=True, compiled=True,
                    note="the fusedops row under torch.compile(model, dynamic=False)"),
    _implementation("fusedops-triton+torch.compile", fused=True, tier="triton", compiled=True,
                    note="the fusedops-triton row under torch.compile(model, dynamic=False)"),
)

FORMULAS = (
    "One step = forward under bf16 autocast + loss + backward + AdamW (fused, float32 "
    "parameters). Throughput = tokens (GPT: B·S) or images (ResNet-50: B) per step / median "
    "step time; the case label says how many per step. FLOPs: GPT 6·N·T + 12·L·C·S·T with "
    "T = B·S tokens and N = 12·L·C² + V·C (attention counted over the full S×S scores, "
    "PaLM's convention: a causal kernel does about half of that term); ResNet-50 3 × the "
    "forward, the forward 2 × its multiply-adds (4.09 G per 224² image). Bytes: a floor of "
    "36·P for P float32 parameters (read in the forward, gradient written, AdamW reads 4 "
    "and writes 3 tensors of P) plus the batch; activations not counted. Peak memory: "
    "during one step, beyond the parameters, AdamW state and batch held between steps "
    "(gradients are set to None after each step), i.e. activations, gradients, logits and "
    "workspaces."
)

FAMILY = Family(
    name="training",
    description="one training step (forward, backward, AdamW) of GPT-2 small (B=8, S=1024) "
                "and ResNet-50 (B=64, 224², channels_last), bf16 autocast",
    cases=cases,
    implementations=IMPLEMENTATIONS,
    make_inputs=make_inputs,
    bytes_moved=bytes_moved,
    flops=flops,
    input_bytes=input_bytes,
    bound="compute",
    ratio_baselines=("eager", "torch.compile"),
    panel_key="model",
    formulas=FORMULAS,
    extra={"items_per_step": items_per_step, "throughput": throughput,
           "throughput_unit": throughput_unit},
)
