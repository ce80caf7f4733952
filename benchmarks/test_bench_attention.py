"""pytest-benchmark suite for attention (GPU only; skipped without CUDA).

Not collected by a plain ``pytest`` (testpaths is tests/); run it explicitly:

    pytest benchmarks/test_bench_attention.py                             # the --quick cases
    FUSEDOPS_BENCH_FULL=1 pytest benchmarks/test_bench_attention.py -k "sdpa-flash or fusedops"
    pytest benchmarks/test_bench_attention.py -k "fwd+bwd" --benchmark-json=attention.json

The cases and implementations are those of ``fusedops-bench`` (cases_attention.py); the
slow-to-compile ones (FlexAttention, FlashAttention 4) only with FUSEDOPS_BENCH_FULL=1. An
implementation that is unavailable here, or does not run a case (a head dimension an SDPA
backend does not cover, eager-math's score matrix over 8 GiB), is skipped with the reason.
pytest-benchmark times on the host clock, so each round ends with a synchronize; the report
CLI's device-event medians are the numbers to quote. Each result's ``extra_info`` carries
the case's FLOPs and the TFLOP/s at the median.
"""

from __future__ import annotations

import pytest

from .cases_attention import FAMILY
from .suite import GPU_ONLY, implementation_names, inputs_fixture, run_benchmark

pytestmark = GPU_ONLY
case_inputs = inputs_fixture(FAMILY)


@pytest.mark.parametrize("implementation", implementation_names(FAMILY))
def test_attention(benchmark, case_inputs, implementation):
    run_benchmark(benchmark, FAMILY, case_inputs, implementation, counts=("flops",))
