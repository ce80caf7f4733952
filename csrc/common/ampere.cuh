// ampere.cuh — the sm_80 building blocks of the mma.sync tensor-core kernels, as thin
// inline-PTX wrappers (they also compile for, and run on, sm_90):
//
//   smem_address        generic pointer -> 32-bit shared-state-space address (what the
//                       cp.async and ldmatrix operands below take)
//   cp_async_cg_16      16-byte global -> shared copy, cached in L2 only (.cg); copies
//                       src_bytes (0..16) bytes and zero-fills the rest, so src_bytes = 0
//                       writes 16 zero bytes without reading `src` (which must still be a
//                       valid address)
//   cp_async_ca_4       4-byte copy cached in L1 and L2 (.ca), src_bytes 0 or 4, same zero-fill
//   cp_async_commit     closes this thread's cp.async operations issued so far into a group
//   cp_async_wait<N>    waits until at most N committed groups of this thread are in flight
//                       (N = 0: all of them); other threads' copies need a barrier after it
//   ldmatrix_x4<kTrans> four 8x8 b16 matrices from shared memory, lane l giving the address
//                       of row l % 8 of matrix l / 8; register i holds matrix i, each lane
//                       the pair of row lane / 4, columns 2 (lane % 4) and +1 (kTrans: of
//                       the transposed matrix, i.e. the column-major read of the same tile)
//   mma_m16n8k16<T>     c (16x8 f32) += a (16x16) b (16x8), T = __half or __nv_bfloat16
//   mma_m16n8k8_tf32    c (16x8 f32) += a (16x8) b (8x8), operands already tf32 bits
//   to_tf32             float bits -> tf32 bits, rounded to nearest, ties away from zero
//   (pack2<T>, two floats -> one register of two T with `lo` in the low half, is in
//   dtype.cuh: the wgmma kernels use it too)
//
// Fragment conventions of mma.sync .row.col (PTX ISA, "Matrix Fragments for mma.m16n8k16"),
// with g = lane / 4 (the group, 0..7) and t = lane % 4 (the thread in the group, 0..3):
//   a[0..3]  (16-bit: two elements per register, the lower column in the low half)
//            a[0] = rows g,     k 2t..2t+1        a[1] = rows g + 8, k 2t..2t+1
//            a[2] = rows g,     k 2t+8..2t+9      a[3] = rows g + 8, k 2t+8..2t+9
//            (tf32 m16n8k8: one element each, a[0] (g, t), a[1] (g+8, t), a[2] (g, t+4),
//            a[3] (g+8, t+4))
//   b0, b1   b0 = k 2t..2t+1, column g     b1 = k 2t+8..2t+9, column g
//            (tf32: b0 (k t, column g), b1 (k t+4, column g))
//   c[0..3]  c[0], c[1] = row g, columns 2t, 2t+1     c[2], c[3] = row g + 8, same columns
// so one ldmatrix_x4 of a 16x16 row-major A tile (matrices: rows 0-7 / 8-15 x k 0-7 / 8-15
// in the order of a[0..3]) gives an A fragment, and one of a 16-row K x 16 N block of B
// gives the (b0, b1) pairs of two adjacent n8 tiles.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace fusedops {
namespace ampere {

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// --- cp.async ----------------------------------------------------------------------------

__device__ __forceinline__ void cp_async_cg_16(uint32_t dst, const void* src,
                                               uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_ca_4(uint32_t dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// --- ldmatrix ----------------------------------------------------------------------------

template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  }
}

// --- mma.sync ----------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<T, __half>, "float16 or bfloat16");
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ void mma_m16n8k8_tf32(float (&c)[4], const uint32_t (&a)[4],
                                                 uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The tensor cores would otherwise ignore the low 13 mantissa bits (truncate). Inf and NaN
// pass through.
__device__ __forceinline__ uint32_t to_tf32(uint32_t bits) {
  uint32_t tf32;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(tf32) : "r"(bits));
  return tf32;
}


}  // namespace ampere
}  // namespace fusedops
