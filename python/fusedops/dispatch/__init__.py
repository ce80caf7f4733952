"""Backend tiers behind one kernel-level contract, and the selection between them.

Tiers: ``torch_ref`` (plain torch, the reference and CPU path), ``triton`` and ``cuda``;
``contract`` states what each implements; ``select`` picks one per call.
"""

from fusedops.dispatch.select import (
    BACKEND_NAMES,
    TIERS,
    backends,
    current_backend,
    select,
    use_backend,
)

__all__ = ["BACKEND_NAMES", "TIERS", "backends", "current_backend", "select", "use_backend"]
