"""Build script. The package's metadata lives in pyproject.toml; this file only adds:

* ``fusedops._C``, the CUDA kernels (csrc/), built ahead of time when torch has CUDA, a CUDA
  toolkit is found and ``FUSEDOPS_BUILD_CUDA`` is not ``0`` (``1`` makes a missing toolkit an
  error instead of a pure-Python build). Flags and sources come from
  python/fusedops/_build_env.py, shared with the JIT build; ``TORCH_CUDA_ARCH_LIST`` picks
  the targets (default sm_80 and sm_90a plus compute_80 PTX), ``MAX_JOBS`` the parallel
  compile jobs, ``FUSEDOPS_PTXAS_VERBOSE=1`` prints ptxas' register and spill report.
* a copy of csrc/ in the built package (``fusedops/csrc``), so that a wheel built without
  ``_C`` can still compile it on first CUDA use (fusedops/_extension.py).

    pip install --no-build-isolation -e .            # builds _C in place (python/fusedops)
    FUSEDOPS_BUILD_CUDA=0 pip wheel --no-build-isolation --no-deps .
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _load_build_env():
    # By path: importing the fusedops package itself here would need its dependencies.
    path = ROOT / "python" / "fusedops" / "_build_env.py"
    spec = importlib.util.spec_from_file_location("_fusedops_build_env", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_env = _load_build_env()


class BuildPyWithSources(build_py):
    """build_py that also copies csrc/ into fusedops/csrc/ of the build (not for -e installs,
    which find the sources in the checkout)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        source_root = ROOT / "csrc"
        target_root = Path(self.build_lib) / "fusedops" / "csrc"
        for source in build_env.source_files(source_root):
            target = target_root / source.relative_to(source_root)
            self.mkpath(str(target.parent))
            self.copy_file(str(source), str(target))


def _cuda_extension():
    """([CUDAExtension], {"build_ext": BuildExtension}) or ([], {}) with the reason printed."""
    request = os.environ.get("FUSEDOPS_BUILD_CUDA", "").strip()
    if request == "0":
        print("fusedops: FUSEDOPS_BUILD_CUDA=0, building without fusedops._C", file=sys.stderr)
        return [], {}
    reason = None
    cuda_home = None
    try:
        import torch
    except ImportError:
        reason = "torch is not importable (build with --no-build-isolation to use yours)"
    else:
        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} has no CUDA"
        else:
            cuda_home = build_env.find_cuda_home()
            reason = build_env.cuda_build_unavailable_reason(cuda_home)
    if reason is not None:
        if request == "1":
            raise SystemExit(f"fusedops: FUSEDOPS_BUILD_CUDA=1 but {reason}")
        print(f"fusedops: building without fusedops._C: {reason}; the CUDA tier compiles it "
              f"on first use instead", file=sys.stderr)
        return [], {}

    # torch.utils.cpp_extension reads CUDA_HOME once, when it is first imported.
    os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home
    csrc = ROOT / "csrc"
    extension = cpp_extension.CUDAExtension(
        name=build_env.EXTENSION_NAME,
        sources=[os.path.relpath(p, ROOT) for p in build_env.sources(csrc)],
        include_dirs=[str(csrc)],
        extra_compile_args=build_env.compile_args("aot"),
    )
    print(f"fusedops: building fusedops._C with CUDA_HOME={cuda_home}, targets "
          f"{build_env.parse_arch_list()[1]}", file=sys.stderr)
    return [extension], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
