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

import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from .cases_attention import FAMILY  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FULL = os.environ.get("FUSEDOPS_BENCH_FULL") == "1"
CASES = FAMILY.cases(quick=not FULL)
IMPLEMENTATIONS = [impl.name for impl in FAMILY.implementations if FULL or impl.quick]


@pytest.fixture(scope="module", params=CASES, ids=[case.id for case in CASES])
def case_inputs(request):
    """One case's inputs, made once for all implementations, freed after them."""
    case = request.param
    inputs = FAMILY.make_inputs(case, "cuda")
    yield case, [inputs]
    del inputs
    torch.cuda.empty_cache()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_attention(benchmark, case_inputs, implementation):
    case, input_sets = case_inputs
    impl = FAMILY.implementation(implementation)
    reason = impl.unavailable() or impl.unsupported(case)
    if reason is not None:
        pytest.skip(f"{implementation}: {reason}")
    fn = impl.setup(case, input_sets)  # the bwd mode runs its one forward here
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
    nflops = FAMILY.flops(case)
    benchmark.extra_info.update(case=case.id, implementation=implementation, flops=nflops)
    stats = getattr(benchmark, "stats", None)
    median = getattr(getattr(stats, "stats", None), "median", None)
    if median:
        benchmark.extra_info["tflops_at_median"] = nflops / median / 1e12
