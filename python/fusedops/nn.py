"""Drop-in modules: subclasses of torch's, so isinstance checks and checkpoints keep working."""

from __future__ import annotations

import torch

from fusedops.ops.cross_entropy import cross_entropy
from fusedops.ops.linear import check_activation, linear
from fusedops.ops.linear_cross_entropy import linear_cross_entropy


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` on fusedops' kernels, plus ``z_loss`` and ``softcap``.

    Takes nn.CrossEntropyLoss's arguments (including the deprecated ``size_average`` and
    ``reduce``, resolved the way torch resolves them) and the same state_dict (the
    ``weight`` buffer).
    """

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean", label_smoothing=0.0, *, z_loss=0.0, softcap=None):
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss
        self.softcap = softcap

    def forward(self, input, target):
        return cross_entropy(input, target, self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing,
                             z_loss=self.z_loss, softcap=self.softcap)

    def extra_repr(self) -> str:
        parts = [f"reduction={self.reduction!r}", f"ignore_index={self.ignore_index}"]
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing}")
        if self.z_loss:
            parts.append(f"z_loss={self.z_loss}")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap}")
        return ", ".join(parts)


class FusedLinear(torch.nn.Linear):
    """``nn.Linear`` followed by an activation, as one fused GEMM (``fusedops.linear``).

    Same parameters and state_dict keys as ``nn.Linear``; ``.activation`` holds the
    activation's name (None, "relu", "gelu", "gelu_tanh" or "silu"). ``forward`` also takes
    an optional ``residual``, added before the activation.
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *,
                 activation=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        check_activation(activation)
        self.activation = activation

    @classmethod
    def from_linear(cls, module: torch.nn.Linear, activation=None) -> FusedLinear:
        """A FusedLinear sharing ``module``'s Parameter objects (an optimizer built before
        keeps working)."""
        if not isinstance(module, torch.nn.Linear):
            raise TypeError(f"FusedLinear.from_linear: expected an nn.Linear, got "
                            f"{type(module).__name__}")
        check_activation(activation)
        fused = cls.__new__(cls)
        torch.nn.Module.__init__(fused)
        fused.in_features, fused.out_features = module.in_features, module.out_features
        fused.weight = module.weight
        fused.bias = module.bias  # a Parameter, or None (registered as such)
        fused.activation = activation
        fused.train(module.training)
        return fused

    def forward(self, input, residual=None):
        return linear(input, self.weight, self.bias, activation=self.activation,
                      residual=residual)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"


class LinearCrossEntropyLoss(torch.nn.Module):
    """``cross_entropy(F.linear(input, weight, bias), target)`` without the logits in memory.

    ``forward(input, weight, target, bias=None)``: ``weight`` is the (vocab, hidden) matrix,
    typically a language model's head (``lm_head.weight``), passed per call so the module
    owns no parameters. ``class_weight`` is kept as a buffer, as nn.CrossEntropyLoss keeps
    ``weight``.
    """

    def __init__(self, *, class_weight=None, ignore_index=-100, reduction="mean",
                 label_smoothing=0.0, z_loss=0.0, softcap=None):
        super().__init__()
        self.register_buffer("class_weight", class_weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap

    def forward(self, input, weight, target, bias=None):
        return linear_cross_entropy(input, weight, target, bias, class_weight=self.class_weight,
                                    ignore_index=self.ignore_index, reduction=self.reduction,
                                    label_smoothing=self.label_smoothing, z_loss=self.z_loss,
                                    softcap=self.softcap)

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
                f"softcap={self.softcap}")


__all__ = ["CrossEntropyLoss", "FusedLinear", "LinearCrossEntropyLoss"]
