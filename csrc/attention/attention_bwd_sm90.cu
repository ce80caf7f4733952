// attention_bwd_sm90.cu — the sm_90a flash-attention backward (FlashAttention-3 style): TMA,
// an mbarrier ring, warp specialization and warpgroup MMAs (wgmma), dQ added with float32
// atomics. The non-deterministic path only: attention.cu sends deterministic=true to the
// sm_80 backward (attention_bwd_sm90 rejects it with cudaErrorInvalidValue), since the order
// of the atomic additions into dQ varies from run to run.
//
// The math (attention.h, attention_contract.py). For a query row i and a key j it sees:
//   p_ij = exp(s_ij - lse_i),  s_ij = q_i . k_j * scale,
//   delta_i = sum_d dout_id out_id = sum_j p_ij dp_ij          (a pre-pass kernel),
//   dp_ij = dout_i . v_j,   ds_ij = p_ij (dp_ij - delta_i),
//   dV_j = sum_i p_ij dout_i,   dK_j = scale sum_i ds_ij q_i,   dQ_i = scale sum_j ds_ij k_j.
// Exponentials are exp2: p = exp2(s * scale * log2(e) - lse * log2(e)). A row that sees no
// key has lse = -inf; it is turned into +inf (as the Triton tier does), so that its p is 0.
//
// Three kernels, in stream order:
//   1. delta = rowsum(dout * out) in float32, laid out like lse (params.delta);
//   2. the main kernel: dK and dV, and dQ added into params.grad_q_accum (float32, zeroed by
//      the caller) with red.global.add.v4.f32;
//   3. grad_q = scale * grad_q_accum, cast to the 16-bit type.
//
// The main kernel's partitioning: one CTA per (block of 128 keys, kv head, sequence). Its K
// and V tiles are loaded once by TMA; it then visits, for each query head of the GQA group
// and each block of 64 query rows that sees one of its keys (rows_seeing_keys), the tiles of
// Q and dO, and accumulates dK and dV of its 128 keys in registers over the whole group —
// each written once at the end, no atomics on dK/dV. Keys that no query sees get dK = dV = 0.
//
// The CTA: three warpgroups of 128 threads.
//   * The producer (warpgroup 2; after giving registers back with setmaxnreg, only warp 0
//     works): lane 0 has TMA load K and V (once), then for every (head, query block) waits
//     until a stage of the kStages ring is empty, and has TMA load Q and dO (64 rows x D)
//     into it; meanwhile the 32 lanes copy the 64 rows' lse (times log2 e; +inf for a row
//     that sees no key or lies past the sequence) and delta (0 there) into the stage. The
//     stage's "full" mbarrier expects 32 arrivals (the lanes, after their lse/delta stores:
//     arrive releases them) and the TMA transaction bytes.
//   * Two consumers (warpgroups 0 and 1): consumer w owns keys [64 w, 64 w + 64) of the
//     block. Per stage, with 64 queries:
//       S^T  = K_w Q^T                 wgmma SS  m64n64k16 x D/16    (A K-major, B K-major)
//       dP^T = V_w dO^T                wgmma SS  m64n64k16 x D/16    (A K-major, B K-major)
//       P^T  = exp2(S^T scale log2e - lse log2e), masked where the block needs it
//       dV  += P^T dO                  wgmma RS  m64nDk16 x 4        (A registers, B MN-major)
//       dS^T = P^T (dP^T - delta)
//       dK  += dS^T Q                  wgmma RS  m64nDk16 x 4        (A registers, B MN-major)
//       dS^T -> shared memory (16-bit), then
//       dQ   = dS K                    wgmma SS  m64n64k16           (A MN-major, B MN-major)
//       dQ  -> grad_q_accum with red.global.add.v4.f32
//     and the stage is released (one arrival per consumer warp on its "empty" mbarrier) once
//     the last wgmma reading it has completed.
//
// Shared-memory layout: every 16-bit tile is made of TMA boxes of 64 d-columns (128 bytes, the
// 128-byte swizzle: the 16-byte chunk c of row r lies at chunk c ^ (r % 8)) by R rows, box b
// (columns [64 b, 64 b + 64)) at b * R * 128 bytes. One such tile serves as a K-major operand
// when the product contracts over d, and as an MN-major one when it contracts over its rows
// (hopper.cuh: K-major SBO = 1024 and the 16-wide k step at +32 bytes inside the row; MN-major
// LBO = the distance between the 64-column boxes, SBO = 1024, the k step at +16 rows = 2048
// bytes). Per product:
//   S^T  = K_w Q^T: A = K rows [64 w, 64 w + 64) (M = keys, K = d): K-major, start
//          K + 64 w * 128 + (kk / 4) * box + (kk % 4) * 32; B = Q (N = 64 queries, K = d):
//          K-major, start Q + (kk / 4) * box + (kk % 4) * 32. trans-a = trans-b = 0.
//   dP^T = V_w dO^T: the same with V and dO.
//   dV  += P^T dO: A = P^T from registers (below); B = dO (N = d, K = queries): MN-major,
//          start dO + kk * 2048, LBO = 8 KB (the dO box), trans-b = 1.
//   dK  += dS^T Q: A = dS^T from registers; B = Q, as dO above.
//   dQ   = dS K: A = dS (M = queries, K = keys), stored by the consumers as an MN-major tile
//          of 128 key rows x 64 queries (128 bytes a row, swizzled like the rest): element
//          (q, key) at key * 128 + (((q / 8) ^ (key % 8)) << 4) + 2 (q % 8); start
//          dS + kk * 2048, trans-a = 1. B = K (N = d, K = keys): MN-major, start
//          K + box(d0) + key0 * 128 + kk * 2048, trans-b = 1. How the work is split:
//            D = 128: by columns. Consumer w computes dQ[:, 64 w : 64 w + 64] over all 128
//              keys (8 k steps; B = K's box w). It needs both consumers' dS, so the dS stores
//              are followed by a named barrier of the 256 consumer threads; dS is double
//              buffered so that the next stage's stores never race the other consumer's dQ
//              wgmma (a consumer writes buffer i % 2 at stage i only after passing the
//              barrier of stage i - 1, which the other passed after its stage i - 2 wgmma).
//            D = 64: by keys. A 32-column slice of an MN-major 128-byte-swizzled operand is
//              not a layout wgmma has (the MN-major atom is 64 elements wide), so consumer w
//              computes the partial dQ[:, 0:64] of its own 64 keys (4 k steps; A = its dS
//              rows, B = K rows [64 w, 64 w + 64)) and both consumers add into grad_q_accum:
//              twice the atomics of D = 128 per column, no cross-consumer barrier (a
//              128-thread barrier per consumer, dS double buffered as above).
//
// Fragments. The wgmma m64nNk16 accumulator: warp v of the warpgroup holds rows 16 v + g and
// 16 v + g + 8 (g = lane / 4), at columns 8 j + 2 t and 8 j + 2 t + 1 (t = lane % 4), in
// registers d[4 j], d[4 j + 1] (row 16 v + g) and d[4 j + 2], d[4 j + 3] (row + 8). The
// register A fragment of m64k16 (16-bit) holds, in its four 32-bit registers, (row g, cols
// 2t..2t+1), (row g + 8, cols 2t..), (row g, cols 8 + 2t..), (row g + 8, cols 8 + 2t..):
// exactly accumulator columns [16 kk, 16 kk + 16) of the same rows, so the A fragment of k
// step kk is d[8 kk .. 8 kk + 7] converted pairwise (low half = the lower column), with no
// shuffle. That is how P^T and dS^T (M = this consumer's 64 keys, K = the 64 queries) feed
// the dV and dK products, whose accumulators have the same rows (keys).
//
// Masking. Query rows past the sequence (the last block of a sequence) get lse = +inf, hence
// p = 0 and ds = 0, and are never added into grad_q_accum. A block pair where every row of the
// block (inside the sequence) sees every key of the block (keys_seen_by_all) needs no mask;
// otherwise p is set to 0 where key_visible is false, in a relative int32 form: query m0 + ql
// sees key n0 + kl iff kl < len_k - n0 and lo <= kl - ql <= hi, with lo = -left - rel,
// hi = right - rel, rel = n0 - m0 - (len_k - len_q) (int64), clamped to [-256, 256] (the
// tile has kl - ql in [-63, 127], so the clamp changes no answer). In a packed batch the rows
// TMA reads past a sequence's end belong to the next sequence; the consumers zero them in
// shared memory (whole 128-byte rows: the swizzle does not matter) before any wgmma reads
// them, so that even a non-finite neighbour row contributes an exact 0 (p = 0 alone would
// give 0 * inf = NaN). Batched tensor maps have the sequence length as their row extent, so
// TMA itself writes zeros there.
//
// TMA maps: one per tensor (Q, dO with boxes of 64 d x 64 rows; K, V with 64 d x 128 rows),
// 4-D (d, row, head, batch) for the batched layout and 3-D (d, row, head) for the packed one,
// with the tensors' own strides (a dimension of extent 1 may have stride 0 from bindings.cpp:
// any valid stride is given instead, it is never stepped along). Coordinates are int32:
// covers() requires rows < 2**31.
//
// Registers: the producer keeps 40, the consumers 232 (2 x 232 + 40 = 504 <= 512 per lane).
// A consumer holds dK and dV (2 x D/2 floats), S^T and dP^T (2 x 32), P and dS fragments
// (2 x 16) and the dQ tile (32). D = 256 would need 2 x 128 floats for dK/dV alone: not
// covered (the sm_80 backward runs it).
//
// Shared memory: K, V (2 x 128 x D x 2 bytes) + kStages x (Q, dO) (64 x D x 2 each) + 2 dS
// buffers (2 x 16 KB) + lse/delta + barriers + 1 KB of alignment slack: 165,928 bytes at
// D = 128 (2 stages), 117,304 bytes at D = 64 (3 stages). One CTA per SM.
//
// Left for a GPU (unmeasured): the order of the per-stage products (dV is issued before dP is
// waited for; dQ waits for all), a third stage at D = 128, TMA reduce-add of the dQ tile by the
// idle producer warps instead of per-thread red.v4, an LPT / shifted order of query blocks so
// that CTAs of one head do not add into the same dQ rows at the same time.
#include <atomic>
#include <cstdint>
#include <type_traits>

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/check.cuh"
#include "../common/dtype.cuh"
#include "../common/hopper.cuh"
#include "../common/tensor_map.h"
#include "../common/vec.cuh"
#include "attention.h"
#include "attention_mask.cuh"

// The sm_80 and compute_80 passes compile the main kernel's body out (FUSEDOPS_SM90A_ENABLED),
// which leaves constants and helpers unused there: not worth a warning per pass.
#pragma nv_diag_suppress 177

namespace fusedops {
namespace {

constexpr int kBlockN = 128;             // keys per CTA
constexpr int kBlockM = 64;              // query rows per stage
constexpr int kConsumers = 2;            // warpgroups, 64 keys each
constexpr int kConsumerKeys = kBlockN / kConsumers;
constexpr int kWarpgroupThreads = 128;
constexpr int kConsumerThreads = kConsumers * kWarpgroupThreads;
constexpr int kThreads = (kConsumers + 1) * kWarpgroupThreads;
constexpr int kProducerRegisters = 40;
constexpr int kConsumerRegisters = 232;  // 2 x 232 + 40 = 504 <= 512 per lane

constexpr int kRowBytes = 128;           // one swizzled row: 64 16-bit elements
constexpr int kBoxColumns = 64;
constexpr int kKStepBytes = 32;          // 16 elements along a K-major row
constexpr int kMnStepBytes = 16 * kRowBytes;  // 16 rows of an MN-major operand
constexpr int kAtomBytes = 1024;         // 8 rows: the swizzle's period, the SBO
constexpr int kSwizzleAlign = 1024;

// Named barriers (0 is __syncthreads'): all consumers; consumer w alone (D = 64's dS).
constexpr uint32_t kBarrierConsumers = 1;
constexpr uint32_t kBarrierConsumer0 = 2;

constexpr float kLog2e = 1.4426950408889634f;

template <int kD>
struct Config {
  static_assert(kD == 64 || kD == 128, "head dims 64 and 128");
  static constexpr int kBoxes = kD / kBoxColumns;
  static constexpr int kKvBoxBytes = kBlockN * kRowBytes;    // 16 KB: 128 keys x 64 d
  static constexpr int kKvBytes = kBoxes * kKvBoxBytes;
  static constexpr int kQBoxBytes = kBlockM * kRowBytes;     // 8 KB: 64 rows x 64 d
  static constexpr int kQBytes = kBoxes * kQBoxBytes;
  static constexpr int kStages = kD == 64 ? 3 : 2;
  static constexpr bool kDqSplitKeys = kD == 64;             // see the top comment
  static constexpr int kDsBytes = kBlockN * kRowBytes;       // 128 key rows x 64 queries
  static constexpr int kDsBuffers = 2;
  // Byte offsets in the 1024-byte aligned dynamic shared memory.
  static constexpr int kK = 0;
  static constexpr int kV = kK + kKvBytes;
  static constexpr int kQ = kV + kKvBytes;
  static constexpr int kDo = kQ + kStages * kQBytes;
  static constexpr int kDs = kDo + kStages * kQBytes;
  static constexpr int kLse = kDs + kDsBuffers * kDsBytes;
  static constexpr int kDelta = kLse + kStages * kBlockM * 4;
  static constexpr int kBarriers = kDelta + kStages * kBlockM * 4;
  static constexpr int kBarrierCount = 2 * kStages + 1;      // full, empty, K/V
  static constexpr size_t kSmemBytes = kSwizzleAlign + kBarriers + kBarrierCount * 8;
  static_assert(kQ % kSwizzleAlign == 0 && kDo % kSwizzleAlign == 0 &&
                    kDs % kSwizzleAlign == 0 && kQBytes % kSwizzleAlign == 0,
                "TMA and wgmma tiles must be 1024-byte aligned");
  static_assert(kSmemBytes <= 227 * 1024, "one CTA's shared memory");
};

// --- sm_90a helpers that hopper.cuh does not have ------------------------------------------

// The box of 64 d-columns starting at column d0 and row `row` of (head, batch).
__device__ __forceinline__ void tma_load_rows(void* dst, const CUtensorMap* map, uint64_t* bar,
                                              bool packed, int d0, int64_t row, int head,
                                              int batch) {
  if (packed) {
    hopper::tma_load_3d(dst, map, bar, d0, static_cast<int32_t>(row), head);
  } else {
    hopper::tma_load_4d(dst, map, bar, d0, static_cast<int32_t>(row), head, batch);
  }
}

__device__ __forceinline__ float exp2_approx(float x) {  // ex2(-inf) = +0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ void red_add_v4(float* address, float a, float b, float c, float d) {
#if FUSEDOPS_SM90A_ENABLED
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(address), "f"(a), "f"(b),
               "f"(c), "f"(d)
               : "memory");
#endif
}

// Descriptors of one 16-wide k step `kk` of a tile made of 64-column boxes `box_bytes` apart
// (see the top comment and hopper.cuh).
__device__ __forceinline__ uint64_t k_major_descriptor(const uint8_t* tile, int box_bytes,
                                                       int kk) {
  return hopper::smem_descriptor(tile + (kk / 4) * box_bytes + (kk % 4) * kKStepBytes,
                                 /*leading_bytes=*/16, /*stride_bytes=*/kAtomBytes);
}

__device__ __forceinline__ uint64_t mn_major_descriptor(const uint8_t* tile, int box_bytes,
                                                        int kk) {
  return hopper::smem_descriptor(tile + kk * kMnStepBytes, /*leading_bytes=*/box_bytes,
                                 /*stride_bytes=*/kAtomBytes);
}

// --- wgmma --------------------------------------------------------------------------------

#define FUSEDOPS_ACC8(c, i)                                                          \
  c(d[i]), c(d[i + 1]), c(d[i + 2]), c(d[i + 3]), c(d[i + 4]), c(d[i + 5]), c(d[i + 6]), \
      c(d[i + 7])
#define FUSEDOPS_ACC32(c) \
  FUSEDOPS_ACC8(c, 0), FUSEDOPS_ACC8(c, 8), FUSEDOPS_ACC8(c, 16), FUSEDOPS_ACC8(c, 24)
#define FUSEDOPS_ACC64(c)                                                                 \
  FUSEDOPS_ACC8(c, 0), FUSEDOPS_ACC8(c, 8), FUSEDOPS_ACC8(c, 16), FUSEDOPS_ACC8(c, 24), \
      FUSEDOPS_ACC8(c, 32), FUSEDOPS_ACC8(c, 40), FUSEDOPS_ACC8(c, 48), FUSEDOPS_ACC8(c, 56)
#define FUSEDOPS_D32                                                                        \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, " \
  "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define FUSEDOPS_D64                                                                        \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, " \
  "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "  \
  "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, "  \
  "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
// SS m64n64k16: d = 32 registers, then desc_a %32, desc_b %33, trans-a %34, trans-b %35.
#define FUSEDOPS_WGMMA_SS_N64(TYPE, SCALE_D)                                              \
  "{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE_D ", 0;\n"                                   \
  "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " " FUSEDOPS_D32           \
  ", %32, %33, p, 1, 1, %34, %35;\n}\n"
// RS m64nNk16, accumulating, B MN-major: d, then a %N/2 .. %N/2+3, desc_b %N/2+4.
#define FUSEDOPS_WGMMA_RS(SHAPE, TYPE, DREGS, A0, A1, A2, A3, DESC)                     \
  "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                             \
  "wgmma.mma_async.sync.aligned." SHAPE ".f32." TYPE "." TYPE " " DREGS ", {" A0 ", " A1 \
  ", " A2 ", " A3 "}, " DESC ", p, 1, 1, 1;\n}\n"

// d (64 x 64 float32 of one warpgroup) = or += A (64 x 16) B (64 x 16)^T, both operands in
// shared memory (trans = 1: MN-major).
template <typename T, int kTransA, int kTransB, bool kAccumulate>
__device__ __forceinline__ void wgmma_ss_m64n64(float (&d)[32], uint64_t desc_a,
                                                uint64_t desc_b) {
#if FUSEDOPS_SM90A_ENABLED
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  if constexpr (kAccumulate && kBf16) {
    asm volatile(FUSEDOPS_WGMMA_SS_N64("bf16", "1")
                 : FUSEDOPS_ACC32("+f")
                 : "l"(desc_a), "l"(desc_b), "n"(kTransA), "n"(kTransB));
  } else if constexpr (kAccumulate) {
    asm volatile(FUSEDOPS_WGMMA_SS_N64("f16", "1")
                 : FUSEDOPS_ACC32("+f")
                 : "l"(desc_a), "l"(desc_b), "n"(kTransA), "n"(kTransB));
  } else if constexpr (kBf16) {  // scale-d = 0: d's old value is not read
    asm volatile(FUSEDOPS_WGMMA_SS_N64("bf16", "0")
                 : FUSEDOPS_ACC32("=f")
                 : "l"(desc_a), "l"(desc_b), "n"(kTransA), "n"(kTransB));
  } else {
    asm volatile(FUSEDOPS_WGMMA_SS_N64("f16", "0")
                 : FUSEDOPS_ACC32("=f")
                 : "l"(desc_a), "l"(desc_b), "n"(kTransA), "n"(kTransB));
  }
#endif
}

// d (64 x kN float32) += A (64 x 16, registers: the four 32-bit registers of the m64k16
// fragment) B (kN x 16)^T with B MN-major in shared memory.
template <typename T, int kN>
__device__ __forceinline__ void wgmma_rs(float (&d)[kN / 2], const uint32_t* a,
                                         uint64_t desc_b) {
#if FUSEDOPS_SM90A_ENABLED
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  if constexpr (kN == 64 && kBf16) {
    asm volatile(FUSEDOPS_WGMMA_RS("m64n64k16", "bf16", FUSEDOPS_D32, "%32", "%33", "%34",
                                   "%35", "%36")
                 : FUSEDOPS_ACC32("+f")
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));
  } else if constexpr (kN == 64) {
    asm volatile(FUSEDOPS_WGMMA_RS("m64n64k16", "f16", FUSEDOPS_D32, "%32", "%33", "%34",
                                   "%35", "%36")
                 : FUSEDOPS_ACC32("+f")
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));
  } else if constexpr (kBf16) {
    static_assert(kN == 128, "n64 or n128");
    asm volatile(FUSEDOPS_WGMMA_RS("m64n128k16", "bf16", FUSEDOPS_D64, "%64", "%65", "%66",
                                   "%67", "%68")
                 : FUSEDOPS_ACC64("+f")
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));
  } else {
    static_assert(kN == 128, "n64 or n128");
    asm volatile(FUSEDOPS_WGMMA_RS("m64n128k16", "f16", FUSEDOPS_D64, "%64", "%65", "%66",
                                   "%67", "%68")
                 : FUSEDOPS_ACC64("+f")
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));
  }
#endif
}

#undef FUSEDOPS_WGMMA_RS
#undef FUSEDOPS_WGMMA_SS_N64
#undef FUSEDOPS_D64
#undef FUSEDOPS_D32
#undef FUSEDOPS_ACC64
#undef FUSEDOPS_ACC32
#undef FUSEDOPS_ACC8

// --- addressing shared by the kernels -------------------------------------------------------

// Element (row, head, 0) of a q/k/v-shaped tensor, `row` counted in the packed row space
// (sequence begin + row) or, batched, inside sequence b.
template <typename T>
__device__ __forceinline__ T* row_pointer(const AttentionTensor& t, bool packed, int b,
                                          int64_t row, int head) {
  int64_t offset = row * t.row_stride + static_cast<int64_t>(head) * t.head_stride;
  if (!packed) offset += static_cast<int64_t>(b) * t.batch_stride;
  return static_cast<T*>(t.data) + offset;
}

// Row of grad_q_accum (a contiguous (B, Sq, Hq, D) or (Tq, Hq, D) tensor) of row s of
// sequence b.
__device__ __forceinline__ int64_t accum_row(const AttentionProblem& p, int b,
                                             int64_t sequence_begin, int64_t s) {
  if (p.cu_seqlens_q != nullptr) return sequence_begin + s;
  return static_cast<int64_t>(b) * p.seqlen_q + s;
}

// Zeroes rows [first, rows) of every box of a tile of `boxes` boxes of `rows` 128-byte rows:
// whole rows, so the swizzle (a permutation inside each row) does not matter.
__device__ __forceinline__ void zero_tile_rows(uint8_t* tile, int boxes, int rows, int first,
                                               int thread, int threads) {
  const int zero_rows = rows - first;
  const int chunks = boxes * zero_rows * (kRowBytes / 16);
  for (int i = thread; i < chunks; i += threads) {
    const int chunk = i % (kRowBytes / 16);
    const int row = first + (i / (kRowBytes / 16)) % zero_rows;
    const int box = i / ((kRowBytes / 16) * zero_rows);
    *reinterpret_cast<uint4*>(tile + (box * rows + row) * kRowBytes + chunk * 16) =
        make_uint4(0u, 0u, 0u, 0u);
  }
}

// --- 1. delta = rowsum(dout * out) -------------------------------------------------------------

constexpr int kRowKernelThreads = 256;
constexpr int kRowKernelRows = 64;  // rows of one (head, sequence) per block

// Grid (row blocks of 64, Hq, B). kD / 8 lanes share a row, 16 bytes each.
template <typename T, int kD>
__global__ void __launch_bounds__(kRowKernelThreads)
    attention_bwd_sm90_delta_kernel(const AttentionBwdParams params) {
  constexpr int kVectors = kD / Vec<T>::kSize;
  constexpr int kRowsPerPass = kRowKernelThreads / kVectors;
  static_assert(kRowKernelRows % kRowsPerPass == 0, "uniform trip count for the shuffles");
  const AttentionProblem& p = params.problem;
  const bool packed = p.cu_seqlens_q != nullptr;
  const int b = blockIdx.z;
  const int head = blockIdx.y;
  const SequenceRows sq = clamp_sequence(p.cu_seqlens_q, b, p.total_q, p.seqlen_q);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowKernelRows;
  if (row0 >= sq.length) return;
  const int vector = threadIdx.x % kVectors;
  for (int r = threadIdx.x / kVectors; r < kRowKernelRows; r += kRowsPerPass) {
    const int64_t s = row0 + r;
    const bool valid = s < sq.length;
    float sum = 0.f;
    if (valid) {
      const Vec<T> o = load_vec(row_pointer<const T>(params.out, packed, b, sq.begin + s, head) +
                                vector * Vec<T>::kSize);
      const Vec<T> g = load_vec(
          row_pointer<const T>(params.grad_out, packed, b, sq.begin + s, head) +
          vector * Vec<T>::kSize);
#pragma unroll
      for (int e = 0; e < Vec<T>::kSize; ++e) sum += to_float(o.v[e]) * to_float(g.v[e]);
    }
#pragma unroll
    for (int offset = kVectors / 2; offset > 0; offset /= 2) {
      sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    }
    if (valid && vector == 0) params.delta[lse_index(p, b, head, sq.begin, s)] = sum;
  }
}

// --- 3. grad_q = scale * grad_q_accum ----------------------------------------------------------

template <typename T, int kD>
__global__ void __launch_bounds__(kRowKernelThreads)
    attention_bwd_sm90_convert_dq_kernel(const AttentionBwdParams params) {
  constexpr int kVectors = kD / Vec<T>::kSize;
  constexpr int kRowsPerPass = kRowKernelThreads / kVectors;
  const AttentionProblem& p = params.problem;
  const bool packed = p.cu_seqlens_q != nullptr;
  const int b = blockIdx.z;
  const int head = blockIdx.y;
  const SequenceRows sq = clamp_sequence(p.cu_seqlens_q, b, p.total_q, p.seqlen_q);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowKernelRows;
  if (row0 >= sq.length) return;
  const int vector = threadIdx.x % kVectors;
  for (int r = threadIdx.x / kVectors; r < kRowKernelRows; r += kRowsPerPass) {
    const int64_t s = row0 + r;
    if (s >= sq.length) break;
    const float* accum = params.grad_q_accum +
                         (accum_row(p, b, sq.begin, s) * p.heads_q + head) * kD +
                         vector * Vec<T>::kSize;
    const float4 lo = *reinterpret_cast<const float4*>(accum);
    const float4 hi = *reinterpret_cast<const float4*>(accum + 4);
    const float x[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    Vec<T> out;
#pragma unroll
    for (int e = 0; e < Vec<T>::kSize; ++e) out.v[e] = from_float<T>(x[e] * p.scale);
    store_vec(row_pointer<T>(params.grad_q, packed, b, sq.begin + s, head) +
                  vector * Vec<T>::kSize,
              out);
  }
}

// --- 2. the main kernel ----------------------------------------------------------------------

// Writes zeros to grad_k and grad_v of keys [n0, n0 + count) of (sequence, kv head), with
// every thread of the CTA: the keys no query sees.
template <typename T, int kD>
__device__ __forceinline__ void zero_key_gradients(const AttentionBwdParams& params, bool packed,
                                                   int b, int head_kv, int64_t first_row,
                                                   int count) {
  constexpr int kVectors = kD / Vec<T>::kSize;
  Vec<T> zero;
#pragma unroll
  for (int e = 0; e < Vec<T>::kSize; ++e) zero.v[e] = from_float<T>(0.f);
  for (int i = threadIdx.x; i < count * kVectors; i += blockDim.x) {
    const int64_t row = first_row + i / kVectors;
    const int column = (i % kVectors) * Vec<T>::kSize;
    store_vec(row_pointer<T>(params.grad_k, packed, b, row, head_kv) + column, zero);
    store_vec(row_pointer<T>(params.grad_v, packed, b, row, head_kv) + column, zero);
  }
}

// Grid (key blocks of 128, Hkv, B); 384 threads (see the top comment).
template <typename T, int kD>
__global__ void __launch_bounds__(kThreads, 1)
    attention_bwd_sm90_kernel(const __grid_constant__ CUtensorMap map_q,
                              const __grid_constant__ CUtensorMap map_k,
                              const __grid_constant__ CUtensorMap map_v,
                              const __grid_constant__ CUtensorMap map_do,
                              const AttentionBwdParams params) {
#if FUSEDOPS_SM90A_ENABLED
  using C = Config<kD>;
  const AttentionProblem& pr = params.problem;
  const bool packed = pr.cu_seqlens_q != nullptr;
  const int b = blockIdx.z;
  const int head_kv = blockIdx.y;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBlockN;
  const SequenceRows sq = clamp_sequence(pr.cu_seqlens_q, b, pr.total_q, pr.seqlen_q);
  const SequenceRows sk = clamp_sequence(pr.cu_seqlens_k, b, pr.total_k, pr.seqlen_k);
  const int64_t len_q = sq.length;
  const int64_t len_k = sk.length;
  if (n0 >= len_k) return;  // past this sequence's keys (uniform: before any barrier)
  const int key_limit = static_cast<int>(len_k - n0 < kBlockN ? len_k - n0 : kBlockN);
  const KeyRange rows = rows_seeing_keys(n0, n0 + kBlockN, len_q, len_k, pr.window_left,
                                         pr.window_right);
  if (rows.last < rows.first) {  // no query sees these keys: their gradients are 0
    zero_key_gradients<T, kD>(params, packed, b, head_kv, sk.begin + n0, key_limit);
    return;
  }
  const int64_t m_first = rows.first / kBlockM;
  const int64_t m_last = rows.last / kBlockM;
  const int group = pr.heads_q / pr.heads_kv;

  // 1024-byte alignment for the swizzled tiles, by an offset from the __shared__ array (not
  // through an integer) so that every access stays a shared-memory one (STS/LDS, not ST/LD).
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + (kSwizzleAlign - hopper::smem_address(smem_raw) % kSwizzleAlign) %
                                 kSwizzleAlign;
  uint8_t* tile_k = smem + C::kK;
  uint8_t* tile_v = smem + C::kV;
  uint8_t* tiles_q = smem + C::kQ;
  uint8_t* tiles_do = smem + C::kDo;
  uint8_t* tiles_ds = smem + C::kDs;
  float* stage_lse = reinterpret_cast<float*>(smem + C::kLse);
  float* stage_delta = reinterpret_cast<float*>(smem + C::kDelta);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + C::kBarriers);
  uint64_t* empty = full + C::kStages;
  uint64_t* kv_full = empty + C::kStages;

  const int warpgroup = threadIdx.x / kWarpgroupThreads;
  const int thread = threadIdx.x % kWarpgroupThreads;
  if (threadIdx.x == 0) {
    for (int s = 0; s < C::kStages; ++s) {
      hopper::mbarrier_init(&full[s], 32);              // the producer warp's lanes
      hopper::mbarrier_init(&empty[s], kConsumers * 4);  // one per consumer warp
    }
    hopper::mbarrier_init(kv_full, 1);
    hopper::mbarrier_init_fence();
  }
  __syncthreads();

  // The row coordinates of this sequence's rows in the tensor maps.
  const int64_t q_row0 = packed ? sq.begin : 0;
  const int64_t k_row0 = packed ? sk.begin : 0;

  if (warpgroup == kConsumers) {
    // ---- The producer.
    hopper::release_registers<kProducerRegisters>();
    if (thread >= 32) return;
    const int lane = thread;
    if (lane == 0) {
      hopper::tma_prefetch_descriptor(&map_q);
      hopper::tma_prefetch_descriptor(&map_k);
      hopper::tma_prefetch_descriptor(&map_v);
      hopper::tma_prefetch_descriptor(&map_do);
      hopper::mbarrier_arrive_expect_tx(kv_full, 2 * C::kKvBytes);
#pragma unroll
      for (int c = 0; c < C::kBoxes; ++c) {
        tma_load_rows(tile_k + c * C::kKvBoxBytes, &map_k, kv_full, packed, c * kBoxColumns,
                      k_row0 + n0, head_kv, b);
        tma_load_rows(tile_v + c * C::kKvBoxBytes, &map_v, kv_full, packed, c * kBoxColumns,
                      k_row0 + n0, head_kv, b);
      }
    }
    int stage = 0;
    uint32_t phase = 0;
    for (int member = 0; member < group; ++member) {
      const int head = head_kv * group + member;
      for (int64_t mb = m_first; mb <= m_last; ++mb) {
        const int64_t m0 = mb * kBlockM;
        hopper::mbarrier_wait(&empty[stage], phase ^ 1);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int r = lane + 32 * half;
          const int64_t s = m0 + r;
          float lse_log2 = __int_as_float(0x7f800000);  // +inf: p = 0 past the sequence
          float delta = 0.f;
          if (s < len_q) {
            const int64_t index = lse_index(pr, b, head, sq.begin, s);
            const float lse = params.lse[index];
            lse_log2 = lse == -__int_as_float(0x7f800000) ? __int_as_float(0x7f800000)
                                                          : lse * kLog2e;
            delta = params.delta[index];
          }
          stage_lse[stage * kBlockM + r] = lse_log2;
          stage_delta[stage * kBlockM + r] = delta;
        }
        if (lane == 0) {
          hopper::mbarrier_arrive_expect_tx(&full[stage], 2 * C::kQBytes);
#pragma unroll
          for (int c = 0; c < C::kBoxes; ++c) {
            tma_load_rows(tiles_q + stage * C::kQBytes + c * C::kQBoxBytes, &map_q,
                          &full[stage], packed, c * kBoxColumns, q_row0 + m0, head, b);
            tma_load_rows(tiles_do + stage * C::kQBytes + c * C::kQBoxBytes, &map_do,
                          &full[stage], packed, c * kBoxColumns, q_row0 + m0, head, b);
          }
        } else {
          hopper::mbarrier_arrive(&full[stage]);
        }
        if (++stage == C::kStages) {
          stage = 0;
          phase ^= 1;
        }
      }
    }
    return;
  }

  // ---- A consumer: keys [64 w, 64 w + 64) of the block.
  hopper::claim_registers<kConsumerRegisters>();
  const int w = warpgroup;
  const int warp = thread / 32;
  const int lane = thread % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int consumer_thread = threadIdx.x;  // 0..255 across both consumers
  // The local key (row of this thread's accumulators) for register pairs h = 0; +8 for h = 1.
  const int key_row = kConsumerKeys * w + 16 * warp + g;
  const float scale_log2 = pr.scale * kLog2e;

  float dk[kD / 2];
  float dv[kD / 2];
#pragma unroll
  for (int i = 0; i < kD / 2; ++i) {
    dk[i] = 0.f;
    dv[i] = 0.f;
  }

  hopper::mbarrier_wait(kv_full, 0);
  if (packed && key_limit < kBlockN) {  // the next sequence's keys: zeros, not its data
    zero_tile_rows(tile_k, C::kBoxes, kBlockN, key_limit, consumer_thread, kConsumerThreads);
    zero_tile_rows(tile_v, C::kBoxes, kBlockN, key_limit, consumer_thread, kConsumerThreads);
    hopper::fence_proxy_async_shared();
    hopper::named_barrier_sync(kBarrierConsumers, kConsumerThreads);
  }

  const uint8_t* my_k = tile_k + kConsumerKeys * w * kRowBytes;
  const uint8_t* my_v = tile_v + kConsumerKeys * w * kRowBytes;
  int stage = 0;
  uint32_t phase = 0;
  int ds_buffer = 0;
  for (int member = 0; member < group; ++member) {
    const int head = head_kv * group + member;
    for (int64_t mb = m_first; mb <= m_last; ++mb) {
      const int64_t m0 = mb * kBlockM;
      uint8_t* q_stage = tiles_q + stage * C::kQBytes;
      uint8_t* do_stage = tiles_do + stage * C::kQBytes;
      hopper::mbarrier_wait(&full[stage], phase);
      if (packed && m0 + kBlockM > len_q) {  // the next sequence's rows: zeros
        const int first = static_cast<int>(len_q - m0);
        zero_tile_rows(q_stage, C::kBoxes, kBlockM, first, consumer_thread, kConsumerThreads);
        zero_tile_rows(do_stage, C::kBoxes, kBlockM, first, consumer_thread, kConsumerThreads);
        hopper::fence_proxy_async_shared();
        hopper::named_barrier_sync(kBarrierConsumers, kConsumerThreads);
      }
      // Mask: none when every row of the block (inside the sequence) sees every key.
      const KeyRange seen = keys_seen_by_all(m0, m0 + kBlockM, len_q, len_k, pr.window_left,
                                             pr.window_right);
      const bool masked = !(seen.first <= n0 && seen.last >= n0 + kBlockN - 1);
      int lo = 0, hi = 0;
      if (masked) {
        const int64_t rel = n0 - m0 - (len_k - len_q);
        const int64_t lo64 = -static_cast<int64_t>(pr.window_left) - rel;
        const int64_t hi64 = static_cast<int64_t>(pr.window_right) - rel;
        lo = static_cast<int>(lo64 < -256 ? -256 : (lo64 > 256 ? 256 : lo64));
        hi = static_cast<int>(hi64 < -256 ? -256 : (hi64 > 256 ? 256 : hi64));
      }

      // S^T = K_w Q^T and dP^T = V_w dO^T.
      float s[32];
      float dp[32];
      hopper::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        const uint64_t a = k_major_descriptor(my_k, C::kKvBoxBytes, kk);
        const uint64_t bq = k_major_descriptor(q_stage, C::kQBoxBytes, kk);
        if (kk == 0) {
          wgmma_ss_m64n64<T, 0, 0, false>(s, a, bq);
        } else {
          wgmma_ss_m64n64<T, 0, 0, true>(s, a, bq);
        }
      }
      hopper::wgmma_commit_group();
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        const uint64_t a = k_major_descriptor(my_v, C::kKvBoxBytes, kk);
        const uint64_t bdo = k_major_descriptor(do_stage, C::kQBoxBytes, kk);
        if (kk == 0) {
          wgmma_ss_m64n64<T, 0, 0, false>(dp, a, bdo);
        } else {
          wgmma_ss_m64n64<T, 0, 0, true>(dp, a, bdo);
        }
      }
      hopper::wgmma_commit_group();

      // P^T: this thread's queries are 8 j + 2 t + {0, 1}; its keys key_row + 8 h.
      const float* lse_s = stage_lse + stage * kBlockM;
      const float* delta_s = stage_delta + stage * kBlockM;
      hopper::wgmma_wait_group<1>();
      hopper::fence_registers(s);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float2 lse2 = *reinterpret_cast<const float2*>(lse_s + 8 * j + 2 * t);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float p0 = exp2_approx(fmaf(s[4 * j + 2 * h], scale_log2, -lse2.x));
          float p1 = exp2_approx(fmaf(s[4 * j + 2 * h + 1], scale_log2, -lse2.y));
          if (masked) {
            const int kl = key_row + 8 * h;
            const int rel0 = kl - (8 * j + 2 * t);  // kl - ql of the first column
            const bool key_in = kl < key_limit;
            p0 = key_in && rel0 >= lo && rel0 <= hi ? p0 : 0.f;
            p1 = key_in && rel0 - 1 >= lo && rel0 - 1 <= hi ? p1 : 0.f;
          }
          s[4 * j + 2 * h] = p0;
          s[4 * j + 2 * h + 1] = p1;
        }
      }
      uint32_t p_frag[16];
#pragma unroll
      for (int r = 0; r < 16; ++r) p_frag[r] = pack2<T>(s[2 * r], s[2 * r + 1]);

      // dV += P^T dO (A fragment of k step kk = p_frag[4 kk .. 4 kk + 3]).
      hopper::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBlockM / 16; ++kk) {
        wgmma_rs<T, kD>(dv, &p_frag[4 * kk],
                        mn_major_descriptor(do_stage, C::kQBoxBytes, kk));
      }
      hopper::wgmma_commit_group();

      // dS^T = P^T (dP^T - delta).
      hopper::wgmma_wait_group<1>();  // dP^T (dV may still run)
      hopper::fence_registers(dp);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float2 delta2 = *reinterpret_cast<const float2*>(delta_s + 8 * j + 2 * t);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          dp[4 * j + 2 * h] = s[4 * j + 2 * h] * (dp[4 * j + 2 * h] - delta2.x);
          dp[4 * j + 2 * h + 1] = s[4 * j + 2 * h + 1] * (dp[4 * j + 2 * h + 1] - delta2.y);
        }
      }
      uint32_t ds_frag[16];
#pragma unroll
      for (int r = 0; r < 16; ++r) ds_frag[r] = pack2<T>(dp[2 * r], dp[2 * r + 1]);

      // dK += dS^T Q.
      hopper::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBlockM / 16; ++kk) {
        wgmma_rs<T, kD>(dk, &ds_frag[4 * kk], mn_major_descriptor(q_stage, C::kQBoxBytes, kk));
      }
      hopper::wgmma_commit_group();

      // dS^T -> the MN-major dS tile: (key, queries 8 j + 2 t, +1) of register pair (j, h) =
      // ds_frag[2 j + h]; chunk j of row key lies at chunk j ^ (key % 8), key % 8 = g.
      uint8_t* ds_tile = tiles_ds + ds_buffer * C::kDsBytes;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int key = key_row + 8 * h;
          *reinterpret_cast<uint32_t*>(ds_tile + key * kRowBytes + ((j ^ g) << 4) + 4 * t) =
              ds_frag[2 * j + h];
        }
      }
      hopper::fence_proxy_async_shared();
      if constexpr (C::kDqSplitKeys) {  // literal ids: ptxas then reserves 4 barriers, not 16
        if (w == 0) {
          hopper::named_barrier_sync(kBarrierConsumer0, kWarpgroupThreads);
        } else {
          hopper::named_barrier_sync(kBarrierConsumer0 + 1, kWarpgroupThreads);
        }
      } else {
        hopper::named_barrier_sync(kBarrierConsumers, kConsumerThreads);
      }

      // dQ = dS K: D = 64, this consumer's keys; D = 128, columns [64 w, 64 w + 64).
      constexpr int kDqSteps = C::kDqSplitKeys ? kConsumerKeys / 16 : kBlockN / 16;
      const uint8_t* dq_a =
          C::kDqSplitKeys ? ds_tile + kConsumerKeys * w * kRowBytes : ds_tile;
      const uint8_t* dq_b = C::kDqSplitKeys ? tile_k + kConsumerKeys * w * kRowBytes
                                            : tile_k + w * C::kKvBoxBytes;
      float dq[32];
      hopper::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kDqSteps; ++kk) {
        const uint64_t a = mn_major_descriptor(dq_a, C::kDsBytes, kk);
        const uint64_t bk = mn_major_descriptor(dq_b, C::kKvBoxBytes, kk);
        if (kk == 0) {
          wgmma_ss_m64n64<T, 1, 1, false>(dq, a, bk);
        } else {
          wgmma_ss_m64n64<T, 1, 1, true>(dq, a, bk);
        }
      }
      hopper::wgmma_commit_group();
      hopper::wgmma_wait_group<0>();
      hopper::fence_registers(dq);
      __syncwarp();
      if (lane == 0) hopper::mbarrier_arrive(&empty[stage]);  // Q, dO, lse, delta read

      // dQ -> grad_q_accum. Lanes t and t ^ 1 trade halves so that each adds 4 consecutive
      // columns: even t row 16 warp + g, odd t row + 8, columns 8 j + 4 (t / 2) .. + 3.
      const int64_t q_local = m0 + 16 * warp + g + 8 * (t & 1);
      const bool odd = (t & 1) != 0;
      float* dq_row = params.grad_q_accum +
                      (accum_row(pr, b, sq.begin, q_local) * pr.heads_q + head) * kD +
                      (C::kDqSplitKeys ? 0 : kBoxColumns * w) + 4 * (t >> 1);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float send0 = odd ? dq[4 * j] : dq[4 * j + 2];
        const float send1 = odd ? dq[4 * j + 1] : dq[4 * j + 3];
        const float got0 = __shfl_xor_sync(0xffffffffu, send0, 1);
        const float got1 = __shfl_xor_sync(0xffffffffu, send1, 1);
        if (q_local < len_q) {
          red_add_v4(dq_row + 8 * j, odd ? got0 : dq[4 * j], odd ? got1 : dq[4 * j + 1],
                     odd ? dq[4 * j + 2] : got0, odd ? dq[4 * j + 3] : got1);
        }
      }

      ds_buffer ^= 1;
      if (++stage == C::kStages) {
        stage = 0;
        phase ^= 1;
      }
    }
  }

  // dK (times scale) and dV of this consumer's keys, once: rows key_row + 8 h, columns
  // 8 j + 2 t, + 1.
  hopper::fence_registers(dk);
  hopper::fence_registers(dv);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int key = key_row + 8 * h;
    if (key < key_limit) {
      T* dk_row = row_pointer<T>(params.grad_k, packed, b, sk.begin + n0 + key, head_kv);
      T* dv_row = row_pointer<T>(params.grad_v, packed, b, sk.begin + n0 + key, head_kv);
#pragma unroll
      for (int j = 0; j < kD / 8; ++j) {
        const int column = 8 * j + 2 * t;
        *reinterpret_cast<uint32_t*>(dk_row + column) =
            pack2<T>(dk[4 * j + 2 * h] * pr.scale, dk[4 * j + 2 * h + 1] * pr.scale);
        *reinterpret_cast<uint32_t*>(dv_row + column) =
            pack2<T>(dv[4 * j + 2 * h], dv[4 * j + 2 * h + 1]);
      }
    }
  }
#else
  __trap();  // built without sm_90a code: the launcher never starts this kernel then
#endif
}

// --- host -----------------------------------------------------------------------------------

// The TMA map of a q/k/v-shaped tensor: (d, row, head[, batch]) with boxes of 64 d x
// box_rows rows x 1 x 1, 128-byte swizzle. `rows` is the row extent: Sq / Sk batched (rows
// past it read as zeros), Tq / Tk packed.
template <typename T>
cudaError_t rows_tensor_map(CUtensorMap* map, const AttentionTensor& tensor, bool packed,
                            int head_dim, int64_t rows, int heads, int batch,
                            uint32_t box_rows) {
  constexpr uint64_t kBytes = sizeof(T);
  // bindings.cpp gives a dimension of extent 1 the stride 0; any valid stride does there.
  auto stride_bytes = [&](int64_t stride) -> cuuint64_t {
    return stride > 0 ? static_cast<cuuint64_t>(stride) * kBytes
                      : static_cast<cuuint64_t>(head_dim) * kBytes;
  };
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(head_dim), static_cast<cuuint64_t>(rows),
                              static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  const cuuint64_t strides[3] = {stride_bytes(tensor.row_stride),
                                 stride_bytes(tensor.head_stride),
                                 stride_bytes(tensor.batch_stride)};
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(kBoxColumns), box_rows, 1, 1};
  return make_tensor_map(map, tensor.data, tensor_map_type<T>(), packed ? 3 : 4, dims, strides,
                         box);
}

// TMA needs 16-byte aligned data and strides that are multiples of 16 bytes (8 elements),
// below 2**40 bytes; an extent-1 dimension's stride is replaced (rows_tensor_map).
bool tma_tensor_ok(const AttentionTensor& t, bool packed) {
  auto stride_ok = [](int64_t stride) {
    return stride >= 0 && stride % 8 == 0 && stride < (int64_t{1} << 38);
  };
  return t.data != nullptr && reinterpret_cast<uintptr_t>(t.data) % 16 == 0 &&
         stride_ok(t.row_stride) && stride_ok(t.head_stride) &&
         (packed || stride_ok(t.batch_stride));
}

// Whether this file's sm_90a code can run on `device` (compute capability 9.0, sm_90a machine
// code in the build, the driver's tensor-map encoder).
bool sm90a_kernels_run(int device) {
  static std::atomic<int> known[64] = {};
  const void* kernel =
      reinterpret_cast<const void*>(&attention_bwd_sm90_kernel<__nv_bfloat16, 128>);
  return fusedops::sm90a_code_runs(kernel, device, known);
}

template <typename T, int kD>
cudaError_t launch(const AttentionBwdParams& params, int device, cudaStream_t stream) {
  using C = Config<kD>;
  const AttentionProblem& p = params.problem;
  const bool packed = p.cu_seqlens_q != nullptr;
  const dim3 row_grid(static_cast<unsigned>((p.seqlen_q + kRowKernelRows - 1) / kRowKernelRows),
                      static_cast<unsigned>(p.heads_q), static_cast<unsigned>(p.batch));
  if (p.seqlen_q > 0) {
    attention_bwd_sm90_delta_kernel<T, kD><<<row_grid, kRowKernelThreads, 0, stream>>>(params);
    FUSEDOPS_RETURN_IF_ERROR(cudaGetLastError());
  }
  if (p.seqlen_k > 0) {
    const int64_t rows_q = packed ? p.total_q : p.seqlen_q;
    const int64_t rows_k = packed ? p.total_k : p.seqlen_k;
    CUtensorMap map_q, map_k, map_v, map_do;
    FUSEDOPS_RETURN_IF_ERROR(rows_tensor_map<T>(&map_q, p.q, packed, kD, rows_q, p.heads_q,
                                                p.batch, kBlockM));
    FUSEDOPS_RETURN_IF_ERROR(rows_tensor_map<T>(&map_do, params.grad_out, packed, kD, rows_q,
                                                p.heads_q, p.batch, kBlockM));
    FUSEDOPS_RETURN_IF_ERROR(rows_tensor_map<T>(&map_k, p.k, packed, kD, rows_k, p.heads_kv,
                                                p.batch, kBlockN));
    FUSEDOPS_RETURN_IF_ERROR(rows_tensor_map<T>(&map_v, p.v, packed, kD, rows_k, p.heads_kv,
                                                p.batch, kBlockN));
    auto kernel = attention_bwd_sm90_kernel<T, kD>;
    static std::atomic<uint64_t> configured_devices{0};
    const uint64_t bit = uint64_t{1} << (device % 64);
    if ((configured_devices.load(std::memory_order_relaxed) & bit) == 0) {
      FUSEDOPS_RETURN_IF_ERROR(cudaFuncSetAttribute(
          kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(C::kSmemBytes)));
      configured_devices.fetch_or(bit, std::memory_order_relaxed);
    }
    const dim3 grid(static_cast<unsigned>((p.seqlen_k + kBlockN - 1) / kBlockN),
                    static_cast<unsigned>(p.heads_kv), static_cast<unsigned>(p.batch));
    kernel<<<grid, kThreads, C::kSmemBytes, stream>>>(map_q, map_k, map_v, map_do, params);
    FUSEDOPS_RETURN_IF_ERROR(cudaGetLastError());
  }
  if (p.seqlen_q > 0) {
    attention_bwd_sm90_convert_dq_kernel<T, kD>
        <<<row_grid, kRowKernelThreads, 0, stream>>>(params);
    FUSEDOPS_RETURN_IF_ERROR(cudaGetLastError());
  }
  return cudaSuccess;
}

}  // namespace

// Head dims 64 and 128 in 16-bit types, tensors TMA can address, grids that fit. Whether the
// call is deterministic is not part of the problem: attention.cu sends deterministic calls to
// the sm_80 backward (this one adds dQ with atomics).
bool attention_bwd_sm90_covers(const AttentionProblem& problem) {
  const AttentionProblem& p = problem;
  if (p.type != AttentionType::kFloat16 && p.type != AttentionType::kBFloat16) return false;
  if (p.head_dim != 64 && p.head_dim != 128) return false;
  if (p.batch < 1 || p.batch > 65535 || p.heads_kv < 1 || p.heads_kv > 65535 ||
      p.heads_q < p.heads_kv || p.heads_q > 65535 || p.heads_q % p.heads_kv != 0) {
    return false;
  }
  const bool packed = p.cu_seqlens_q != nullptr;
  if (packed != (p.cu_seqlens_k != nullptr)) return false;
  constexpr int64_t kMaxRows = INT32_MAX;  // TMA coordinates are int32
  if (p.seqlen_q < 0 || p.seqlen_k < 0 || p.seqlen_q > kMaxRows || p.seqlen_k > kMaxRows) {
    return false;
  }
  if (packed && (p.total_q < 0 || p.total_k < 0 || p.total_q > kMaxRows ||
                 p.total_k > kMaxRows)) {
    return false;
  }
  return tma_tensor_ok(p.q, packed) && tma_tensor_ok(p.k, packed) && tma_tensor_ok(p.v, packed);
}

cudaError_t attention_bwd_sm90(const AttentionBwdParams& params, cudaStream_t stream) {
  const AttentionProblem& p = params.problem;
  const bool packed = p.cu_seqlens_q != nullptr;
  // The deterministic backward is the sm_80 one (attention.cu never sends it here).
  if (params.deterministic) return cudaErrorInvalidValue;
  if (!attention_bwd_sm90_covers(p)) return cudaErrorNotSupported;
  if (params.lse == nullptr || params.delta == nullptr || params.grad_q_accum == nullptr ||
      reinterpret_cast<uintptr_t>(params.grad_q_accum) % 16 != 0 ||
      !tma_tensor_ok(params.grad_out, packed) || !tma_tensor_ok(params.out, packed) ||
      !tma_tensor_ok(params.grad_q, packed) || !tma_tensor_ok(params.grad_k, packed) ||
      !tma_tensor_ok(params.grad_v, packed)) {
    return cudaErrorInvalidValue;
  }
  // No rows or no keys at all: bindings.cpp handles these (zeros); nothing is launched here.
  if (p.seqlen_q == 0 || p.seqlen_k == 0 || (packed && (p.total_q == 0 || p.total_k == 0))) {
    return cudaSuccess;
  }
  int device = 0;
  FUSEDOPS_RETURN_IF_ERROR(cudaGetDevice(&device));
  if (!sm90a_kernels_run(device)) return cudaErrorNotSupported;
  const bool bf16 = p.type == AttentionType::kBFloat16;
  if (p.head_dim == 64) {
    return bf16 ? launch<__nv_bfloat16, 64>(params, device, stream)
                : launch<__half, 64>(params, device, stream);
  }
  return bf16 ? launch<__nv_bfloat16, 128>(params, device, stream)
              : launch<__half, 128>(params, device, stream);
}

}  // namespace fusedops
