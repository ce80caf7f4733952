#!/usr/bin/env bash
# GPU verification of fusedops in one device call: install, environment, the whole test suite,
# compute-sanitizer on the op tests, the benchmark report. Logs and results go to $OUT.
#
#   tools/gpu_verify.sh [STAGE ...]
#   STAGE: tests | sm80 | sanitizer | racecheck | ncu | bench | all (default all: every stage)
#
# Every call first installs (pip install --no-build-isolation --no-deps -e ., with CUDA_HOME
# found; wheels carried in .whl/ go to /tmp/site first) and prints the environment, then runs
# the stages asked for, in the order tests, sanitizer, bench:
#
#   tests      python -m pytest tests -m "gpu or not gpu"              -> tests.log
#   sm80       the fused-linear and conv suites on the CUDA tier with FUSEDOPS_GEMM_PATH=sm80
#              and FUSEDOPS_CONV_PATH=sm80: the sm_80 (mma.sync) GEMM and implicit-GEMM
#              convolution forced on this GPU                          -> sm80.log
#   sanitizer  compute-sanitizer --tool memcheck (PYTORCH_NO_CUDA_MEMORY_CACHING=1) on
#              python -m pytest $SANITIZER_TESTS -m "not large"         -> sanitizer.log
#              (the op tests: on a CUDA machine every parity test runs on the GPU)
#   racecheck  compute-sanitizer --tool racecheck (shared-memory hazards) on a few small
#              cases of the CUDA GEMM, attention and convolution kernels -> racecheck.log
#   ncu        Nsight Compute on warm launches of the main GEMM and attention kernels and of
#              cuBLAS / SDPA-flash (tools/profile_kernels.py): speed of light, memory,
#              occupancy, warp stalls
#                                                                        -> ncu.log
#   bench      fusedops-bench $BENCH_ARGS (default --quick)             -> bench.log
#
# Each stage runs under `timeout`, bounded by what is left of the call's budget
# (GPU_VERIFY_BUDGET_S, default 570 s: the device tool stops a command at 600 s), so a hang
# in one stage still leaves the others' logs and the summary. A stage that gets no time is
# reported "not run"; run it in a call of its own. The build of fusedops._C is the slow part
# of a first call (minutes); a warm machine reuses it.
#
# $OUT receives at most 10 files:
#   summary.txt env.txt install.log tests.log sm80.log sanitizer.log racecheck.log ncu.log
#   bench.log results.tar.gz
# results.tar.gz holds benchmarks/results/ (the report's JSON/Markdown/PNG, to unpack at the
# repository root and commit) and the JUnit XML of the test stages. The last lines printed
# are the summary table.
#
# Through the device tool, for example:
#   run(command="FUSEDOPS_GIT_COMMIT=<sha> bash tools/gpu_verify.sh tests", timeout_s=600)
#   (the commit spelled out from `git rev-parse HEAD` here, since the device copy may have
#   no .git; it goes into the results files)
#   carry=[".whl"] with a liger-kernel wheel in .whl/ adds the Liger baseline; make it here
#   with: echo /.whl/ >> .git/info/exclude; pip download --no-deps --only-binary=:all:
#   -d .whl liger-kernel==0.8.5   (pure Python; torch and triton are already there)
#   cut-cross-entropy==25.1.1 goes into .whl/ the same way (pure Python, py3-none-any):
#   it adds the cce and cce-filtered baselines of the linear_cross_entropy family
#   The drop-in tests (tests/test_patch*.py) and the ResNet-50 training benchmark need
#   transformers and torchvision; for the GPU machine's Python 3.12 and torch 2.11 (29 MB):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux_2_17_x86_64 -d .whl transformers==5.23.0 "torchvision==0.26.*" \
#     tokenizers==0.23.3 safetensors==0.8.0 huggingface_hub==2.4.0 hf-xet
#   (a dependency still missing there makes those tests skip, saying so, not fail)
# To resume an interrupted bench stage, unpack results.tar.gz here first: the next call
# carries benchmarks/results/ over and fusedops-bench skips what it already measured.
#
# Environment knobs: OUT, PYTHON (python3), GPU_VERIFY_BUDGET_S, GPU_VERIFY_SKIP_INSTALL=1
# (reuse an install made by an earlier call on the same warm machine), TORCH_CUDA_ARCH_LIST
# (default: setup.py's, sm_80 + sm_90a + PTX), MAX_JOBS (default: all cores), TEST_PATHS
# (default "tests"), PYTEST_ARGS (extra pytest arguments for the tests stage, e.g. -x),
# SANITIZER_TESTS (default: the op tests: cross-entropy, custom ops, linear, linear-CE,
# attention, SDPA, conv2d), SANITIZER_PYTEST_ARGS (e.g. -k cross_entropy),
# BENCH_ARGS (default --quick; e.g. "--family cross_entropy" for the full grid).

set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)

OUT=${OUT:-/tmp/fusedops-gpu-verify}
WORK=${GPU_VERIFY_WORK:-/tmp/fusedops-gpu-verify-work}
PYTHON=${PYTHON:-python3}
BUDGET_S=${GPU_VERIFY_BUDGET_S:-570}
RESERVE_S=25          # kept back for packing the results and printing the summary
mkdir -p "$OUT" "$WORK"
rm -f "$WORK"/*.xml
SUMMARY="$OUT/summary.txt"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

DEFAULT_SANITIZER_TESTS="tests/test_cross_entropy.py tests/test_cross_entropy_gpu.py tests/test_custom_ops.py tests/test_linear.py tests/test_linear_kernels.py tests/test_linear_cuda_gemm.py tests/test_linear_cross_entropy.py tests/test_attention.py tests/test_attention_cuda.py tests/test_sdpa.py tests/test_conv.py tests/test_conv_cuda.py tests/test_conv_depthwise_kernels.py"
# racecheck is slow (it tracks every shared-memory access): a few small cases of the kernels
# that share memory between warps.
RACECHECK_TESTS=(tests/test_linear_cuda_gemm.py tests/test_attention_cuda.py
    tests/test_conv_cuda.py -m "not large" -k
    "(127x65x129 and bfloat16 and gelu) or transposed or (ragged_and_grouped and 3x6x1)
     or (against_float64 and float16 and s2)")
NCU_WORKLOADS="gemm gemm_sm80 torch_mm linear_gelu attention sdpa_flash conv conv_sm80 cudnn_conv"

STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(all)
want_tests=0 want_sm80=0 want_sanitizer=0 want_racecheck=0 want_ncu=0 want_bench=0
for stage in "${STAGES[@]}"; do
    case "$stage" in
        all) want_tests=1 want_sm80=1 want_sanitizer=1 want_racecheck=1 want_ncu=1 want_bench=1 ;;
        tests) want_tests=1 ;;
        sm80) want_sm80=1 ;;
        sanitizer) want_sanitizer=1 ;;
        racecheck) want_racecheck=1 ;;
        ncu) want_ncu=1 ;;
        bench) want_bench=1 ;;
        -h|--help) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown stage '$stage' (expected tests, sm80, sanitizer, racecheck, ncu," \
                "bench or all)" >&2; exit 2 ;;
    esac
done

printf '%-10s %-34s %8s\n' stage result seconds >"$SUMMARY"
note() { printf '%-10s %-34s %8s\n' "$1" "$2" "$3" >>"$SUMMARY"; }
remaining() { echo $((BUDGET_S - SECONDS - RESERVE_S)); }

# run_stage NAME CAP_S LOG COMMAND...: COMMAND under timeout, output to the terminal and LOG.
run_stage() {
    local name=$1 cap=$2 log=$3
    shift 3
    local left limit start rc result
    left=$(remaining)
    limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 30 ]; then
        echo "=== $name: not run, ${left}s left of the ${BUDGET_S}s budget" | tee -a "$OUT/$log"
        note "$name" "not run (out of time)" 0
        return 0
    fi
    echo "=== $name (up to ${limit}s): $*"
    start=$SECONDS
    timeout -k 20 "$limit" "$@" 2>&1 | tee -a "$OUT/$log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) result=ok ;;
        124|137) result="TIMED OUT after ${limit}s" ;;
        86) result="FAILED: memcheck errors" ;;   # compute-sanitizer --error-exitcode
        *) result="FAILED (exit $rc)" ;;
    esac
    echo "=== $name: $result ($((SECONDS - start))s)"
    note "$name" "$result" $((SECONDS - start))
    return 0
}

# --- wheels carried in .whl/ (e.g. liger-kernel): installed aside, as the device README says
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# --- the CUDA toolkit (the build's architectures are setup.py's default unless
#     TORCH_CUDA_ARCH_LIST says otherwise: the GPU run checks what ships) -----------------
CUDA_HOME=${CUDA_HOME:-}
if [ -z "$CUDA_HOME" ]; then
    # Follows an nvcc that is a wrapper script to the real toolkit (the build uses the same).
    CUDA_HOME=$("$PYTHON" python/fusedops/_build_env.py 2>/dev/null) || CUDA_HOME=
fi
export CUDA_HOME
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

# --- environment -----------------------------------------------------------------------------
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(hostname)  cpus: $(nproc)"
    echo "stages: ${STAGES[*]}  budget: ${BUDGET_S}s"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo "${FUSEDOPS_GIT_COMMIT:-unknown (no .git here; set FUSEDOPS_GIT_COMMIT)}")"
    echo "CUDA_HOME=${CUDA_HOME:-}  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-}  MAX_JOBS=$MAX_JOBS"
    echo "PYTHONPATH=${PYTHONPATH:-}"
    nvidia-smi || echo "nvidia-smi failed"
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv || true
    "$PYTHON" - <<'EOF'
import importlib.metadata as md, platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn",
      torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
for name in ("triton", "liger-kernel", "matplotlib", "pytest", "pytest-benchmark",
             "pytest-timeout", "setuptools", "ninja"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "(not installed)")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name} sm_{p.major}{p.minor} {p.multi_processor_count} SMs "
          f"{p.total_memory / 2**30:.1f} GiB L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
else:
    print("torch sees NO CUDA device")
EOF
    for tool in nvcc compute-sanitizer ncu cuobjdump; do
        printf '%s: ' "$tool"; (command -v "$tool" && "$tool" --version 2>&1 | tail -n 1) || echo "not found"
    done
    free -g | head -n 2
    df -h /tmp | tail -n 1
} 2>&1 | tee "$OUT/env.txt"

# --- install -----------------------------------------------------------------------------------
if [ "${GPU_VERIFY_SKIP_INSTALL:-0}" = 1 ] && "$PYTHON" -c "import fusedops" 2>/dev/null; then
    echo "=== install: skipped (GPU_VERIFY_SKIP_INSTALL=1)" | tee "$OUT/install.log"
    note install "skipped (reused)" 0
else
    : >"$OUT/install.log"
    run_stage install 330 install.log \
        "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e .
fi
"$PYTHON" - 2>&1 <<'EOF' | tee -a "$OUT/install.log"
import fusedops
print("fusedops", fusedops.__version__, fusedops.__file__)
print("backends()", fusedops.backends())
try:
    import fusedops._C as C
    print("fusedops._C", getattr(C, "build_info", lambda: "(no build_info)")())
except ImportError as exc:
    print("fusedops._C is not built:", exc)
EOF

# --- stages --------------------------------------------------------------------------------
if [ $want_tests = 1 ]; then
    timeout_args=()
    if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then
        timeout_args=(--timeout=300)   # one hung test fails alone, the stage goes on
    fi
    : >"$OUT/tests.log"
    # shellcheck disable=SC2086
    run_stage tests 420 tests.log "$PYTHON" -m pytest ${TEST_PATHS:-tests} -m "gpu or not gpu" -ra \
        --durations=25 --junitxml="$WORK/junit-tests.xml" "${timeout_args[@]}" ${PYTEST_ARGS:-}
fi

if [ $want_sm80 = 1 ]; then
    : >"$OUT/sm80.log"
    # The tier fixture's "cuda" cases of the fused-linear suites, on the forced sm_80 kernel.
    run_stage sm80 300 sm80.log env FUSEDOPS_GEMM_PATH=sm80 FUSEDOPS_CONV_PATH=sm80 \
        "$PYTHON" -m pytest tests/test_linear.py tests/test_linear_cross_entropy.py \
        tests/test_conv.py tests/test_conv_cuda.py -m "gpu or not gpu" -k cuda \
        -q -ra -p no:cacheprovider --junitxml="$WORK/junit-sm80.xml"
fi

if [ $want_sanitizer = 1 ]; then
    : >"$OUT/sanitizer.log"
    if command -v compute-sanitizer >/dev/null; then
        # shellcheck disable=SC2086
        run_stage sanitizer 420 sanitizer.log env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
            compute-sanitizer --tool memcheck --target-processes all --error-exitcode 86 \
            --print-limit 50 \
            "$PYTHON" -m pytest ${SANITIZER_TESTS:-$DEFAULT_SANITIZER_TESTS} -m "not large" -q -ra \
            -p no:cacheprovider --junitxml="$WORK/junit-sanitizer.xml" ${SANITIZER_PYTEST_ARGS:-}
    else
        echo "compute-sanitizer not found" | tee "$OUT/sanitizer.log"
        note sanitizer "not run (no compute-sanitizer)" 0
    fi
fi

if [ $want_racecheck = 1 ]; then
    : >"$OUT/racecheck.log"
    if command -v compute-sanitizer >/dev/null; then
        run_stage racecheck 240 racecheck.log env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
            compute-sanitizer --tool racecheck --target-processes all --error-exitcode 86 \
            --print-limit 50 "$PYTHON" -m pytest "${RACECHECK_TESTS[@]}" -q -ra \
            -p no:cacheprovider
    else
        echo "compute-sanitizer not found" | tee "$OUT/racecheck.log"
        note racecheck "not run (no compute-sanitizer)" 0
    fi
fi

if [ $want_ncu = 1 ]; then
    : >"$OUT/ncu.log"
    if command -v ncu >/dev/null; then
        for workload in $NCU_WORKLOADS; do
            # One warm launch of each GEMM kernel (ours, or cuBLAS's for torch_mm).
            run_stage "ncu-$workload" 120 ncu.log ncu --section SpeedOfLight \
                --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
                --section Occupancy --section LaunchStats --section WarpStateStats \
                -k "regex:gemm|GEMM|nvjet|xmma|cutlass|linear_bwd|attention|flash|fmha" \
                --launch-skip 1 \
                --launch-count 3 "$PYTHON" tools/profile_kernels.py "$workload"
        done
    else
        echo "ncu not found" | tee "$OUT/ncu.log"
        note ncu "not run (no ncu)" 0
    fi
fi

if [ $want_bench = 1 ]; then
    : >"$OUT/bench.log"
    if command -v fusedops-bench >/dev/null; then bench=(fusedops-bench); else
        bench=("$PYTHON" -m fusedops.benchmarks); fi
    # shellcheck disable=SC2086
    run_stage bench 480 bench.log "${bench[@]}" ${BENCH_ARGS:---quick}
fi

# --- pack what comes back ------------------------------------------------------------------
members=()
[ -d benchmarks/results ] && members+=(-C "$ROOT" benchmarks/results)
for xml in "$WORK"/*.xml; do [ -f "$xml" ] && members+=(-C "$WORK" "$(basename "$xml")"); done
if [ ${#members[@]} -gt 0 ]; then
    tar czf "$OUT/results.tar.gz" "${members[@]}" && note pack "results.tar.gz" 0
fi
# The device tool returns files up to 16 MiB: compress any log that grew past that.
for f in "$OUT"/*.log "$OUT"/*.txt; do
    [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt $((15 * 1024 * 1024)) ] && gzip -f "$f"
done

echo
echo "=== summary ($SECONDS s in all; logs in $OUT)"
cat "$SUMMARY"
grep -qE 'FAILED|TIMED OUT' "$SUMMARY" && exit 1
exit 0
