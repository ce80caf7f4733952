"""The fused linear ``act(x @ W^T + b + r)``: one tiled tensor-core GEMM with a fused prologue
and epilogue, used for the forward and for both backward products.

The kernel computes ``C[M, N] = A[M, K] @ B[K, N]`` for A and B of any strides, so every
transposed operand is a view with its strides swapped and no copy is ever made:

    forward       out = act(z),  z = x @ W^T + b + r        A = x, B = W^T
    grad_input    dx  = dz @ W                              A = dz  (M, N),  B = W
    grad_weight   dW  = dz^T @ x                            A = dz^T (N, M), B = x
    with          dz  = grad_out * act'(z)     (act'(z) from z, or from out for relu)

Epilogue (forward, constexpr-selected): the float32 accumulator gets + bias[n] and
+ residual[m, n] (both upcast to float32), is stored as z in the output dtype when backward
needs it (gelu, gelu_tanh, silu), then goes through the activation and is stored as out.

Prologue (backward, constexpr-selected): A's tiles are grad_out (or its transpose); each one
is multiplied elementwise by act'(saved) loaded from the same positions of ``saved`` as it is
loaded, in float32, then cast to B's dtype for the MMA. dz is never formed in a separate pass.
Two optional side outputs come from the same prologue:

* ``grad_preact`` (dz itself): written by the programs of the first column block
  (pid_n == 0) only, as they stream their row block of A over the whole reduction, so each
  element of dz is written exactly once (the other column blocks load the same tiles and
  write nothing). It is written by the grad_input product when that runs, else by the
  grad_weight product, else by a "prologue only" launch (COMPUTE_C=False: no B, no MMA).
* ``grad_bias`` = dz.sum(0): in the grad_weight product (A = dz^T) it is the row sums of A
  over the reduction. The programs with pid_n == 0 already stream their whole row block of A,
  so they keep a float32 row sum of the (float32, pre-rounding) dz tiles and write it once at
  the end: atomic-free and deterministic, with no extra pass and no extra read of grad_out.
  (Without grad_weight, the prologue-only launch does the same.)

Bytes and FLOPs (M tokens, K in features, N out features, b bytes per element):
    forward     2*M*N*K FLOPs; reads M*K*b + N*K*b (+ N*b bias + M*N*b residual),
                writes M*N*b (+ M*N*b z for gelu/gelu_tanh/silu)
    backward    4*M*N*K FLOPs; reads grad_out and saved twice (once per product, 2*M*N*b
                each), x and W once, writes dx, dW (+ dz, db)
Re-reading grad_out and saved in both products costs 2*M*N*b more than materialising dz once
(which would cost a write and two reads of M*N*b): the same traffic, one launch fewer.

Offsets are 64-bit (row and column indices are widened before multiplying by the strides),
so operands of more than 2**31 elements are fine. Masks cover ragged M, N and K, including
K = 0 (the epilogue alone: z = b + r). The launchers allocate nothing.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

# --- configuration -------------------------------------------------------------------------

ACTIVATION_CODES = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}

# One fixed config under the interpreter: it pays ~0.6 ms per program instance and per op,
# so tiles as big as the tests' odd sizes (17, 33) need (few programs, few K steps).
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}

# NOT yet measured on a GPU: the usual starting points of Triton's matmul tutorial and
# Liger/Inductor for fp16/bf16 on A100/H100 (128x128x64 and 128x256x64 for large problems,
# 64x128x32 and 64x64x32 for small or skinny ones). To be replaced by what benchmarks/
# measures, with the result file cited here.
GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8},
                  num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8},
                  num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8},
                  num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8},
                  num_stages=4, num_warps=4),
]


# The one config of the in-place accumulating launch (C += A @ B): an autotuner would run
# the candidates on the same output, adding the product once per candidate.
ACCUMULATE_CONFIG = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8},
                                  num_stages=3, num_warps=8)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles far larger than the problem (a 128x256 tile for M = 8 only wastes work)."""
    m, n = named_args["M"], named_args["N"]
    kept = [c for c in configs
            if c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(m))
            and c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(n))]
    return kept or configs[-1:]


# --- kernel --------------------------------------------------------------------------------


@triton.jit
def _tanh(u):
    """tanh from one exp (no portable tanh in both the interpreter and libdevice): with
    e = exp(-2|u|) in [0, 1], |tanh u| = (1 - e) / (1 + e), which never overflows."""
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0.0, -t, t)


@triton.jit
def _sigmoid(z):
    """1 / (1 + exp(-z)) from e = exp(-|z|) in [0, 1], so the exp never overflows."""
    e = tl.exp(-tl.abs(z))
    r = 1.0 / (1.0 + e)
    return tl.where(z >= 0.0, r, e * r)


@triton.jit
def _activation(z, ACTIVATION: tl.constexpr):
    """act(z) in float32; ACTIVATION as in ACTIVATION_CODES."""
    if ACTIVATION == 1:
        y = tl.maximum(z, 0.0)
    elif ACTIVATION == 2:
        y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACTIVATION == 3:
        y = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACTIVATION == 4:
        y = z * _sigmoid(z)
    else:
        y = z
    return y


@triton.jit
def _activation_derivative(s, ACTIVATION: tl.constexpr):
    """act'(z) in float32 from what the forward saved: out for relu, z otherwise."""
    if ACTIVATION == 1:
        d = tl.where(s > 0.0, 1.0, 0.0)
    elif ACTIVATION == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(s * 0.7071067811865476))
        pdf = tl.exp(-0.5 * s * s) * 0.3989422804014327
        d = cdf + s * pdf
    elif ACTIVATION == 3:
        k = 0.7978845608028654
        t = _tanh(k * (s + 0.044715 * s * s * s))
        d = 0.5 * (1.0 + t) + 0.5 * s * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * s * s)
    elif ACTIVATION == 4:
        sig = _sigmoid(s)
        d = sig * (1.0 + s * (1.0 - sig))
    else:
        d = tl.full(s.shape, 1.0, tl.float32)
    return d


@triton.jit
def fused_matmul_kernel(
        a_ptr, b_ptr, c_ptr, z_ptr, bias_ptr, res_ptr, saved_ptr, dz_ptr, rowsum_ptr,
        M, N, K,
        stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
        stride_rm, stride_rn, stride_sm, stride_sk, stride_dm, stride_dk, stride_bias,
        m_key, n_key, k_key,  # autotuning keys (power-of-2 buckets of M, N, K); unused
        HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
        STORE_Z: tl.constexpr, PROLOGUE: tl.constexpr, STORE_DZ: tl.constexpr,
        STORE_ROWSUM: tl.constexpr, COMPUTE_C: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C = epilogue(prologue(A) @ B); see the module docstring.

    PROLOGUE: 0 none, else 1 + the activation code whose derivative scales A's tiles
    (A = grad_out, saved at A's positions with strides (stride_sm, stride_sk)); dz and the
    row sums of dz are written by the programs with pid_n == 0 when STORE_DZ / STORE_ROWSUM.
    ACCUMULATE: C and the row sums are added to what the outputs hold (each program reads
    and then writes only its own tile: safe in place, but never to be autotuned).
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    if COMPUTE_C:
        # Grouped order: GROUP_M row blocks share each column block of B while it is in L2.
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m
    else:
        pid_m = pid
        pid_n = 0

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)

    a_rows = a_ptr + rm64[:, None] * stride_am
    b_cols = b_ptr + rn64[None, :] * stride_bn
    if PROLOGUE:
        s_rows = saved_ptr + rm64[:, None] * stride_sm
    if STORE_DZ:
        dz_rows = dz_ptr + rm64[:, None] * stride_dm
    # Only the first column block writes dz and its row sums: each element exactly once.
    side_writer = pid_n == 0

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rowsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        mask_k = kk < K
        kk64 = kk.to(tl.int64)
        mask_a = mask_m[:, None] & mask_k[None, :]
        a = tl.load(a_rows + kk64[None, :] * stride_ak, mask=mask_a, other=0.0)
        if PROLOGUE:
            s = tl.load(s_rows + kk64[None, :] * stride_sk, mask=mask_a, other=0.0)
            dz = a.to(tl.float32) * _activation_derivative(s.to(tl.float32), PROLOGUE - 1)
            a = dz.to(b_ptr.dtype.element_ty)  # the MMA's operand, in B's dtype
        elif STORE_DZ or STORE_ROWSUM:
            dz = a.to(tl.float32)
        if STORE_DZ:
            tl.store(dz_rows + kk64[None, :] * stride_dk, dz.to(dz_ptr.dtype.element_ty),
                     mask=mask_a & side_writer)
        if STORE_ROWSUM:
            rowsum += tl.sum(dz, axis=1)
        if COMPUTE_C:
            b = tl.load(b_cols + kk64[:, None] * stride_bk,
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    if STORE_ROWSUM:
        if ACCUMULATE:
            rowsum += tl.load(rowsum_ptr + rm64, mask=mask_m & side_writer,
                              other=0.0).to(tl.float32)
        tl.store(rowsum_ptr + rm64, rowsum.to(rowsum_ptr.dtype.element_ty),
                 mask=mask_m & side_writer)

    if COMPUTE_C:
        mask_c = mask_m[:, None] & mask_n[None, :]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + rn64 * stride_bias, mask=mask_n, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        if HAS_RESIDUAL:
            acc += tl.load(res_ptr + rm64[:, None] * stride_rm + rn64[None, :] * stride_rn,
                           mask=mask_c, other=0.0).to(tl.float32)
        c_offsets = rm64[:, None] * stride_cm + rn64[None, :] * stride_cn
        if ACCUMULATE:
            acc += tl.load(c_ptr + c_offsets, mask=mask_c, other=0.0).to(tl.float32)
        if STORE_Z:
            tl.store(z_ptr + c_offsets, acc.to(z_ptr.dtype.element_ty), mask=mask_c)
        out = _activation(acc, ACTIVATION)
        tl.store(c_ptr + c_offsets, out.to(c_ptr.dtype.element_ty), mask=mask_c)


fused_matmul_autotuned = triton.autotune(
    configs=GPU_CONFIGS, key=["m_key", "n_key", "k_key"],
    prune_configs_by={"early_config_prune": _prune_configs})(fused_matmul_kernel)


# --- launchers -----------------------------------------------------------------------------


def _on_device(tensor: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device), on its stream."""
    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def input_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "tf32" if allow_tf32 and dtype == torch.float32 else "ieee"


def _bucket(size: int) -> int:
    return triton.next_power_of_2(max(size, 1))


def _strides(t: torch.Tensor | None, transpose: bool = False) -> tuple[int, int]:
    if t is None:
        return 0, 0
    s0, s1 = t.stride()
    return (s1, s0) if transpose else (s0, s1)


def fused_matmul(a, b, *, c=None, z=None, bias=None, residual=None, activation="none",
                 prologue=None, saved=None, dz=None, dz_transposed=False, rowsum=None,
                 allow_tf32=False, accumulate=False):
    """``c = act(prologue(a) @ b + bias + residual)`` for 2-D views ``a`` (M, K), ``b`` (K, N).

    ``prologue`` (an activation name or None): ``a`` is grad_out (or a transposed view of
    it) and is multiplied by act'(``saved``), ``saved`` indexed like ``a``. ``dz`` receives
    the scaled ``a`` (a view indexed like ``a``) and ``rowsum`` (M,) its row sums. ``c`` None
    runs the prologue alone (no B, no MMA). Every output is written, nothing is allocated.
    ``accumulate``: ``c`` and ``rowsum`` receive ``+=`` instead of ``=`` (one fixed config).
    """
    m, k = a.shape
    n = b.shape[1] if c is not None else 0
    if m == 0:
        return
    compute_c = c is not None and n > 0
    if not compute_c and dz is None and rowsum is None:
        return
    flags = dict(HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
                 ACTIVATION=ACTIVATION_CODES[activation], STORE_Z=z is not None,
                 PROLOGUE=0 if prologue is None else 1 + ACTIVATION_CODES[prologue],
                 STORE_DZ=dz is not None, STORE_ROWSUM=rowsum is not None,
                 COMPUTE_C=compute_c, INPUT_PRECISION=input_precision(a.dtype, allow_tf32),
                 ACCUMULATE=accumulate)
    anchor = c if compute_c else (dz if dz is not None else rowsum)
    args = (a, b if compute_c else anchor, c if compute_c else anchor,
            z if z is not None else anchor, bias if bias is not None else anchor,
            residual if residual is not None else anchor,
            saved if saved is not None else anchor, dz if dz is not None else anchor,
            rowsum if rowsum is not None else anchor,
            m, n, k, *a.stride(), *(_strides(b) if compute_c else (0, 0)),
            *(_strides(c) if compute_c else (0, 0)), *_strides(residual),
            *_strides(saved), *_strides(dz), bias.stride(0) if bias is not None else 0,
            _bucket(m), _bucket(n), _bucket(k))
    with _on_device(a):
        if accumulate and compute_c and not _interpreting():
            config = ACCUMULATE_CONFIG
            grid = (triton.cdiv(m, config.kwargs["BLOCK_M"])
                    * triton.cdiv(n, config.kwargs["BLOCK_N"]),)
            fused_matmul_kernel[grid](*args, **flags, **config.kwargs,
                                      num_warps=config.num_warps,
                                      num_stages=config.num_stages)
        elif _interpreting() or not compute_c:
            cfg = dict(INTERPRETER_CONFIG)
            num_warps = 4
            if not compute_c and not _interpreting():
                cfg = {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 1}
            grid = (triton.cdiv(m, cfg["BLOCK_M"])
                    * (triton.cdiv(n, cfg["BLOCK_N"]) if compute_c else 1),)
            fused_matmul_kernel[grid](*args, **flags, **cfg, num_warps=num_warps)
        else:
            def grid(meta):
                return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

            fused_matmul_autotuned[grid](*args, **flags)


def linear_fwd_launch(input, weight, bias, residual, activation, allow_tf32, out, z):
    """out = act(input @ weight.T + bias + residual) (M, N); z (or None) the pre-activation."""
    fused_matmul(input, weight.t(), c=out, z=z, bias=bias, residual=residual,
                 activation=activation, allow_tf32=allow_tf32)


def linear_bwd_launch(grad_out, input, weight, saved, activation, allow_tf32, grad_input,
                      grad_weight, grad_bias, grad_preact):
    """The backward products; each output may be None (not asked for).

    dz = grad_out * act'(saved) is formed in the prologue of each product. grad_preact is
    written by the first product that runs, grad_bias by the grad_weight product (or a
    prologue-only launch over dz^T when grad_weight is not asked for).
    """
    prologue = None if activation == "none" else activation
    saved = saved if prologue is not None else None
    dz_pending = grad_preact
    if grad_input is not None:
        fused_matmul(grad_out, weight, c=grad_input, prologue=prologue, saved=saved,
                     dz=dz_pending, allow_tf32=allow_tf32)
        dz_pending = None
    # The grad_weight product runs over dz^T (N, M): transposed views, no copies.
    saved_t = saved.t() if saved is not None else None
    dz_t = dz_pending.t() if dz_pending is not None else None
    if grad_weight is not None:
        fused_matmul(grad_out.t(), input, c=grad_weight, prologue=prologue, saved=saved_t,
                     dz=dz_t, rowsum=grad_bias, allow_tf32=allow_tf32)
    elif grad_bias is not None or dz_t is not None:
        fused_matmul(grad_out.t(), input, prologue=prologue, saved=saved_t, dz=dz_t,
                     rowsum=grad_bias)


def weight_grad_accumulate_launch(grad_out, input, grad_weight, grad_bias, allow_tf32):
    """grad_weight += grad_out.T @ input and grad_bias += grad_out.sum(0), in place (float32)."""
    if input.shape[1] == 0 and grad_bias is None:
        return
    fused_matmul(grad_out.t(), input, c=grad_weight if input.shape[1] else None,
                 rowsum=grad_bias, allow_tf32=allow_tf32, accumulate=True)
