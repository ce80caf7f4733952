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

Flash attention, the implicit-GEMM conv2d and the depthwise conv2d have their own case
generators below (attention_cases, conv_gemm_cases, depthwise_cases), each saying which
instructions its kernels must show.
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

from fusedops.triton_kernels import (  # noqa: E402
    attention,
    conv,
    conv_depthwise,
    cross_entropy,
    matmul,
)

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


# What Triton's launcher turns into constants at run time for channels_last tensors and unit
# stride/dilation: integer arguments equal to 1.
DEPTHWISE_UNIT_ARGS = ("stride_xc", "stride_rk", "stride_ok", "stride_zk", "stride_gk",
                       "stride_sk", "stride_dk", "stride_ic", "conv_stride_h", "conv_stride_w",
                       "dilation_h", "dilation_w")


def depthwise_cases():
    """The depthwise convolution (triton_kernels/conv_depthwise.py) as its launchers use it on
    a GPU, each kernel with its first autotuning tile: channels_last (channel strides 1)
    with the channel count a multiple of 16, where the tile accesses are 128 bits wide —
    `ld.global.v4` for the input, patch and dz tiles (multiplier 1), `st.global.v4` for
    out, z, dz and grad_input. The forward with every activation (bias, residual, z); the
    weight kernel (dz, the bias and weight partial sums; 3x3 in one tap block, 7x7 in two;
    the dz-only launch); the input-gradient gather (reading dz, or grad_out with relu's
    act'); bf16, and fp16/fp32 for the fullest variants; stride 2, dilation 2 and multiplier
    2 once each. (compile_case marks the weight strides divisible by 16 too, which they
    seldom are: the weights are read per tap as a strided vector either way.)"""
    kernels = {"fwd": conv_depthwise.depthwise_fwd_kernel,
               "bwd_weight": conv_depthwise.depthwise_bwd_weight_kernel,
               "bwd_input": conv_depthwise.depthwise_bwd_input_kernel}
    code = conv_depthwise.ACTIVATION_CODES

    def case(kind, dtype, activation, flags, kernel_size=3, unit_steps=True, multiplier=1):
        kernel = kernels[kind]
        unit = [name for name in DEPTHWISE_UNIT_ARGS if name in kernel.arg_names
                and (unit_steps or not name.startswith(("conv_stride", "dilation")))]
        types = {param.name: "i32" for param in kernel.params
                 if not param.is_constexpr and param.name not in unit}
        types.update({name: "*fp32" if name.startswith("partial") else f"*{dtype}"
                      for name in kernel.arg_names if name.endswith("_ptr")})
        constants = {**dict.fromkeys(unit, 1), "R": kernel_size, "S": kernel_size,
                     "MULTIPLIER": multiplier, "ACTIVATION": code[activation], **flags}
        if kind == "bwd_weight":  # the tap block as the launcher picks it
            tap_block = (min(triton.next_power_of_2(kernel_size ** 2),
                             conv_depthwise.MAX_TAP_BLOCK) if flags["COMPUTE_WEIGHT"] else 1)
            block_p, block_c, warps = conv_depthwise.weight_tiles(tap_block)[0]
            constants["TAP_BLOCK"] = tap_block
        else:
            block_p, block_c, warps = conv_depthwise.GPU_TILES[0]
        constants.update(BLOCK_P=block_p, BLOCK_C=block_c)
        # A multiplier > 1 reads input channel k // multiplier (forward, weight kernel) and
        # dz channel c * multiplier + m (gather): no contiguous run per pixel, narrower loads.
        loads = ("ld.global.v4",) if multiplier == 1 else ()
        stores = ("st.global.v4",) if flags.get("STORE_DZ", True) else ()
        tag = f"{dtype}/{kernel_size}x{kernel_size}/{activation}"
        tag += ("" if unit_steps else "/s2d2") + ("" if multiplier == 1 else f"/m{multiplier}")
        return (f"depthwise_{kind}[{tag}]", kernel, types, constants, loads + stores,
                {"num_warps": warps})

    def fwd(activation):
        return {"HAS_BIAS": True, "HAS_RESIDUAL": True,
                "STORE_Z": activation in ("gelu", "gelu_tanh", "silu")}

    def weight(compute_weight=True, store_bias=True, store_dz=True):
        return {"COMPUTE_WEIGHT": compute_weight, "STORE_BIAS": store_bias,
                "STORE_DZ": store_dz}

    for activation in code:
        yield case("fwd", "bf16", activation, fwd(activation))
    for dtype in ("fp16", "fp32"):
        yield case("fwd", dtype, "gelu", fwd("gelu"))
    yield case("fwd", "bf16", "relu", fwd("relu"), kernel_size=7)
    yield case("fwd", "bf16", "silu", fwd("silu"), kernel_size=5, unit_steps=False,
               multiplier=2)
    for dtype in ("bf16", "fp16", "fp32"):
        yield case("bwd_weight", dtype, "gelu", weight())
    yield case("bwd_weight", "bf16", "none", weight(store_bias=False, store_dz=False))
    yield case("bwd_weight", "bf16", "silu", weight(), kernel_size=7)
    yield case("bwd_weight", "bf16", "relu", weight(), unit_steps=False, multiplier=2)
    yield case("bwd_weight", "bf16", "gelu_tanh", weight(compute_weight=False, store_bias=False))
    # The gather applies act' itself only where it is cheap (see CHEAP_DERIVATIVES).
    for dtype in ("bf16", "fp32"):
        for activation in conv_depthwise.CHEAP_DERIVATIVES:
            yield case("bwd_input", dtype, activation, {})
    yield case("bwd_input", "bf16", "none", {}, kernel_size=5, unit_steps=False, multiplier=2)


# Channel strides of channels_last tensors: 1 at run time, so Triton makes them constants.
CONV_UNIT_STRIDES = ("stride_xc", "stride_wc", "stride_dc", "stride_gk", "stride_sk",
                     "stride_zk", "stride_rk", "stride_ok")
CONV_TILE = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}


def conv_gemm_cases():
    """The implicit-GEMM conv2d (triton_kernels/conv.py) for channels_last tensors: the
    forward with bias, residual, z and an activation; the input gradient and the split weight
    gradient with act' applied to grad_out's tiles; bf16, fp16 and fp32 as tf32. Tensor-core
    MMA in all three; the forward's input and weight tiles as 128-bit loads, the backward's
    gathers as 16-byte cp.async copies into shared memory (Triton's pipeline)."""
    scalar_names = ("C", "H", "W", "K", "OH", "OW", "R", "S", "M", "rows_per_split",
                    "conv_stride_h", "conv_stride_w", "pad_h", "pad_w", "dil_h", "dil_w",
                    "tune_m", "tune_n", "tune_k", "taps", "stride_key")
    options = {"num_warps": 8, "num_stages": 3}
    backward_ops = {80: ("mma.sync", "cp.async"), 90: ("wgmma.mma_async", "cp.async")}
    for dtype, precision in (("bf16", "ieee"), ("fp16", "ieee"), ("fp32", "tf32")):
        kernels = (
            ("fwd", conv.conv2d_fwd_kernel, {"HAS_BIAS": True, "HAS_RESIDUAL": True,
                                             "ACTIVATION": 2, "STORE_Z": True},
             {80: ("mma.sync", "ld.global.v4"), 90: ("wgmma.mma_async", "ld.global.v4")}),
            ("bwd_input", conv.conv2d_bwd_input_kernel, {"ACTIVATION": 2}, backward_ops),
            ("bwd_weight", conv.conv2d_bwd_weight_kernel,
             {"ACTIVATION": 2, "COMPUTE_WEIGHT": True, "STORE_BIAS": True, "STORE_DZ": True},
             backward_ops))
        for kind, kernel, flags, required in kernels:
            types = {name: "i32" for name in kernel.arg_names
                     if (name.startswith("stride") and name not in CONV_UNIT_STRIDES)
                     or name in scalar_names}
            types.update({name: "*fp32" if name.startswith(("dw_partial", "db_partial"))
                          else f"*{dtype}" for name in kernel.arg_names
                          if name.endswith("_ptr")})
            constants = {**{name: 1 for name in CONV_UNIT_STRIDES if name in kernel.arg_names},
                         **flags, "INPUT_PRECISION": precision, **CONV_TILE}
            yield f"conv2d_{kind}[{dtype}]", kernel, types, constants, required, options


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
                            ((*case, None) for case in linear_cases()), attention_cases(),
                            conv_gemm_cases(), depthwise_cases())
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
