#!/usr/bin/env python3
"""Check the machine code (SASS) of the built fusedops._C against what each kernel is meant to use.

CI has no GPU, so this is how it shows that the CUDA kernels compile to the intended
instructions: it runs ``cuobjdump --dump-sass`` and ``--dump-resource-usage`` on the built
extension, splits the output per architecture and per kernel, and checks every row of
EXPECTATIONS below. It exits 1, saying which kernel on which architecture misses what, when
any check fails (or when an expected kernel or architecture is missing altogether), and
prints a per-kernel summary either way.

    python tools/check_sass.py                 # the installed / in-place fusedops._C
    python tools/check_sass.py --so path/to/_C.so --verbose
    python tools/check_sass.py --markdown audit.md   # every kernel: resources, instructions

To cover a new kernel add a row: a regex on the demangled kernel name, the architectures,
how many instantiations must exist per architecture, and the instruction regexes that must
appear (e.g. ``HGMMA`` for an sm_90a tensor-core kernel, ``HMMA`` for its sm_80 version,
``LDG_128`` for a memory-bound one).

cuobjdump is looked for in the pip wheel (site-packages/nvidia/cu13/bin, installed by
``nvidia-cuda-cuobjdump``), then $CUDA_HOME/bin, then PATH; c++filt (binutils) demangles.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Instruction patterns. nvcc 13 writes 128-bit global loads as LDG.E.128 (sm_80) and
# LDG.E.128 with a memory descriptor operand (sm_90a), with optional cache qualifiers
# (LDG.E.128.CONSTANT for the read-only path, LDG.E.EF.128 for evict-first, ...).
LDG_128 = r"^LDG(\.[A-Z0-9_]+)*\.128\b"
STG_128 = r"^STG(\.[A-Z0-9_]+)*\.128\b"
HMMA = r"^HMMA\b"
HGMMA = r"^HGMMA\b"
UTMALDG = r"^UTMALDG\b"
LDSM = r"^LDSM\b"
LDS_32 = r"^LDS\s"
HMMA_TF32 = r"^HMMA\.1688\.F32\.TF32\b"
LDGSTS = r"^LDGSTS\b"


@dataclass(frozen=True)
class Expectation:
    what: str                       # the kernel family, for messages
    kernel: str                     # regex searched in the demangled kernel name
    arches: tuple[str, ...]         # where it must be present and checked
    instances: int                  # kernels matching `kernel` on each arch (instantiations)
    require: tuple[tuple[str, str], ...]  # (description, regex on an instruction) that must occur
    no_local_memory: bool = True    # no spills / stack (LOCAL and STACK of the resource usage)


BOTH_ARCHES = ("sm_80", "sm_90a")
EXPECTATIONS: tuple[Expectation, ...] = (
    # 3 logits dtypes (float, __half, __nv_bfloat16) x 2 target dtypes (int, long).
    Expectation("cross-entropy forward", r"\bfusedops::ce_fwd_kernel<", BOTH_ARCHES, 6,
                (("128-bit global loads", LDG_128),)),
    Expectation("cross-entropy backward", r"\bfusedops::ce_bwd_kernel<", BOTH_ARCHES,
                6, (("128-bit global loads", LDG_128), ("128-bit global stores", STG_128))),
    # GEMMs: 2 dtypes (__half, __nv_bfloat16) x 4 operand majors (A, B each K- or MN-major)
    # + float (tf32, both K-major). The sm_80 kernel on both architectures (sm_90a runs it
    # when FUSEDOPS_GEMM_PATH=sm80 forces it); the sm_90a kernel only there (the sm_80 build
    # has it too, with an empty trapping body).
    Expectation("GEMM sm_80 (mma.sync + cp.async)", r"\bgemm_sm80_kernel<", BOTH_ARCHES,
                9, (("tensor-core MMA", HMMA), ("ldmatrix", LDSM), ("cp.async", LDGSTS))),
    # 3 dtypes (the activation is a runtime switch over specialised bodies).
    Expectation("linear backward prologue (dz, bias partials)",
                r"\bfusedops::linear_bwd_prologue_kernel<", BOTH_ARCHES, 3,
                (("128-bit global loads", LDG_128), ("128-bit global stores", STG_128))),
    Expectation("GEMM sm_90a (wgmma + TMA)", r"\bgemm_sm90_kernel<", ("sm_90a",), 9,
                (("warpgroup MMA", HGMMA), ("TMA tile loads", UTMALDG))),
    # Attention, sm_80 (also run on sm_90a for other head dims and when forced): 2 dtypes x
    # head dims 16, 32, 64, 96, 128, 256.
    Expectation("attention forward sm_80 (mma.sync + cp.async)", r"\battention_fwd_sm80_kernel<",
                BOTH_ARCHES, 12, (("tensor-core MMA", HMMA), ("ldmatrix", LDSM),
                                  ("cp.async", LDGSTS), ("128-bit output stores", STG_128))),
    Expectation("attention backward dK/dV sm_80", r"\battention_bwd_dkdv_kernel<", BOTH_ARCHES,
                12, (("tensor-core MMA", HMMA), ("ldmatrix", LDSM), ("cp.async", LDGSTS),
                     ("dQ float32 reductions", r"^REDG?\.E\.ADD\.F32"))),
    Expectation("attention backward dQ (deterministic) sm_80", r"\battention_bwd_dq_kernel<",
                BOTH_ARCHES, 12, (("tensor-core MMA", HMMA), ("ldmatrix", LDSM),
                                  ("cp.async", LDGSTS))),
    # Convolution, sm_80 implicit GEMM: 3 dtypes (float32 in tf32) x (forward, input grad,
    # weight grad). float32's MN-major operands (dgrad's B, both of wgrad's) are read with
    # ld.shared, not ldmatrix: its weight grad has no ldmatrix at all.
    Expectation("conv implicit GEMM sm_80 (mma.sync + cp.async)", r"\bconv_sm80_kernel<",
                BOTH_ARCHES, 9, (("tensor-core MMA", HMMA), ("cp.async", LDGSTS))),
    Expectation("conv implicit GEMM sm_80, ldmatrix operands",
                r"\bconv_sm80_kernel<(?!float, \(fusedops::conv_gemm::ConvOp\)2>)",
                BOTH_ARCHES, 8, (("ldmatrix", LDSM),)),
    Expectation("conv implicit GEMM sm_80, float32 (tf32)", r"\bconv_sm80_kernel<float,",
                BOTH_ARCHES, 3, (("tf32 tensor-core MMA", HMMA_TF32),)),
    Expectation("conv implicit GEMM sm_80, float32 MN-major operands (ld.shared.b32)",
                r"\bconv_sm80_kernel<float, \(fusedops::conv_gemm::ConvOp\)[12]>",
                BOTH_ARCHES, 2, (("32-bit shared loads", LDS_32),)),
    # Convolution, sm_90a implicit GEMM (wgmma fed by the same cp.async gathers): 2 dtypes x
    # (forward, input grad, weight grad) + the float32 (tf32) forward; checked on sm_90a only
    # (the sm_80 build has it too, with an empty trapping body).
    Expectation("conv implicit GEMM sm_90a (wgmma + cp.async)", r"\bconv_sm90_kernel<",
                ("sm_90a",), 7, (("warpgroup MMA", HGMMA), ("cp.async", LDGSTS))),
    # The input gradient's plain store (conv_gather.cuh's dgrad_store_tile): 16-byte runs of
    # channels in both kernel families (sm_80: 3 dtypes; sm_90a: the 16-bit ones).
    Expectation("conv implicit GEMM sm_80 input grad, 128-bit stores",
                r"\bconv_sm80_kernel<[^,]+, \(fusedops::conv_gemm::ConvOp\)1>", BOTH_ARCHES, 3,
                (("128-bit global stores", STG_128),)),
    Expectation("conv implicit GEMM sm_90a input grad, 128-bit stores",
                r"\bconv_sm90_kernel<[^,]+, \(fusedops::conv_gemm::ConvOp\)1>", ("sm_90a",), 2,
                (("128-bit global stores", STG_128),)),
    # Depthwise, memory-bound: 3 dtypes; 16-byte accesses along channels.
    Expectation("depthwise conv forward", r"\bdw_fwd_kernel<", BOTH_ARCHES, 3,
                (("128-bit global loads", LDG_128), ("128-bit global stores", STG_128))),
    Expectation("depthwise conv input grad", r"\bdw_dgrad_kernel<", BOTH_ARCHES, 3,
                (("128-bit global loads", LDG_128), ("128-bit global stores", STG_128))),
    # Attention, sm_90a: 2 dtypes x head dims 64, 128, 256 (forward) and 64, 128 (backward).
    Expectation("attention forward sm_90a (wgmma + TMA)", r"\battention_fwd_sm90_kernel<",
                ("sm_90a",), 6, (("warpgroup MMA", HGMMA), ("TMA tile loads", UTMALDG))),
    Expectation("attention backward sm_90a (wgmma + TMA)", r"\battention_bwd_sm90_kernel<",
                ("sm_90a",), 4, (("warpgroup MMA", HGMMA), ("TMA tile loads", UTMALDG),
                                 ("dQ float32 reductions", r"^REDG?\.E\.ADD\.F32"))),
)


@dataclass
class Kernel:
    arch: str
    mangled: str
    name: str = ""                  # demangled
    instructions: list[str] = field(default_factory=list)
    registers: int | None = None
    stack: int | None = None
    local: int | None = None
    shared: int | None = None       # static shared memory (dynamic is set at launch)


def find_library(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    candidates = sorted(glob.glob(str(ROOT / "python" / "fusedops" / "_C*.so")))
    try:
        spec = importlib.util.find_spec("fusedops._C")
    except ImportError:
        spec = None
    if spec is not None and spec.origin:
        candidates.insert(0, spec.origin)
    if not candidates:
        sys.exit("check_sass: no fusedops._C found; build it first "
                 "(pip install --no-build-isolation -e .) or pass --so PATH")
    return Path(candidates[0])


def find_cuobjdump() -> str:
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations \
        else []
    candidates = []
    for root in roots:
        candidates += sorted(glob.glob(os.path.join(root, "cu*", "bin", "cuobjdump")), reverse=True)
        candidates += glob.glob(os.path.join(root, "cuda_cuobjdump", "bin", "cuobjdump"))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "cuobjdump"))
    on_path = shutil.which("cuobjdump")
    if on_path:
        candidates.append(on_path)
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    sys.exit("check_sass: cuobjdump not found (pip install 'nvidia-cuda-cuobjdump<14', or set "
             "CUDA_HOME to a toolkit that has it)")


def run(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"check_sass: {' '.join(command)} failed ({result.returncode}):\n"
                 f"{result.stderr.strip()}")
    return result.stdout


_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?(.*?)\s*;")


def parse_sass(text: str) -> dict[tuple[str, str], Kernel]:
    """(arch, mangled name) -> Kernel with its instructions (opcode and operands)."""
    kernels: dict[tuple[str, str], Kernel] = {}
    arch = None
    in_elf = False
    current = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("Fatbin elf code"):
            in_elf, current = True, None
        elif stripped.startswith("Fatbin ptx code"):
            in_elf, current = False, None
        elif stripped.startswith("arch = "):
            arch = stripped.split("=", 1)[1].strip()
        elif stripped.startswith("Function : ") and in_elf:
            mangled = stripped.split(":", 1)[1].strip()
            current = kernels.setdefault((arch, mangled), Kernel(arch, mangled))
        elif current is not None:
            match = _INSTRUCTION.match(line)
            if match:
                current.instructions.append(match.group(1))
    return kernels


def parse_resource_usage(text: str, kernels: dict[tuple[str, str], Kernel]) -> None:
    arch = None
    name = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("arch = "):
            arch = stripped.split("=", 1)[1].strip()
        elif stripped.startswith("Function ") and stripped.endswith(":"):
            name = stripped[len("Function "):-1].strip()
        elif name is not None and stripped.startswith("REG:"):
            fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", stripped))
            kernel = kernels.get((arch, name))
            if kernel is not None:
                kernel.registers = int(fields.get("REG", 0))
                kernel.stack = int(fields.get("STACK", 0))
                kernel.local = int(fields.get("LOCAL", 0))
                kernel.shared = int(fields.get("SHARED", 0))
            name = None


def demangle(kernels: dict[tuple[str, str], Kernel]) -> None:
    names = sorted({k.mangled for k in kernels.values()})
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        sys.exit("check_sass: c++filt (binutils) is needed to demangle kernel names")
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    table = dict(zip(names, out))
    for kernel in kernels.values():
        kernel.name = table.get(kernel.mangled, kernel.mangled)


def short_name(name: str) -> str:
    name = name.replace("(anonymous namespace)::", "")
    name = re.sub(r"\(.*\)$", "", name)          # parameters
    name = re.sub(r"^void ", "", name)
    return name.replace("CUtensorMap_st", "CUtensorMap")


def check(kernels: dict[tuple[str, str], Kernel], expectations, only_arches=None
          ) -> tuple[list[str], list[tuple[Kernel, Expectation, list[str]]]]:
    failures: list[str] = []
    checked: list[tuple[Kernel, Expectation, list[str]]] = []
    present_arches = {arch for arch, _ in kernels}
    for exp in expectations:
        for arch in exp.arches:
            if only_arches and arch not in only_arches:
                continue
            if arch not in present_arches:
                failures.append(f"{exp.what}: the library has no {arch} code at all (built with "
                                f"another TORCH_CUDA_ARCH_LIST?); it has {sorted(present_arches)}")
                continue
            matching = [k for (a, _), k in sorted(kernels.items())
                        if a == arch and re.search(exp.kernel, k.name)]
            if len(matching) != exp.instances:
                failures.append(f"{exp.what} on {arch}: expected {exp.instances} kernels matching "
                                f"{exp.kernel!r}, found {len(matching)}: "
                                f"{[short_name(k.name) for k in matching]}")
            for kernel in matching:
                problems = []
                for description, pattern in exp.require:
                    if not any(re.search(pattern, ins) for ins in kernel.instructions):
                        problems.append(f"no {description} ({pattern})")
                if exp.no_local_memory and (kernel.local or kernel.stack):
                    problems.append(f"uses local memory (LOCAL {kernel.local} B, STACK "
                                    f"{kernel.stack} B: register spills?)")
                checked.append((kernel, exp, problems))
                failures += [f"{short_name(kernel.name)} on {arch}: {p}" for p in problems]
    return failures, checked


def count(kernel: Kernel, pattern: str) -> int:
    return sum(1 for ins in kernel.instructions if re.search(pattern, ins))


def summary(checked, verbose: bool) -> str:
    rows = [("arch", "kernel", "regs", "local", "LDG.128", "STG.128", "LDG", "result")]
    for kernel, _exp, problems in sorted(checked, key=lambda c: (c[0].arch, c[0].name)):
        rows.append((kernel.arch, short_name(kernel.name), str(kernel.registers),
                     str((kernel.local or 0) + (kernel.stack or 0)),
                     str(count(kernel, LDG_128)), str(count(kernel, STG_128)),
                     str(count(kernel, r"^LDG\b")), "ok" if not problems else "FAIL"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if verbose:
        for kernel, _exp, _problems in checked:
            loads = sorted({ins.split()[0] for ins in kernel.instructions
                            if ins.startswith(("LDG", "STG"))})
            lines.append(f"{kernel.arch} {short_name(kernel.name)}: {' '.join(loads)}")
    return "\n".join(lines)


# The columns of the --markdown audit: instruction classes worth seeing per kernel.
AUDIT_COLUMNS = (("HGMMA", HGMMA), ("HMMA", HMMA), ("UTMALDG", UTMALDG), ("LDGSTS", LDGSTS),
                 ("LDSM", LDSM), ("LDG.128", LDG_128), ("STG.128", STG_128))


def markdown_audit(kernels: dict[tuple[str, str], Kernel]) -> str:
    """Every kernel family of the library (instantiations grouped by the name before the
    template arguments) per architecture: how many, registers, local memory (stack + spills),
    static shared memory and instruction counts (a range over the instantiations), as a
    Markdown table. The sm_90a-only kernels' empty bodies in the other builds are left out."""
    def span(values):
        low, high = min(values), max(values)
        return str(low) if low == high else f"{low}–{high}"

    families: dict[tuple[str, str], list[Kernel]] = {}
    for kernel in kernels.values():
        family = short_name(kernel.name).split("<")[0]
        if "sm90" in family and kernel.arch != "sm_90a":
            continue
        families.setdefault((kernel.arch, family), []).append(kernel)
    header = ["arch", "kernel", "instances", "regs", "stack+local B", "static smem B",
              *(name for name, _ in AUDIT_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for (arch, family), members in sorted(families.items()):
        cells = [arch, f"`{family.removeprefix('fusedops::')}`", str(len(members)),
                 span([k.registers or 0 for k in members]),
                 span([(k.local or 0) + (k.stack or 0) for k in members]),
                 span([k.shared or 0 for k in members]),
                 *(span([count(k, pattern) for k in members]) for _, pattern in AUDIT_COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--so", help="the extension library (default: fusedops._C)")
    parser.add_argument("--arch", action="append",
                        help="check only this arch (repeatable), e.g. --arch sm_90a")
    parser.add_argument("--verbose", action="store_true",
                        help="list the global load/store opcodes of each kernel")
    parser.add_argument("--markdown", metavar="FILE",
                        help="also write a Markdown table of every kernel's registers, "
                             "local memory, static shared memory and instruction counts")
    args = parser.parse_args(argv)

    library = find_library(args.so)
    cuobjdump = find_cuobjdump()
    print(f"check_sass: {library}\ncheck_sass: {cuobjdump}")
    kernels = parse_sass(run([cuobjdump, "--dump-sass", str(library)]))
    if not kernels:
        print(f"check_sass: FAIL: no device code found in {library}")
        return 1
    parse_resource_usage(run([cuobjdump, "--dump-resource-usage", str(library)]), kernels)
    demangle(kernels)
    if args.markdown:
        Path(args.markdown).write_text(markdown_audit(kernels) + "\n")
        print(f"check_sass: wrote the audit table to {args.markdown}")
    failures, checked = check(kernels, EXPECTATIONS, set(args.arch) if args.arch else None)
    print(summary(checked, args.verbose))
    if failures:
        print(f"\ncheck_sass: FAIL ({len(failures)}):")
        for failure in failures:
            print(f"  - {failure}")
        return 1
    print(f"\ncheck_sass: OK: {len(checked)} kernels on "
          f"{sorted({k.arch for k, _, _ in checked})} meet {len(EXPECTATIONS)} expectations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
