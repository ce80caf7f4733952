"""``fusedops-bench``: the benchmark report, or without a GPU the parity self-check.

On a CUDA machine: measure the two ceilings, then time every implemented op family against
its baselines (``--family`` picks some), print one line per measurement as it finishes and a
table at the end, and write ``<out>/<gpu>/<family>.json`` (every measurement, appended;
a rerun at the same commit resumes), ``<family>.md`` and ``<family>.png``.

Without one: say so on the first line, set ``TRITON_INTERPRET=1`` (before anything imports
triton) and run ``selfcheck``: the torch and Triton tiers against float64 torch.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import textwrap
from pathlib import Path

NO_CUDA_LINE = ("No CUDA device: running the parity self-check of the CPU and interpreter "
                "tiers instead; timings need a GPU.")

EPILOG = textwrap.dedent("""\
    what is measured, per case and implementation:
      median device time (triton.testing.do_bench, L2 flushed before each call, inputs
      rotated when small, after an untimed first call that absorbs compilation); the
      fewest bytes the op must move and its FLOPs (formulas in each cases_<family>.py and in
      the Markdown report); GB/s and TFLOP/s, as a percentage of the ceilings measured in
      the same run (a 1 GiB device-to-device copy, read + write; a bf16 8192^3 matmul);
      peak memory beyond the inputs; speed ratios against the baselines measured in the
      same run (eager torch, torch.compile, cuBLAS, SDPA's flash, cuDNN and efficient
      backends, FlexAttention, Liger-Kernel and flash-attn-4 when installed). A failing
      implementation (an exception, an OOM) is recorded with its error and the run goes on;
      an unavailable fusedops tier is recorded as skipped, with the reason.

    resuming:
      results are appended to <out>/<gpu>/<family>.json after every measurement; a rerun
      skips what was already measured at the same git commit (plus a hash of the sources
      when the tree has uncommitted changes or no .git; FUSEDOPS_GIT_COMMIT names the
      commit there). A measurement cut off by a crash or a hang is recorded as an error
      and not retried; --fresh starts the file over.

    exit status:
      0 when every fusedops implementation that ran succeeded (baseline failures are only
      reported), 1 when one failed or the self-check has a FAIL, 2 when the CUDA context
      broke and the run stopped, 130 when interrupted (what was measured is kept).

    examples:
      fusedops-bench                           # everything (or the self-check without a GPU)
      fusedops-bench --quick                   # every family in under 8 minutes on an H100
      fusedops-bench --family cross_entropy --impl fusedops-triton --impl eager
      fusedops-bench --list                    # the cases and implementations, no GPU needed
    """)


def build_parser() -> argparse.ArgumentParser:
    from .registry import family_names

    parser = argparse.ArgumentParser(
        prog="fusedops-bench",
        description=textwrap.fill(
            "Benchmark fusedops' fused kernels against eager torch, torch.compile and "
            "Liger-Kernel on a CUDA GPU, and write JSON, Markdown and PNG reports. Without a "
            "GPU, run the parity self-check of the CPU and Triton-interpreter tiers instead.",
            width=88),
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a representative subset of cases that covers every family in "
                             "under 8 minutes on an H100, with fewer timed calls and without "
                             "the slow-to-compile baselines")
    parser.add_argument("--family", action="append", choices=family_names(), metavar="NAME",
                        help=f"run only this op family (repeatable; default: all of "
                             f"{', '.join(family_names())})")
    parser.add_argument("--impl", action="append", metavar="NAME",
                        help="time only this implementation (repeatable), e.g. "
                             "fusedops-triton, fusedops-cuda, eager, torch.compile, liger")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="results root; files go to DIR/<gpu>/ (default: benchmarks/"
                             "results in the fusedops checkout, else ./fusedops-bench-results)")
    parser.add_argument("--fresh", action="store_true",
                        help="start the results files over instead of appending and resuming")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--list", action="store_true",
                        help="list the families, cases and implementations, then exit")
    parser.add_argument("--selfcheck", action="store_true",
                        help="run the parity self-check even on a CUDA machine (there it "
                             "checks the torch, triton and cuda tiers on the GPU)")
    parser.add_argument("--seed", type=int, help="random seed (default: a fresh one)")
    return parser


def default_out() -> Path:
    from .environment import PACKAGE_DIR, checkout_root

    if checkout_root() is not None:
        return PACKAGE_DIR / "results"
    return Path.cwd() / "fusedops-bench-results"


def list_families(names: list[str], quick: bool) -> None:
    from .registry import get_family

    for name in names:
        family = get_family(name)
        cases = family.cases(quick)
        print(f"{name}: {family.description}")
        print("  implementations: " + ", ".join(
            f"{i.name}{'' if i.quick or not quick else ' (not in --quick)'}"
            for i in family.implementations))
        print(f"  cases ({len(cases)}{', --quick' if quick else ''}):")
        for case in cases:
            mode = case.params.get(family.panel_key, "") if family.panel_key else ""
            print(f"    {case.id:<36} {mode:<8} {case.label}  "
                  f"{family.bytes_moved(case) / 1e9:.2f} GB"
                  + ("  [quick]" if case.quick else ""))


def _interrupt(signum, frame):  # SIGTERM (e.g. from `timeout`): stop like Ctrl-C, saving
    raise KeyboardInterrupt(f"signal {signum}")


def run_benchmarks(args, names: list[str], info: dict) -> int:
    import torch

    from . import ceilings as ceilings_module
    from . import compare, render, store, timing
    from .environment import PACKAGE_DIR, checkout_root
    from .registry import get_family
    from .runner import DeviceBroken, Runner

    profile = timing.QUICK if args.quick else timing.FULL
    out_root = args.out or default_out()
    gpu_dir = out_root / info["device"]["slug"]
    root = checkout_root()
    roots = ([root / "python" / "fusedops", root / "triton_kernels", root / "csrc",
              root / "benchmarks"] if root else [PACKAGE_DIR.parent])
    commit, version = store.code_version(info["git_commit"], info["git_dirty"],
                                         store.source_fingerprint(roots))
    print(f"results: {gpu_dir}  (code version {version})")
    if args.seed is not None:
        torch.manual_seed(args.seed)

    print("measuring the ceilings ...", flush=True)
    try:
        ceilings = ceilings_module.measure(profile)
        print(f"  copy {ceilings.copy_gbps:.0f} GB/s (1 GiB device-to-device, read + write); "
              f"bf16 8192^3 matmul {ceilings.matmul_tflops:.0f} TFLOP/s")
    except Exception as exc:  # noqa: BLE001 - the run goes on without percentages
        ceilings = None
        print(f"  the ceilings could not be measured ({type(exc).__name__}: {exc}); "
              f"percentages are left out")

    status = 0
    for name in names:
        family = get_family(name)
        results = store.ResultsStore(gpu_dir / f"{name}.json", name, info["device"]["slug"],
                                     fresh=args.fresh)
        for note in results.notes:
            print(f"note: {note}")
        results.start_run({**info, "git_commit": commit, "code_version": version,
                           "profile": "quick" if args.quick else "full",
                           "argv": sys.argv[1:],
                           "ceilings": ceilings.as_dict() if ceilings else None})
        print(f"\n== {name}: {family.description}", flush=True)
        runner = Runner(family, results, version=version, commit=commit, ceilings=ceilings,
                        profile=profile, quick=args.quick, implementations=args.impl,
                        say=lambda line: print(line, flush=True))
        broken = interrupted = False
        outcome = None
        try:
            outcome = runner.run()
        except DeviceBroken as exc:
            print(f"STOPPED: {exc}")
            broken = True
        except KeyboardInterrupt:
            print("interrupted: saving what was measured")
            results.drop_running()
            interrupted = True
        records = results.current(version)
        compare.attach_speedups(records, family.ratio_baselines)
        results.save()
        md = render.write_markdown(gpu_dir / f"{name}.md", family, results.data, records)
        written = [results.path, md]
        if not args.no_plots:
            note = render.write_plot(gpu_dir / f"{name}.png", family, results.data, records)
            if note:
                print(f"note: {note}")
            else:
                written.append(gpu_dir / f"{name}.png")
        print()
        print(render.terminal_table(family, records))
        print("\nwrote " + ", ".join(str(p) for p in written))
        if broken:
            return 2
        if interrupted:
            return 130
        if outcome is not None and outcome.errors:
            print(f"{len(outcome.errors)} implementation(s) failed:")
            for case, impl, error in outcome.errors:
                print(f"  {case} {impl}: {(error.strip().splitlines() or ['?'])[0][:200]}")
        if outcome is not None and outcome.fusedops_errors:
            status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .registry import family_names

    names = args.family or family_names()
    if args.impl:
        from .registry import get_family

        known = {impl.name for name in names for impl in get_family(name).implementations}
        unknown = sorted(set(args.impl) - known)
        if unknown:
            build_parser().error(f"unknown implementation(s) {', '.join(unknown)}; "
                                 f"known: {', '.join(sorted(known))}")
    if args.list:
        list_families(names, args.quick)
        return 0

    import torch

    has_cuda = torch.cuda.is_available()
    if not has_cuda:
        print(NO_CUDA_LINE, flush=True)
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            # `import fusedops` does not import triton; something else in this process did.
            print("note: triton was imported before TRITON_INTERPRET=1 could be set; the "
                  "Triton tier cannot run in its interpreter in this process")
        else:
            os.environ["TRITON_INTERPRET"] = "1"

    from . import environment

    info = environment.describe()
    for line in environment.version_lines(info):
        print(line)
    print(flush=True)

    if not has_cuda or args.selfcheck:
        from . import selfcheck

        failures = selfcheck.run(say=lambda line: print(line, flush=True), seed=args.seed)
        return 1 if failures else 0

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run_benchmarks(args, names, info)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
