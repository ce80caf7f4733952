"""Device time and peak memory of one callable, measured the way DESIGN.md asks.

- Time: ``triton.testing.do_bench(fn, return_mode=...)`` times each call with CUDA events
  after a warm-up and, before every timed call, zeroes a buffer larger than the L2 cache
  (outside the timed region), so a memory-bound op reads its inputs from DRAM, not from L2.
  We keep all the per-call times and report the median (and the 20th/80th percentiles, to
  show the spread). Without triton the same loop runs on plain CUDA events.
- Rotation: where one input set is small enough that the flush does not make it cold
  (under ``ROTATE_BELOW_L2_MULTIPLE`` times the L2), the family makes several equivalent
  input sets and the timed callable cycles through them (``rotate``).
- Repetitions: do_bench repeats for ``rep`` milliseconds; we stretch ``rep`` so that even a
  slow call is timed at least ``min_calls`` times.
- Peak memory: ``torch.cuda.max_memory_allocated()`` during one call, minus what was
  allocated before it (the inputs), so it counts what the op itself allocates.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

ROTATE_BELOW_L2_MULTIPLE = 4
MAX_INPUT_SETS = 8
L2_FLUSH_BYTES = 256 * 2**20  # what do_bench zeroes; our fallback does the same


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    calls: int


@dataclass(frozen=True)
class Profile:
    """How hard to time: do_bench's warm-up and repetition budgets (ms) and a minimum count."""

    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_calls: int = 10
    max_rep_ms: float = 2000.0


QUICK = Profile(warmup_ms=25.0, rep_ms=100.0, min_calls=10, max_rep_ms=1000.0)
FULL = Profile(warmup_ms=50.0, rep_ms=300.0, min_calls=30, max_rep_ms=4000.0)


def input_sets_needed(bytes_per_set: int, l2_bytes: int | None) -> int:
    """How many equivalent input sets to rotate through so that each timed call is cold."""
    if not l2_bytes or bytes_per_set <= 0:
        return 1
    target = ROTATE_BELOW_L2_MULTIPLE * l2_bytes
    if bytes_per_set >= target:
        return 1
    return min(MAX_INPUT_SETS, math.ceil(target / bytes_per_set))


def rotate(callables: Sequence[Callable[[], Any]]) -> Callable[[], Any]:
    """One callable that runs the given ones in turn, one per call."""
    if len(callables) == 1:
        return callables[0]
    state = {"next": 0}

    def run():
        i = state["next"]
        state["next"] = (i + 1) % len(callables)
        return callables[i]()

    return run


def _quantile(sorted_times: list[float], q: float) -> float:
    # Linear interpolation between closest ranks (numpy's default).
    position = q * (len(sorted_times) - 1)
    lower = math.floor(position)
    upper = min(lower + 1, len(sorted_times) - 1)
    return sorted_times[lower] + (sorted_times[upper] - sorted_times[lower]) * (position - lower)


def summarize(times_ms: Sequence[float]) -> Timing:
    if not times_ms:
        raise ValueError("no timings to summarize")
    ordered = sorted(float(t) for t in times_ms)
    return Timing(median_ms=statistics.median(ordered), p20_ms=_quantile(ordered, 0.2),
                  p80_ms=_quantile(ordered, 0.8), calls=len(ordered))


def _events_bench(fn: Callable[[], Any], warmup_ms: float, rep_ms: float) -> list[float]:
    """do_bench's loop on plain CUDA events, for a machine without triton."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    n = max(1, int(rep_ms / estimate))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def _do_bench(fn: Callable[[], Any], warmup_ms: float, rep_ms: float) -> list[float]:
    try:
        from triton.testing import do_bench
    except ImportError:
        return _events_bench(fn, warmup_ms, rep_ms)
    try:
        times = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
    except (AssertionError, TypeError):  # a triton whose do_bench has no "all"
        return [do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")]
    return list(times)


def first_call(fn: Callable[[], Any]) -> float:
    """Run ``fn`` once and wait for it: compilation, autotuning and first-use builds land
    here, outside the timed calls. Returns the wall-clock seconds it took."""
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def device_time(fn: Callable[[], Any], profile: Profile = QUICK) -> Timing:
    """The per-call device time of ``fn`` (call ``first_call`` before, for the warm-up)."""
    probe = summarize(_do_bench(fn, warmup_ms=min(profile.warmup_ms, 10.0), rep_ms=1.0))
    rep_ms = min(max(profile.rep_ms, profile.min_calls * probe.median_ms), profile.max_rep_ms)
    return summarize(_do_bench(fn, warmup_ms=profile.warmup_ms, rep_ms=rep_ms))


def peak_memory(fn: Callable[[], Any]) -> int:
    """Bytes ``fn`` allocates at its peak, beyond what was allocated before the call."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return int(peak)
