"""Where the CUDA toolkit and the kernel sources are, and the flags that build ``fusedops._C``.

Shared by ``setup.py`` (the ahead-of-time build, which imports this file by its path, so it
must not import ``fusedops``, nor torch at import time) and ``_extension.py`` (the JIT build
on first CUDA use). One source of truth for both builds: the source list, the -gencode
flags, the host and nvcc flags.

``python -m fusedops._build_env`` (or ``python python/fusedops/_build_env.py``) prints the
CUDA toolkit it finds, for scripts that need ``CUDA_HOME``.

Environment:

* ``CUDA_HOME`` / ``CUDA_PATH``: the toolkit; else found from ``nvcc`` on ``PATH`` (following
  a wrapper script to the real toolkit) or ``/usr/local/cuda*``.
* ``TORCH_CUDA_ARCH_LIST``: the targets, torch's syntax (``"8.0;9.0a"``, ``"8.0+PTX"``);
  default ``8.0+PTX;9.0a``: sm_80 and sm_90a machine code plus compute_80 PTX, which the
  driver compiles for any newer GPU.
* ``FUSEDOPS_PTXAS_VERBOSE=1``: pass ``-Xptxas=-v`` (registers, spills per kernel).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path

EXTENSION_NAME = "fusedops._C"
DEFAULT_ARCH_LIST = "8.0+PTX;9.0a"
SOURCE_SUFFIXES = (".cu", ".cuh", ".h", ".cpp")
_ARCH_RE = re.compile(r"^(\d+)\.(\d+)([af]?)(\+PTX)?$")


def package_dir() -> Path:
    return Path(__file__).resolve().parent


def csrc_dir() -> Path | None:
    """The kernel sources: ``fusedops/csrc`` in a wheel, ``<repo>/csrc`` in a checkout."""
    here = package_dir()
    for candidate in (here / "csrc", here.parent.parent / "csrc"):
        if (candidate / "bindings.cpp").is_file():
            return candidate
    return None


def sources(csrc: Path) -> list[Path]:
    """What is compiled: bindings.cpp (host compiler) and every csrc/<family>/*.cu (nvcc)."""
    return [csrc / "bindings.cpp", *sorted(csrc.glob("*/*.cu"))]


def source_files(csrc: Path) -> list[Path]:
    """Everything a build reads (sources and headers), e.g. to ship in a wheel."""
    return sorted(p for p in csrc.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES)


def is_toolkit(path: str | os.PathLike | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime_api.h"))


def _toolkit_from_nvcc(nvcc: str) -> str | None:
    """The toolkit an ``nvcc`` on PATH belongs to, following symlinks and wrapper scripts."""
    real = os.path.realpath(nvcc)
    home = os.path.dirname(os.path.dirname(real))
    if is_toolkit(home):
        return home
    try:  # a wrapper script such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
        with open(real, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    for match in re.finditer(rb"(/[^\s'\"]+)/bin/nvcc\b", head):
        home = os.path.realpath(match.group(1).decode())
        if is_toolkit(home):
            return home
    return None


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", os.path.basename(path))) or (0,)


def find_cuda_home() -> str | None:
    """The CUDA toolkit root (it has bin/nvcc and include/), or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if is_toolkit(os.environ.get(var)):
            return os.path.realpath(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        home = _toolkit_from_nvcc(nvcc)
        if home is not None:
            return home
    if is_toolkit("/usr/local/cuda"):
        return os.path.realpath("/usr/local/cuda")
    for home in sorted(glob.glob("/usr/local/cuda-*"), key=_version_key, reverse=True):
        if is_toolkit(home):
            return os.path.realpath(home)
    return None


# Headers that torch's CUDA headers include and a bare toolkit may lack.
_PIP_HEADERS = ("cublas_v2.h", "cusparse.h", "cusolverDn.h", "curand.h", "cufft.h")


def nvidia_pip_include_dirs() -> list[str]:
    """Headers of the pip CUDA wheels (nvidia/cu13/include, or the cu12-era per-library dirs).

    torch's CUDA headers include cuBLAS/cuSPARSE headers that a bare toolkit may lack; the
    pip wheels torch depends on ship them. They go on the host compiler's path with
    -idirafter, so they never shadow the toolkit's own headers.
    """
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    found = []
    for root in spec.submodule_search_locations:
        for include in sorted(glob.glob(os.path.join(root, "*", "include"))):
            has_headers = any(os.path.isfile(os.path.join(include, h)) for h in _PIP_HEADERS)
            if has_headers and include not in found:
                found.append(include)
    return found


def parse_arch_list(arch_list: str | None = None) -> tuple[list[str], list[str]]:
    """(nvcc -gencode flags, target names) for a TORCH_CUDA_ARCH_LIST-style string.

    ``"8.0+PTX;9.0a"`` gives sm_80 and sm_90a machine code and compute_80 PTX.
    """
    if arch_list is None:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_ARCH_LIST
    flags: list[str] = []
    names: list[str] = []
    ptx: list[str] = []
    for entry in re.split(r"[;,\s]+", arch_list.strip()):
        if not entry:
            continue
        match = _ARCH_RE.match(entry)
        if match is None:
            raise ValueError(f"fusedops: cannot parse {entry!r} in TORCH_CUDA_ARCH_LIST="
                             f"{arch_list!r}; expected entries like 8.0, 9.0a or 8.0+PTX")
        arch = f"{match.group(1)}{match.group(2)}{match.group(3)}"
        if f"sm_{arch}" not in names:
            flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
            names.append(f"sm_{arch}")
        if match.group(4) and f"compute_{arch}" not in ptx:
            ptx.append(f"compute_{arch}")
    for target in ptx:
        flags += ["-gencode", f"arch={target},code={target}"]
        names.append(target)
    if not names:
        raise ValueError(f"fusedops: TORCH_CUDA_ARCH_LIST={arch_list!r} names no architecture")
    return flags, names


def compile_args(kind: str, arch_list: str | None = None) -> dict[str, list[str]]:
    """``{"cxx": [...], "nvcc": [...]}`` for CUDAExtension / cpp_extension.load.

    ``kind`` is "aot" or "jit" and ends up in ``build_info()``. No --use_fast_math: the
    kernels call __expf explicitly where the approximation is fine, and keep the accurate
    logf/tanhf and IEEE division elsewhere.
    """
    gencode, names = parse_arch_list(arch_list)
    cxx = ["-O3", f"-DFUSEDOPS_ARCHS={','.join(names)}", f"-DFUSEDOPS_BUILD_KIND={kind}"]
    for include in nvidia_pip_include_dirs():
        cxx += ["-idirafter", include]
    nvcc = ["-O3", "-lineinfo", *gencode]
    if os.environ.get("FUSEDOPS_PTXAS_VERBOSE") == "1":
        nvcc.append("-Xptxas=-v")
    return {"cxx": cxx, "nvcc": nvcc}


def cuda_build_unavailable_reason(cuda_home: str | None = None) -> str | None:
    """None when this machine can compile csrc/ (toolkit and sources present), else why not."""
    if cuda_home is None:
        cuda_home = find_cuda_home()
    if cuda_home is None:
        return ("no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH) to build "
                "fusedops._C")
    if csrc_dir() is None:
        return "the csrc/ kernel sources are not installed next to the fusedops package"
    return None


if __name__ == "__main__":
    home = find_cuda_home()
    if home is None:
        sys.exit("no CUDA toolkit found")
    print(home)
