"""Drop-in modules: subclasses of torch's, so isinstance checks and checkpoints keep working."""

from __future__ import annotations

import torch

from fusedops.ops.conv import check_activation as check_conv_activation
from fusedops.ops.conv import conv2d
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

    @classmethod
    def from_loss(cls, module: torch.nn.CrossEntropyLoss) -> CrossEntropyLoss:
        """The same loss on fusedops' kernels, sharing ``module``'s class-weight buffer."""
        if not isinstance(module, torch.nn.CrossEntropyLoss):
            raise TypeError(f"CrossEntropyLoss.from_loss: expected an nn.CrossEntropyLoss, got "
                            f"{type(module).__name__}")
        fused = cls(ignore_index=module.ignore_index, reduction=module.reduction,
                    label_smoothing=module.label_smoothing)
        fused.weight = module.weight  # the same buffer object (or None)
        fused.train(module.training)
        return fused

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


class FusedConv1D(torch.nn.Module):
    """Hugging Face's transposed ``Conv1D`` (GPT-2's projections) on ``fusedops.linear``.

    ``y = x @ weight + bias`` with ``weight`` stored ``(in_features, out_features)``, as the
    original keeps it (its checkpoints load unchanged): the kernels read ``weight.T`` as a
    strided view, nothing is copied. ``.activation`` as in FusedLinear.
    """

    def __init__(self, out_features, in_features, *, activation=None, device=None,
                 dtype=None):
        super().__init__()
        check_activation(activation)
        self.nf = out_features
        self.nx = in_features
        self.weight = torch.nn.Parameter(torch.empty(in_features, out_features, device=device,
                                                     dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        torch.nn.init.normal_(self.weight, std=0.02)
        self.activation = activation

    @classmethod
    def from_conv1d(cls, module: torch.nn.Module, activation=None) -> FusedConv1D:
        """A FusedConv1D sharing ``module``'s Parameter objects."""
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TypeError(f"FusedConv1D.from_conv1d: expected a transformers Conv1D with a "
                            f"2-D weight, got {type(module).__name__}")
        check_activation(activation)
        fused = cls.__new__(cls)
        torch.nn.Module.__init__(fused)
        fused.nx, fused.nf = weight.shape
        fused.weight = module.weight
        fused.bias = module.bias
        fused.activation = activation
        fused.train(module.training)
        return fused

    def forward(self, input, residual=None):
        return linear(input, self.weight.T, self.bias, activation=self.activation,
                      residual=residual)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, activation={self.activation!r}"


class FusedConv2d(torch.nn.Conv2d):
    """``nn.Conv2d`` followed by an activation, as one fused convolution (``fusedops.conv2d``).

    Takes nn.Conv2d's constructor arguments (``padding_mode`` honoured: a mode other than
    "zeros" pads the input explicitly first, as nn.Conv2d does) and keeps its parameters and
    state_dict keys; ``.activation`` holds the activation's name (None, "relu", "gelu",
    "gelu_tanh" or "silu"). ``forward`` also takes an optional ``residual``, added before the
    activation.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 dilation=1, groups=1, bias=True, padding_mode="zeros", device=None,
                 dtype=None, *, activation=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device, dtype)
        check_conv_activation(activation)
        self.activation = activation

    @classmethod
    def from_conv(cls, conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d | None = None,
                  activation=None) -> FusedConv2d:
        """A FusedConv2d computing ``act(bn(conv(x)))``.

        Without ``bn`` it shares ``conv``'s Parameter objects (an optimizer built before keeps
        working). With an eval-mode ``bn`` (running statistics, for inference) the
        normalisation is folded into new weight and bias parameters:
        ``W' = W · γ / sqrt(var + ε)`` per output channel and
        ``b' = (b − mean) · γ / sqrt(var + ε) + β``, computed in float64.
        """
        if not isinstance(conv, torch.nn.Conv2d):
            raise TypeError(f"FusedConv2d.from_conv: expected an nn.Conv2d, got "
                            f"{type(conv).__name__}")
        check_conv_activation(activation)
        fused = cls.__new__(cls)
        torch.nn.Module.__init__(fused)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                     "dilation", "transposed", "output_padding", "groups", "padding_mode",
                     "_reversed_padding_repeated_twice"):
            setattr(fused, name, getattr(conv, name))
        fused.activation = activation
        fused.train(conv.training)
        if bn is None:
            fused.weight, fused.bias = conv.weight, conv.bias
            return fused
        if not isinstance(bn, torch.nn.BatchNorm2d):
            raise TypeError(f"FusedConv2d.from_conv: bn must be an nn.BatchNorm2d, got "
                            f"{type(bn).__name__}")
        if bn.training:
            raise ValueError("FusedConv2d.from_conv: the BatchNorm2d is in training mode; "
                             "folding uses its running statistics, which only describe "
                             "inference: call .eval() on it (and fold for inference only)")
        if not bn.track_running_stats or bn.running_mean is None:
            raise ValueError("FusedConv2d.from_conv: the BatchNorm2d has no running "
                             "statistics (track_running_stats=False) to fold")
        if bn.num_features != conv.out_channels:
            raise ValueError(f"FusedConv2d.from_conv: bn has {bn.num_features} features but "
                             f"the conv has {conv.out_channels} output channels")
        with torch.no_grad():
            weight = conv.weight.double()
            inv_std = torch.rsqrt(bn.running_var.double() + bn.eps)
            gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(inv_std)
            beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(inv_std)
            scale = gamma * inv_std
            bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(inv_std)
            folded_weight = weight * scale[:, None, None, None]
            folded_bias = (bias - bn.running_mean.double()) * scale + beta
        dtype = conv.weight.dtype
        fused.weight = torch.nn.Parameter(folded_weight.to(dtype),
                                          requires_grad=conv.weight.requires_grad)
        fused.bias = torch.nn.Parameter(folded_bias.to(dtype),
                                        requires_grad=conv.weight.requires_grad)
        return fused

    def forward(self, input, residual=None):
        if self.padding_mode != "zeros":
            input = torch.nn.functional.pad(input, self._reversed_padding_repeated_twice,
                                            mode=self.padding_mode)
            padding = 0
        else:
            padding = self.padding
        return conv2d(input, self.weight, self.bias, self.stride, padding, self.dilation,
                      self.groups, activation=self.activation, residual=residual)

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
