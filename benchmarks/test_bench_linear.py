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

import pytest

from .cases_linear import FAMILY as LINEAR
from .cases_linear_cross_entropy import FAMILY as LINEAR_CE
from .cases_linear_cross_entropy import memory_fraction
from .suite import GPU_ONLY, implementation_names, inputs_fixture, run_benchmark
from .timing import peak_memory

pytestmark = GPU_ONLY
linear_inputs = inputs_fixture(LINEAR, "linear_inputs")
linear_ce_inputs = inputs_fixture(LINEAR_CE, "linear_ce_inputs")


@pytest.mark.parametrize("implementation", implementation_names(LINEAR))
def test_linear(benchmark, linear_inputs, implementation):
    run_benchmark(benchmark, LINEAR, linear_inputs, implementation, counts=("flops",))


@pytest.mark.parametrize("implementation", implementation_names(LINEAR_CE))
def test_linear_cross_entropy(benchmark, linear_ce_inputs, implementation):
    case, fn = run_benchmark(benchmark, LINEAR_CE, linear_ce_inputs, implementation,
                             counts=("flops",))
    peak = peak_memory(fn)  # beyond the inputs: the headline, against one logits tensor
    benchmark.extra_info.update(peak_memory_bytes=peak,
                                peak_fraction_of_logits=memory_fraction(case, peak))
