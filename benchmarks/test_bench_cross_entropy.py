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

import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from .cases_cross_entropy import FAMILY  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CASES = FAMILY.cases(quick=os.environ.get("FUSEDOPS_BENCH_FULL") != "1")
IMPLEMENTATIONS = [impl.name for impl in FAMILY.implementations]


@pytest.fixture(scope="module", params=CASES, ids=[case.id for case in CASES])
def case_inputs(request):
    """One case's inputs, made once for all implementations, freed after them."""
    case = request.param
    inputs = FAMILY.make_inputs(case, "cuda")
    yield case, [inputs]
    del inputs
    torch.cuda.empty_cache()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_cross_entropy(benchmark, case_inputs, implementation):
    case, input_sets = case_inputs
    impl = FAMILY.implementation(implementation)
    reason = impl.unavailable()
    if reason is not None:
        pytest.skip(f"{implementation}: {reason}")
    fn = impl.setup(case, input_sets)
    first = fn()  # compilation and autotuning, untimed
    torch.cuda.synchronize()
    if isinstance(first, torch.Tensor) and first.is_floating_point():
        assert bool(torch.isfinite(first).all()), f"{implementation} gave a non-finite output"
    del first

    def call():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=20, iterations=1, warmup_rounds=3)
    nbytes = FAMILY.bytes_moved(case)
    benchmark.extra_info.update(case=case.id, implementation=implementation, bytes=nbytes)
    stats = getattr(benchmark, "stats", None)
    median = getattr(getattr(stats, "stats", None), "median", None)
    if median:
        benchmark.extra_info["gbps_at_median"] = nbytes / median / 1e9
