"""What every fusedops autograd.Function shares."""

from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable


def once_differentiable_op(op: str):
    """Mark a backward as not differentiable again, with a clear error.

    The kernels' backward is not itself differentiable. torch's ``once_differentiable`` alone
    raises only when the incoming gradients require grad; a double backward whose
    ``create_graph=True`` gradient also flows through other ops would otherwise silently miss
    this op's second-order term. Grad mode is on inside a backward exactly when the caller
    asked for ``create_graph=True``, so that is refused up front.
    """

    def decorate(backward):
        differentiable_once = once_differentiable(backward)

        @functools.wraps(backward)
        def checked(ctx, *grads):
            if torch.is_grad_enabled() and not torch.compiler.is_compiling():
                raise RuntimeError(
                    f"fusedops.{op}: double backward (torch.autograd.grad(..., "
                    f"create_graph=True) through this op) is not supported: its backward "
                    f"kernels are not differentiable. Use torch's own op where second "
                    f"derivatives are needed.")
            return differentiable_once(ctx, *grads)

        return checked

    return decorate
