"""Softmax-cross-entropy: cases, implementations and the bytes each case must move.

Cases (the issue's grid): N rows in {4096, 16384}, C classes in {32000, 128256, 262144}
(Llama-2, Llama-3 and Gemma vocabularies), bfloat16 logits, ``reduction="mean"``, random
class targets with about 1% of them ``ignore_index``; forward alone, and forward+backward.
``--quick`` keeps N=4096 C=32000 and N=16384 C=128256 (the headline case), both modes.

Implementations: fusedops forced onto its Triton tier and onto its CUDA tier (a tier that
``fusedops.backends()`` reports unavailable is skipped with the reason), and the baselines
eager ``F.cross_entropy``, ``torch.compile(F.cross_entropy, dynamic=False)`` and, when it is
installed, Liger-Kernel's ``LigerCrossEntropyLoss``. Forward+backward is
``torch.autograd.grad(loss, logits)``: no ``.grad`` accumulation inside the timed call.

Bytes (the fewest the op must move; ``e`` = bytes per logit, 2 for bf16; int64 targets):

    forward          N*C*e (read the logits) + 8*N (read the targets) + 4*N (write one
                     float32 per row: the loss, or the lse a backward needs)
    forward+backward forward + N*C*e (read the logits again) + N*C*e (write the gradient)

That is the contract of fusedops' kernels (save only the lse, re-read the logits in the
backward). An implementation that computes the gradient inside the forward (Liger-Kernel)
moves only two passes over the logits and can exceed 100% of the copy ceiling on this
count; its GB/s is then "effective" bandwidth, which is what a user compares.

FLOPs (about, an exp counted as one): forward 4*N*C (max, subtract, exp, add), backward
4*N*C more (subtract the lse, exp, scale, write). Cross-entropy is memory-bound by three
orders of magnitude; the TFLOP/s column only shows how far.

Liger-Kernel writes the gradient over its input in the forward, so it gets its own copy of
the logits (outside the timed call and outside the peak-memory count); after the first call
it runs on its own gradients, which are finite and timed the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import (
    IGNORE_FRACTION,
    IGNORE_INDEX,
    ROW_OUTPUT_BYTES,
    TARGET_BYTES,
    element_bytes,
    fresh_dynamo_cache,
    fusedops_implementation,
    needs_grad,
    package_missing,
    random_targets,
    rotating_over,
    tier_unavailable,
    torch_dtype,
)
from .registry import Case, Family, Implementation

ROWS = (4096, 16384)
CLASSES = (32000, 128256, 262144)
QUICK_SHAPES = {(4096, 32000), (16384, 128256)}
MODES = ("fwd", "fwd+bwd")
DTYPE = "bfloat16"


def cases(quick: bool) -> list[Case]:
    out = []
    for mode in MODES:
        for rows in ROWS:
            for classes in CLASSES:
                in_quick = (rows, classes) in QUICK_SHAPES
                if quick and not in_quick:
                    continue
                params = {"mode": mode, "N": rows, "C": classes, "dtype": DTYPE,
                          "reduction": "mean", "ignore_fraction": IGNORE_FRACTION}
                out.append(Case(id=f"{mode}_N{rows}_C{classes}_{DTYPE}",
                                label=f"N={rows} C={classes}", params=params, quick=in_quick))
    return out


def bytes_moved(case: Case) -> int:
    """The fewest bytes the op must move (see the module docstring for the formula)."""
    n, c, e = case.params["N"], case.params["C"], element_bytes(case)
    forward = n * c * e + n * TARGET_BYTES + n * ROW_OUTPUT_BYTES
    if case.params["mode"] == "fwd":
        return forward
    return forward + n * c * e + n * c * e


def flops(case: Case) -> int:
    n, c = case.params["N"], case.params["C"]
    return 4 * n * c * (1 if case.params["mode"] == "fwd" else 2)


def input_bytes(case: Case) -> int:
    n, c, e = case.params["N"], case.params["C"], element_bytes(case)
    return n * c * e + n * TARGET_BYTES


def make_inputs(case: Case, device) -> dict:
    """Random bf16 logits and int64 targets with ~1% ignore_index (never zeros)."""
    n, c = case.params["N"], case.params["C"]
    logits = torch.randn(n, c, device=device, dtype=torch_dtype(case.params["dtype"]))
    target = random_targets(n, c, case.params["ignore_fraction"], device)
    if needs_grad(case):
        logits.requires_grad_(True)
    return {"logits": logits, "target": target}


def _bind(loss_fn, case: Case, inputs: dict):
    """The timed callable: the loss, or the loss and its gradient with respect to the logits."""
    logits, target = inputs["logits"], inputs["target"]
    if case.params["mode"] == "fwd":
        return lambda: loss_fn(logits, target)
    return lambda: torch.autograd.grad(loss_fn(logits, target), logits)[0]


_rotating = rotating_over(_bind)


# --- fusedops tiers ---------------------------------------------------------------------


def _fusedops_tier(tier: str) -> Implementation:
    def setup(case, input_sets):
        import fusedops

        def loss_fn(logits, target):
            with fusedops.use_backend(tier):
                return fusedops.cross_entropy(logits, target, ignore_index=IGNORE_INDEX,
                                              reduction=case.params["reduction"])

        return _rotating(loss_fn, case, input_sets)

    return fusedops_implementation(tier, setup, unavailable=lambda: tier_unavailable(tier))


# --- baselines --------------------------------------------------------------------------


def _eager_setup(case, input_sets):
    def loss_fn(logits, target):
        return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX,
                               reduction=case.params["reduction"])

    return _rotating(loss_fn, case, input_sets)


def _compile_setup(case, input_sets):
    fresh_dynamo_cache()
    compiled = torch.compile(F.cross_entropy, dynamic=False)

    def loss_fn(logits, target):
        return compiled(logits, target, ignore_index=IGNORE_INDEX,
                        reduction=case.params["reduction"])

    return _rotating(loss_fn, case, input_sets)


_liger_unavailable = package_missing("liger_kernel", "liger-kernel")


def _liger_loss_module(reduction: str):
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
    except ImportError:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    return LigerCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction=reduction)


def _liger_setup(case, input_sets):
    module = _liger_loss_module(case.params["reduction"])

    def loss_fn(logits, target):
        out = module(logits, target)
        if isinstance(out, tuple):  # versions that return (loss, z_loss, ...)
            out = out[0]
        return getattr(out, "loss", out)  # versions that return a CrossEntropyOutput

    # Liger overwrites its input with the gradient: give it copies of the logits.
    own = [{"logits": inputs["logits"].detach().clone()
            .requires_grad_(inputs["logits"].requires_grad),
            "target": inputs["target"]} for inputs in input_sets]
    return _rotating(loss_fn, case, own)


IMPLEMENTATIONS = (
    _fusedops_tier("triton"),
    _fusedops_tier("cuda"),
    Implementation(name="eager", setup=_eager_setup, note="F.cross_entropy"),
    Implementation(name="torch.compile", setup=_compile_setup,
                   note="torch.compile(F.cross_entropy, dynamic=False)"),
    Implementation(name="liger", setup=_liger_setup, unavailable=_liger_unavailable,
                   note="liger_kernel LigerCrossEntropyLoss"),
)

FORMULAS = (
    "Bytes: forward = N·C·e (read logits) + 8·N (int64 targets) + 4·N (one float32 per row); "
    "forward+backward = forward + N·C·e (read logits again) + N·C·e (write the gradient); "
    "e = 2 for bf16. FLOPs ≈ 4·N·C per pass (exp counted as one). "
    "An implementation that writes the gradient during the forward (Liger) moves fewer bytes "
    "than this count and can show more than 100% of the copy ceiling."
)

FAMILY = Family(
    name="cross_entropy",
    description="softmax-cross-entropy, bf16 logits, reduction='mean', ~1% ignore_index",
    cases=cases,
    implementations=IMPLEMENTATIONS,
    make_inputs=make_inputs,
    bytes_moved=bytes_moved,
    flops=flops,
    input_bytes=input_bytes,
    bound="memory",
    ratio_baselines=("eager", "torch.compile", "liger"),
    panel_key="mode",
    formulas=FORMULAS,
)
