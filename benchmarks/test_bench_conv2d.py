"""pytest-benchmark suite for the fused conv2d (GPU only; skipped without CUDA).

Not collected by a plain ``pytest`` (testpaths is tests/); run it explicitly:

    pytest benchmarks/test_bench_conv2d.py                                # the --quick cases
    FUSEDOPS_BENCH_FULL=1 pytest benchmarks/test_bench_conv2d.py -k "cudnn or fusedops"
    pytest benchmarks/test_bench_conv2d.py -k "fwd+bwd" --benchmark-json=conv2d.json

The cases and implementations are those of ``fusedops-bench`` (cases_conv2d.py): ResNet-50
and MobileNetV2 depthwise layers, channels_last, with ``torch.backends.cudnn.benchmark`` on
around every call; the slow-to-compile max-autotune torch.compile only with
FUSEDOPS_BENCH_FULL=1. An implementation that is unavailable here, or does not run a case
(a fusedops tier without depthwise kernels, say), is skipped with the reason.
pytest-benchmark times on the host clock, so each round ends with a synchronize: the small
layers (tens of µs) read high here; the report CLI's device-event medians are the numbers
to quote. Each result's ``extra_info`` carries the case's FLOPs and bytes, and the TFLOP/s
and GB/s at the median (GB/s is the figure for the memory-bound depthwise cases).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from .cases_conv2d import FAMILY  # noqa: E402

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
def test_conv2d(benchmark, case_inputs, implementation):
    case, input_sets = case_inputs
    impl = FAMILY.implementation(implementation)
    reason = impl.unavailable() or impl.unsupported(case)
    if reason is not None:
        pytest.skip(f"{implementation}: {reason}")
    try:
        fn = impl.setup(case, input_sets)
    except NotImplementedError as exc:
        pytest.skip(f"{implementation}: {exc}")
    first = fn()  # compilation, autotuning and cuDNN's algorithm search, untimed
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
    nflops, nbytes = FAMILY.flops(case), FAMILY.bytes_moved(case)
    benchmark.extra_info.update(case=case.id, implementation=implementation, flops=nflops,
                                bytes=nbytes, bound=case.params["bound"])
    stats = getattr(benchmark, "stats", None)
    median = getattr(getattr(stats, "stats", None), "median", None)
    if median:
        benchmark.extra_info["tflops_at_median"] = nflops / median / 1e12
        benchmark.extra_info["gbps_at_median"] = nbytes / median / 1e9
