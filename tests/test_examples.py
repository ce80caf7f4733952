"""The examples (examples/*.py) at their smallest, on CPU: each trains its model unfused and
patched from the same weights on the same batches; both losses must go down and the two
curves must agree at every logged step within float32 rounding (fusedops' torch tier on CPU
computes the same math in a different order)."""

from __future__ import annotations

import builtins
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RTOL, ATOL = 1e-4, 1e-5

# The smallest settings that still show learning, per example (CPU, float32).
SMALLEST = {
    "mlp": ["--steps", "30"],
    "mnist_dense": ["--images", "256", "--batch", "32", "--steps", "12", "--lr", "0.1"],
    "cifar_cnn": ["--size", "8", "--images", "64", "--batch", "8", "--steps", "12",
                  "--lr", "3e-3"],
    "small_gpt": ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32",
                  "--batch", "4", "--steps", "10", "--lr", "1e-2"],
}


@pytest.fixture
def example(monkeypatch):
    """Import an example by path, with its folder on sys.path (for fused_vs_unfused)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread avoids OpenMP's spin-waits

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"fusedops_example_{name}",
                                                      EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    yield load
    torch.set_num_threads(threads)
    sys.modules.pop("fused_vs_unfused", None)


def _check(result):
    unfused, fused = result.unfused, result.fused
    assert unfused.steps == fused.steps and len(unfused.steps) >= 2
    for run in (unfused, fused):
        assert all(torch.isfinite(torch.tensor(run.losses)))
        assert run.losses[-1] < run.losses[0], f"{run.name}: {run.losses}"
        assert run.items > 0 and run.seconds > 0 and run.peak_memory_bytes is None  # CPU
    for step, a, b in zip(unfused.steps, unfused.losses, fused.losses):
        assert abs(a - b) <= ATOL + RTOL * abs(a), f"step {step}: unfused {a}, fused {b}"


@pytest.mark.parametrize("name", list(SMALLEST))
def test_example_fused_matches_unfused(example, name, capsys):
    result = example(name).main(SMALLEST[name] + ["--device", "cpu", "--log-every", "1",
                                                 "--no-plot"])
    _check(result)
    out = capsys.readouterr().out
    assert "fusedops.patch replaced" in out
    assert "unfused loss" in out and "fused loss" in out
    assert out.count("\n") >= len(result.unfused.steps) + 4  # a line per logged step
    assert "/s, fused" in out and "n/a (CPU)" in out


def test_patch_replaced_what_the_docstrings_say(example, capsys):
    """The MLP's Linear + ReLU is fused, and its loss module is fusedops' too."""
    result = example("mlp").main(["--device", "cpu", "--steps", "3", "--no-plot"])
    assert "1 x Linear + relu -> FusedLinear" in result.patch_summary
    assert "CrossEntropyLoss -> CrossEntropyLoss" in result.patch_summary
    gpt = example("small_gpt").main(SMALLEST["small_gpt"] + ["--device", "cpu", "--steps", "2",
                                                            "--no-plot"])
    assert "Linear + gelu_tanh -> FusedLinear" in gpt.patch_summary


def test_plot_is_written(example, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "curves.png"
    example("mlp").main(["--device", "cpu", "--steps", "4", "--plot", str(path)])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot: {path}" in capsys.readouterr().out


def test_without_matplotlib_the_plot_is_skipped(example, tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    path = tmp_path / "curves.png"
    example("mlp").main(["--device", "cpu", "--steps", "3", "--plot", str(path)])
    assert not path.exists()
    assert "matplotlib is not installed: no plot saved" in capsys.readouterr().out


def test_synthetic_data_is_deterministic_and_shaped(example):
    mlp, mnist, cifar, gpt = (example(n) for n in ("mlp", "mnist_dense", "cifar_cnn",
                                                    "small_gpt"))
    x, y = mlp.make_data(0)
    assert x.shape == (100, 5) and y.tolist().count(1) == 50
    assert torch.equal(x, mlp.make_data(0)[0]) and not torch.equal(x, mlp.make_data(1)[0])
    images, labels = mnist.make_data(40, seed=3)
    assert images.shape == (40, 1, 28, 28) and labels.bincount().tolist() == [4] * 10
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert torch.equal(images, mnist.make_data(40, seed=3)[0])
    # one glyph's pixels differ between digits more than between two draws of one digit
    ones = mnist.render(torch.tensor([1, 1]), torch.Generator().manual_seed(0))
    eights = mnist.render(torch.tensor([8]), torch.Generator().manual_seed(0))
    assert ones.sum(dim=(1, 2)).max() < eights.sum()
    pictures, classes = cifar.make_data(20, seed=0, size=32)
    assert pictures.shape == (20, 3, 32, 32) and classes.bincount().tolist() == [2] * 10
    tokens, vocab = gpt.load_corpus()
    assert 3000 < tokens.numel() < 20000 and len(vocab) < 100
    assert "".join(vocab[i] for i in tokens[:10]) == gpt.CORPUS.read_text()[:10]
