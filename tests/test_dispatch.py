"""Backend selection: use_backend, FUSEDOPS_BACKEND, backends(), forced tiers, auto."""

import importlib

import pytest
import torch
from conftest import DEVICE

import fusedops

# The module, not the function fusedops.dispatch.select that shadows it as an attribute.
select = importlib.import_module("fusedops.dispatch.select")


def test_backends_reports_every_tier():
    report = fusedops.backends()
    assert set(report) == {"torch", "triton", "cuda"}
    assert report["torch"] is None
    for name, reason in report.items():
        assert reason is None or (isinstance(reason, str) and reason), name
    if not torch.cuda.is_available():
        assert "CUDA" in report["cuda"] or "cuda" in report["cuda"]


def test_auto_is_the_default_and_use_backend_nests():
    assert select.current_backend() == "auto"
    with fusedops.use_backend("torch"):
        assert select.current_backend() == "torch"
        with fusedops.use_backend("triton"):
            assert select.current_backend() == "triton"
        assert select.current_backend() == "torch"
    assert select.current_backend() == "auto"


def test_use_backend_restores_after_an_exception():
    with pytest.raises(RuntimeError), fusedops.use_backend("torch"):
        raise RuntimeError("boom")
    assert select.current_backend() == "auto"


def test_unknown_backend_names_are_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        with fusedops.use_backend("cudnn"):
            pass
    monkeypatch.setenv("FUSEDOPS_BACKEND", "fast")
    with pytest.raises(ValueError, match="FUSEDOPS_BACKEND"):
        fusedops.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))


def test_environment_variable_forces_a_tier(monkeypatch):
    monkeypatch.setenv("FUSEDOPS_BACKEND", "torch")
    assert select.current_backend() == "torch"
    with fusedops.use_backend("auto"):  # the context manager wins over the environment
        assert select.current_backend() == "auto"


def test_auto_on_cpu_is_the_torch_tier():
    tier = select.select("cross_entropy", torch.device("cpu"), lambda t: None)
    assert tier.NAME == "torch"


def test_auto_without_a_table_entry_is_the_torch_tier(monkeypatch):
    monkeypatch.setattr(select, "AUTO_TABLE", {})
    assert select.select("cross_entropy", DEVICE, lambda t: None).NAME == "torch"


@pytest.mark.gpu
def test_auto_takes_the_first_available_listed_tier_that_covers_the_case(monkeypatch):
    capability = torch.cuda.get_device_capability()
    monkeypatch.setattr(select, "AUTO_TABLE", {("cross_entropy", capability): ("cuda", "triton")})
    device = torch.device("cuda")
    covered = {"cuda": None, "triton": None, "torch": None}
    expected = "cuda" if fusedops.backends()["cuda"] is None else "triton"
    assert select.select("cross_entropy", device, lambda t: covered[t.NAME]).NAME == expected
    not_cuda = {"cuda": "no", "triton": None, "torch": None}
    assert select.select("cross_entropy", device, lambda t: not_cuda[t.NAME]).NAME == "triton"
    nothing = {"cuda": "no", "triton": "no", "torch": None}
    assert select.select("cross_entropy", device, lambda t: nothing[t.NAME]).NAME == "torch"


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_a_forced_tier_never_hands_over(name):
    with fusedops.use_backend(name), pytest.raises(NotImplementedError, match=name):
        select.select("cross_entropy", DEVICE, lambda t: "this case is not covered")


def test_a_forced_missing_tier_says_why():
    missing = [name for name, reason in fusedops.backends().items() if reason]
    if not missing:
        pytest.skip("every tier is available here")
    name = missing[0]
    with fusedops.use_backend(name), pytest.raises(NotImplementedError) as info:
        fusedops.cross_entropy(torch.randn(2, 3, device=DEVICE),
                               torch.tensor([0, 1], device=DEVICE))
    assert fusedops.backends()[name] in str(info.value)


def test_auto_table_entries_name_real_tiers():
    for (op, capability), tiers in select.AUTO_TABLE.items():
        assert isinstance(op, str) and len(capability) == 2
        assert tiers and all(tier in select.TIERS and tier != "torch" for tier in tiers)
