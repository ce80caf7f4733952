#!/usr/bin/env bash
# Runs the CPU test suite and the Triton compile check against the oldest versions fusedops
# supports — the GPU machines' torch 2.11 and Triton 3.6 — in a throwaway venv, with
# fusedops._C built against torch 2.11's headers. Not part of .ci/run (about 5 GB of wheels
# and a few minutes); run it after touching version-sensitive code (custom ops, the build,
# Triton kernels).
#
#   tools/check_oldest_supported.sh [VENV_DIR]      (default /tmp/fusedops-oldest)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/tmp/fusedops-oldest}
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# Triton 3.6's interpreter breaks on numpy >= 2.4 (loops over runtime bounds).
"$VENV/bin/pip" install -q "torch==2.11.*" "triton==3.6.*" "numpy<2.4" pytest setuptools wheel
CUDA_HOME=${CUDA_HOME:-$("$PYTHON" python/fusedops/_build_env.py)}
export CUDA_HOME MAX_JOBS=${MAX_JOBS:-2}
# A copy of the tree, so this build's _C never lands next to the working tree's.
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
git ls-files -z | xargs -0 cp --parents -t "$WORK"
(cd "$WORK" && "$VENV/bin/pip" install -q --no-build-isolation --no-deps .)
(cd "$WORK" && rm -rf python/fusedops && "$VENV/bin/python" -c \
    "import torch, triton, fusedops._C as C; print(torch.__version__, triton.__version__, C.build_info())")
(cd "$WORK" && rm -rf python && "$VENV/bin/python" tools/check_triton_compile.py)
(cd "$WORK" && rm -rf python && "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests)
