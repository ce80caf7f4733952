"""pytest-benchmark suites for the fused linear and linear + cross-entropy (GPU only).

Skipped without CUDA. Not collected by a plain ``pytest`` (testpaths is tests/); run them
explicitly:

    pytest benchmarks/test_bench_linear.py                                # the --quick cases
    FUSEDOPS_BENCH_FULL=1 pytest benchmarks/test_bench_linear.py -k "addmm or fusedops"
    pytest benchmarks/test_bench_linear.py -k linear_cross_entropy --benchmark-json=lce.json

The cases and implementations are those of ``fusedops-bench`` (cases_linear.py and
cases_linear_cross_entropy.py); the slow-to-compile ones (max-autotune torch.compile,
filtered cut-cross-entropy) only with FUSEDOPS_BENCH_FULL=1. pytest-benchmark times on the
host clock, so each round ends with a synchronize; the report CLI's device-event medians
are the numbers to quote. Each result's ``extra_info`` carries the case's FLOPs and the
TFLOP/s at the median; the linear + cross-entropy ones also the peak memory beyond the
inputs and its fraction of one bf16 logits tensor.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from . import timing  # noqa: E402
from .cases_linear import FAMILY as LINEAR  # noqa: E402
from .cases_linear_cross_entropy import FAMILY as LINEAR_CE  # noqa: E402
from .cases_linear_cross_entropy import memory_fraction  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FULL = os.environ.get("FUSEDOPS_BENCH_FULL") == "1"


def _cases(family):
    return family.cases(quick=not FULL)


def _implementations(family):
    return [impl.name for impl in family.implementations if FULL or impl.quick]


def _inputs_fixture(family, name):
    @pytest.fixture(name=name, scope="module", params=_cases(family),
                    ids=[c.id for c in _cases(family)])
    def fixture(request):
        """One case's inputs, made once for all implementations, freed after them."""
        case = request.param
        inputs = family.make_inputs(case, "cuda")
        yield case, [inputs]
        del inputs
        torch.cuda.empty_cache()

    return fixture


linear_inputs = _inputs_fixture(LINEAR, "linear_inputs")
linear_ce_inputs = _inputs_fixture(LINEAR_CE, "linear_ce_inputs")


def _bench(benchmark, family, case, input_sets, implementation, measure_memory=False):
    impl = family.implementation(implementation)
    reason = impl.unavailable()
    if reason is not None:
        pytest.skip(f"{implementation}: {reason}")
    try:
        fn = impl.setup(case, input_sets)
    except NotImplementedError as exc:  # e.g. _addmm_activation has no backward
        pytest.skip(f"{implementation}: {exc}")
    first = fn()  # compilation and autotuning, untimed
    torch.cuda.synchronize()
    results = first if isinstance(first, (tuple, list)) else (first,)
    for result in results:
        if isinstance(result, torch.Tensor) and result.is_floating_point():
            assert bool(torch.isfinite(result).all()), f"{implementation}: non-finite output"
    del first, results

    def call():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=20, iterations=1, warmup_rounds=3)
    nflops = family.flops(case)
    benchmark.extra_info.update(case=case.id, implementation=implementation, flops=nflops)
    stats = getattr(benchmark, "stats", None)
    median = getattr(getattr(stats, "stats", None), "median", None)
    if median:
        benchmark.extra_info["tflops_at_median"] = nflops / median / 1e12
    if measure_memory:
        peak = timing.peak_memory(fn)
        benchmark.extra_info.update(peak_memory_bytes=peak,
                                    peak_fraction_of_logits=memory_fraction(case, peak))


@pytest.mark.parametrize("implementation", _implementations(LINEAR))
def test_linear(benchmark, linear_inputs, implementation):
    case, input_sets = linear_inputs
    _bench(benchmark, LINEAR, case, input_sets, implementation)


@pytest.mark.parametrize("implementation", _implementations(LINEAR_CE))
def test_linear_cross_entropy(benchmark, linear_ce_inputs, implementation):
    case, input_sets = linear_ce_inputs
    _bench(benchmark, LINEAR_CE, case, input_sets, implementation, measure_memory=True)
