"""fusedops.scaled_dot_product_attention: a drop-in for ``F.scaled_dot_product_attention``.

Same arguments, shapes, dtypes and semantics as torch's, including its top-left causal
alignment when ``Sq != Sk`` (query ``i`` sees keys ``j <= i``; ``fusedops.attention`` aligns
at the bottom right instead). The kernels take the calls they cover — q, k and v of shape
``(B, H, S, D)`` with equal batch sizes, no ``attn_mask``, ``dropout_p == 0``, a head dim and
dtype the chosen tier supports, heads equal or (with ``enable_gqa``) grouped, non-empty
sequences — through the same contract as ``fusedops.attention``, causal masking as the window
``(unbounded, Sq - Sk)``. Everything else (3-D or broadcast batch dimensions, masks, dropout,
...) runs torch's own ``F.scaled_dot_product_attention`` under ``auto`` (and under a forced
``torch`` backend, whose implementation of SDPA is torch's), and raises
``NotImplementedError`` saying why when a kernel backend ("triton", "cuda") is forced.
Under ``auto``, a covered call goes to a kernel tier only where the auto table has one for
this op and GPU; otherwise torch's SDPA runs it.
"""

from __future__ import annotations

import contextlib
import numbers

import torch
import torch.nn.functional as F

from fusedops import dispatch
from fusedops.ops._autocast import cast_like_autocast
from fusedops.ops.attention import (
    UNBOUNDED,
    attention_unsupported,
    default_scale,
    run_attention,
)

_OP = "scaled_dot_product_attention"
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def kernel_unsupported(query, key, value, attn_mask, dropout_p, scale, enable_gqa) -> str | None:
    """None when the attention kernels' contract covers this call, else why not."""
    tensors = (query, key, value)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return "query, key and value must all be tensors"
    if attn_mask is not None:
        return "an attn_mask (the kernels take causal masking only)"
    if not isinstance(dropout_p, numbers.Real) or dropout_p != 0.0:
        return f"dropout_p={dropout_p!r} (the kernels have no dropout)"
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        return f"scale={scale!r}"
    if any(t.dim() != 4 for t in tensors):
        return (f"inputs of shapes {[tuple(t.shape) for t in tensors]} (the kernels take "
                f"(B, H, S, D) with the same B for all three)")
    if len({t.dtype for t in tensors}) != 1 or query.dtype not in _KERNEL_DTYPES:
        return f"dtypes {[t.dtype for t in tensors]} (the kernels take one of float16, " \
               f"bfloat16, float32 for all three)"
    if len({t.device for t in tensors}) != 1:
        return "inputs on different devices"
    if not query.shape[0] == key.shape[0] == value.shape[0] or key.shape != value.shape:
        return (f"shapes {[tuple(t.shape) for t in tensors]} (the kernels take one batch size "
                f"and k, v of one shape, without broadcasting)")
    if query.shape[-1] != key.shape[-1]:
        return "query and key head dims differ"
    heads_q, heads_kv = query.shape[1], key.shape[1]
    if heads_q != heads_kv and not (enable_gqa and heads_kv and heads_q % heads_kv == 0):
        return f"{heads_q} query heads and {heads_kv} key/value heads"
    if query.shape[2] == 0 or key.shape[2] == 0 or query.shape[-1] == 0:
        return "an empty sequence or head dim (torch's semantics for it are kept)"
    if any(t.stride(-1) != 1 and t.shape[-1] > 1 for t in tensors):
        return "an input whose last dimension is not contiguous"
    return None


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention`` with fusedops' attention kernels where they apply."""
    reason = kernel_unsupported(query, key, value, attn_mask, dropout_p, scale, enable_gqa)
    backend = dispatch.current_backend()
    if reason is None and isinstance(is_causal, bool):
        q, k, v = cast_like_autocast(query.device.type, query, key, value)
        tier = dispatch.select(_OP, q.device,
                               lambda t: attention_unsupported(t, q, k, v, False))
        if tier.NAME != "torch":
            window_right = q.shape[2] - k.shape[2] if is_causal else UNBOUNDED
            out, _ = run_attention(_OP, q, k, v, None, None, q.shape[2], k.shape[2],
                                   default_scale(_OP, scale, q.shape[-1]), UNBOUNDED,
                                   window_right, False)
            return out
    elif backend in ("triton", "cuda"):
        raise NotImplementedError(f"fusedops.{_OP}: backend {backend!r} was forced but cannot "
                                  f"run this call: {reason or f'is_causal={is_causal!r}'}")
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                          dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                                          enable_gqa=enable_gqa)


class _FusedSDPAMode(torch.overrides.TorchFunctionMode):
    """Routes F.scaled_dot_product_attention to fusedops' drop-in; leaves all else alone.

    Inside ``__torch_function__`` the mode is off, so the drop-in's own fallback to torch's
    SDPA is not routed back here.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return scaled_dot_product_attention(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def fused_sdpa():
    """``with fusedops.fused_sdpa(): ...``: calls to ``F.scaled_dot_product_attention`` made
    inside the block (by any module's Python code) run
    ``fusedops.scaled_dot_product_attention``. Scoped to the block and the thread; torch
    itself is never changed. Not routed: the SDPA call inside another function that torch
    dispatches through ``__torch_function__`` itself (``F.multi_head_attention_forward``, used
    by ``nn.MultiheadAttention``), since a torch-function mode is off while it handles a
    call."""
    with _FusedSDPAMode():
        yield
