"""fusedops.attention and fusedops.attention_varlen: flash attention, batched or packed.

The path of one call: check the arguments once, here → turn ``causal`` and ``window`` into
the contract's ``(window_left, window_right)`` → ``dispatch.select`` picks a tier →
``AttentionFunction`` runs the tier's ``attention_fwd`` (the output and the float32
log-sum-exp, never the S×S probabilities) → on backward the tier's ``attention_bwd``, which
recomputes the probabilities from q, k and the lse.

Semantics (DESIGN.md): positions are aligned at the bottom right — query ``i`` of ``Sq`` sits
at key position ``i + Sk - Sq`` — so ``causal`` lets it see keys ``j <= i + Sk - Sq`` (what
decoding with a KV cache needs). ``window=(left, right)`` lets it see keys
``i + Sk - Sq - left <= j <= i + Sk - Sq + right``; an int ``W`` means ``(W, W)``; None or -1
on a side means no limit there; with ``causal`` the right side is 0. A query that sees no key
gets output 0, lse ``-inf`` and passes no gradient.

Under autocast, float32 inputs are cast to autocast's dtype, as autocast casts
``F.scaled_dot_product_attention``. float32 inputs use tf32 tensor cores exactly when torch's
matmuls would.
"""

from __future__ import annotations

import math
import numbers
import os

import torch

from fusedops import dispatch
from fusedops._autograd import once_differentiable_op
from fusedops.dispatch import attention_contract
from fusedops.ops._autocast import cast_like_autocast
from fusedops.ops.linear import allow_tf32

UNBOUNDED = attention_contract.UNBOUNDED
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fail(op, exc_type, message):
    raise exc_type(f"fusedops.{op}: {message}")


def _check_tensors(op, q, k, v, rank, layout):
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor):
            _fail(op, TypeError, f"{name} must be a Tensor, got {type(tensor).__name__}")
        if tensor.dim() != rank:
            _fail(op, ValueError, f"{name} must be {rank}-D {layout}, got shape "
                                  f"{tuple(tensor.shape)}")
    if q.dtype not in _DTYPES:
        _fail(op, TypeError, f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    for name, tensor in (("k", k), ("v", v)):
        if tensor.dtype != q.dtype:
            _fail(op, TypeError, f"{name} has dtype {tensor.dtype} but q has {q.dtype}")
        if tensor.device != q.device:
            _fail(op, ValueError, f"{name} is on {tensor.device} but q is on {q.device}")
    if k.shape != v.shape:
        _fail(op, ValueError, f"k and v must have the same shape, got {tuple(k.shape)} and "
                              f"{tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        _fail(op, ValueError, f"q and k must have the same head dim (last dimension), got "
                              f"{q.shape[-1]} and {k.shape[-1]}")
    if q.shape[-1] == 0:
        _fail(op, ValueError, "the head dim (last dimension) must be at least 1")
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.stride(-1) != 1 and tensor.shape[-1] > 1:
            _fail(op, ValueError, f"{name}'s last dimension must be contiguous (stride 1), got "
                                  f"strides {tensor.stride()}; call .contiguous() first")


def _check_heads(op, heads_q, heads_kv):
    if heads_kv == 0 and heads_q != 0 or heads_kv and heads_q % heads_kv:
        _fail(op, ValueError, f"q's number of heads ({heads_q}) must be a multiple of k's and "
                              f"v's ({heads_kv}) (grouped-query attention)")


def _window_side(op, value, side):
    if value is None or (isinstance(value, numbers.Integral) and not isinstance(value, bool)
                         and value == -1):
        return UNBOUNDED
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(op, TypeError, f"window's {side} side must be an int or None, got {value!r}")
    if value < 0:
        _fail(op, ValueError, f"window's {side} side must be >= 0 (or -1 / None for no limit), "
                              f"got {value}")
    return min(int(value), UNBOUNDED)


def window_bounds(op, window, causal) -> tuple[int, int]:
    """The contract's ``(window_left, window_right)`` for ``window`` and ``causal``."""
    if not isinstance(causal, bool):
        _fail(op, TypeError, f"causal must be a bool, got {causal!r}")
    if window is None:
        left = right = UNBOUNDED
    elif isinstance(window, numbers.Integral) and not isinstance(window, bool):
        left = right = _window_side(op, window, "left")
    elif isinstance(window, (tuple, list)) and len(window) == 2:
        left, right = _window_side(op, window[0], "left"), _window_side(op, window[1], "right")
    else:
        _fail(op, TypeError, f"window must be None, an int or a (left, right) pair, got "
                             f"{window!r}")
    return left, (0 if causal else right)


def _check_flag(op, name, value):
    if not isinstance(value, bool):
        _fail(op, TypeError, f"{name} must be a bool, got {value!r}")


def default_scale(op, scale, head_dim) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        _fail(op, TypeError, f"scale must be a float or None, got {scale!r}")
    return float(scale)


def attention_unsupported(tier, q, k, v, packed):
    covers = getattr(tier, "attention_unsupported", None)
    if covers is None:
        return f"the {tier.NAME} tier has no attention yet"
    return covers(q, k, v, packed)


class AttentionFunction(torch.autograd.Function):
    """One attention_fwd launch forward (out and lse); one attention_bwd back.

    Takes each distinct tensor once (``roles`` maps q, k, v, cu_seqlens_q, cu_seqlens_k to
    positions in ``tensors``, -1 for None): self-attention may pass one tensor as q, k and v,
    and a packed batch the same cu_seqlens twice, which torch.compile cannot trace as
    separate inputs of one autograd.Function. A tensor in several roles gets the sum of their
    gradients.
    """

    @staticmethod
    def forward(ctx, roles, options, *tensors):
        q, k, v, cu_seqlens_q, cu_seqlens_k = (tensors[i] if i >= 0 else None for i in roles)
        (max_seqlen_q, max_seqlen_k, scale, window_left, window_right, tier_name, tf32,
         deterministic) = options
        out, lse = dispatch.TIERS[tier_name].attention_fwd(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
            window_left, window_right, tf32)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.roles, ctx.options = roles, options
        ctx.mark_non_differentiable(lse)  # as FlashAttention's: a gradient of lse is ignored
        return out, lse

    @staticmethod
    @once_differentiable_op("attention")
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        (max_seqlen_q, max_seqlen_k, scale, window_left, window_right, tier_name, tf32,
         deterministic) = ctx.options
        if grad_out.stride(-1) != 1:  # e.g. the stride-0 gradient of a .sum()
            grad_out = grad_out.contiguous()
        role_grads = dispatch.TIERS[tier_name].attention_bwd(
            grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
            max_seqlen_k, scale, window_left, window_right, tf32, deterministic)
        grads = [None] * (len(ctx.needs_input_grad) - 2)
        for position, grad in zip(ctx.roles, role_grads):
            if ctx.needs_input_grad[2 + position]:
                previous = grads[position]
                grads[position] = grad if previous is None else previous + grad
        return None, None, *grads


def run_attention(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                  window_left, window_right, deterministic):
    """Select a tier and apply AttentionFunction to checked, autocast arguments."""
    packed = attention_contract.is_packed(cu_seqlens_q)
    tier = dispatch.select(op, q.device,
                           lambda t: attention_unsupported(t, q, k, v, packed))
    tf32 = q.dtype == torch.float32 and allow_tf32()
    # As torch's own ops: use_deterministic_algorithms(True) makes every backward reproducible.
    deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
    tensors, roles = [], []
    for tensor in (q, k, v, cu_seqlens_q, cu_seqlens_k):
        if tensor is None:
            roles.append(-1)
            continue
        same = [i for i, seen in enumerate(tensors) if seen is tensor]
        if not same:
            tensors.append(tensor)
        roles.append(same[0] if same else len(tensors) - 1)
    options = (max_seqlen_q, max_seqlen_k, scale, window_left, window_right, tier.NAME, tf32,
               deterministic)
    return AttentionFunction.apply(tuple(roles), options, *tensors)


def attention(q, k, v, *, causal=False, scale=None, window=None, return_lse=False,
              deterministic=False):
    """Flash attention on ``(B, H, S, D)`` tensors, bottom-right aligned.

    ``q`` ``(B, Hq, Sq, D)``, ``k`` and ``v`` ``(B, Hkv, Sk, D)`` with ``Hq % Hkv == 0``
    (grouped-query and multi-query attention, K and V never repeated); any strides with a
    contiguous last dimension, so tensors stored ``(B, S, H, D)`` work through
    ``.transpose(1, 2)``, and the output is laid out like q. ``scale`` defaults to
    ``1 / sqrt(D)``. Returns the output ``(B, Hq, Sq, D)``, and with ``return_lse=True`` also
    the float32 log-sum-exp ``(B, Hq, Sq)`` (not differentiable). ``deterministic=True``
    (or ``torch.use_deterministic_algorithms(True)``) makes the gradients bitwise
    reproducible; otherwise a tier may sum dQ in an order that varies from run to run.
    """
    op = "attention"
    _check_tensors(op, q, k, v, 4, "(batch, heads, seqlen, head_dim)")
    if k.shape[0] != q.shape[0]:
        _fail(op, ValueError, f"q and k must have the same batch size, got {q.shape[0]} and "
                              f"{k.shape[0]}")
    _check_heads(op, q.shape[1], k.shape[1])
    window_left, window_right = window_bounds(op, window, causal)
    _check_flag(op, "return_lse", return_lse)
    _check_flag(op, "deterministic", deterministic)
    scale = default_scale(op, scale, q.shape[-1])
    q, k, v = cast_like_autocast(q.device.type, q, k, v)
    out, lse = run_attention(op, q, k, v, None, None, q.shape[2], k.shape[2], scale,
                             window_left, window_right, deterministic)
    return (out, lse) if return_lse else out


def _check_cu_seqlens(op, name, cu_seqlens, q, tokens, max_seqlen):
    if not isinstance(cu_seqlens, torch.Tensor):
        _fail(op, TypeError, f"{name} must be a Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        _fail(op, TypeError, f"{name} must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        _fail(op, ValueError, f"{name} must be 1-D (batch + 1,), got shape "
                              f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        _fail(op, ValueError, f"{name} is on {cu_seqlens.device} but q is on {q.device}")
    if cu_seqlens.stride(0) != 1 and cu_seqlens.numel() > 1:
        _fail(op, ValueError, f"{name} must be contiguous")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (numbers.Integral,
                                                                   torch.SymInt)):
        _fail(op, TypeError, f"max_seqlen for {name} must be an int, got {max_seqlen!r}")
    if isinstance(max_seqlen, numbers.Integral) and max_seqlen < 0:
        _fail(op, ValueError, f"max_seqlen for {name} must be >= 0, got {max_seqlen}")
    # The contents can only be checked with a host sync: always on CPU, on a GPU when asked;
    # never while torch.compile traces (a data-dependent read would break the graph).
    if torch.compiler.is_compiling():
        return
    if q.device.type == "cpu" or os.environ.get("FUSEDOPS_DEBUG") == "1":
        values = cu_seqlens.tolist()
        lengths = [b - a for a, b in zip(values, values[1:])]
        if values[0] != 0 or any(n < 0 for n in lengths) or values[-1] != tokens:
            _fail(op, ValueError, f"{name} must start at 0, never decrease and end at the "
                                  f"number of tokens ({tokens}); got {values}")
        if lengths and max(lengths) > max_seqlen:
            _fail(op, ValueError, f"{name} has a sequence of {max(lengths)} tokens, longer "
                                  f"than max_seqlen {max_seqlen}")


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                     causal=False, scale=None, window=None, return_lse=False,
                     deterministic=False):
    """Flash attention on packed sequences: ``fusedops.attention`` per sequence.

    ``q`` ``(Tq, Hq, D)``, ``k`` and ``v`` ``(Tk, Hkv, D)``; sequence ``b`` is rows
    ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of q and ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]`` of
    k and v (int32, ``(batch + 1,)``, starting at 0 and ending at T); ``max_seqlen_q`` and
    ``max_seqlen_k`` bound the sequence lengths (Python ints). Returns the output
    ``(Tq, Hq, D)``, and with ``return_lse=True`` also the float32 lse ``(Hq, Tq)``.
    Malformed ``cu_seqlens`` are a ValueError on CPU (and with ``FUSEDOPS_DEBUG=1``); on a
    GPU they never cause an out-of-bounds access, but the rows of a malformed sequence are
    unspecified.
    """
    op = "attention_varlen"
    _check_tensors(op, q, k, v, 3, "(total_tokens, heads, head_dim)")
    _check_heads(op, q.shape[1], k.shape[1])
    _check_cu_seqlens(op, "cu_seqlens_q", cu_seqlens_q, q, q.shape[0], max_seqlen_q)
    _check_cu_seqlens(op, "cu_seqlens_k", cu_seqlens_k, q, k.shape[0], max_seqlen_k)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        _fail(op, ValueError, f"cu_seqlens_q and cu_seqlens_k must describe the same number "
                              f"of sequences, got shapes {tuple(cu_seqlens_q.shape)} and "
                              f"{tuple(cu_seqlens_k.shape)}")
    window_left, window_right = window_bounds(op, window, causal)
    _check_flag(op, "return_lse", return_lse)
    _check_flag(op, "deterministic", deterministic)
    scale = default_scale(op, scale, q.shape[-1])
    q, k, v = cast_like_autocast(q.device.type, q, k, v)
    out, lse = run_attention(op, q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                             int(max_seqlen_k), scale, window_left, window_right, deterministic)
    return (out, lse) if return_lse else out
