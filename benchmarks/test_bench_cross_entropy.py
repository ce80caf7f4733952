"""pytest-benchmark suite for softmax-cross-entropy (GPU only; skipped without CUDA).

Not collected by a plain ``pytest`` (testpaths is tests/); run it explicitly:

    pytest benchmarks/test_bench_cross_entropy.py                       # the --quick cases
    FUSEDOPS_BENCH_FULL=1 pytest benchmarks/ --benchmark-columns=median,iqr,rounds
    pytest benchmarks/ -k "fusedops or eager" --benchmark-json=ce.json

The cases and implementations are those of ``fusedops-bench`` (cases_cross_entropy.py).
pytest-benchmark times on the host clock, so each round ends with a synchronize; the
report CLI's device-event medians are the numbers to quote. Each result's ``extra_info``
carries the case's byte count and the GB/s at the median.
"""

from __future__ import annotations

import pytest

from .cases_cross_entropy import FAMILY
from .suite import GPU_ONLY, implementation_names, inputs_fixture, run_benchmark

pytestmark = GPU_ONLY
case_inputs = inputs_fixture(FAMILY)


@pytest.mark.parametrize("implementation", implementation_names(FAMILY))
def test_cross_entropy(benchmark, case_inputs, implementation):
    run_benchmark(benchmark, FAMILY, case_inputs, implementation, counts=("bytes",))
