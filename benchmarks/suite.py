"""What the pytest-benchmark suites (``test_bench_*``) share: one timing loop for every family.

Each suite is a family's cases times its implementations, as ``fusedops-bench`` has them
(the slow-to-compile implementations only with ``FUSEDOPS_BENCH_FULL=1``, which also runs
every case instead of the ``--quick`` ones). An implementation that is unavailable here,
or does not run a case, is skipped with the runner's reason; so is one whose ``setup``
raises NotImplementedError (linear's ``_addmm_activation`` has no backward, say).
pytest-benchmark times on the host clock, so each round ends with a synchronize; the report
CLI's device-event medians are the numbers to quote.

Only the suites import this module (it imports pytest, and skips the suite that imports it
where pytest-benchmark is not installed); the report CLI never does.
"""

from __future__ import annotations

import os

import pytest
import torch

from .registry import Family

pytest.importorskip("pytest_benchmark")

FULL = os.environ.get("FUSEDOPS_BENCH_FULL") == "1"
ROUNDS, WARMUP_ROUNDS = 20, 3

# A suite module's ``pytestmark``: marked gpu, and skipped without a CUDA device.
GPU_ONLY = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def implementation_names(family: Family) -> list[str]:
    """The implementations a suite times: the --quick ones, all with FUSEDOPS_BENCH_FULL=1."""
    return [impl.name for impl in family.implementations if FULL or impl.quick]


def inputs_fixture(family: Family, name: str = "case_inputs"):
    """A module-scoped fixture ``name``, parametrized over the family's cases: ``(case,
    [inputs])``, one case's inputs made once for all implementations, freed after them."""
    cases = family.cases(quick=not FULL)

    @pytest.fixture(name=name, scope="module", params=cases, ids=[case.id for case in cases])
    def fixture(request):
        """One case's inputs, made once for all implementations, freed after them."""
        case = request.param
        inputs = family.make_inputs(case, "cuda")
        yield case, [inputs]
        del inputs
        torch.cuda.empty_cache()

    return fixture


def _check_finite(first, implementation: str) -> None:
    results = first if isinstance(first, (tuple, list)) else (first,)
    for result in results:
        if isinstance(result, torch.Tensor) and result.is_floating_point():
            assert bool(torch.isfinite(result).all()), f"{implementation}: non-finite output"


def run_benchmark(benchmark, family: Family, case_inputs, implementation: str, *,
                  counts: tuple[str, ...], params: tuple[str, ...] = ()):
    """Time ``implementation`` on one case with pytest-benchmark; returns ``(case, fn)``,
    the case and its timed callable (for a measurement after the timing).

    ``setup`` (where attention's bwd mode runs its one forward) and the first call
    (compilation, autotuning, cuDNN's algorithm search) are untimed; the first call's
    floating-point outputs must be finite.
    ``extra_info`` gets the case and implementation, the case's ``counts`` ("flops" and/or
    "bytes"), the case ``params`` named, and the TFLOP/s and/or GB/s at the median.
    """
    case, input_sets = case_inputs
    impl = family.implementation(implementation)
    reason = impl.unavailable() or impl.unsupported(case)
    if reason is not None:
        pytest.skip(f"{implementation}: {reason}")
    try:
        fn = impl.setup(case, input_sets)
    except NotImplementedError as exc:
        pytest.skip(f"{implementation}: {exc}")
    first = fn()
    torch.cuda.synchronize()
    _check_finite(first, implementation)
    del first

    def call():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP_ROUNDS)
    info = {"case": case.id, "implementation": implementation}
    if "flops" in counts:
        info["flops"] = family.flops(case)
    if "bytes" in counts:
        info["bytes"] = family.bytes_moved(case)
    info.update({name: case.params[name] for name in params})
    benchmark.extra_info.update(info)
    stats = getattr(benchmark, "stats", None)
    median = getattr(getattr(stats, "stats", None), "median", None)
    if median:
        if "flops" in info:
            benchmark.extra_info["tflops_at_median"] = info["flops"] / median / 1e12
        if "bytes" in info:
            benchmark.extra_info["gbps_at_median"] = info["bytes"] / median / 1e9
    return case, fn
