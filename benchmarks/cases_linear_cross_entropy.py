"""Linear + cross-entropy without the logits: cases, implementations, counts, memory.

``linear_cross_entropy(x, W, t)`` == ``F.cross_entropy(F.linear(x, W), t)`` for x (T, H),
W (V, H), class targets t (T,), where a fused implementation never materialises the
(T, V) logits. Peak memory is the headline: the report's ``peak GiB`` (what one call
allocates beyond its inputs) is to be read against one bf16 (T, V) logits tensor,
``logits_bytes(case)`` (``memory_fraction`` gives the ratio; ``FAMILY.extra`` carries both).

Case (the issue's): T = 16384 tokens, H = 4096 hidden, V = 128256 (the Llama-3 vocabulary),
bfloat16, ``reduction="mean"``, ~1% of the targets ``ignore_index``, no bias; forward alone,
and forward+backward (``torch.autograd.grad`` of the loss with respect to x and W).
``--quick`` keeps forward+backward, the training case. One bf16 logits tensor is
T·V·2 B = 4.20 GB (3.91 GiB). The floor for forward+backward is the two gradients it returns,
(T + V)·H·2 B = 1.18 GB, 0.28 of the logits; for the forward it is ~nothing.

Implementations: fusedops forced onto its Triton and CUDA tiers (skipped, with the reason,
where ``fusedops.backends()`` reports the tier unavailable, where
``fusedops.linear_cross_entropy`` does not exist yet, or where a tiny probe call raises
``NotImplementedError``); eager ``F.cross_entropy(F.linear(x, W), t)`` (materialises the
logits, and their gradient in the backward); ``torch.compile`` of it (``dynamic=False``);
Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` (chunked, gradients computed in the
forward) when installed; Apple's cut-cross-entropy (``cut_cross_entropy.linear_cross_entropy``)
when installed, twice: ``cce`` with ``filter_eps=None`` (exact gradients, the like-for-like
comparison) and ``cce-filtered`` with the package's default gradient filtering (skips the
blocks whose softmax is below bf16 eps/32: its speed depends on the logit distribution,
here random logits of standard deviation ~1; left out of ``--quick``).

FLOPs: forward 2·T·H·V (the logits) + 4·T·V (the softmax, exp counted as one); forward+
backward 6·T·H·V + 8·T·V (grad x = dlogits·W and grad W = dlogitsᵀ·x, 2·T·H·V each). An
implementation that recomputes the logits in its backward does 2·T·H·V more than counted.

Bytes (the fewest, e = 2 for bf16, int64 targets): forward T·H·e + V·H·e + 8·T (read x,
W, t) + 4·T (one float32 per row, the lse); forward+backward adds reading x and W again and
writing grad x (T·H·e) and grad W (V·H·e). Compute-bound: GB/s is only context.

Quick-profile estimate on an H100: eager forward+backward is ~51.6 TFLOP (~80 ms at ~650
TFLOP/s). --quick has 1 case (forward+backward) x 6 implementations (fusedops-triton,
fusedops-cuda, eager, torch.compile, liger, cce; one not installed or not implemented skips
at once), ~3 s each to time (10+ calls) and take the peak memory → ~20 s, plus the first
calls: torch.compile of forward and backward (~40 s), Triton JIT and autotuning of fusedops'
kernels (~60 s), Liger and cut-cross-entropy (~10–20 s each): about 2.5 minutes.
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
    fusedops_tier_unavailable,
    needs_grad,
    package_missing,
    probe_device,
    random_targets,
    rotating_over,
    torch_dtype,
)
from .registry import Case, Family, Implementation

TOKENS = 16384
HIDDEN = 4096
VOCAB = 128256
MODES = ("fwd", "fwd+bwd")
QUICK_MODES = ("fwd+bwd",)
DTYPE = "bfloat16"
PROBE_SHAPE = (64, 64, 256)  # (T, H, V) of the availability probe


def make_case(mode: str, tokens: int = TOKENS, hidden: int = HIDDEN, vocab: int = VOCAB,
              dtype: str = DTYPE) -> Case:
    params = {"mode": mode, "T": tokens, "H": hidden, "V": vocab, "dtype": dtype,
              "bias": False, "reduction": "mean", "ignore_fraction": IGNORE_FRACTION}
    return Case(id=f"{mode}_T{tokens}_H{hidden}_V{vocab}_{dtype}",
                label=f"T={tokens} H={hidden} V={vocab}", params=params,
                quick=mode in QUICK_MODES)


def cases(quick: bool) -> list[Case]:
    return [c for c in (make_case(mode) for mode in MODES) if c.quick or not quick]


def logits_bytes(case: Case) -> int:
    """Bytes of one bf16 (tokens x vocab) logits tensor: what the peak memory is read against."""
    return case.params["T"] * case.params["V"] * torch.bfloat16.itemsize


def memory_fraction(case: Case, peak_bytes: int) -> float:
    """A peak memory as a fraction of one bf16 logits tensor of the case."""
    return peak_bytes / logits_bytes(case)


def flops(case: Case) -> int:
    t, h, v = case.params["T"], case.params["H"], case.params["V"]
    if case.params["mode"] == "fwd":
        return 2 * t * h * v + 4 * t * v
    return 6 * t * h * v + 8 * t * v


def bytes_moved(case: Case) -> int:
    """The fewest bytes the op must move (see the module docstring for the formula)."""
    t, h, v, e = case.params["T"], case.params["H"], case.params["V"], element_bytes(case)
    forward = t * h * e + v * h * e + t * TARGET_BYTES + t * ROW_OUTPUT_BYTES
    if case.params["mode"] == "fwd":
        return forward
    return forward + 2 * (t * h * e + v * h * e)


def input_bytes(case: Case) -> int:
    t, h, v, e = case.params["T"], case.params["H"], case.params["V"], element_bytes(case)
    return t * h * e + v * h * e + t * TARGET_BYTES


def make_inputs(case: Case, device) -> dict:
    """Random x, W scaled by H^-1/2 (logits of standard deviation ~1), int64 targets with
    ~1% ignore_index."""
    t, h, v = case.params["T"], case.params["H"], case.params["V"]
    dtype = torch_dtype(case.params["dtype"])
    x = torch.randn(t, h, device=device, dtype=dtype)
    w = torch.randn(v, h, device=device, dtype=dtype) * h ** -0.5
    target = random_targets(t, v, case.params["ignore_fraction"], device)
    if needs_grad(case):
        x.requires_grad_(True)
        w.requires_grad_(True)
    return {"input": x, "weight": w, "target": target}


def reference(x, w, target, reduction="mean"):
    return F.cross_entropy(F.linear(x, w), target, ignore_index=IGNORE_INDEX,
                           reduction=reduction)


def _bind(loss_fn, case: Case, inputs: dict):
    """The timed callable: the loss, or its gradients with respect to x and W."""
    x, w, target = inputs["input"], inputs["weight"], inputs["target"]
    if case.params["mode"] == "fwd":
        return lambda: loss_fn(x, w, target)
    return lambda: torch.autograd.grad(loss_fn(x, w, target), (x, w))


_rotating = rotating_over(_bind)


def _loss_of(out):
    """The loss tensor out of what a library returns (a tensor, a tuple, an output object)."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    return getattr(out, "loss", out)


# --- fusedops tiers ---------------------------------------------------------------------


def _fusedops_loss(tier: str, reduction: str):
    import fusedops

    def loss_fn(x, w, target):
        with fusedops.use_backend(tier):
            return fusedops.linear_cross_entropy(x, w, target, ignore_index=IGNORE_INDEX,
                                                 reduction=reduction)

    return loss_fn


_probed: dict[str, str | None] = {}


def fusedops_unavailable(tier: str) -> str | None:
    """Why ``fusedops.linear_cross_entropy`` cannot be timed on ``tier`` (a tiny forced
    forward+backward probes it)."""

    def probe():
        case = make_case("fwd+bwd", *PROBE_SHAPE)
        _bind(_fusedops_loss(tier, "mean"), case, make_inputs(case, probe_device()))()

    return fusedops_tier_unavailable(tier, "linear_cross_entropy", probe, _probed)


def _fusedops_tier(tier: str) -> Implementation:
    def setup(case, input_sets):
        return _rotating(_fusedops_loss(tier, case.params["reduction"]), case, input_sets)

    return fusedops_implementation(tier, setup, unavailable=lambda: fusedops_unavailable(tier))


# --- baselines --------------------------------------------------------------------------


def _eager_setup(case, input_sets):
    reduction = case.params["reduction"]
    return _rotating(lambda x, w, t: reference(x, w, t, reduction), case, input_sets)


def _compile_setup(case, input_sets):
    fresh_dynamo_cache()
    compiled = torch.compile(reference, dynamic=False)
    reduction = case.params["reduction"]
    return _rotating(lambda x, w, t: compiled(x, w, t, reduction), case, input_sets)


_liger_unavailable = package_missing("liger_kernel", "liger-kernel")


def _liger_loss_module(reduction: str):
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyLoss,
        )
    except ImportError:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction=reduction)


def _liger_setup(case, input_sets):
    module = _liger_loss_module(case.params["reduction"])

    def loss_fn(x, w, target):  # Liger takes the weight first
        return _loss_of(module(w, x, target))

    return _rotating(loss_fn, case, input_sets)


_cce_unavailable = package_missing("cut_cross_entropy", "cut-cross-entropy")


def _cce_setup(exact: bool):
    def setup(case, input_sets):
        from cut_cross_entropy import linear_cross_entropy

        options = {"filter_eps": None} if exact else {}
        reduction = case.params["reduction"]

        def loss_fn(x, w, target):
            return linear_cross_entropy(x, w, target, ignore_index=IGNORE_INDEX,
                                        reduction=reduction, **options)

        return _rotating(loss_fn, case, input_sets)

    return setup


IMPLEMENTATIONS = (
    _fusedops_tier("triton"),
    _fusedops_tier("cuda"),
    Implementation(name="eager", setup=_eager_setup,
                   note="F.cross_entropy(F.linear(x, w), t)"),
    Implementation(name="torch.compile", setup=_compile_setup,
                   note="torch.compile(eager, dynamic=False)"),
    Implementation(name="liger", setup=_liger_setup, unavailable=_liger_unavailable,
                   note="liger_kernel LigerFusedLinearCrossEntropyLoss"),
    Implementation(name="cce", setup=_cce_setup(exact=True), unavailable=_cce_unavailable,
                   note="cut_cross_entropy.linear_cross_entropy(filter_eps=None): exact"),
    Implementation(name="cce-filtered", setup=_cce_setup(exact=False),
                   unavailable=_cce_unavailable, quick=False,
                   note="cut_cross_entropy.linear_cross_entropy, default gradient filtering "
                        "(data-dependent speed)"),
)

FORMULAS = (
    "Peak memory is the headline: read `peak GiB` against one bf16 (T, V) logits tensor, "
    "T·V·2 B (3.91 GiB at T=16384, V=128256); forward+backward cannot go below its two "
    "gradients, (T + V)·H·2 B (0.28 of the logits). FLOPs: forward 2·T·H·V + 4·T·V; "
    "forward+backward 6·T·H·V + 8·T·V (a backward that recomputes the logits does 2·T·H·V "
    "more than counted). Bytes (e = 2 for bf16): forward T·H·e + V·H·e + 8·T (targets) + "
    "4·T (lse); forward+backward adds x and W read again and grad x, grad W written. "
    "cce is exact (filter_eps=None); cce-filtered skips small gradients, so its time "
    "depends on the logits (here random, standard deviation ~1)."
)

FAMILY = Family(
    name="linear_cross_entropy",
    description="linear + cross-entropy without the logits, bf16, reduction='mean', ~1% "
                "ignore_index; peak memory against one bf16 logits tensor",
    cases=cases,
    implementations=IMPLEMENTATIONS,
    make_inputs=make_inputs,
    bytes_moved=bytes_moved,
    flops=flops,
    input_bytes=input_bytes,
    bound="compute",
    ratio_baselines=("eager", "torch.compile", "liger", "cce"),
    panel_key="mode",
    formulas=FORMULAS,
    extra={"memory_reference_bytes": logits_bytes,
           "memory_reference": "one bf16 (tokens x vocab) logits tensor",
           "memory_fraction": memory_fraction},
)
