"""The one place that loads ``fusedops._C``, the CUDA kernels.

Two ways to get it, never both in one process:

* ahead of time: ``setup.py`` built ``fusedops._C`` into the installed package; ``load()``
  imports it.
* just in time: no ``fusedops._C`` is installed (a wheel built with ``FUSEDOPS_BUILD_CUDA=0``,
  or a checkout without a build); ``load()`` compiles the csrc/ sources shipped with the
  package with ``torch.utils.cpp_extension.load`` into a cache directory keyed by the torch,
  CUDA and Python versions: ``$FUSEDOPS_CACHE_DIR/torch-2.14.1-cu130-py311/`` (default root
  ``~/.cache/fusedops``, or ``$XDG_CACHE_HOME/fusedops``). The first call compiles (about a
  minute); later processes reuse the build, and torch rebuilds it when a source changes.

Both register the same ``torch.ops.fusedops.*_cuda`` ops (TORCH_LIBRARY in csrc/bindings.cpp),
which is why only one may ever be loaded.

``availability()`` is cheap and never builds: it says whether the CUDA tier can run here.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

from fusedops import _build_env

JIT_MODULE_NAME = "fusedops_C"
_lock = threading.Lock()
_module: ModuleType | None = None
_failure: str | None = None  # why load() failed, so that it fails fast the next time
_aot_found: bool | None = None


def _aot_installed() -> bool:
    """Whether the ahead-of-time build is installed (found without importing it)."""
    global _aot_found
    if _aot_found is None:
        _aot_found = importlib.util.find_spec(_build_env.EXTENSION_NAME) is not None
    return _aot_found


def _torch_cuda_reason() -> str | None:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} was built without CUDA"
    return None


def cache_dir() -> Path:
    """Where the JIT build goes: one directory per torch / CUDA / Python version."""
    root = os.environ.get("FUSEDOPS_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "fusedops")
    torch_version = torch.__version__.split("+")[0]
    cuda = (torch.version.cuda or "none").replace(".", "")
    python = f"{sys.version_info.major}{sys.version_info.minor}"
    return Path(root) / f"torch-{torch_version}-cu{cuda}-py{python}"


def availability() -> str | None:
    """None when the CUDA tier can run here, else the reason. Cheap; never builds."""
    if _failure is not None:
        return _failure
    reason = _torch_cuda_reason()
    if reason is not None:
        return reason
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if _module is not None or _aot_installed():
        return None
    return _build_env.cuda_build_unavailable_reason()


def load() -> ModuleType:
    """``fusedops._C`` (or its JIT twin), loaded once. Works without a GPU; raises
    RuntimeError saying why when neither the installed build nor a JIT build is possible."""
    global _module, _failure
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        if _failure is not None:
            raise RuntimeError(_failure)
        try:
            _module = _import_aot() if _aot_installed() else _build_jit()
        except RuntimeError as error:
            _failure = str(error)
            raise
        return _module


def _import_aot() -> ModuleType:
    try:
        return importlib.import_module(_build_env.EXTENSION_NAME)
    except ImportError as error:
        raise RuntimeError(
            f"fusedops: the installed {_build_env.EXTENSION_NAME} cannot be imported ({error}); "
            f"it was probably built against another torch than {torch.__version__}: reinstall "
            f"fusedops (pip install --no-build-isolation ...) or remove the stale _C library "
            f"to use the JIT build") from error


def _build_jit() -> ModuleType:
    reason = _torch_cuda_reason()
    cuda_home = _build_env.find_cuda_home()
    if reason is None:
        reason = _build_env.cuda_build_unavailable_reason(cuda_home)
    if reason is not None:
        raise RuntimeError(f"fusedops: cannot build the CUDA kernels: {reason}")
    # cpp_extension reads CUDA_HOME once at import and does not follow nvcc wrapper scripts.
    if not _build_env.is_toolkit(os.environ.get("CUDA_HOME")):
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension

    if not _build_env.is_toolkit(cpp_extension.CUDA_HOME):
        cpp_extension.CUDA_HOME = cuda_home
    csrc = _build_env.csrc_dir()
    build_directory = cache_dir()
    build_directory.mkdir(parents=True, exist_ok=True)
    flags = _build_env.compile_args("jit")
    try:
        return cpp_extension.load(
            name=JIT_MODULE_NAME,
            sources=[str(p) for p in _build_env.sources(csrc)],
            extra_cflags=flags["cxx"],
            extra_cuda_cflags=flags["nvcc"],
            extra_include_paths=[str(csrc)],
            build_directory=str(build_directory),
            with_cuda=True,
            verbose=os.environ.get("FUSEDOPS_VERBOSE_BUILD") == "1",
        )
    except Exception as error:  # compiler errors come as RuntimeError/CalledProcessError
        raise RuntimeError(
            f"fusedops: the JIT build of the CUDA kernels in {build_directory} failed: {error} "
            f"(FUSEDOPS_VERBOSE_BUILD=1 shows the compiler output)") from error


def build_info() -> dict:
    """How the loaded (or installed) extension was built; never starts a JIT build."""
    module = _module
    if module is None and _aot_installed() and _failure is None:
        try:
            module = load()
        except RuntimeError:
            module = None
    if module is not None:
        info = dict(module.build_info())
        info["path"] = getattr(module, "__file__", None)
        return info
    names = None
    try:
        names = _build_env.parse_arch_list()[1]
    except ValueError:
        pass
    return {"build": "jit (not built in this process)", "arches": names,
            "cache_dir": str(cache_dir()), "cuda_home": _build_env.find_cuda_home(),
            "unavailable": _failure or availability()}
