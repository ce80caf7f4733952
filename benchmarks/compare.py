"""Speed ratios between implementations of the same case, measured side by side.

``speedup[b]`` of an implementation is ``time(b) / time(implementation)``: above 1 it is
faster than baseline ``b``. Only finished measurements of one code version are compared
(``ResultsStore.current``), so a ratio never mixes code from two commits.
"""

from __future__ import annotations


def speedups(records: list[dict], baselines) -> dict[tuple[str, str], dict[str, float]]:
    """(case_id, implementation) -> {baseline: time(baseline) / time(implementation)}."""
    times: dict[str, dict[str, float]] = {}
    for record in records:
        if record.get("status") == "ok" and record.get("median_ms"):
            times.setdefault(record["case_id"], {})[record["implementation"]] = record["median_ms"]
    out: dict[tuple[str, str], dict[str, float]] = {}
    for case_id, by_impl in times.items():
        for impl, ms in by_impl.items():
            ratios = {b: by_impl[b] / ms for b in baselines if b in by_impl and b != impl}
            out[(case_id, impl)] = ratios
    return out


def attach_speedups(records: list[dict], baselines) -> None:
    """Write each ok record's ``speedup`` dict (in place)."""
    table = speedups(records, baselines)
    for record in records:
        if record.get("status") == "ok":
            record["speedup"] = table.get((record["case_id"], record["implementation"]), {})
