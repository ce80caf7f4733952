"""Writers of a family's results: the terminal table, ``<family>.md`` and ``<family>.png``.

All of them take the results file's data (``ResultsStore.data``) and the records to show
(``ResultsStore.current(version)``: the latest measurement of each case and implementation
at one code version), so they can be re-rendered from a committed JSON at any time.
The PNG needs matplotlib; without it ``write_plot`` returns a note instead of a file.
"""

from __future__ import annotations

from pathlib import Path

from .registry import Family

MISSING = "–"


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    if value is None:
        return MISSING
    return format(value * scale, spec)


def _ordered(family: Family, records: list[dict]) -> list[dict]:
    """Records in the family's case order, then its implementation order."""
    case_order = {c.id: i for i, c in enumerate(family.cases(False))}
    impl_order = {impl.name: i for i, impl in enumerate(family.implementations)}
    return sorted(records, key=lambda r: (case_order.get(r["case_id"], len(case_order)),
                                          impl_order.get(r["implementation"], len(impl_order))))


def _panels(family: Family, records: list[dict]) -> list[tuple[str, list[dict]]]:
    if not family.panel_key:
        return [("", records)]
    panels: dict[str, list[dict]] = {}
    for record in records:
        panels.setdefault(str(record["params"].get(family.panel_key, "")), []).append(record)
    return list(panels.items())


def _runs_of(data: dict, records: list[dict]) -> list[dict]:
    used = {r.get("run_id") for r in records}
    return [run for run in data.get("runs", []) if run["run_id"] in used]


def _row_cells(family: Family, record: dict) -> list[str]:
    ratios = record.get("speedup") or {}
    cells = [record["case"], record["implementation"]]
    if record["status"] == "ok":
        cells += [_fmt(record["median_ms"], ".3f"), _fmt(record["gbps"], ".0f"),
                  _fmt(record.get("pct_copy"), ".0f"), _fmt(record["tflops"], ".2f"),
                  _fmt(record.get("pct_matmul"), ".1f"),
                  _fmt(record.get("peak_memory_bytes"), ".2f", 1 / 2**30)]
        cells += [(f"{ratios[b]:.2f}×" if b in ratios else MISSING)
                  for b in family.ratio_baselines]
        note = "non-finite output!" if record.get("output_finite") is False else ""
    else:
        cells += [MISSING] * (6 + len(family.ratio_baselines))
        error = (record.get("error") or "").splitlines()
        note = (f"skipped: {record['reason']}" if record["status"] == "skipped"
                else f"error: {error[0] if error else 'unknown'}")
    cells.append(note.replace("|", "\\|"))
    return cells


def _header(family: Family) -> list[str]:
    return (["case", "implementation", "median ms", "GB/s", "% copy", "TFLOP/s", "% matmul",
             "peak GiB"] + [f"× {b}" for b in family.ratio_baselines] + ["note"])


def markdown(family: Family, data: dict, records: list[dict]) -> str:
    """The Markdown report of ``records`` (see the module docstring)."""
    records = _ordered(family, records)
    runs = _runs_of(data, records)
    lines = [f"# {family.name}: {family.description}", ""]
    if runs:
        last = runs[-1]
        device = last.get("device") or {}
        v = last.get("versions") or {}
        lines += [
            f"- **Device**: {device.get('name', 'unknown')} "
            f"(sm_{str(device.get('capability', '?')).replace('.', '')}, "
            f"{device.get('multiprocessors', '?')} SMs, driver {device.get('driver', '?')})",
            f"- **Software**: torch {v.get('torch')}, triton {v.get('triton')}, "
            f"CUDA {v.get('cuda')}, fusedops {v.get('fusedops')}"
            + (f", liger-kernel {v['liger_kernel']}" if v.get("liger_kernel") else ""),
            f"- **Commit**: {last.get('git_commit', 'unknown')} (code version "
            f"{last.get('code_version', '?')}); profile {last.get('profile', '?')}",
        ]
        for run in runs:
            c = run.get("ceilings") or {}
            if c:
                lines.append(
                    f"- **Ceilings** measured in run {run['run_id']} ({run.get('date', '')}): "
                    f"copy {c['copy_gbps']:.0f} GB/s (1 GiB device-to-device copy, read + "
                    f"write), bf16 8192³ matmul {c['matmul_tflops']:.0f} TFLOP/s")
    lines += [
        "- **Timing**: median device time of many calls (`triton.testing.do_bench`, CUDA "
        "events, L2 flushed before each call, inputs rotated when small), after an untimed "
        "first call; peak memory is `torch.cuda.max_memory_allocated()` during one call "
        "beyond the inputs. `× b` is time(b) / time(row): above 1 the row is faster.",
    ]
    if family.formulas:
        lines.append(f"- **Counts**: {family.formulas}")
    lines.append("")
    header = _header(family)
    for panel, panel_records in _panels(family, records):
        if panel:
            lines += [f"## {panel}", ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 3) + ["---"]) + "|")
        for record in panel_records:
            lines.append("| " + " | ".join(_row_cells(family, record)) + " |")
        lines.append("")
    return "\n".join(lines)


def terminal_table(family: Family, records: list[dict]) -> str:
    """A plain-text table for the end of a run."""
    records = _ordered(family, records)
    header = _header(family)
    rows = []
    for panel, panel_records in _panels(family, records):
        for record in panel_records:
            cells = _row_cells(family, record)
            cells[0] = f"{panel} {cells[0]}".strip()
            rows.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    widths[-1] = min(widths[-1], 60)
    def line(cells):  # text columns left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i < 2 or i == len(cells) - 1 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    for r in rows:
        r[-1] = r[-1][:60]
        out.append(line(r))
    return "\n".join(out)


def write_markdown(path: Path, family: Family, data: dict, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(family, data, records) + "\n")
    return path


def write_plot(path: Path, family: Family, data: dict, records: list[dict]) -> str | None:
    """Write the PNG: per panel, throughput bars (with the ceiling) and the speedup over
    the first ratio baseline. Returns None, or a note saying why no plot was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no PNG written"
    ok = [r for r in _ordered(family, records) if r["status"] == "ok"]
    if not ok:
        return "no successful measurement to plot"
    runs = _runs_of(data, ok)
    ceilings = (runs[-1].get("ceilings") if runs else None) or {}
    memory = family.bound == "memory"
    metric, unit = ("gbps", "GB/s") if memory else ("tflops", "TFLOP/s")
    ceiling = ceilings.get("copy_gbps" if memory else "matmul_tflops")
    reference = family.ratio_baselines[0] if family.ratio_baselines else None
    panels = _panels(family, ok)
    impl_names = [i.name for i in family.implementations
                  if any(r["implementation"] == i.name for r in ok)]
    rows = 2 if reference else 1
    fig, axes = plt.subplots(rows, len(panels), figsize=(6.5 * len(panels), 4.2 * rows),
                             squeeze=False)
    width = 0.8 / max(1, len(impl_names))
    for col, (panel, panel_records) in enumerate(panels):
        labels = list(dict.fromkeys(r["case"] for r in panel_records))
        for k, impl in enumerate(impl_names):
            by_case = {r["case"]: r for r in panel_records if r["implementation"] == impl}
            xs = [i + (k - (len(impl_names) - 1) / 2) * width for i in range(len(labels))]
            axes[0][col].bar(xs, [by_case[c][metric] if c in by_case else 0 for c in labels],
                             width, label=impl)
            if reference:
                own = 1.0 if impl == reference else 0.0  # the reference is 1x itself
                axes[1][col].bar(xs, [(by_case[c].get("speedup") or {}).get(reference, own)
                                      if c in by_case else 0 for c in labels], width, label=impl)
        for row in range(rows):
            axes[row][col].set_xticks(range(len(labels)))
            axes[row][col].set_xticklabels(labels, rotation=15, fontsize=8)
        axes[0][col].set_title(f"{family.name} {panel}".strip())
        axes[0][col].set_ylabel(unit)
        if ceiling:
            axes[0][col].axhline(ceiling, color="k", linestyle="--", linewidth=1)
            axes[0][col].text(len(labels) - 0.5, ceiling, f"{'copy' if memory else 'matmul'} "
                              f"ceiling {ceiling:.0f}", ha="right", va="bottom", fontsize=8)
        if reference:
            axes[1][col].axhline(1.0, color="k", linestyle="--", linewidth=1)
            axes[1][col].set_ylabel(f"speedup over {reference} (×)")
    axes[0][0].legend(fontsize=8)
    device = ((runs[-1].get("device") or {}).get("name", "") if runs else "")
    commit = runs[-1].get("git_commit", "unknown")[:12] if runs else "unknown"
    fig.suptitle(f"{family.name} on {device} — commit {commit}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
