"""Compile every Triton kernel for sm_80 and sm_90 without a GPU (CI runs this).

Triton's interpreter runs kernels as numpy and accepts code its compiler rejects (a variable
that changes type inside a loop, for instance), so CI also lowers each kernel to PTX and
cubin here, with the ptxas Triton bundles. Exit status 1 names each kernel that fails.

Each variant is compiled as Triton specialises it at run time for 16-byte aligned pointers
and row lengths divisible by 16 (the benchmark shapes: C = 32000, 128256, 262144), where
the memory-bound kernels must use 128-bit accesses (`ld.global.v4` / `st.global.v4` in the
PTX); the flag combinations are also compiled once unaligned (C = 50257, say), where they
fall back to narrower accesses. A table entry is (kernel, types, constexprs, the PTX
instructions required when aligned: a tuple, or a dict per arch); add one per kernel.

The fused-linear GEMM (triton_kernels/matmul.py) must use tensor cores for fp16, bf16 and
tf32: `mma.sync` on sm_80; on sm_90 Triton 3.8 emits `wgmma.mma_async` (Hopper's warpgroup
MMA) for these tiles, the forward and the backward products with the act' prologue alike.
float32 with input_precision="ieee" has no tensor-core form and is only compiled.
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

from fusedops.triton_kernels import attention, cross_entropy, matmul  # noqa: E402

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
        yield f"ce_fwd_kernel[{tag}]", cross_entropy.ce_fwd_kernel, fwd, flags, ("ld.global.v4",)
        yield (f"ce_bwd_kernel[{tag}]", cross_entropy.ce_bwd_kernel, bwd, flags,
               ("ld.global.v4", "st.global.v4"))


LINEAR_MMA = {80: ("mma.sync",), 90: ("wgmma.mma_async",)}
LINEAR_TILE = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}
LINEAR_SCALARS = ("M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn",
                  "stride_cm", "stride_cn", "stride_rm", "stride_rn", "stride_sm", "stride_sk",
                  "stride_dm", "stride_dk", "stride_bias", "m_key", "n_key", "k_key")


def linear_cases():
    """The fused-linear GEMM as the launchers use it: forward (every activation, bias and
    residual, z stored), the grad_input product (act' prologue, dz stored), the grad_weight
    product (prologue, dz and the bias row sums, float32 output), the in-place accumulating
    weight-gradient product of linear_cross_entropy, the prologue-only launch."""
    code = matmul.ACTIVATION_CODES

    def types(dtype, out_dtype):
        return {**dict.fromkeys(LINEAR_SCALARS, "i32"),
                "a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "c_ptr": f"*{out_dtype}",
                "z_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}", "res_ptr": f"*{dtype}",
                "saved_ptr": f"*{dtype}", "dz_ptr": f"*{dtype}", "rowsum_ptr": f"*{out_dtype}"}

    def flags(activation="none", prologue=None, store_z=False, bias=False, residual=False,
              store_dz=False, rowsum=False, compute_c=True, precision="ieee", accumulate=False):
        return {"HAS_BIAS": bias, "HAS_RESIDUAL": residual, "ACTIVATION": code[activation],
                "STORE_Z": store_z, "PROLOGUE": 0 if prologue is None else 1 + code[prologue],
                "STORE_DZ": store_dz, "STORE_ROWSUM": rowsum, "COMPUTE_C": compute_c,
                "INPUT_PRECISION": precision, "ACCUMULATE": accumulate, **LINEAR_TILE}

    kernel = matmul.fused_matmul_kernel
    dtypes = (("fp16", "ieee"), ("bf16", "ieee"), ("fp32", "tf32"))
    for activation in matmul.ACTIVATION_CODES:
        for dtype, precision in dtypes if activation == "gelu" else dtypes[:1]:
            store_z = activation in ("gelu", "gelu_tanh", "silu")
            yield (f"linear_fwd[{dtype}/{activation}]", kernel, types(dtype, dtype),
                   flags(activation, store_z=store_z, bias=True, residual=True,
                         precision=precision), LINEAR_MMA)
        if activation == "none":
            continue
        for dtype, precision in dtypes if activation == "gelu" else dtypes[:1]:
            yield (f"linear_bwd_input[{dtype}/{activation}]", kernel, types(dtype, dtype),
                   flags(prologue=activation, store_dz=True, precision=precision), LINEAR_MMA)
    for dtype, out in (("fp16", "fp32"), ("bf16", "bf16")):
        yield (f"linear_bwd_weight[{dtype}->{out}/gelu]", kernel, types(dtype, out),
               flags(prologue="gelu", store_dz=True, rowsum=True), LINEAR_MMA)
    yield ("linear_bwd_weight[fp16/none]", kernel, types("fp16", "fp32"),
           flags(rowsum=True), LINEAR_MMA)
    yield ("linear_weight_grad_accumulate[bf16->fp32]", kernel, types("bf16", "fp32"),
           flags(rowsum=True, accumulate=True), LINEAR_MMA)
    yield ("linear_fwd[fp32/ieee/relu]", kernel, types("fp32", "fp32"),
           flags("relu", bias=True), ())
    yield ("linear_bwd_prologue_only[bf16/silu]", kernel, types("bf16", "fp32"),
           flags(prologue="silu", store_dz=True, rowsum=True, compute_c=False), ())


ATTENTION_MMA = {80: ("mma.sync",), 90: ("wgmma.mma_async",)}
ATTENTION_SCALARS = ("seqlen_q", "seqlen_k", "group_size", "window_left", "window_right",
                     "tune_key_seqlen")


def attention_cases():
    """Flash attention as the launchers use it on a GPU: for each head-dim class its first
    (BLOCK_M, BLOCK_N, warps, stages) configuration; the forward, the dK/dV kernel with and
    without the atomic dQ, the dQ kernel and the preprocessing pass."""
    kernels = (("fwd", attention.attention_fwd_kernel, attention._FWD_CONFIGS),
               ("bwd_kv", attention.attention_bwd_kv_kernel, attention._BWD_KV_CONFIGS),
               ("bwd_q", attention.attention_bwd_q_kernel, attention._BWD_Q_CONFIGS))
    for head_dim, dtype, varlen in itertools.product((64, 96, 128, 256),
                                                     ("fp16", "bf16", "fp32"), (False, True)):
        # bf16 at every head-dim class; fp16, fp32 (tf32) and the packed layout at D = 128.
        if dtype != "bf16" and head_dim != 128 or varlen and (head_dim, dtype) != (128, "bf16"):
            continue
        block_d = attention.triton.next_power_of_2(head_dim)
        precision = "tf32" if dtype == "fp32" else "ieee"
        tensor_names = ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "grad_out_ptr", "grad_q_ptr",
                        "grad_k_ptr", "grad_v_ptr")
        variants = [(kind, kernel, table, False) for kind, kernel, table in kernels]
        variants.insert(2, ("bwd_kv_atomic_dq", kernels[1][1], kernels[1][2], True))
        for kind, kernel, table, atomic_dq in variants:
            block_m, block_n, warps, stages = table[attention._head_dim_class(block_d)][0]
            types = {name: "i32" for name in kernel.arg_names
                     if name.startswith("stride") or name in ATTENTION_SCALARS}
            types.update({name: f"*{dtype}" for name in tensor_names})
            types.update({"lse_ptr": "*fp32", "delta_ptr": "*fp32", "scale": "fp32",
                          "scale_log2": "fp32"})
            constants = {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK_M": block_m,
                         "BLOCK_N": block_n, "VARLEN": varlen, "INPUT_PRECISION": precision}
            required = ATTENTION_MMA
            if kernel is attention.attention_bwd_kv_kernel:
                constants["ATOMIC_DQ"] = atomic_dq
                if atomic_dq:  # float32 reductions into dQ, as red/atom instructions
                    types["grad_q_accum_ptr"] = "*fp32"
                    required = {arch: (*ops, "atom.global") for arch, ops in required.items()}
                else:
                    constants["grad_q_accum_ptr"] = None
            if varlen:
                types.update(cu_seqlens_q_ptr="*i32", cu_seqlens_k_ptr="*i32")
            else:
                constants.update(cu_seqlens_q_ptr=None, cu_seqlens_k_ptr=None)
            tag = f"{dtype}/D{head_dim}/{'packed' if varlen else 'batched'}"
            yield (f"attention_{kind}[{tag}]", kernel, types, constants, required,
                   {"num_warps": warps, "num_stages": stages})
        if head_dim == 128 and dtype == "bf16":
            kernel = attention.attention_bwd_preprocess_kernel
            types = {name: "i32" for name in kernel.arg_names
                     if name.startswith("stride") or name == "seqlen_q"}
            types.update(out_ptr="*bf16", grad_out_ptr="*bf16", delta_ptr="*fp32")
            constants = {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "VARLEN": varlen,
                         "BLOCK_M": attention._PREPROCESS_BLOCK_M,
                         **({} if varlen else {"cu_seqlens_q_ptr": None})}
            if varlen:
                types["cu_seqlens_q_ptr"] = "*i32"
            yield (f"attention_bwd_preprocess[{'packed' if varlen else 'batched'}]", kernel,
                   types, constants, ("ld.global.v4",), {"num_warps": 4})


def compile_case(kernel, types, constants, arch, aligned, options=None):
    arg_names = kernel.arg_names
    signature = {name: types.get(name, "constexpr") for name in arg_names}
    attrs = None
    if aligned:  # what Triton's launcher specialises for 16-aligned pointers and sizes
        attrs = {(index,): [["tt.divisibility", 16]] for index, name in enumerate(arg_names)
                 if name in types and (types[name].startswith("*")
                                       or name in ("C", "M", "N", "K")
                                       or name.startswith("stride"))}
    source = ASTSource(kernel, signature, constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=options or {"num_warps": 8})


def main() -> int:
    failures = []
    count = 0
    unaligned_done = set()
    cases = itertools.chain(((*case, None) for case in cross_entropy_cases()),
                            ((*case, None) for case in linear_cases()), attention_cases())
    for name, kernel, types, constants, required, options in cases:
        # Unaligned: each kernel and flag set once (one dtype), on the newest arch.
        key = (kernel.fn.__name__, tuple(constants.items()))
        variants = [(arch, True) for arch in ARCHES]
        if key not in unaligned_done:
            unaligned_done.add(key)
            variants.append((ARCHES[-1], False))
        for arch, aligned in variants:
            count += 1
            label = f"sm_{arch} {name}{'' if aligned else ' unaligned'}"
            try:
                compiled = compile_case(kernel, types, constants, arch, aligned, options)
                assert compiled.asm.get("cubin"), "no cubin produced"
            except Exception as error:  # report every failure, not only the first
                failures.append(f"{label}: {type(error).__name__}: {error}")
                continue
            wanted = required.get(arch, ()) if isinstance(required, dict) else required
            missing = [op for op in wanted if aligned and op not in compiled.asm["ptx"]]
            if missing:
                failures.append(f"{label}: the PTX has no {', '.join(missing)} "
                                f"(expected when aligned: 128-bit accesses, tensor-core MMA)")
    print(f"check_triton_compile: {count - len(failures)}/{count} kernel variants compiled "
          f"for sm_{'/sm_'.join(map(str, ARCHES))} with the expected instructions (128-bit "
          f"accesses, tensor-core MMA) when aligned (triton {triton.__version__})")
    for failure in failures:
        print("FAIL", failure[:2000])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
