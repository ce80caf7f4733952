"""Op families, by name: what a family is, and where each one lives.

A family (cross-entropy, linear, linear-cross-entropy, attention and conv2d) is
one ``cases_<name>.py`` module that defines ``FAMILY = Family(...)``, and one line in
``FAMILY_MODULES`` below. The runner, the store and the writers are generic: they only see
``Case``, ``Implementation`` and the family's byte and FLOP counts. What the families
share (dtypes, rotation through input sets, probes and skip reasons) is in ``common``.

Adding a family::

    # benchmarks/cases_matmul.py
    FAMILY = Family(name="matmul", description=..., cases=..., implementations=[...],
                    make_inputs=..., bytes_moved=..., flops=..., bound="compute", ...)

    # here
    FAMILY_MODULES["matmul"] = "cases_matmul"
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# family name -> module (inside this package) that defines FAMILY. Imported on demand.
FAMILY_MODULES: dict[str, str] = {
    "cross_entropy": "cases_cross_entropy",
    "linear": "cases_linear",
    "linear_cross_entropy": "cases_linear_cross_entropy",
    "attention": "cases_attention",
    "conv2d": "cases_conv2d",
    "training": "cases_training",
}


@dataclass(frozen=True)
class Case:
    """One shape and mode of an op: what the tables' rows and the plots' bars are about.

    ``params`` holds plain JSON values (ints, strings); ``id`` names the case in the results
    file (a resumed run skips a case by ``(id, implementation, commit)``), ``label`` in tables.
    """

    id: str
    label: str
    params: dict[str, Any]
    quick: bool = False  # part of the --quick profile


@dataclass(frozen=True)
class Implementation:
    """One way to compute a family's op: a fusedops tier or a baseline.

    ``unavailable()`` returns None when it can run here, else why not (cheap; the runner
    records the reason and moves on); ``unsupported(case)`` likewise for one case (a
    forward-only baseline in a forward+backward case, say). ``setup(case, input_sets)``
    returns the callable to time, already bound to its inputs; it may compile.
    ``input_sets`` has one or more equivalent inputs the callable must rotate through (see
    ``timing.rotate``).
    """

    name: str
    setup: Callable[[Case, Sequence[Any]], Callable[[], Any]]
    unavailable: Callable[[], str | None] = lambda: None
    unsupported: Callable[[Case], str | None] = lambda case: None
    baseline: bool = True
    quick: bool = True  # False for slow-to-compile baselines (max-autotune, FlexAttention)
    note: str = ""


@dataclass(frozen=True)
class Family:
    """An op family: its cases, implementations, inputs and the counts behind GB/s and TFLOP/s.

    ``bytes_moved(case)`` is the fewest bytes the op must move through device memory, and
    ``flops(case)`` the floating-point operations it must do; each family documents its
    formulas. ``bound`` ("memory" or "compute") picks the ceiling the plots draw.
    ``ratio_baselines`` are the implementations every other one is compared with, side by side.
    ``panel_key`` splits the plots into panels (for example forward / forward+backward).
    """

    name: str
    description: str
    cases: Callable[[bool], list[Case]]  # cases(quick)
    implementations: Sequence[Implementation]
    make_inputs: Callable[[Case, Any], Any]  # make_inputs(case, device)
    bytes_moved: Callable[[Case], int]
    flops: Callable[[Case], int]
    input_bytes: Callable[[Case], int]  # bytes of one input set, to decide on rotation
    bound: str = "memory"
    ratio_baselines: Sequence[str] = ()
    panel_key: str | None = None
    formulas: str = ""  # the byte and FLOP formulas, printed in the Markdown report
    extra: dict[str, Any] = field(default_factory=dict)

    def implementation(self, name: str) -> Implementation:
        for impl in self.implementations:
            if impl.name == name:
                return impl
        raise KeyError(f"{self.name}: no implementation {name!r}")


def family_names() -> list[str]:
    return list(FAMILY_MODULES)


def get_family(name: str) -> Family:
    """The family registered as ``name`` (imports its module)."""
    if name not in FAMILY_MODULES:
        raise KeyError(f"unknown op family {name!r}; known: {', '.join(FAMILY_MODULES)}")
    module = importlib.import_module(f".{FAMILY_MODULES[name]}", __package__)
    family = module.FAMILY
    if family.name != name:
        raise RuntimeError(f"{module.__name__} defines family {family.name!r}, "
                           f"registered as {name!r}")
    return family

