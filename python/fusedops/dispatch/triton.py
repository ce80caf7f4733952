"""The Triton tier: the kernel-level contract on ``fusedops.triton_kernels``.

It runs on CUDA (and ROCm) devices, and on CPU tensors in Triton's interpreter when
``TRITON_INTERPRET=1`` was set before triton was first imported (the test suite's CPU tier).
This module never imports triton itself at import time: the kernels are imported on first
use, after the caller (the benchmark CLI, the tests) has decided ``TRITON_INTERPRET``.

Class-index targets only; probability targets and float64 stay on the torch tier.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

from fusedops.dispatch import contract

NAME = "triton"

_LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TARGET_DTYPES = (torch.int32, torch.int64)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _imported_without_interpreter() -> bool:
    """True when TRITON_INTERPRET=1 came only after triton was imported (too late for it).

    Triton decides at import time whether its own @jit library functions are interpreted; a
    kernel run in the interpreter then fails on the first of them with an obscure error.
    """
    standard = sys.modules.get("triton.language.standard")
    if standard is None:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction

        return not isinstance(standard.sigmoid, InterpretedFunction)
    except (ImportError, AttributeError):  # a Triton whose internals moved: assume all is well
        return False


def availability() -> str | None:
    """None when this tier can run here, else why not (cheap: imports nothing)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'fusedops[triton]')"
    if _interpreting():
        if _imported_without_interpreter():
            return ("TRITON_INTERPRET=1 was set after triton was imported; Triton's interpreter "
                    "needs it set before the first import of triton")
        return None
    if not torch.cuda.is_available():
        return "no CUDA device, and TRITON_INTERPRET=1 (Triton's CPU interpreter) is not set"
    return None


def ce_unsupported(logits: torch.Tensor, target: torch.Tensor, *, probability_target: bool
                   ) -> str | None:
    """None when the kernels cover this call, else the reason (no host sync)."""
    if probability_target:
        return "class-probability targets run on the torch tier only"
    if logits.dtype not in _LOGIT_DTYPES:
        return f"{logits.dtype} logits (the Triton kernels take float16, bfloat16 and float32)"
    if target.dtype not in _TARGET_DTYPES:
        return f"{target.dtype} targets (the Triton kernels take int32 and int64)"
    if logits.dim() != 2 or logits.shape[1] == 0:
        return f"logits of shape {tuple(logits.shape)} (the kernels take (N, C) with C >= 1)"
    if logits.stride(1) != 1:
        return "the class dimension of the logits is not contiguous (stride(1) != 1)"
    if logits.device.type == "cpu":
        if not _interpreting():
            return "CPU tensors run only in Triton's interpreter (set TRITON_INTERPRET=1)"
    elif logits.device.type != "cuda":
        return f"tensors on {logits.device.type} (the Triton tier runs on CUDA devices)"
    return None


def _kernels():
    # Imported here, not at the top: TRITON_INTERPRET must be decided before triton loads.
    from fusedops.triton_kernels import cross_entropy

    return cross_entropy


def _ce_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap):
    rows = logits.shape[0]
    loss = contract.new_output((rows,), dtype=torch.float32, device=logits.device)
    lse = contract.new_output((rows,), dtype=torch.float32, device=logits.device)
    weight = weight.contiguous() if weight is not None else None
    _kernels().ce_fwd_launch(logits, target.contiguous(), weight, ignore_index,
                             label_smoothing, z_loss, softcap, loss, lse)
    return loss, lse


def _ce_bwd(logits, target, weight, lse, grad_loss, ignore_index, label_smoothing, z_loss,
            softcap, out):
    weight = weight.contiguous() if weight is not None else None
    _kernels().ce_bwd_launch(logits, target.contiguous(), weight, lse.contiguous(),
                             grad_loss.contiguous(), ignore_index, label_smoothing, z_loss,
                             softcap, out)


ce_fwd, ce_bwd = contract.tier_functions(
    contract.register_cross_entropy_ops(NAME, _ce_fwd, _ce_bwd))
