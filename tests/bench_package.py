"""The benchmark package for the harness tests: installed as fusedops.benchmarks, or the
checkout's benchmarks/ when fusedops is not installed."""

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _package() -> str:
    try:
        importlib.import_module("fusedops.benchmarks")
        return "fusedops.benchmarks"
    except ImportError:  # fusedops not installed: use the checkout's benchmarks/ directly
        sys.path.insert(0, str(ROOT))
        return "benchmarks"


PKG = _package()


def load(name: str):
    """``benchmarks.<name>`` from wherever the package is."""
    return importlib.import_module(f"{PKG}.{name}")
