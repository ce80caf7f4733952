"""The two ceilings every measurement is compared with, measured in the same run.

- Copy bandwidth: a device-to-device ``copy_`` of ``COPY_BYTES`` (1 GiB, far beyond any L2),
  counting the bytes read plus the bytes written. A memory-bound kernel near this number
  has nothing left to gain; datasheet bandwidth is not reachable and not quoted.
- Matmul throughput: a bf16 ``8192 x 8192 x 8192`` product through cuBLAS (``torch.mm``) on
  random data (zeros run faster), ``2 * 8192**3`` FLOPs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from . import timing

COPY_BYTES = 2**30
MATMUL_SIZE = 8192


@dataclass(frozen=True)
class Ceilings:
    copy_gbps: float  # GB/s (1e9 bytes per second), bytes read + written
    matmul_tflops: float  # bf16 TFLOP/s
    copy_ms: float
    matmul_ms: float

    def as_dict(self) -> dict:
        return asdict(self)


def copy_bandwidth(profile: timing.Profile = timing.QUICK) -> tuple[float, float]:
    """(GB/s, ms) of a 1 GiB device-to-device copy; bytes = read + write."""
    elements = COPY_BYTES // 4
    src = torch.randn(elements, device="cuda")
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)
    timing.first_call(fn)
    ms = timing.device_time(fn, profile).median_ms
    return 2 * COPY_BYTES / (ms * 1e-3) / 1e9, ms


def matmul_throughput(profile: timing.Profile = timing.QUICK) -> tuple[float, float]:
    """(TFLOP/s, ms) of a bf16 8192^3 torch.mm on random data."""
    n = MATMUL_SIZE
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    fn = lambda: torch.mm(a, b, out=out)
    timing.first_call(fn)
    ms = timing.device_time(fn, profile).median_ms
    return 2 * n**3 / (ms * 1e-3) / 1e12, ms


def measure(profile: timing.Profile = timing.QUICK) -> Ceilings:
    copy_gbps, copy_ms = copy_bandwidth(profile)
    matmul_tflops, matmul_ms = matmul_throughput(profile)
    torch.cuda.empty_cache()
    return Ceilings(copy_gbps=copy_gbps, matmul_tflops=matmul_tflops, copy_ms=copy_ms,
                    matmul_ms=matmul_ms)
