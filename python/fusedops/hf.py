"""Hugging Face transformers models on fusedops: attention and the causal-LM loss.

``fusedops.patch(model)`` calls ``patch_transformers_model``; nothing here is imported by
``import fusedops`` (transformers is optional).

Attention goes through transformers' own extension point: ``attention_forward`` is
registered as the attention implementation ``"fusedops"`` (``AttentionInterface``) with
FlashAttention-2's mask convention (``AttentionMaskInterface``: None when the batch has no
padding, else the 2-D padding mask), and the model's config is switched to it.

* No padding: ``fusedops.attention`` on the (B, H, S, D) tensors as transformers hands them
  over, grouped-query heads unrepeated, ``sliding_window=W`` as ``window=(W - 1, 0)``; with
  a KV cache the queries are the last ``Sq`` positions, which is fusedops' bottom-right
  alignment.
* Padding: the real tokens are packed and run through ``fusedops.attention_varlen`` (one
  host sync, for the sequence lengths), the padded query rows get zeros.
* Dropout during training: torch's SDPA with the full boolean mask built from the same
  rules. A mask is never ignored. ``softcap`` (Gemma 2) is refused with a clear error.

Causal-LM loss: when ``labels`` are passed, ``model.forward`` runs the base model, then
``fusedops.linear_cross_entropy(hidden[:, :-1], lm_head.weight, labels[:, 1:])``, the loss
transformers computes, without the (tokens, vocab) logits in memory. The output's ``logits``
is then None; without labels the model is unchanged.
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F

import fusedops

IMPLEMENTATION = "fusedops"
_IGNORE_INDEX = -100


def _window(sliding_window) -> tuple[int, int] | None:
    return (int(sliding_window) - 1, 0) if sliding_window else None


def _dense_mask(padding, seqlen_q, seqlen_k, causal, window, device):
    """(B, 1, Sq, Sk) bool from a (B, Sk) padding mask with fusedops' alignment rules."""
    position = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    key = torch.arange(seqlen_k, device=device)[None, :]
    allowed = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if causal:
        allowed &= key <= position
    if window is not None:
        allowed &= key >= position - window[0]
    if padding is not None:
        allowed = allowed[None] & padding.bool()[:, None, :]
    return allowed.reshape(-1, 1, seqlen_q, seqlen_k)


def _pack(x, keep):
    """(B, H, S, D) → (tokens, H, D) rows where keep (B, S) is true, and their indices."""
    batch, heads, seqlen, dim = x.shape
    indices = keep.reshape(-1).nonzero().squeeze(1)
    return x.transpose(1, 2).reshape(batch * seqlen, heads, dim)[indices], indices


def _cumulative(keep):
    lengths = keep.sum(-1, dtype=torch.int32)
    return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)), int(lengths.max())


def _padded_attention(query, key, value, padding, causal, scale, window):
    """Unpad, attention_varlen, pad back: (B, Sq, H, D)."""
    batch, heads, seqlen_q, dim = query.shape
    keep_k = padding.bool()
    if seqlen_q == key.shape[2]:
        keep_q = keep_k
    elif seqlen_q == 1:  # one new token per sequence: it is real
        keep_q = torch.ones(batch, 1, dtype=torch.bool, device=query.device)
    else:  # the last Sq positions are this call's queries
        keep_q = keep_k[:, -seqlen_q:]
    q, rows = _pack(query, keep_q)
    k, _ = _pack(key, keep_k)
    v, _ = _pack(value, keep_k)
    cu_q, max_q = _cumulative(keep_q)
    cu_k, max_k = _cumulative(keep_k)
    out = fusedops.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal,
                                    scale=scale, window=window)
    full = out.new_zeros(batch * seqlen_q, heads, dim)
    full = full.index_copy(0, rows, out)
    return full.reshape(batch, seqlen_q, heads, dim)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      is_causal=None, sliding_window=None, softcap=None, **kwargs):
    """transformers' attention-implementation signature; returns ((B, S, H, D), None)."""
    if softcap is not None:
        raise ValueError("fusedops attention has no logit softcap: load this model with "
                         "attn_implementation='eager' or 'sdpa'")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    window = _window(sliding_window)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"fusedops attention expects transformers' 2-D padding mask (the "
                         f"flash-attention convention), got shape {tuple(attention_mask.shape)}")
    if dropout and module.training:
        mask = _dense_mask(attention_mask, query.shape[2], key.shape[2], causal, window,
                           query.device)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                             dropout_p=dropout, scale=scaling,
                                             enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2).contiguous(), None
    if attention_mask is None or (not torch.compiler.is_compiling()
                                  and bool(attention_mask.bool().all())):
        out = fusedops.attention(query, key, value, causal=causal, scale=scaling, window=window)
        return out.transpose(1, 2), None
    return _padded_attention(query, key, value, attention_mask, causal, scaling, window), None


def register() -> None:
    """Make ``"fusedops"`` a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, flash_attention_mask)


def _is_transformers_model(model) -> bool:
    return any(cls.__module__.startswith("transformers.") for cls in type(model).__mro__)


def _set_attention(model, name):
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


def _fused_loss_forward(self, *args, labels=None, **kwargs):
    """The causal LM's forward with the loss from linear_cross_entropy when labels are given.

    Bound to the model as a method (``types.MethodType``), so a deep copy of a patched model
    rebinds it to the copy; it carries the class forward's signature (``functools.wraps``),
    which ``generate`` inspects to decide what to pass.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    if labels is None:
        return type(self).forward(self, *args, **kwargs)
    kwargs.pop("logits_to_keep", None)
    return_dict = kwargs.pop("return_dict", None)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    outputs = self.base_model(*args, **kwargs)
    hidden = outputs[0]
    head = self.get_output_embeddings()
    if shift_labels is None:  # predict token t + 1 from position t, as transformers does
        shift_labels = F.pad(labels, (0, 1), value=_IGNORE_INDEX)[..., 1:]
    loss = fusedops.linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), head.weight,
        shift_labels.reshape(-1).to(hidden.device), getattr(head, "bias", None),
        ignore_index=_IGNORE_INDEX, reduction="sum" if num_items_in_batch else "mean")
    if num_items_in_batch:
        loss = loss / num_items_in_batch
    result = CausalLMOutputWithPast(loss=loss, logits=None,
                                    past_key_values=getattr(outputs, "past_key_values", None),
                                    hidden_states=getattr(outputs, "hidden_states", None),
                                    attentions=getattr(outputs, "attentions", None))
    if return_dict is None:
        return_dict = getattr(self.config, "use_return_dict", True)
    return result if return_dict else result.to_tuple()


def _with_signature_of(class_forward):
    """A fresh function running _fused_loss_forward under the class forward's signature."""

    @functools.wraps(class_forward)
    def forward(self, *args, labels=None, **kwargs):
        return _fused_loss_forward(self, *args, labels=labels, **kwargs)

    return forward


def _restore_class_forward(model) -> None:
    model.__dict__.pop("forward", None)


def patch_transformers_model(model, undo: list, report, *, attention: bool, loss: bool) -> None:
    """Switch a transformers model to fusedops attention and the fused LM loss; each change
    appends ``(function, *arguments)`` that undoes it to ``undo`` (data, not closures, so a
    deep copy of the model undoes its own changes)."""
    if not _is_transformers_model(model) or not hasattr(model, "config"):
        return
    name = type(model).__name__
    if attention:
        previous = getattr(model.config, "_attn_implementation", None)
        register()
        _set_attention(model, IMPLEMENTATION)
        undo.append((_set_attention, model, previous))
        report.replaced.append(("", f"{name} attention ({previous})", IMPLEMENTATION))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if loss and head is not None and (name.endswith("ForCausalLM")
                                      or name.endswith("LMHeadModel")):
        model.forward = types.MethodType(_with_signature_of(type(model).forward), model)
        undo.append((_restore_class_forward, model))
        report.replaced.append(("", f"{name} lm_head + loss (with labels)",
                                "fusedops.linear_cross_entropy (logits=None)"))
