"""Attention ``softmax(q·kᵀ·scale [+ causal mask])·v``: cases, implementations, FLOPs, bytes.

Cases (the setting of the FlashAttention papers): bfloat16, batch × seqlen = 16384 tokens,
heads × D = 2048, D in {64, 128, 256}, seqlen S in {512, 1024, 2048, 4096, 8192, 16384}
(B = 16384 / S, H = 2048 / D; q, k and v all (B, H, S, D), so Hq = Hkv = H), the default
scale D^-1/2, full and causal. Three modes:

- ``fwd``: the forward alone, on inputs that do not require grad.
- ``bwd``: the backward alone: the forward runs once when the callable is made (outside the
  timed call) and its graph is kept; each timed call is ``torch.autograd.grad(out, (q, k,
  v), grad_out, retain_graph=True)`` with a fixed random ``grad_out``.
- ``fwd+bwd``: ``torch.autograd.grad(attention(q, k, v), (q, k, v), grad_out)``.

``torch.autograd.grad`` returns the gradients, so no ``.grad`` accumulates between calls.
``--quick`` keeps D=128, S=4096 (B=4, H=16), full and causal, ``fwd`` and ``fwd+bwd``: 4
cases.

Implementations:

- ``fusedops-triton``, ``fusedops-cuda``: ``fusedops.attention(q, k, v, causal=...)`` under
  ``fusedops.use_backend(tier)``; ``fusedops-triton-deterministic`` the same with
  ``deterministic=True`` (its bitwise reproducible backward; left out of ``--quick``).
  Skipped, with the reason, where ``fusedops.backends()`` reports the tier unavailable,
  where ``fusedops.attention`` does not exist yet, where a tiny forced forward+backward
  raises ``NotImplementedError`` (the tier has no attention), and per case where a tiny
  call with the case's D, dtype, masking and mode raises it.
- ``sdpa-flash``, ``sdpa-cudnn``, ``sdpa-efficient``: ``F.scaled_dot_product_attention(q,
  k, v, is_causal=...)`` under ``torch.nn.attention.sdpa_kernel`` with one backend:
  FLASH_ATTENTION (torch's bundled FlashAttention-2; skipped if this process swapped another
  implementation in with ``activate_flash_attention_impl``), CUDNN_ATTENTION and
  EFFICIENT_ATTENTION (memory-efficient, from xformers). CUDA only. A case the backend does
  not run (SDPA's "No available kernel") is skipped, with torch's warnings as the reason; a
  tiny call with the case's D, dtype, masking and mode probes it. ``sdpa-flash`` is the
  ratio every other row is quoted against (``× sdpa-flash``), ``sdpa-cudnn`` the second.
- ``flex-attention``: ``torch.nn.attention.flex_attention.flex_attention`` under
  ``torch.compile(dynamic=False)``, causal through a block mask made once per case, outside
  the timed call. CUDA only (its CPU path has no backward). Compiles for tens of seconds
  per case: left out of ``--quick``.
- ``eager-math``: ``softmax((q·scale)·kᵀ [masked]) · v`` in plain torch ops, which
  materialise the (B, H, S, S) scores and probabilities. Skipped where one such matrix
  would exceed 8 GiB (D=64, S=16384: 16 GiB), saying so.
- ``flash-attn-4``: ``flash_attn.cute.interface.flash_attn_func`` from the ``flash-attn-4``
  package (FlashAttention 4, CuTe DSL; Hopper and Blackwell) where it is installed. It takes
  (B, S, H, D): it gets its own transposed, contiguous copies of the inputs, made outside
  the timed call. Skipped per case where a tiny call with the case's parameters fails an
  assertion of its interface (a head dimension or GPU it does not cover). Its kernels are
  JIT-compiled on first use: left out of ``--quick``.

FLOPs (FlashAttention's convention, the matmuls only): forward 4·B·H·S²·D (q·kᵀ and P·v,
2·B·H·S²·D each); backward 2.5× the forward (5 matmuls against 2: recomputed q·kᵀ, dO·vᵀ,
Pᵀ·dO, dSᵀ·q and dS·k); forward+backward 3.5× the forward. Causal counts half. An
implementation that recomputes more in its backward (fusedops' deterministic Triton backward:
7 matmuls) does more than it is credited with.

Bytes (the fewest the op must move, e = 2 for bf16, N = B·H·S·D elements per tensor,
R = B·H·S rows, one float32 lse per row; causal does not change them, every element is still
read or written once):

    fwd      read q, k, v; write out                                   4·N·e
    bwd      read q, k, v, out, grad_out and the lse (4·R);
             write dq, dk, dv                                          8·N·e + 4·R
    fwd+bwd  the forward, writing the lse as well (4·R), then the
             backward                                                  12·N·e + 8·R

FLOPs per byte of the forward are S/2 (S/4 causal): 256 at S=512, near an H100's ridge
(~300 FLOP/B), and 8192 at S=16384, far above it. Read TFLOP/s, ``% matmul`` and the
ratios; GB/s is context.

Quick-profile estimate on an H100: every quick case moves the same bytes (N·e = 64 MiB per
tensor); the forward is 0.55 PFLOP (~1.5 ms at FlashAttention-2's ~350 TFLOP/s), eager-math
a few ms (2 GiB score matrices). 4 cases x 6 implementations (fusedops' two tiers, the
three SDPA backends, eager-math; a tier without attention skips at once), ~2 s each for the
inputs, do_bench and the peak memory → ~45 s, plus the first calls: Triton JIT and
autotuning of fusedops' forward and two backward kernels (~30–90 s), cuDNN plan building
(seconds): about 1.5–2.5 minutes.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .common import (
    element_bytes,
    fresh_dynamo_cache,
    fusedops_case_unsupported,
    fusedops_implementation,
    fusedops_tier_unavailable,
    needs_cuda,
    needs_grad,
    package_missing,
    probe_device,
    probe_once,
    rotating_over,
    torch_dtype,
)
from .registry import Case, Family, Implementation

TOKENS = 16384  # batch x seqlen
WIDTH = 2048  # heads x D
HEAD_DIMS = (64, 128, 256)
SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
CAUSAL = (False, True)
MODES = ("fwd", "bwd", "fwd+bwd")
QUICK_HEAD_DIM = 128
QUICK_SEQLEN = 4096
QUICK_MODES = ("fwd", "fwd+bwd")
DTYPE = "bfloat16"
LSE_BYTES = 4  # one float32 log-sum-exp per query row
EAGER_SCORE_LIMIT_BYTES = 8 * 2**30  # eager-math skips a case whose score matrix is larger
PROBE_SEQLEN = 128  # the tiny calls that probe whether an implementation runs a case
PROBE_HEADS = 2
FLASH_ATTN_4 = "flash-attn-4"  # the pip package providing flash_attn.cute

# SDPA's messages when the forced backend cannot run a call (CUDA; CPU)
SDPA_NO_KERNEL = ("No available kernel", "No viable backend")


def make_case(mode: str, seqlen: int, head_dim: int, causal: bool, *,
              batch: int | None = None, heads: int | None = None, dtype: str = DTYPE) -> Case:
    """One case; the batch and heads default to the grid's B = 16384 / S, H = 2048 / D."""
    b = TOKENS // seqlen if batch is None else batch
    h = WIDTH // head_dim if heads is None else heads
    in_quick = (head_dim == QUICK_HEAD_DIM and seqlen == QUICK_SEQLEN and mode in QUICK_MODES
                and batch is None and heads is None and dtype == DTYPE)
    params = {"mode": mode, "B": b, "H": h, "S": seqlen, "D": head_dim, "causal": causal,
              "dtype": dtype}
    masking = "causal" if causal else "full"
    return Case(id=f"{mode}_B{b}_H{h}_S{seqlen}_D{head_dim}_{masking}_{dtype}",
                label=f"S={seqlen} D={head_dim}" + (" causal" if causal else ""),
                params=params, quick=in_quick)


def cases(quick: bool) -> list[Case]:
    out = []
    for mode in MODES:
        for head_dim in HEAD_DIMS:
            for seqlen in SEQLENS:
                for causal in CAUSAL:
                    out.append(make_case(mode, seqlen, head_dim, causal))
    return [c for c in out if c.quick or not quick]


def forward_flops(case: Case) -> int:
    """4·B·H·S²·D (q·kᵀ and P·v), half of it causal."""
    p = case.params
    total = 4 * p["B"] * p["H"] * p["S"] * p["S"] * p["D"]
    return total // 2 if p["causal"] else total


def flops(case: Case) -> int:
    """The forward's count x 1 (fwd), x 2.5 (bwd: 5 matmuls against 2), x 3.5 (fwd+bwd)."""
    halves = {"fwd": 2, "bwd": 5, "fwd+bwd": 7}[case.params["mode"]]
    return forward_flops(case) * halves // 2


def _elements(case: Case) -> int:
    p = case.params
    return p["B"] * p["H"] * p["S"] * p["D"]


def _rows(case: Case) -> int:
    p = case.params
    return p["B"] * p["H"] * p["S"]


def bytes_moved(case: Case) -> int:
    """The fewest bytes the op must move (see the module docstring for the formula)."""
    n, e, lse = _elements(case), element_bytes(case), _rows(case) * LSE_BYTES
    forward = 4 * n * e  # read q, k, v; write out
    backward = 5 * n * e + lse + 3 * n * e  # read q, k, v, out, grad_out, lse; write dq, dk, dv
    mode = case.params["mode"]
    if mode == "fwd":
        return forward
    if mode == "bwd":
        return backward
    return forward + lse + backward  # the forward also writes the lse the backward reads


def input_bytes(case: Case) -> int:
    n, e = _elements(case), element_bytes(case)
    return (4 if needs_grad(case) else 3) * n * e  # q, k, v (and grad_out)


def score_matrix_bytes(case: Case) -> int:
    """Bytes of one (B, H, S, S) score matrix in the case's dtype: what eager-math makes."""
    p = case.params
    return p["B"] * p["H"] * p["S"] * p["S"] * element_bytes(case)


def make_inputs(case: Case, device) -> dict:
    """Random q, k, v (standard normal: scores q·kᵀ·D^-1/2 of standard deviation ~1) and,
    for the modes with a backward, a fixed random grad_out."""
    p = case.params
    shape = (p["B"], p["H"], p["S"], p["D"])
    dtype = torch_dtype(p["dtype"])
    train = needs_grad(case)
    inputs = {name: torch.randn(shape, device=device, dtype=dtype).requires_grad_(train)
              for name in ("q", "k", "v")}
    inputs["grad_out"] = torch.randn(shape, device=device, dtype=dtype) if train else None
    return inputs


def causal_mask(seqlen: int, device) -> torch.Tensor:
    """True where query i must not see key j (j > i): equal lengths, so top-left and
    bottom-right alignment agree."""
    return torch.ones(seqlen, seqlen, dtype=torch.bool, device=device).triu(1)


def reference(q, k, v, mask: torch.Tensor | None = None):
    """What every implementation computes, in plain torch ops (materialises the scores)."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def _bind(forward, case: Case, inputs: dict):
    """The timed callable: the output (fwd); the gradients of <output, grad_out> with respect
    to q, k, v (fwd+bwd); or those gradients from a forward run now, once, whose graph every
    call reuses (bwd)."""
    q, k, v, grad_out = inputs["q"], inputs["k"], inputs["v"], inputs["grad_out"]
    mode = case.params["mode"]
    if mode == "fwd":
        return lambda: forward(q, k, v)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(forward(q, k, v), (q, k, v), grad_out)
    out = forward(q, k, v)  # untimed: only the backward is measured
    return lambda: torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)


_rotating = rotating_over(_bind)


def _probe_case(case: Case) -> Case:
    """A tiny case with the same D, dtype, masking and mode."""
    p = case.params
    return make_case(p["mode"], PROBE_SEQLEN, p["D"], p["causal"], batch=1, heads=PROBE_HEADS,
                     dtype=p["dtype"])


def _probe_key(name: str, case: Case) -> tuple:
    p = case.params
    return (name, p["D"], p["dtype"], p["causal"], p["mode"])


def _describe(case: Case) -> str:
    p = case.params
    what = {"fwd": "forward", "bwd": "backward", "fwd+bwd": "forward+backward"}[p["mode"]]
    return f"D={p['D']} {p['dtype']} {'causal' if p['causal'] else 'full'} {what}"


# what the tiny calls found, per (implementation, D, dtype, masking, mode)
_case_probes: dict[tuple, str | None] = {}


# --- fusedops tiers ---------------------------------------------------------------------


def _fusedops_forward(tier: str, causal: bool, deterministic: bool = False):
    import fusedops

    def forward(q, k, v):
        with fusedops.use_backend(tier):
            return fusedops.attention(q, k, v, causal=causal, deterministic=deterministic)

    return forward


_probed: dict[str, str | None] = {}


def fusedops_unavailable(tier: str) -> str | None:
    """Why ``fusedops.attention`` cannot be timed on ``tier`` (a tiny forced forward+backward,
    D=64, causal, probes it)."""

    def probe():
        case = make_case("fwd+bwd", PROBE_SEQLEN, 64, True, batch=1, heads=PROBE_HEADS)
        _bind(_fusedops_forward(tier, True), case, make_inputs(case, probe_device()))()

    return fusedops_tier_unavailable(tier, "attention", probe, _probed)


def fusedops_unsupported(tier: str, case: Case) -> str | None:
    """Why the tier does not run this case: a tiny forced call with the case's D, dtype,
    masking and mode raises NotImplementedError."""
    small = _probe_case(case)

    def call():
        _bind(_fusedops_forward(tier, small.params["causal"]), small,
              make_inputs(small, probe_device()))()

    return fusedops_case_unsupported(tier, "attention", _describe(case), call,
                                     _probe_key(f"fusedops-{tier}", case), _case_probes)


def _fusedops_tier(tier: str, deterministic: bool = False) -> Implementation:
    def setup(case, input_sets):
        return _rotating(_fusedops_forward(tier, case.params["causal"], deterministic), case,
                         input_sets)

    return fusedops_implementation(tier, setup,
                                   unavailable=lambda: fusedops_unavailable(tier),
                                   unsupported=lambda case: fusedops_unsupported(tier, case),
                                   variant="deterministic" if deterministic else "",
                                   note=", deterministic=True" if deterministic else "",
                                   quick=not deterministic)


# --- SDPA backends ----------------------------------------------------------------------


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return getattr(SDPBackend, name)


def _sdpa_forward(backend: str, causal: bool):
    from torch.nn.attention import sdpa_kernel

    chosen = _sdpa_backend(backend)

    def forward(q, k, v):
        with sdpa_kernel(chosen):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return forward


def sdpa_probe_reason(backend: str, case: Case, device: str) -> str | None:
    """Why SDPA's ``backend`` does not run this case on ``device`` (a tiny call with its D,
    dtype, masking and mode; torch's warnings say why), or None. Not cached."""
    small = _probe_case(case)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _bind(_sdpa_forward(backend, small.params["causal"]), small,
                  make_inputs(small, device))()
        except RuntimeError as exc:
            if not any(phrase in str(exc) for phrase in SDPA_NO_KERNEL):
                return None  # another failure: the measurement records it
            why = [str(w.message).strip() for w in caught
                   if issubclass(w.category, UserWarning)]
            return (f"SDPA's {backend} backend does not run {_describe(case)}: "
                    + ("; ".join(why) or str(exc).strip())[:400])
    return None


def _sdpa_unavailable(backend: str):
    def unavailable() -> str | None:
        reason = needs_cuda()
        if reason is None and backend == "FLASH_ATTENTION":
            import torch.nn.attention

            current = getattr(torch.nn.attention, "current_flash_attention_impl", None)
            impl = current() if current is not None else None
            if impl is not None:
                reason = (f"SDPA's flash backend is {impl} in this process (activated with "
                          f"activate_flash_attention_impl), not the bundled FlashAttention-2")
        return reason

    return unavailable


def _sdpa(name: str, backend: str, note: str) -> Implementation:
    def setup(case, input_sets):
        return _rotating(_sdpa_forward(backend, case.params["causal"]), case, input_sets)

    def unsupported(case):
        key = _probe_key(name, case)
        if key not in _case_probes:
            _case_probes[key] = sdpa_probe_reason(backend, case, "cuda")
        return _case_probes[key]

    return Implementation(name=name, setup=setup, unavailable=_sdpa_unavailable(backend),
                          unsupported=unsupported, note=note)


# --- FlexAttention ----------------------------------------------------------------------


def _flex_unavailable() -> str | None:
    reason = needs_cuda(because="FlexAttention's CPU path has no backward")
    if reason is not None:
        return reason
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError as exc:
        return f"torch.nn.attention.flex_attention cannot be imported: {exc}"
    return None


def _causal_mask_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def flex_forward(case: Case, device, compiled: bool = True):
    """flex_attention (under torch.compile unless ``compiled`` is False), with the case's
    causal block mask made here, once."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block_mask = None
    if case.params["causal"]:
        s = case.params["S"]
        block_mask = create_block_mask(_causal_mask_mod, None, None, s, s, device=device)
    attend = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention

    def forward(q, k, v):
        return attend(q, k, v, block_mask=block_mask)

    return forward


def _flex_setup(case, input_sets):
    fresh_dynamo_cache()
    forward = flex_forward(case, input_sets[0]["q"].device)
    if case.params["mode"] != "bwd":
        return _rotating(forward, case, input_sets)
    import torch._functorch.config as functorch_config

    # The bwd mode runs one backward many times over a kept graph (retain_graph=True);
    # a backward compiled to donate its saved buffers would refuse the second call.
    with functorch_config.patch(donated_buffer=False):
        return _rotating(forward, case, input_sets)


# --- eager math -------------------------------------------------------------------------


def eager_unsupported(case: Case) -> str | None:
    size = score_matrix_bytes(case)
    if size <= EAGER_SCORE_LIMIT_BYTES:
        return None
    return (f"eager-math materialises the (B, H, S, S) score matrix: {size / 2**30:.0f} GiB "
            f"here, over the {EAGER_SCORE_LIMIT_BYTES / 2**30:.0f} GiB this benchmark "
            f"allows (and its backward keeps several such tensors alive)")


def _eager_setup(case, input_sets):
    mask = (causal_mask(case.params["S"], input_sets[0]["q"].device)
            if case.params["causal"] else None)  # made once, outside the timed call
    return _rotating(lambda q, k, v: reference(q, k, v, mask), case, input_sets)


# --- FlashAttention 4 -------------------------------------------------------------------

# flash-attn-4 installs flash_attn/cute (flash_attn may be a namespace package); a spec
# lookup of flash_attn.cute would raise without flash_attn, so look up the parent first.
_flash_attn_missing = package_missing("flash_attn", FLASH_ATTN_4)
_flash_attn_cute_missing = package_missing("flash_attn.cute", FLASH_ATTN_4)


def _flash_attn_4_unavailable() -> str | None:
    return _flash_attn_missing() or _flash_attn_cute_missing() or needs_cuda()


def _to_bshd(inputs: dict) -> dict:
    """Contiguous (B, S, H, D) copies of the inputs (FlashAttention's layout)."""

    def copy(t):
        if t is None:
            return None
        return t.detach().transpose(1, 2).contiguous().requires_grad_(t.requires_grad)

    return {name: copy(t) for name, t in inputs.items()}


def _flash_attn_4_forward(causal: bool):
    from flash_attn.cute.interface import flash_attn_func

    def forward(q, k, v):
        out = flash_attn_func(q, k, v, causal=causal)
        return out[0] if isinstance(out, (tuple, list)) else out  # versions return (out, lse)

    return forward


def _flash_attn_4_setup(case, input_sets):
    own = [_to_bshd(inputs) for inputs in input_sets]
    return _rotating(_flash_attn_4_forward(case.params["causal"]), case, own)


def flash_attn_4_unsupported(case: Case) -> str | None:
    """Why FlashAttention 4 does not run this case (its interface asserts what it covers)."""
    small = _probe_case(case)

    def call():
        inputs = _to_bshd(make_inputs(small, "cuda"))
        _bind(_flash_attn_4_forward(small.params["causal"]), small, inputs)()

    def say(exc):
        why = f"{type(exc).__name__}: {exc}".strip()[:300]
        return f"{FLASH_ATTN_4} does not run {_describe(case)} here: {why}"

    return probe_once(_case_probes, _probe_key(FLASH_ATTN_4, case), call, say,
                      catch=(AssertionError, NotImplementedError, ValueError))


IMPLEMENTATIONS = (
    _fusedops_tier("triton"),
    _fusedops_tier("triton", deterministic=True),
    _fusedops_tier("cuda"),
    _sdpa("sdpa-flash", "FLASH_ATTENTION",
          "F.scaled_dot_product_attention under sdpa_kernel(FLASH_ATTENTION): torch's "
          "FlashAttention-2"),
    _sdpa("sdpa-cudnn", "CUDNN_ATTENTION",
          "F.scaled_dot_product_attention under sdpa_kernel(CUDNN_ATTENTION)"),
    _sdpa("sdpa-efficient", "EFFICIENT_ATTENTION",
          "F.scaled_dot_product_attention under sdpa_kernel(EFFICIENT_ATTENTION)"),
    Implementation(name="flex-attention", setup=_flex_setup, unavailable=_flex_unavailable,
                   quick=False,
                   note="torch.compile(flex_attention, dynamic=False), causal via a block mask"),
    Implementation(name="eager-math", setup=_eager_setup, unsupported=eager_unsupported,
                   note="softmax((q·scale)·kᵀ [masked])·v in torch ops (materialises S×S)"),
    Implementation(name=FLASH_ATTN_4, setup=_flash_attn_4_setup,
                   unavailable=_flash_attn_4_unavailable, unsupported=flash_attn_4_unsupported,
                   quick=False,
                   note="flash_attn.cute flash_attn_func (FlashAttention 4), (B, S, H, D) copies"),
)

FORMULAS = (
    "FLOPs (FlashAttention's convention, matmuls only): forward 4·B·H·S²·D; backward 2.5× "
    "the forward (5 matmuls against 2); forward+backward 3.5×; causal counts half. A "
    "backward that recomputes more (fusedops' deterministic Triton backward: 7 matmuls) is "
    "credited only "
    "these. `× sdpa-flash` is against SDPA's FlashAttention-2 backend, `× sdpa-cudnn` "
    "against its cuDNN backend, both measured in this run. Bytes (e = 2 for bf16, N = "
    "B·H·S·D, R = B·H·S rows, a float32 lse per row): forward 4·N·e (read q, k, v, write "
    "out); backward 8·N·e + 4·R (read q, k, v, out, grad_out, lse, write dq, dk, dv); "
    "forward+backward 12·N·e + 8·R. The bwd mode times the backward alone, from a forward "
    "whose graph is kept (retain_graph=True)."
)

FAMILY = Family(
    name="attention",
    description="attention softmax(q·kᵀ/√D)·v, bf16, B·S = 16384 tokens, H·D = 2048, full "
                "and causal",
    cases=cases,
    implementations=IMPLEMENTATIONS,
    make_inputs=make_inputs,
    bytes_moved=bytes_moved,
    flops=flops,
    input_bytes=input_bytes,
    bound="compute",
    ratio_baselines=("sdpa-flash", "sdpa-cudnn"),
    panel_key="mode",
    formulas=FORMULAS,
)
