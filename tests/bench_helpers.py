"""What the benchmark harness tests (``test_bench_*_harness.py``) share, without a GPU.

float64 references and the closeness checks of the timed callables' results, the skip
reasons of the fusedops tiers (checked the same way in every family), and the runner's
records of made-up timings rendered as the Markdown report.
"""

from __future__ import annotations

import torch
from bench_package import load

ceilings_mod = load("ceilings")
compare = load("compare")
render = load("render")
report = load("report")
runner_mod = load("runner")

# The ceilings of the made-up runs the Markdown tests render (an H100's, roughly).
CEILINGS = ceilings_mod.Ceilings(copy_gbps=3000.0, matmul_tflops=700.0, copy_ms=1.0,
                                 matmul_ms=1.6)
ALL_TIERS_AVAILABLE = {"torch": None, "triton": None, "cuda": None}

# --- float64 references -----------------------------------------------------------------


def float64_leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    """A float64 copy of an input that a reference differentiates (None stays None)."""
    return None if t is None else t.detach().double().requires_grad_(True)


def assert_close64(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """``got`` has ``want``'s shape and is within ``rtol`` of it (relative Frobenius norm)."""
    assert got.shape == want.shape
    assert (got.double() - want).norm() <= rtol * want.norm()


def assert_all_close64(got, want, rtol: float) -> None:
    """As many results as references (gradients, say), each within ``rtol`` of its own."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert_close64(g, w, rtol)


# --- skip reasons of the fusedops tiers -------------------------------------------------


def assert_unavailable_tiers_give_the_backends_reason(family) -> None:
    """An unavailable fusedops tier is skipped with ``fusedops.backends()``'s own reason (an
    available tier is not asked: it would be probed, slowly in Triton's interpreter)."""
    import fusedops

    for tier in ("triton", "cuda"):
        reason = fusedops.backends()[tier]
        if reason is not None:
            assert family.implementation(f"fusedops-{tier}").unavailable() == reason


def assert_missing_or_unimplemented_op_is_skipped(monkeypatch, module, op: str, tier: str,
                                                  raises: str, says: str) -> None:
    """With every tier available, ``fusedops-<tier>`` of ``module``'s family is skipped when
    ``fusedops.<op>`` does not exist, and when its probe raises NotImplementedError
    (``raises``; the reason ``says`` so); a probe failing any other way is no reason at all
    (the measurement records it, with its traceback)."""
    import fusedops

    monkeypatch.setattr(fusedops, "backends", lambda: dict(ALL_TIERS_AVAILABLE))
    monkeypatch.setattr(module, "_probed", {})
    impl = module.FAMILY.implementation(f"fusedops-{tier}")
    monkeypatch.delattr(fusedops, op, raising=False)
    assert impl.unavailable() == f"fusedops.{op} does not exist yet"

    def not_implemented(*args, **kwargs):
        raise NotImplementedError(raises)

    monkeypatch.setattr(fusedops, op, not_implemented, raising=False)
    reason = impl.unavailable()
    assert reason.startswith(f"fusedops.{op} raises NotImplementedError")
    assert says in reason

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(module, "_probed", {})
    monkeypatch.setattr(fusedops, op, broken, raising=False)
    assert impl.unavailable() is None


# --- the runner and the report ----------------------------------------------------------


def listings(capsys, family_name: str) -> tuple[str, str]:
    """What ``fusedops-bench --list`` prints (every family), and what ``--list --quick
    --family <family_name>`` prints."""
    assert report.main(["--list"]) == 0
    full = capsys.readouterr().out
    assert report.main(["--list", "--quick", "--family", family_name]) == 0
    return full, capsys.readouterr().out


def cpu_runner(family, store, *, quick: bool):
    """The report's runner over ``family`` on the CPU, quietly, with no ceilings."""
    return runner_mod.Runner(family, store, version="v1", commit="abc", ceilings=None,
                             profile=None, quick=quick, device="cpu", say=lambda line: None)


def markdown_of(family, case, medians_ms: dict[str, float],
                peak_memory_bytes: int = 2**20) -> tuple[list[dict], str]:
    """The records the runner writes for ``case`` measured at ``medians_ms`` (implementation
    -> median ms) against ``CEILINGS``, with the speed ratios attached, and the Markdown
    report of them."""
    records = []
    for impl, ms in medians_ms.items():
        records.append({"run_id": "r1", "case_id": case.id, "case": case.label,
                        "params": case.params, "implementation": impl, "status": "ok",
                        "median_ms": ms, "peak_memory_bytes": peak_memory_bytes,
                        "output_finite": True,
                        **runner_mod.derived(family, case, ms, CEILINGS)})
    compare.attach_speedups(records, family.ratio_baselines)
    text = render.markdown(family, {"runs": [{"run_id": "r1", "ceilings": CEILINGS.as_dict()}]},
                           records)
    return records, text
