"""Compile every Triton kernel for sm_80 and sm_90 without a GPU (CI runs this).

Triton's interpreter runs kernels as numpy and accepts code its compiler rejects (a variable
that changes type inside a loop, for instance), so CI also lowers each kernel to PTX and
cubin here, with the ptxas Triton bundles. Exit status 1 names each kernel that fails.
A table entry is (kernel, pointer and scalar types, constexpr values); add one per kernel.
"""

from __future__ import annotations

import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("check_triton_compile: unset TRITON_INTERPRET; this lowers kernels to PTX")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fusedops.triton_kernels import cross_entropy  # noqa: E402

ARCHES = (80, 90)
LOGIT_TYPES = ("fp32", "fp16", "bf16")
INDEX_TYPES = ("i32", "i64")
FLAG_SETS = list(itertools.product((False, True), repeat=3))  # weight, smoothing, softcap


def cross_entropy_cases():
    for logit, index, (weight, smoothing, softcap) in itertools.product(
            LOGIT_TYPES, INDEX_TYPES, FLAG_SETS):
        flags = {"HAS_WEIGHT": weight, "HAS_SMOOTHING": smoothing, "HAS_SOFTCAP": softcap,
                 "BLOCK_C": 4096}
        scalars = {"C": "i32", "stride_row": "i64", "ignore_index": "i64",
                   "label_smoothing": "fp32", "z_loss": "fp32", "softcap": "fp32"}
        fwd = {"logits_ptr": f"*{logit}", "target_ptr": f"*{index}", "weight_ptr": "*fp32",
               "loss_ptr": "*fp32", "lse_ptr": "*fp32", **scalars}
        bwd = {"logits_ptr": f"*{logit}", "target_ptr": f"*{index}", "weight_ptr": "*fp32",
               "weight_sum_ptr": "*fp32", "lse_ptr": "*fp32", "grad_loss_ptr": "*fp32",
               "out_ptr": f"*{logit}", **scalars, "stride_out_row": "i64"}
        tag = f"{logit}/{index}/w{int(weight)}s{int(smoothing)}c{int(softcap)}"
        yield f"ce_fwd_kernel[{tag}]", cross_entropy.ce_fwd_kernel, fwd, flags
        yield f"ce_bwd_kernel[{tag}]", cross_entropy.ce_bwd_kernel, bwd, flags


def compile_case(kernel, types, constants, arch):
    arg_names = kernel.arg_names
    signature = {name: types.get(name, "constexpr") for name in arg_names}
    source = ASTSource(kernel, signature, constants)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8})


def main() -> int:
    failures = []
    count = 0
    for name, kernel, types, constants in cross_entropy_cases():
        for arch in ARCHES:
            count += 1
            try:
                compiled = compile_case(kernel, types, constants, arch)
                assert compiled.asm.get("cubin"), "no cubin produced"
            except Exception as error:  # report every failure, not only the first
                failures.append(f"sm_{arch} {name}: {type(error).__name__}: {error}")
    print(f"check_triton_compile: {count - len(failures)}/{count} kernel variants compiled "
          f"for sm_{'/sm_'.join(map(str, ARCHES))} (triton {triton.__version__})")
    for failure in failures:
        print("FAIL", failure[:2000])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
