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

import pytest

from .cases_conv2d import FAMILY
from .suite import GPU_ONLY, implementation_names, inputs_fixture, run_benchmark

pytestmark = GPU_ONLY
case_inputs = inputs_fixture(FAMILY)


@pytest.mark.parametrize("implementation", implementation_names(FAMILY))
def test_conv2d(benchmark, case_inputs, implementation):
    run_benchmark(benchmark, FAMILY, case_inputs, implementation, counts=("flops", "bytes"),
                  params=("bound",))
