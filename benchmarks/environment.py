"""What a measurement was taken on: versions, device, git commit, and the results folder name.

Every results file carries this, so a number can always be traced to the GPU, the software
and the commit that produced it. Nothing here imports triton (its version comes from the
package metadata): without a GPU, ``TRITON_INTERPRET`` must be decided first.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import re
import shutil
import subprocess
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent


def package_version(name: str) -> str | None:
    """The installed version of a distribution, or None (never imports it)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(command: list[str], cwd: Path | None = None) -> str | None:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=20,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def checkout_root() -> Path | None:
    """The fusedops git checkout this package runs from, or None (a wheel install)."""
    if shutil.which("git") is None:
        return None
    top = _run(["git", "rev-parse", "--show-toplevel"], cwd=PACKAGE_DIR)
    if not top:
        return None
    root = Path(top)
    # An editable install runs from the checkout; a wheel installed somewhere inside an
    # unrelated repository must not report that repository's commit.
    if not (root / "python" / "fusedops").is_dir() or not (root / "benchmarks").is_dir():
        return None
    return root


def git_commit() -> tuple[str, bool | None]:
    """(commit, dirty): ``git rev-parse HEAD`` of the checkout, else ("unknown", None)."""
    root = checkout_root()
    if root is None:
        return "unknown", None
    commit = _run(["git", "rev-parse", "HEAD"], cwd=root)
    if not commit:
        return "unknown", None
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)
    return commit, (bool(status) if status is not None else None)


def gpu_slug(name: str) -> str:
    """The results folder for a device name: "NVIDIA H100 80GB HBM3" -> "h100-sxm".

    H100s get their form factor (the SXM part reports itself as "H100 80GB HBM3"), since
    PCIe, NVL and SXM boards differ in bandwidth and clocks; other names are slugified.
    """
    lowered = name.lower().replace("nvidia", " ").strip()
    if re.search(r"(^|[^a-z0-9])h100([^a-z0-9]|$)", lowered):
        if "pcie" in lowered:
            return "h100-pcie"
        if "nvl" in lowered:
            return "h100-nvl"
        return "h100-sxm"
    slug = re.sub(r"[^a-z0-9]+", "-", lowered).strip("-")
    return slug or "unknown-gpu"


def device_info(index: int | None = None) -> dict:
    """Name, capability, SMs, memory and L2 of a CUDA device (empty without one)."""
    if not torch.cuda.is_available():
        return {}
    index = torch.cuda.current_device() if index is None else index
    props = torch.cuda.get_device_properties(index)
    info = {
        "name": props.name,
        "slug": gpu_slug(props.name),
        "capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "memory_bytes": props.total_memory,
        "l2_cache_bytes": getattr(props, "L2_cache_size", None),
    }
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader",
                   f"--id={index}"]) if shutil.which("nvidia-smi") else None
    info["driver"] = driver or "unknown"
    return info


def versions() -> dict:
    """Software versions that matter to a timing."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": package_version("triton") or package_version("pytorch-triton"),
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "fusedops": package_version("fusedops"),
        "liger_kernel": package_version("liger-kernel") or package_version("liger_kernel"),
        "matplotlib": package_version("matplotlib"),
    }


def describe() -> dict:
    """Everything a results file records about where and when it was measured."""
    commit, dirty = git_commit()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": dirty,
        "host": platform.node(),
        "versions": versions(),
        "device": device_info(),
    }


def version_lines(info: dict) -> list[str]:
    """The lines the CLI prints at the top."""
    v = info["versions"]
    lines = [
        f"fusedops {v['fusedops'] or '(not installed)'}, torch {v['torch']}, "
        f"triton {v['triton'] or '(not installed)'}, CUDA {v['cuda'] or '(none)'}, "
        f"Python {v['python']}",
        f"git commit {info['git_commit']}" + (" (uncommitted changes)" if info["git_dirty"]
                                               else ""),
    ]
    if v["liger_kernel"]:
        lines[0] += f", liger-kernel {v['liger_kernel']}"
    device = info["device"]
    if device:
        lines.append(f"device {device['name']} (sm_{device['capability'].replace('.', '')}, "
                     f"{device['multiprocessors']} SMs, "
                     f"{device['memory_bytes'] / 2**30:.0f} GiB, driver {device['driver']})")
    return lines
