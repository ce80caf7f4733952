"""The benchmark harness (``fusedops-bench``) without a GPU: everything but the timings.

Byte formulas, cases, the results file (append, resume, interrupted runs), speed ratios,
the Markdown/PNG writers on fake measurements, the runner's flow with the device calls
replaced, the cross-entropy implementations' callables on CPU tensors, and the CLI's
no-GPU path. Nothing here asserts a timing.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from bench_package import PKG, ROOT, load

registry = load("registry")
ce = load("cases_cross_entropy")
store_mod = load("store")
compare = load("compare")
render = load("render")
runner_mod = load("runner")
timing = load("timing")
environment = load("environment")
ceilings_mod = load("ceilings")
report = load("report")
selfcheck = load("selfcheck")


def _case(mode="fwd", n=16384, c=128256, dtype="bfloat16"):
    params = {"mode": mode, "N": n, "C": c, "dtype": dtype, "reduction": "mean",
              "ignore_fraction": 0.01}
    return registry.Case(id=f"{mode}_N{n}_C{c}_{dtype}", label=f"N={n} C={c}", params=params)


# --- cross-entropy cases and byte counts -------------------------------------------------


def test_cross_entropy_bytes_forward():
    n, c = 16384, 128256
    # read N*C bf16 logits + N int64 targets + write N float32
    assert ce.bytes_moved(_case("fwd", n, c)) == n * c * 2 + n * 8 + n * 4


def test_cross_entropy_bytes_forward_backward():
    n, c = 4096, 32000
    forward = n * c * 2 + n * 8 + n * 4
    # + read the logits again + write the gradient
    assert ce.bytes_moved(_case("fwd+bwd", n, c)) == forward + 2 * n * c * 2
    # float32 logits double the logit terms
    assert ce.bytes_moved(_case("fwd+bwd", n, c, "float32")) == 3 * n * c * 4 + n * 12


def test_cross_entropy_flops_and_input_bytes():
    assert ce.flops(_case("fwd", 8, 10)) == 4 * 80
    assert ce.flops(_case("fwd+bwd", 8, 10)) == 8 * 80
    assert ce.input_bytes(_case("fwd", 8, 10)) == 8 * 10 * 2 + 8 * 8


def test_cross_entropy_case_grid():
    full = ce.cases(False)
    assert len(full) == 2 * 2 * 3
    assert {(c.params["N"], c.params["C"]) for c in full} == {
        (n, c) for n in (4096, 16384) for c in (32000, 128256, 262144)}
    assert {c.params["mode"] for c in full} == {"fwd", "fwd+bwd"}
    assert all(c.params["dtype"] == "bfloat16" for c in full)
    assert len({c.id for c in full}) == len(full)
    quick = ce.cases(True)
    assert {c.id for c in quick} < {c.id for c in full}
    for mode in ("fwd", "fwd+bwd"):  # the headline case is in --quick, both modes
        assert any(c.params == {**c.params, "mode": mode, "N": 16384, "C": 128256}
                   for c in quick)


def test_registry():
    assert "cross_entropy" in registry.family_names()
    family = registry.get_family("cross_entropy")
    assert family.name == "cross_entropy"
    names = [i.name for i in family.implementations]
    assert names == ["fusedops-triton", "fusedops-cuda", "eager", "torch.compile", "liger"]
    assert [i.name for i in family.implementations if not i.baseline] == names[:2]
    assert family.implementation("eager").name == "eager"
    with pytest.raises(KeyError):
        family.implementation("nope")
    with pytest.raises(KeyError, match="unknown op family"):
        registry.get_family("nope")


def test_make_inputs_on_cpu():
    case = _case("fwd+bwd", 4000, 37, "float32")
    inputs = ce.make_inputs(case, "cpu")
    logits, target = inputs["logits"], inputs["target"]
    assert logits.shape == (4000, 37) and logits.dtype == torch.float32
    assert logits.requires_grad and target.dtype == torch.int64
    ignored = (target == ce.IGNORE_INDEX).float().mean().item()
    assert 0.001 < ignored < 0.03  # ~1% ignore_index
    kept = target[target != ce.IGNORE_INDEX]
    assert kept.min() >= 0 and kept.max() < 37
    assert logits.std() > 0.5  # random, never zeros
    assert not ce.make_inputs(_case("fwd", 8, 5), "cpu")["logits"].requires_grad


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_cross_entropy_callables_on_cpu(mode):
    """The timed callables compute the right thing: the loss, or its input gradient."""
    case = _case(mode, 9, 37, "float32")
    inputs = ce.make_inputs(case, "cpu")
    x, t = inputs["logits"], inputs["target"]
    ref = F.cross_entropy(x.detach().double(), t, ignore_index=ce.IGNORE_INDEX)
    impls = ["eager"]
    import fusedops

    if fusedops.backends()["triton"] is None:
        impls.append("fusedops-triton")
    for name in impls:
        out = ce.FAMILY.implementation(name).setup(case, [inputs])()
        if mode == "fwd":
            assert out.shape == () and abs(out.item() - ref.item()) < 1e-5 * abs(ref.item())
        else:
            x64 = x.detach().double().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(x64, t, ignore_index=ce.IGNORE_INDEX),
                                       x64)
            assert out.shape == x.shape
            assert (out.double() - g).norm() < 1e-5 * g.norm()
            assert x.grad is None  # autograd.grad: nothing accumulates between timed calls


def test_unavailable_tiers_give_reasons():
    import fusedops

    for tier in ("triton", "cuda"):
        impl = ce.FAMILY.implementation(f"fusedops-{tier}")
        assert impl.unavailable() == fusedops.backends()[tier]
    if importlib.util.find_spec("liger_kernel") is None:
        assert "not installed" in ce.FAMILY.implementation("liger").unavailable()


# --- environment ------------------------------------------------------------------------


@pytest.mark.parametrize("name, slug", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm"),
    ("NVIDIA H100 PCIe", "h100-pcie"),
    ("NVIDIA H100 NVL", "h100-nvl"),
    ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100-sxm4-80gb"),
    ("NVIDIA GH200 480GB", "gh200-480gb"),
    ("", "unknown-gpu"),
])
def test_gpu_slug(name, slug):
    assert environment.gpu_slug(name) == slug


def test_describe_has_versions_and_commit():
    info = environment.describe()
    assert info["versions"]["torch"] == torch.__version__
    assert info["git_commit"] == "unknown" or len(info["git_commit"]) == 40
    lines = environment.version_lines(info)
    assert "torch" in lines[0] and "git commit" in lines[1]


# --- timing helpers ---------------------------------------------------------------------


def test_summarize():
    t = timing.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.calls) == (3.0, 1.8, 4.2, 5)
    with pytest.raises(ValueError):
        timing.summarize([])


def test_input_sets_needed():
    l2 = 50 * 2**20
    assert timing.input_sets_needed(4 * 2**30, l2) == 1
    assert timing.input_sets_needed(4 * l2, l2) == 1
    assert timing.input_sets_needed(l2, l2) == 4
    assert timing.input_sets_needed(1, l2) == timing.MAX_INPUT_SETS
    assert timing.input_sets_needed(1000, None) == 1


def test_rotate():
    calls = []
    fn = timing.rotate([lambda i=i: calls.append(i) for i in range(3)])
    for _ in range(7):
        fn()
    assert calls == [0, 1, 2, 0, 1, 2, 0]
    single = lambda: 1
    assert timing.rotate([single]) is single


def test_derived_numbers():
    family = ce.FAMILY
    case = _case("fwd", 16384, 128256)
    c = ceilings_mod.Ceilings(copy_gbps=3000.0, matmul_tflops=800.0, copy_ms=0.7, matmul_ms=1.4)
    d = runner_mod.derived(family, case, 2.0, c)
    assert d["bytes"] == ce.bytes_moved(case)
    assert d["gbps"] == pytest.approx(ce.bytes_moved(case) / 2e-3 / 1e9)
    assert d["pct_copy"] == pytest.approx(100 * d["gbps"] / 3000.0)
    assert d["tflops"] == pytest.approx(ce.flops(case) / 2e-3 / 1e12)
    assert runner_mod.derived(family, case, 2.0, None)["pct_copy"] is None


def test_format_duration():
    assert runner_mod.format_duration(5) == "5s"
    assert runner_mod.format_duration(125) == "2m05s"
    assert runner_mod.format_duration(3 * 3600 + 60) == "3h01m"


# --- results file: append, resume, interrupted runs --------------------------------------


def _record(case_id, impl, ms=None, status="ok", version="v1", **extra):
    r = {"case_id": case_id, "case": case_id, "params": {"mode": "fwd"},
         "implementation": impl, "status": status, "code_version": version, **extra}
    if ms is not None:
        r["median_ms"] = ms
    return r


def test_store_append_and_resume(tmp_path):
    path = tmp_path / "h100-sxm" / "cross_entropy.json"
    s = store_mod.ResultsStore(path, "cross_entropy", "h100-sxm")
    s.start_run({"git_commit": "abc"})
    s.put(_record("a", "eager", 2.0))
    s.put(_record("a", "liger", status="skipped", reason="not installed"))
    s.put(_record("b", "eager", status="error", error="OOM"))
    data = json.loads(path.read_text())
    assert data["family"] == "cross_entropy" and len(data["runs"]) == 1
    assert len(data["measurements"]) == 3

    again = store_mod.ResultsStore(path, "cross_entropy", "h100-sxm")
    assert again.done("a", "eager", "v1")["median_ms"] == 2.0
    assert again.done("b", "eager", "v1")["status"] == "error"  # errors are not retried
    assert again.done("a", "liger", "v1") is None  # skipped ones are
    assert again.done("a", "eager", "v2") is None  # another code version measures again
    again.start_run({"git_commit": "abc"})
    again.put(_record("c", "eager", 1.0))
    assert len(json.loads(path.read_text())["runs"]) == 2  # appended, not replaced

    fresh = store_mod.ResultsStore(path, "cross_entropy", "h100-sxm", fresh=True)
    assert fresh.measurements == [] and fresh.done("a", "eager", "v1") is None


def test_store_running_becomes_interrupted(tmp_path):
    path = tmp_path / "x.json"
    s = store_mod.ResultsStore(path, "f", "g")
    s.start_run({})
    s.put(_record("a", "eager", status="running"))  # then the process dies
    reloaded = store_mod.ResultsStore(path, "f", "g")
    record = reloaded.done("a", "eager", "v1")
    assert record["status"] == "error" and "interrupted" in record["error"]


def test_store_put_replaces_running_placeholder_and_drop(tmp_path):
    s = store_mod.ResultsStore(tmp_path / "x.json", "f", "g")
    s.start_run({})
    s.put(_record("a", "eager", status="running"))
    s.put(_record("a", "eager", 3.0))
    assert [r["status"] for r in s.measurements] == ["ok"]
    s.put(_record("b", "eager", status="running"))
    s.drop_running()
    assert [r["case_id"] for r in s.measurements] == ["a"]


def test_store_unreadable_file_is_kept_aside(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{not json")
    s = store_mod.ResultsStore(path, "f", "g")
    assert s.measurements == [] and s.notes
    assert len(list(tmp_path.glob("x.unreadable-*.json"))) == 1


def test_store_current_takes_latest_per_version(tmp_path):
    s = store_mod.ResultsStore(tmp_path / "x.json", "f", "g")
    s.start_run({})
    s.put(_record("a", "eager", 5.0, version="v1"))
    s.start_run({})
    s.put(_record("a", "eager", 4.0, version="v2"))
    s.put(_record("a", "liger", status="running", version="v2"))
    assert [r["median_ms"] for r in s.current("v2")] == [4.0]
    assert [r["median_ms"] for r in s.current("v1")] == [5.0]
    assert [r["median_ms"] for r in s.current()] == [4.0]


def test_code_version(monkeypatch, tmp_path):
    monkeypatch.delenv(store_mod.COMMIT_ENV_VAR, raising=False)
    assert store_mod.code_version("abc", False, "fp") == ("abc", "abc")
    assert store_mod.code_version("abc", True, "fp") == ("abc", "abc+src.fp")
    assert store_mod.code_version("unknown", None, "fp") == ("unknown", "unknown+src.fp")
    monkeypatch.setenv(store_mod.COMMIT_ENV_VAR, "def")
    assert store_mod.code_version("unknown", None, "fp") == ("def", "def+src.fp")
    (tmp_path / "a.py").write_text("x = 1\n")
    first = store_mod.source_fingerprint([tmp_path])
    assert first == store_mod.source_fingerprint([tmp_path])
    (tmp_path / "a.py").write_text("x = 2\n")
    assert store_mod.source_fingerprint([tmp_path]) != first


# --- ratios and writers -----------------------------------------------------------------


def _fake_records():
    recs = []
    for mode in ("fwd", "fwd+bwd"):
        for n, c in ((4096, 32000), (16384, 128256)):
            case = _case(mode, n, c)
            for impl, ms in (("fusedops-triton", 1.0), ("eager", 2.5), ("torch.compile", 1.2)):
                d = runner_mod.derived(ce.FAMILY, case, ms * (n / 4096),
                                       ceilings_mod.Ceilings(3000.0, 800.0, 1.0, 1.0))
                recs.append({"run_id": "r1", "case_id": case.id, "case": case.label,
                             "params": case.params, "implementation": impl,
                             "baseline": impl != "fusedops-triton", "status": "ok",
                             "median_ms": ms * (n / 4096), "peak_memory_bytes": 2**30,
                             "output_finite": True, "code_version": "v1", **d})
            recs.append({"run_id": "r1", "case_id": case.id, "case": case.label,
                         "params": case.params, "implementation": "fusedops-cuda",
                         "status": "error", "error": "RuntimeError: boom\nmore"})
            recs.append({"run_id": "r1", "case_id": case.id, "case": case.label,
                         "params": case.params, "implementation": "liger",
                         "status": "skipped", "reason": "liger-kernel is not installed"})
    data = {"runs": [{"run_id": "r1", "date": "2026-01-01", "git_commit": "abc123",
                      "code_version": "v1", "profile": "quick",
                      "device": {"name": "NVIDIA H100 80GB HBM3", "capability": "9.0",
                                 "multiprocessors": 132, "driver": "580"},
                      "versions": {"torch": "2.11", "triton": "3.6", "cuda": "13.0",
                                   "fusedops": "0.1.0"},
                      "ceilings": {"copy_gbps": 3000.0, "matmul_tflops": 800.0}}],
            "measurements": recs}
    return data, recs


def test_speedups():
    _, recs = _fake_records()
    compare.attach_speedups(recs, ce.FAMILY.ratio_baselines)
    fused = next(r for r in recs if r["implementation"] == "fusedops-triton")
    assert fused["speedup"] == {"eager": pytest.approx(2.5), "torch.compile": pytest.approx(1.2)}
    eager = next(r for r in recs if r["implementation"] == "eager")
    assert "eager" not in eager["speedup"]
    assert "speedup" not in next(r for r in recs if r["status"] == "error")


def test_markdown(tmp_path):
    data, recs = _fake_records()
    compare.attach_speedups(recs, ce.FAMILY.ratio_baselines)
    path = render.write_markdown(tmp_path / "cross_entropy.md", ce.FAMILY, data, recs)
    text = path.read_text()
    assert "NVIDIA H100 80GB HBM3" in text and "abc123" in text
    assert "copy 3000 GB/s" in text and "800 TFLOP/s" in text
    assert "## fwd" in text and "## fwd+bwd" in text
    assert "2.50×" in text  # fusedops-triton vs eager
    assert "skipped: liger-kernel is not installed" in text
    assert "error: RuntimeError: boom" in text and "more" not in text.split("boom")[1][:10]
    table_rows = [line for line in text.splitlines() if line.startswith("| N=")]
    assert len(table_rows) == len(recs)
    assert all(row.count("|") == table_rows[0].count("|") for row in table_rows)
    assert "N·C·e" in text  # the byte formula is in the report


def test_terminal_table():
    data, recs = _fake_records()
    compare.attach_speedups(recs, ce.FAMILY.ratio_baselines)
    table = render.terminal_table(ce.FAMILY, recs)
    lines = table.splitlines()
    assert lines[0].startswith("case") and len(lines) == 2 + len(recs)
    assert any("fusedops-triton" in line and "2.50×" in line for line in lines)


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    data, recs = _fake_records()
    compare.attach_speedups(recs, ce.FAMILY.ratio_baselines)
    path = tmp_path / "cross_entropy.png"
    assert render.write_plot(path, ce.FAMILY, data, recs) is None
    head = path.read_bytes()[:8]
    assert head == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    data, recs = _fake_records()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    note = render.write_plot(tmp_path / "x.png", ce.FAMILY, data, recs)
    assert "matplotlib" in note and not (tmp_path / "x.png").exists()


# --- the runner's flow, with the device calls replaced ----------------------------------


def _fake_family(calls):
    def setup_ok(case, input_sets):
        calls.append(("setup", case.id))
        return lambda: torch.ones(3)

    def setup_fail(case, input_sets):
        raise RuntimeError("CUDA out of memory (fake)")

    def setup_nan(case, input_sets):
        return lambda: torch.tensor([float("nan")])

    impls = [
        registry.Implementation("mine", setup_ok, baseline=False),
        registry.Implementation("broken", setup_fail, baseline=False),
        registry.Implementation("nan", setup_nan),
        registry.Implementation("absent", setup_ok, unavailable=lambda: "not here"),
        registry.Implementation("base", setup_ok),
        registry.Implementation("slow", setup_ok, quick=False),
    ]
    cases = [registry.Case("c1", "c1", {"mode": "fwd"}, quick=True),
             registry.Case("c2", "c2", {"mode": "fwd"}, quick=False)]
    return registry.Family(
        name="fake", description="fake", cases=lambda quick: [c for c in cases
                                                                if c.quick or not quick],
        implementations=impls, make_inputs=lambda case, device: {"x": 1},
        bytes_moved=lambda case: 10**9, flops=lambda case: 10**12,
        input_bytes=lambda case: 10**9, ratio_baselines=("base",), panel_key="mode")


@pytest.fixture
def fake_device(monkeypatch):
    """Replace what needs a GPU: synchronization, timing, peak memory, the health check."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(runner_mod.timing, "device_time",
                        lambda fn, profile: timing.Timing(2.0, 1.9, 2.1, 50))
    monkeypatch.setattr(runner_mod.timing, "peak_memory", lambda fn: 12345)
    monkeypatch.setattr(runner_mod, "_device_ok", lambda: True)


def _runner(family, store, quick=True, say=None, only=None):
    return runner_mod.Runner(family, store, version="v1", commit="abc",
                             ceilings=ceilings_mod.Ceilings(1000.0, 100.0, 1.0, 1.0),
                             profile=timing.QUICK, quick=quick, device="cpu",
                             implementations=only, say=say or (lambda line: None))


def test_runner_records_everything(tmp_path, fake_device):
    calls, lines = [], []
    family = _fake_family(calls)
    store = store_mod.ResultsStore(tmp_path / "fake.json", "fake", "gpu")
    store.start_run({})
    outcome = _runner(family, store, say=lines.append).run()
    by_impl = {r["implementation"]: r for r in store.measurements}
    assert set(by_impl) == {"mine", "broken", "nan", "absent", "base"}  # no "slow" in quick
    assert by_impl["mine"]["status"] == "ok" and by_impl["mine"]["median_ms"] == 2.0
    assert by_impl["mine"]["gbps"] == pytest.approx(500.0)  # 1e9 B in 2 ms
    assert by_impl["mine"]["pct_copy"] == pytest.approx(50.0)
    assert by_impl["mine"]["peak_memory_bytes"] == 12345
    assert by_impl["mine"]["speedup"] == {"base": pytest.approx(1.0)}
    assert by_impl["broken"]["status"] == "error" and "out of memory" in by_impl["broken"][
        "error"]
    assert by_impl["absent"] == {**by_impl["absent"], "status": "skipped", "reason": "not here"}
    assert by_impl["nan"]["output_finite"] is False
    assert outcome.measured == 3 and outcome.skipped == 1 and outcome.fusedops_errors == 1
    # baselines run first; progress lines are numbered [i/n]
    assert [line.split()[0] for line in lines] == ["[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"]
    assert "ETA" in lines[0] and "ERROR" in next(x for x in lines if "broken" in x)
    assert lines.index(next(x for x in lines if " base " in x)) < lines.index(
        next(x for x in lines if " mine " in x))


def test_runner_resumes(tmp_path, fake_device):
    calls = []
    family = _fake_family(calls)
    path = tmp_path / "fake.json"
    first = store_mod.ResultsStore(path, "fake", "gpu")
    first.start_run({})
    _runner(family, first).run()
    calls.clear()
    second = store_mod.ResultsStore(path, "fake", "gpu")
    second.start_run({})
    outcome = _runner(family, second).run()
    assert outcome.resumed == 4 and calls == []  # only the skipped one is tried again
    assert len(second.measurements) == 6
    # the full profile adds the other case and the slow implementation
    third = store_mod.ResultsStore(path, "fake", "gpu")
    third.start_run({})
    _runner(family, third, quick=False).run()
    assert ("setup", "c2") in calls
    assert any(r["implementation"] == "slow" for r in third.measurements)


def test_runner_only_some_implementations(tmp_path, fake_device):
    family = _fake_family([])
    store = store_mod.ResultsStore(tmp_path / "fake.json", "fake", "gpu")
    store.start_run({})
    _runner(family, store, only=["mine"]).run()
    assert {r["implementation"] for r in store.measurements} == {"mine"}


def test_runner_stops_when_the_device_breaks(tmp_path, fake_device, monkeypatch):
    monkeypatch.setattr(runner_mod, "_device_ok", lambda: False)
    family = _fake_family([])
    store = store_mod.ResultsStore(tmp_path / "fake.json", "fake", "gpu")
    store.start_run({})
    with pytest.raises(runner_mod.DeviceBroken, match="broken"):
        _runner(family, store).run()
    assert any(r["status"] == "error" for r in store.measurements)


def test_report_gpu_path_with_fakes(tmp_path, fake_device, monkeypatch, capsys):
    """run_benchmarks end to end: JSON, Markdown and the table, then a resumed second run."""
    family = _fake_family([])
    monkeypatch.setattr(registry, "get_family", lambda name: family)
    monkeypatch.setattr(ceilings_mod, "measure",
                        lambda profile: ceilings_mod.Ceilings(1000.0, 100.0, 1.0, 1.0))
    args = report.build_parser().parse_args(["--quick", "--out", str(tmp_path), "--no-plots"])
    info = {**environment.describe(), "device": {"name": "Fake GPU", "slug": "fake-gpu"}}
    status = report.run_benchmarks(args, ["fake"], info)
    assert status == 1  # a fusedops implementation ("broken") failed
    data = json.loads((tmp_path / "fake-gpu" / "fake.json").read_text())
    assert data["runs"][0]["ceilings"]["copy_gbps"] == 1000.0
    assert data["runs"][0]["profile"] == "quick"
    assert data["runs"][0]["versions"]["torch"] == torch.__version__
    assert "git_commit" in data["runs"][0] and "date" in data["runs"][0]
    assert (tmp_path / "fake-gpu" / "fake.md").read_text().count("| c1 |") == 5
    out = capsys.readouterr().out
    assert "[5/5]" in out and "implementation" in out
    report.run_benchmarks(args, ["fake"], info)
    assert "resuming: 4 measurement(s)" in capsys.readouterr().out


# --- the CLI ----------------------------------------------------------------------------


def test_help_and_list(capsys):
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--quick", "--family", "--out", "--fresh", "--list", "--selfcheck"):
        assert option in text
    assert report.main(["--list", "--quick"]) == 0
    listed = capsys.readouterr().out
    assert "fwd+bwd_N16384_C128256_bfloat16" in listed and "N=4096 C=262144" not in listed


def test_selfcheck_relative_error():
    ref = torch.tensor([3.0, 4.0])
    assert selfcheck.relative_error(ref, ref) == 0.0
    assert selfcheck.relative_error(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)
    nan = selfcheck.relative_error(torch.tensor([float("nan"), 4.0]), ref)
    check = selfcheck.Check("torch", torch.float32, (1, 1), "x", nan, 0.0)
    assert not check.passed  # NaN never passes
    assert selfcheck.Check("torch", torch.float16, (1, 1), "x", 1e-3, 1e-3).passed
    assert not selfcheck.Check("torch", torch.float32, (1, 1), "x", 1e-3, 0.0).passed


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path of the CLI")
def test_cli_without_gpu():
    """The real command: first line, TRITON_INTERPRET set by the CLI itself, a PASS table."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if PKG == "benchmarks":
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "python")])
    done = subprocess.run([sys.executable, "-m", f"{PKG}.report"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == report.NO_CUDA_LINE
    assert "TRITON_INTERPRET=1" in done.stdout
    assert "FAIL" not in done.stdout
    assert any(line.startswith("triton ") and line.endswith("PASS") for line in lines)
    assert any(line.startswith("torch ") and line.endswith("PASS") for line in lines)
    assert lines[-1].startswith("self-check: ") and lines[-1].endswith(" 0 failed")
