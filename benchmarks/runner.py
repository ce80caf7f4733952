"""Run one op family on the GPU: every case, every implementation, one results record each.

For each case the inputs are made once (several equivalent sets when one set is small
enough to sit in L2, see ``timing``) and every implementation is timed on them: baselines
first, so each fusedops line can already show its ratio against them. Per implementation:

1. ``unavailable()``: a reason means a ``skipped`` record with that reason;
2. ``setup`` then one untimed first call (compilation, autotuning, a JIT build land here;
   its wall time is kept as ``first_call_s``, and its output is checked to be finite);
3. the median device time, then the peak memory of one more call;
4. the numbers derived from the family's byte and FLOP counts and the run's ceilings.

An exception (an OOM, a compile failure, NotImplementedError) becomes an ``error`` record
and the run goes on. If the CUDA context itself is broken afterwards (an illegal address
poisons it for the rest of the process), the run stops with ``DeviceBroken``.
"""

from __future__ import annotations

import gc
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import compare, timing
from .ceilings import Ceilings
from .registry import Case, Family, Implementation
from .store import ResultsStore

ERROR_CHARS = 2000


class DeviceBroken(RuntimeError):
    """The CUDA context failed after an error: nothing more can run in this process."""


@dataclass
class Outcome:
    measured: int = 0
    errors: list[tuple[str, str, str]] = field(default_factory=list)  # (case, impl, error)
    skipped: int = 0
    resumed: int = 0
    fusedops_errors: int = 0


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def derived(family: Family, case: Case, median_ms: float, ceilings: Ceilings | None) -> dict:
    """Bytes, FLOPs, GB/s, TFLOP/s and the percentages of the ceilings for one time."""
    nbytes, nflops = family.bytes_moved(case), family.flops(case)
    seconds = median_ms * 1e-3
    gbps = nbytes / seconds / 1e9
    tflops = nflops / seconds / 1e12
    out = {"bytes": nbytes, "flops": nflops, "gbps": gbps, "tflops": tflops,
           "pct_copy": None, "pct_matmul": None}
    if ceilings is not None:
        out["pct_copy"] = 100.0 * gbps / ceilings.copy_gbps
        out["pct_matmul"] = 100.0 * tflops / ceilings.matmul_tflops
    return out


def _describe_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    if len(text) > ERROR_CHARS:
        text = text[:ERROR_CHARS] + " ..."
    return text


def _first_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else "unknown error"


def _all_finite(result) -> bool | None:
    if isinstance(result, (tuple, list)):
        checks = [_all_finite(r) for r in result]
        checks = [c for c in checks if c is not None]
        return all(checks) if checks else None
    if isinstance(result, torch.Tensor) and result.is_floating_point():
        return bool(torch.isfinite(result).all())
    return None


def _device_ok() -> bool:
    try:
        torch.cuda.synchronize()
        torch.empty(1, device="cuda").add_(1)
        torch.cuda.synchronize()
        return True
    except Exception:  # noqa: BLE001 - anything here means the context is gone
        return False


def progress_line(index: int, total: int, case: Case, impl: Implementation, record: dict,
                  eta: float | None) -> str:
    head = f"[{index:>{len(str(total))}}/{total}] {case.params.get('mode', ''):<8}" \
           f"{case.label:<18} {impl.name:<16}"
    status = record["status"]
    if status == "ok":
        body = f"{record['median_ms']:9.3f} ms {record['gbps']:7.0f} GB/s"
        if record.get("pct_copy") is not None:
            body += f" {record['pct_copy']:4.0f}% of copy"
        body += f"  peak {record['peak_memory_bytes'] / 2**30:6.2f} GiB"
        ratios = record.get("speedup") or {}
        if ratios:
            body += "  " + " ".join(f"{r:.2f}x {b}" for b, r in ratios.items())
        if record.get("output_finite") is False:
            body += "  NON-FINITE OUTPUT"
    elif status == "skipped":
        body = f"skipped: {record['reason']}"
    else:
        body = f"ERROR {_first_line(record.get('error'))[:160]}"
    tail = f"  (ETA {format_duration(eta)})" if eta is not None else ""
    return f"{head} {body}{tail}"


class Runner:
    """Runs ``family`` into ``store``. ``say`` prints one line (progress goes through it)."""

    def __init__(self, family: Family, store: ResultsStore, *, version: str, commit: str,
                 ceilings: Ceilings | None, profile: timing.Profile, quick: bool,
                 device: str = "cuda", implementations: list[str] | None = None,
                 say: Callable[[str], None] = print):
        self.family = family
        self.store = store
        self.version = version
        self.commit = commit
        self.ceilings = ceilings
        self.profile = profile
        self.quick = quick
        self.device = device
        self.only = set(implementations) if implementations else None
        self.say = say

    def implementations(self) -> list[Implementation]:
        impls = [i for i in self.family.implementations if not self.quick or i.quick]
        if self.only is not None:
            impls = [i for i in impls if i.name in self.only]
        # Baselines first: a fusedops line can then show its ratios as soon as it finishes.
        return sorted(impls, key=lambda i: not i.baseline)

    def plan(self) -> tuple[list[tuple[Case, list[Implementation]]], int]:
        """The (case, implementations still to measure) pairs, and how many were resumed."""
        plan, resumed = [], 0
        for case in self.family.cases(self.quick):
            todo = []
            for impl in self.implementations():
                if self.store.done(case.id, impl.name, self.version):
                    resumed += 1
                else:
                    todo.append(impl)
            if todo:
                plan.append((case, todo))
        return plan, resumed

    def _base_record(self, case: Case, impl: Implementation) -> dict:
        return {"case_id": case.id, "case": case.label, "params": case.params,
                "implementation": impl.name, "baseline": impl.baseline, "note": impl.note,
                "git_commit": self.commit, "code_version": self.version,
                "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def _l2_bytes(self) -> int | None:
        if self.device != "cuda" or not torch.cuda.is_available():
            return None
        return getattr(torch.cuda.get_device_properties(torch.cuda.current_device()),
                       "L2_cache_size", None)

    def _measure(self, case: Case, impl: Implementation, input_sets: list) -> dict:
        record = self._base_record(case, impl)
        fn = impl.setup(case, input_sets)
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        record["first_call_s"] = time.perf_counter() - start
        record["output_finite"] = _all_finite(result)
        del result
        t = timing.device_time(fn, self.profile)
        record.update(status="ok", median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                      calls=t.calls, input_sets=len(input_sets))
        record["peak_memory_bytes"] = timing.peak_memory(fn)
        record.update(derived(self.family, case, t.median_ms, self.ceilings))
        return record

    def run(self) -> Outcome:
        outcome = Outcome()
        plan, outcome.resumed = self.plan()
        total = sum(len(todo) for _, todo in plan)
        if outcome.resumed:
            self.say(f"  resuming: {outcome.resumed} measurement(s) already done at code "
                     f"version {self.version} (--fresh to redo them)")
        if total == 0:
            self.say("  nothing left to measure")
            return outcome
        index, started = 0, time.perf_counter()
        for case, todo in plan:
            input_sets, setup_error = [], None
            try:
                sets = timing.input_sets_needed(self.family.input_bytes(case), self._l2_bytes())
                input_sets = [self.family.make_inputs(case, self.device) for _ in range(sets)]
            except Exception as exc:  # noqa: BLE001 - e.g. an OOM making the inputs
                setup_error = f"making the inputs failed: {_describe_error(exc)}"
            for impl in todo:
                index += 1
                record = self._one(case, impl, input_sets, setup_error, outcome)
                elapsed = time.perf_counter() - started
                eta = elapsed / index * (total - index) if index < total else None
                self.say(progress_line(index, total, case, impl, record, eta))
            del input_sets
            gc.collect()
            torch.cuda.empty_cache()
        return outcome

    def _one(self, case: Case, impl: Implementation, input_sets: list,
             setup_error: str | None, outcome: Outcome) -> dict:
        try:
            reason = impl.unavailable() or impl.unsupported(case)
        except Exception as exc:  # noqa: BLE001
            reason = f"availability check failed: {_describe_error(exc)}"
        if reason is not None:
            record = {**self._base_record(case, impl), "status": "skipped", "reason": reason}
            self.store.put(record)
            outcome.skipped += 1
            return record
        if setup_error is not None:
            record = {**self._base_record(case, impl), "status": "error", "error": setup_error}
        else:
            self.store.put({**self._base_record(case, impl), "status": "running"})
            try:
                record = self._measure(case, impl, input_sets)
            except Exception as exc:  # noqa: BLE001 - recorded; the run goes on
                record = {**self._base_record(case, impl), "status": "error",
                          "error": _describe_error(exc),
                          "traceback": "".join(traceback.format_exception(exc))[-4000:]}
                del exc
                gc.collect()
                torch.cuda.empty_cache()
        if record["status"] == "ok":
            outcome.measured += 1
            peers = self.store.current(self.version) + [record]
            compare.attach_speedups(peers, self.family.ratio_baselines)
        else:
            outcome.errors.append((case.label, impl.name, record["error"]))
            if not impl.baseline:
                outcome.fusedops_errors += 1
        self.store.put(record)
        if record["status"] == "error" and not _device_ok():
            raise DeviceBroken(f"the CUDA context failed after {impl.name} on {case.label}: "
                               f"{_first_line(record.get('error'))}")
        return record
