"""fusedops.patch(model): put fused ops into an existing model, in place; unpatch undoes it.

What it changes, module by module (exact types only: a subclass of nn.Linear or nn.Conv2d
has a forward of its own and is left alone, saying so):

* ``nn.Linear`` → ``fusedops.nn.FusedLinear``, ``nn.Conv2d`` → ``fusedops.nn.FusedConv2d``,
  Hugging Face's transposed ``Conv1D`` (GPT-2) → ``fusedops.nn.FusedConv1D`` (same weight
  layout), ``nn.CrossEntropyLoss`` → ``fusedops.nn.CrossEntropyLoss``. The new modules hold
  the very same Parameter and buffer objects, so an optimizer built before patching keeps
  working and the state_dict keys do not change.
* Inside an ``nn.Sequential``, a Linear or Conv2d directly followed by ``nn.ReLU``,
  ``nn.GELU`` or ``nn.SiLU`` becomes one fused module with that activation, and the
  activation's slot holds an ``nn.Identity`` (indices, and so state_dict keys, unchanged).
  ``fusedops.fx_fuse(model)`` does the same through torch.fx tracing for models whose
  activations are not neighbours in a Sequential; it returns a new GraphModule.
* ``fold_bn=True`` (inference only): a Conv2d followed by an eval-mode ``nn.BatchNorm2d`` in
  a Sequential becomes one FusedConv2d with the normalisation folded into new weight and
  bias parameters. That changes parameters and state_dict keys, hence opt-in.
* Hugging Face transformers models (``attention=True``): their attention runs through
  fusedops' kernels via transformers' own extension point (``AttentionInterface``), see
  ``fusedops.hf``; their causal-LM head and loss become ``fusedops.linear_cross_entropy``
  when ``labels`` are passed (``cross_entropy=True``): the returned ``logits`` are then None.
* Modules that call ``F.scaled_dot_product_attention`` themselves are not changed: wrap the
  code in ``with fusedops.fused_sdpa(): ...`` to route those calls, and only those inside the
  block, to ``fusedops.scaled_dot_product_attention`` (not the ones torch makes inside a
  function it dispatches itself, such as nn.MultiheadAttention's).
* A module with hooks or a parametrization (weight_norm, spectral_norm, ...) is left alone:
  a new module would not run them.

``patch`` returns the model; ``model.fusedops_report`` (a ``PatchReport``) lists what was
replaced and what was left alone and why.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fusedops import nn as fused_nn

_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.SiLU: "silu"}
_RECORD = "_fusedops_patch_record"


def _activation_name(module: nn.Module) -> str | None:
    """The fused activation equal to ``module``, or None."""
    if type(module) in _ACTIVATION_MODULES:
        return _ACTIVATION_MODULES[type(module)]
    if type(module) is nn.GELU:
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    return None


def _has_hooks(module: nn.Module) -> str | None:
    """Why swapping ``module`` would lose behaviour attached to it, or None."""
    if torch.nn.utils.parametrize.is_parametrized(module):
        return "it is parametrized (torch.nn.utils.parametrize)"
    for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                 "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks"):
        if getattr(module, kind, None):
            return (f"it has {kind.strip('_').replace('_', ' ')} (e.g. weight_norm's), which a "
                    f"new module would not run")
    return None


def _is_hf_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith(
        "transformers")


@dataclasses.dataclass
class PatchReport:
    """What ``patch`` replaced (name, old type, new type) and left alone (name, type, why)."""

    replaced: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    left_alone: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fusedops.patch: replaced {len(self.replaced)}, left alone "
                 f"{len(self.left_alone)}"]
        lines += [f"  replaced    {name or '<model>'}: {old} -> {new}"
                  for name, old, new in self.replaced]
        lines += [f"  left alone  {name or '<model>'}: {kind} ({why})"
                  for name, kind, why in self.left_alone]
        return "\n".join(lines)


class _Record:
    """What unpatch needs: the swapped children and the other changes, in order.

    Plain data (modules, names, ``(function, *arguments)``), so ``copy.deepcopy`` of a
    patched model gives a record that refers to the copy's own modules.
    """

    def __init__(self):
        self.children: list[tuple[nn.Module, str, nn.Module]] = []
        self.undo: list = []


def _swap(record: _Record, parent: nn.Module, name: str, new: nn.Module) -> None:
    old = parent._modules[name]
    record.children.append((parent, name, old))
    parent._modules[name] = new


def _fuse_sequential_runs(model, record, report, *, linear, conv, fold_bn):
    """Linear/Conv2d (+ eval BatchNorm2d with fold_bn) + activation inside nn.Sequential."""
    for seq_name, seq in list(model.named_modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        keys = list(seq._modules)
        i = 0
        while i < len(keys):
            module = seq._modules[keys[i]]
            following = [seq._modules[k] for k in keys[i + 1:i + 3]]
            prefix = f"{seq_name}.{keys[i]}" if seq_name else keys[i]
            bn = None
            if _has_hooks(module) or any(_has_hooks(m) for m in following[:1]):
                i += 1
                continue
            if (conv and fold_bn and type(module) is nn.Conv2d and following
                    and type(following[0]) is nn.BatchNorm2d):
                if following[0].training:
                    report.left_alone.append((prefix, "Conv2d + BatchNorm2d", "fold_bn=True but "
                                              "the BatchNorm2d is in training mode: folding is "
                                              "for inference (call model.eval() first)"))
                elif following[0].running_mean is None:
                    report.left_alone.append((prefix, "Conv2d + BatchNorm2d", "the BatchNorm2d "
                                              "keeps no running statistics to fold "
                                              "(track_running_stats=False)"))
                else:
                    bn = following.pop(0)
            act_index = 1 + (bn is not None)
            activation = _activation_name(following[0]) if following else None
            fusable = (linear and type(module) is nn.Linear) or (conv and type(module)
                                                                  is nn.Conv2d)
            if fusable and (activation is not None or bn is not None):
                if type(module) is nn.Linear:
                    fused = fused_nn.FusedLinear.from_linear(module, activation=activation)
                else:
                    fused = fused_nn.FusedConv2d.from_conv(module, bn, activation=activation)
                _swap(record, seq, keys[i], fused)
                what = " + ".join(filter(None, (type(module).__name__,
                                                "BatchNorm2d (folded)" if bn else None,
                                                activation)))
                report.replaced.append((prefix, what, type(fused).__name__))
                covered = [keys[i + 1]] if bn is not None else []
                if activation is not None:
                    covered.append(keys[i + act_index])
                for key in covered:
                    _swap(record, seq, key, nn.Identity())
                i += 1 + len(covered)
                continue
            i += 1


def _replace_modules(model, record, report, *, linear, conv, cross_entropy):
    for parent_name, parent in list(model.named_modules()):
        for name, module in list(parent._modules.items()):
            if module is None:
                continue
            path = f"{parent_name}.{name}" if parent_name else name
            new = None
            swappable = (type(module) in (nn.Linear, nn.Conv2d, nn.CrossEntropyLoss)
                         or _is_hf_conv1d(module))
            hooked = _has_hooks(module) if swappable else None
            if hooked:
                report.left_alone.append((path, type(module).__name__, hooked))
            elif linear and type(module) is nn.Linear:
                new = fused_nn.FusedLinear.from_linear(module)
            elif conv and type(module) is nn.Conv2d:
                new = fused_nn.FusedConv2d.from_conv(module)
            elif linear and _is_hf_conv1d(module):
                new = fused_nn.FusedConv1D.from_conv1d(module)
            elif cross_entropy and type(module) is nn.CrossEntropyLoss:
                new = fused_nn.CrossEntropyLoss.from_loss(module)
            elif isinstance(module, (nn.Linear, nn.Conv2d, nn.CrossEntropyLoss)) and not \
                    isinstance(module, (fused_nn.FusedLinear, fused_nn.FusedConv2d,
                                        fused_nn.CrossEntropyLoss)):
                report.left_alone.append((path, type(module).__name__,
                                          f"a subclass of {type(module).__mro__[1].__name__} "
                                          f"with a forward of its own"))
            if new is not None:
                _swap(record, parent, name, new)
                report.replaced.append((path, type(module).__name__, type(new).__name__))


def patch(model: nn.Module, *, linear: bool = True, conv: bool = True,
          cross_entropy: bool = True, attention: bool = True, fold_bn: bool = False
          ) -> nn.Module:
    """Swap fusedops' modules and kernels into ``model`` in place; returns ``model``.

    See the module docstring for what changes. ``model.fusedops_report`` says what was
    replaced and what was left alone, and why; ``fusedops.unpatch(model)`` undoes it all.
    Patching a patched model first undoes the earlier patch.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusedops.patch: expected an nn.Module, got {type(model).__name__}")
    if getattr(model, _RECORD, None) is not None:
        unpatch(model)
    record, report = _Record(), PatchReport()
    if type(model) in (nn.Linear, nn.Conv2d, nn.CrossEntropyLoss) or _is_hf_conv1d(model):
        report.left_alone.append(("", type(model).__name__, "patch changes a model's children "
                                  "in place and cannot replace the model object itself: use "
                                  "fusedops.nn's from_linear / from_conv / from_loss"))
    object.__setattr__(model, _RECORD, record)
    try:
        _fuse_sequential_runs(model, record, report, linear=linear, conv=conv, fold_bn=fold_bn)
        _replace_modules(model, record, report, linear=linear, conv=conv,
                         cross_entropy=cross_entropy)
        if attention or cross_entropy:
            from fusedops import hf

            hf.patch_transformers_model(model, record.undo, report, attention=attention,
                                        loss=cross_entropy)
    except BaseException:
        object.__setattr__(model, "fusedops_report", report)
        unpatch(model)  # all or nothing: what was swapped before the error goes back
        raise
    object.__setattr__(model, "fusedops_report", report)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch(model)``: the original modules (with their parameters) back in place."""
    record = getattr(model, _RECORD, None)
    if record is None:
        return model
    for function, *arguments in reversed(record.undo):
        function(*arguments)
    for parent, name, old in reversed(record.children):
        parent._modules[name] = old
    object.__delattr__(model, _RECORD)
    object.__delattr__(model, "fusedops_report")
    return model


_FUNCTIONAL_ACTIVATIONS = {torch.relu: "relu", torch.nn.functional.relu: "relu",
                           torch.nn.functional.silu: "silu"}


def _node_activation(graph_module, node) -> str | None:
    """The fused activation a traced node computes, or None."""
    if node.op == "call_module":
        return _activation_name(graph_module.get_submodule(node.target))
    if node.op == "call_function" and node.target in _FUNCTIONAL_ACTIVATIONS:
        return _FUNCTIONAL_ACTIVATIONS[node.target]
    if node.op == "call_function" and node.target is torch.nn.functional.gelu:
        approximate = node.kwargs.get("approximate", "none")
        return "gelu_tanh" if approximate == "tanh" else "gelu"
    return None


def fx_fuse(model: nn.Module) -> torch.fx.GraphModule:
    """A new GraphModule of ``model`` (torch.fx.symbolic_trace) where each nn.Linear or
    nn.Conv2d whose only use is a ReLU, GELU or SiLU (module or function) is one fused
    module with that activation. The model itself is not changed; the GraphModule shares
    its parameters. Models that torch.fx cannot trace raise torch.fx's error."""
    graph_module = torch.fx.symbolic_trace(model)
    calls: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(graph_module.graph.nodes):
        # A module called more than once is shared by calls that may not all be followed by
        # the activation: it stays as it is.
        if node.op != "call_module" or len(node.users) != 1 or calls[node.target] != 1:
            continue
        module = graph_module.get_submodule(node.target)
        if type(module) not in (nn.Linear, nn.Conv2d):
            continue
        (user,) = node.users
        activation = _node_activation(graph_module, user)
        if activation is None or user.args[:1] != (node,):
            continue
        if type(module) is nn.Linear:
            fused = fused_nn.FusedLinear.from_linear(module, activation=activation)
        else:
            fused = fused_nn.FusedConv2d.from_conv(module, activation=activation)
        parent, _, leaf = node.target.rpartition(".")
        setattr(graph_module.get_submodule(parent) if parent else graph_module, leaf, fused)
        user.replace_all_uses_with(node)
        graph_module.graph.erase_node(user)
    graph_module.graph.lint()
    graph_module.recompile()
    return graph_module


__all__ = ["PatchReport", "fx_fuse", "patch", "unpatch"]
