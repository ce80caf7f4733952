"""Backend selection: which tier runs an op.

``"auto"`` (the default) takes, for each op and GPU architecture, the first tier listed in
``AUTO_TABLE`` that is available here and covers the case; a tier earns its place in the
table only by passing the GPU test suite on that architecture and measuring fastest, and each
entry cites the committed benchmark result it came from. Anything else — CPU tensors, an
architecture or op not in the table, a case no listed tier covers — runs on the torch tier.

``use_backend(name)`` and ``FUSEDOPS_BACKEND`` force one tier. A forced tier never hands a
case to another tier: where it is missing or does not cover the case, ``select`` raises
``NotImplementedError`` saying why.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from types import ModuleType

import torch

from fusedops.dispatch import cuda as cuda_tier
from fusedops.dispatch import torch_ref as torch_tier
from fusedops.dispatch import triton as triton_tier

TIERS: dict[str, ModuleType] = {
    torch_tier.NAME: torch_tier,
    triton_tier.NAME: triton_tier,
    cuda_tier.NAME: cuda_tier,
}
BACKEND_NAMES = ("auto", *TIERS)
ENV_VAR = "FUSEDOPS_BACKEND"

# (op, (major, minor) compute capability) -> tiers in order of preference.
# Empty until a tier has passed the GPU test suite on an architecture and measured faster
# than the alternatives there; each entry must cite its result file under
# benchmarks/results/<gpu>/. No fusedops kernel has run on a GPU yet, so `auto` runs
# every op on the torch tier (see the README's support matrix).
AUTO_TABLE: dict[tuple[str, tuple[int, int]], tuple[str, ...]] = {}

_forced: list[str] = []  # the stack of use_backend() contexts, innermost last
_capability: dict[int, tuple[int, int]] = {}


def _check_name(name: object, where: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(f"{where}: unknown backend {name!r}; expected one of {BACKEND_NAMES}")
    return name  # type: ignore[return-value]


def current_backend() -> str:
    """The backend in force: the innermost ``use_backend``, else ``FUSEDOPS_BACKEND``, else auto."""
    if _forced:
        return _forced[-1]
    return _check_name(os.environ.get(ENV_VAR, "auto") or "auto", f"${ENV_VAR}")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``name`` ("auto", "torch", "triton" or "cuda") for the ops called inside."""
    _forced.append(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _forced.pop()


def backends() -> dict[str, str | None]:
    """Each tier's availability on this machine: None when usable, else the reason why not."""
    return {name: tier.availability() for name, tier in TIERS.items()}


def _device_capability(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _capability:
        _capability[index] = torch.cuda.get_device_capability(index)
    return _capability[index]


def select(op: str, device: torch.device, unsupported: Callable[[ModuleType], str | None]
           ) -> ModuleType:
    """The tier module that runs ``op`` for tensors on ``device``.

    ``unsupported(tier)`` returns None when ``tier`` covers the call, else the reason it does
    not (for instance ``tier.ce_unsupported(...)``).
    """
    name = current_backend()
    if name != "auto":
        tier = TIERS[name]
        reason = tier.availability() or unsupported(tier)
        if reason is not None:
            raise NotImplementedError(f"fusedops.{op}: backend {name!r} was forced but cannot "
                                      f"run this call: {reason}")
        return tier
    if device.type == "cuda":
        for candidate in AUTO_TABLE.get((op, _device_capability(device)), ()):
            tier = TIERS[candidate]
            if tier.availability() is None and unsupported(tier) is None:
                return tier
    return torch_tier
