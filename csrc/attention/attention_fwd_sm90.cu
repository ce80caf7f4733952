// attention_fwd_sm90.cu — the FlashAttention-3-style forward for sm_90a: TMA, wgmma with the
// probabilities fed from registers, warp specialization and an mbarrier ring.
//
// The math is attention.h's: for query row i of a sequence and the keys j it sees
// (attention_mask.cuh), s_ij = q_i . k_j * scale, lse_i = log sum_j exp(s_ij) and
// out_i = sum_j exp(s_ij - lse_i) v_j; a row that sees no key gets out 0 and lse -inf. The key
// blocks stream through an online softmax (running max m and sum l per row; the accumulator is
// rescaled by exp(m_old - m_new) when the max grows), in base 2: the scores are multiplied by
// scale * log2(e) first, so every exponential is one ex2 (MUFU.EX2) and lse = (m + log2 l) ln 2.
// (Multiplying before the max costs one FMUL per score, and keeps the max right for any sign
// of the scale.)
//
// The work: one CTA per (block of kBlockM = 128 query rows, query head, sequence), the grid
// flattened to one dimension with the LAST query blocks first (under a causal mask they see the
// most keys, so the long CTAs start first and the short ones fill the tail). Query head h reads
// key/value head h / (heads_q / heads_kv); consecutive CTAs are the heads of one query block,
// so a key/value head's tiles are read from L2 by its whole group at about the same time.
//
// The CTA: three warpgroups of 128 threads, 384 threads, one CTA per SM.
//   * The producer (warpgroup 2) gives its registers back (setmaxnreg 40) and one thread issues
//     every TMA copy: the Q tile once (all 128 rows, kHeadDim wide), then the K and V tiles of
//     the CTA's key blocks into a ring of kStages stages, K running one block ahead of V
//     (K0, K1, V0, K2, V1, ...) so that the consumers can start the next Q K^T while the current
//     V is still in flight. K and V of a stage have their own full and empty barriers: a K tile
//     is released as soon as its Q K^T has retired, a V tile after its P V.
//   * Two consumers (warpgroups 0 and 1) each own 64 query rows (one wgmma M) and all of their
//     state lives in registers: the output accumulator O (64 x kHeadDim float32: kHeadDim / 2
//     per thread), the scores S of one key block (kBlockN / 2 per thread), their 16-bit
//     probabilities P (kBlockN / 4 registers) and m, l for the thread's two rows. Both consumers
//     walk the same key blocks (each stage is released when both are done with it); they are not
//     ping-ponged against each other with named barriers as in FlashAttention-3 — the warp
//     schedulers interleave them freely. Scheduling the two warpgroups' softmax against each
//     other's GEMMs is the next step for speed, as is a persistent tile scheduler.
//
// Per key block n of a consumer, with intra-warpgroup overlap (the softmax of block n runs
// while the tensor cores do P_{n-1} V_{n-1}):
//     (K_n full)          S = Q K_n^T           (wgmma SS, issued and committed: group A)
//     wait V_{n-1} full;  O += P_{n-1} V_{n-1}  (wgmma RS, committed: group B)
//     wait_group 1 (A done) -> release K_n; mask S if block n needs it; online softmax of S:
//       new m, alpha = exp2(m_old - m_new), S := exp2(S - m_new), l = l alpha + rowsum
//     wait K_{n+1} full
//     wait_group 0 (B done) -> release V_{n-1}; O *= alpha; P_n = 16-bit(S)
// after a prologue that does the first block's S and softmax alone and before an epilogue that
// adds the last P V. While group B is in flight nothing touches O or P_{n-1} (the softmax works
// on S, m, l and alpha only), so ptxas keeps the wgmma pipeline asynchronous; the register
// fences after each wait keep the compiler from hoisting reads of S or O above it. The wait
// for K_{n+1} is placed before wait_group 0 to end the softmax's basic block: ptxas puts a
// WARPGROUP.DEPBAR first in its block, and with the softmax in the same block it hoisted the
// wait above all of it (every MUFU.EX2 after the P V retired). Now the SASS shows all the
// block's max/exp2/sum work between DEPBAR.LE gsb0, 1 and DEPBAR.LE gsb0, 0.
//
// Shared-memory operands (hopper.cuh's 128-byte swizzle; every TMA box is 64 16-bit d-columns
// = 128 bytes wide, so a tile of kHeadDim columns is kHeadDim / 64 boxes, each rows x 128 B):
//   * Q: A operand of Q K^T, K-major. The k16 step kk of warpgroup g starts at box kk / 4, row
//     64 g, byte 32 (kk % 4); SBO 1024.
//   * K: B operand of Q K^T, K-major (key rows, d contiguous): box kk / 4, byte 32 (kk % 4),
//     N = kBlockN rows; SBO 1024.
//   * V: B operand of P V. The product's K dimension is the key, its N the head dim, and V is
//     stored key rows x d contiguous: N contiguous, i.e. MN-major (transpose immediate 1). The
//     k16 step t (keys 16t .. 16t+15) starts 16 rows = 2048 bytes further; LBO = the distance
//     between the 64-column boxes (kBlockN * 128 bytes), SBO = 1024 (8 key rows).
//
// Register fragments (PTX ISA, "Register Fragments" for wgmma .m64nNk16; CUTLASS's
// CLayout_64xN and ALayout_64x16 are the same maps). Thread t of a warpgroup, warp w = t / 32,
// lane = t % 32, g = lane / 4, q = lane % 4:
//   accumulator D (64 x N float32), register 4j + 2h + e  <->  row 16w + g + 8h, column
//     8j + 2q + e   (j < N / 8, h, e in {0, 1});
//   A from registers (64 x 16, four .b32 registers of two 16-bit values, low half first),
//     register r, half e  <->  row 16w + g + 8 (r % 2), column 2q + e + 8 (r / 2).
// The 16 key columns 16t .. 16t+15 of S are accumulator registers 8t .. 8t+7: register 8t + 2r
// + e sits at row 16w + g + 8 (r % 2), column 16t + 8 (r / 2) + 2q + e — exactly A's register
// r, half e of the k16 step t. So the scores become P V's A operand without any data movement:
//     p[4t + r] = pack(s[8t + 2r], s[8t + 2r + 1]),  i.e.  p[k] = pack(s[2k], s[2k + 1]).
// Each row's max and sum are reduced over the 4 lanes of a quad (__shfl_xor 1 and 2); the sum
// only at the end (the partial sums are rescaled by the same alpha as the quad's others).
//
// Masking: visible_keys gives the keys that the CTA's 128 rows see together, i.e. its key
// blocks; keys_seen_by_all, per warpgroup, the keys every one of its 64 rows sees. A block
// inside the latter is fully visible and costs no mask arithmetic; any other block (the first
// and last of a window, the diagonal of a causal mask, the ragged last block of a sequence) is
// masked per element against each row's own window (visible_keys of that row, clipped to the
// block: two int compares and a select per score). Masked scores become -inf BEFORE the max.
// A row that has seen no key yet keeps m = -inf, and exp2 is taken relative to 0 instead, so
// its p and alpha are 0 (no NaN); at the end l = 0 gives out 0 and lse -inf.
//
// Sequence ends. A batched tensor has a 4-D map (d, row, head, batch) whose row extent is the
// sequence length: TMA fills rows past it with zeros. A packed one has a 3-D map (d, row, head)
// over all Tq (Tk) rows: the rows past a sequence's end are the next sequence's. They are
//   * never stored as queries (the epilogue stores rows < len_q only; a query row's softmax
//     never mixes with other rows');
//   * masked as keys (j >= len_k lies outside every row's window) — by select, so a NaN score
//     of a neighbour key cannot survive;
//   * zeroed in the V tile: P is 0 there, but 0 * Inf = NaN, so a non-finite value in the
//     neighbour's V would leak. When the CTA's last key block runs past its sequence and there
//     are rows after it, the producer has that V tile land on a private barrier, waits for it,
//     zeroes the rows >= len_k with the whole producer warp, fences them to the async proxy
//     (fence.proxy.async) and only then arrives on the stage's full barrier. Only the last
//     block of a CTA can run past the sequence, so this costs one short wait per CTA.
//
// Epilogue: out = O / l, converted to 16-bit, is written by each consumer into ITS half of the
// Q tile (free once its last Q K^T retired; the other consumer reads only its own rows), in a
// 128-byte XOR swizzle (conflict-free for the accumulator layout's 4-byte writes), then copied
// out with 16-byte stores of whole rows, rows >= len_q skipped. The lse of a row is stored by the
// first lane of its quad.
//
// Tiles per head dim (smem: Q + stages x (K + V) + 1 KB alignment + barriers):
//     kHeadDim  kBlockN  kStages  smem     registers/thread (O + S + P)
//        64       128       4     145 KB    32 + 64 + 32
//       128       128       2     161 KB    64 + 64 + 32
//       256        64       2     193 KB   128 + 32 + 16
// kHeadDim 256 halves the key block so that O, S and P fit the consumers' 232 registers
// (setmaxnreg: 2 x 232 + 40 = 504 <= 512 per lane of the three warpgroups), and the two 64 KB
// stages plus the 64 KB Q tile fit 227 KB.
// Tuning left for a GPU: the warpgroup ping-pong, a persistent scheduler, three stages at
// kHeadDim 128 (230 KB fits), a 192-row CTA at kHeadDim 64, TMA multicast of K/V across the
// query heads of a group. fp8 is not attempted.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/check.cuh"
#include "../common/dtype.cuh"
#include "../common/hopper.cuh"
#include "../common/tensor_map.h"
#include "attention.h"
#include "attention_mask.cuh"

// The sm_80 and compute_80 passes compile the kernel body out (FUSEDOPS_SM90A_ENABLED), which
// leaves the constants and helpers below unused there: not worth a warning per pass.
#pragma nv_diag_suppress 177

namespace fusedops {
namespace {

constexpr int kBlockM = 128;              // query rows of a CTA
constexpr int kWarpgroupThreads = 128;
constexpr int kConsumers = 2;             // warpgroups, 64 query rows each
constexpr int kConsumerRows = kBlockM / kConsumers;
constexpr int kThreads = (kConsumers + 1) * kWarpgroupThreads;
constexpr int kProducerRegisters = 40;
constexpr int kConsumerRegisters = 232;   // 2 x 232 + 40 = 504 <= 512
constexpr int kBoxColumns = 64;           // d-columns of one TMA box: 128 bytes of 16-bit values
constexpr int kRowBytes = 128;            // one swizzled row of a box
constexpr int kSwizzleAlign = 1024;
constexpr int kMaxRows = INT32_MAX - 256; // TMA coordinates are int32; a box may start at the end
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// The key block and the depth of the K/V ring per head dim.
template <int kHeadDim>
struct FwdConfig;
template <>
struct FwdConfig<64> {
  static constexpr int kBlockN = 128;
  static constexpr int kStages = 4;
};
template <>
struct FwdConfig<128> {
  static constexpr int kBlockN = 128;
  static constexpr int kStages = 2;
};
template <>
struct FwdConfig<256> {
  static constexpr int kBlockN = 64;
  static constexpr int kStages = 2;
};

// The shared-memory plan: Q, then the stages (K then V), then the barriers.
template <int kHeadDim>
struct FwdSmem {
  static constexpr int kBlockN = FwdConfig<kHeadDim>::kBlockN;
  static constexpr int kStages = FwdConfig<kHeadDim>::kStages;
  static constexpr int kBoxes = kHeadDim / kBoxColumns;
  static constexpr int kQBoxBytes = kBlockM * kRowBytes;
  static constexpr int kKvBoxBytes = kBlockN * kRowBytes;
  static constexpr int kQBytes = kBoxes * kQBoxBytes;
  static constexpr int kKvBytes = kBoxes * kKvBoxBytes;  // one K or V tile
  static constexpr int kStageBytes = 2 * kKvBytes;
  static constexpr int kBarrierOffset = kQBytes + kStages * kStageBytes;
  // q_full, v_fixup, then k_full, v_full, k_empty, v_empty per stage.
  static constexpr int kBarriers = 2 + 4 * kStages;
  static constexpr size_t kBytes =
      kSwizzleAlign + kBarrierOffset + kBarriers * sizeof(uint64_t);
  static_assert(kHeadDim % kBoxColumns == 0, "whole 128-byte boxes");
  static_assert(kStages >= 2, "K runs one block ahead of V: one stage would deadlock");
  static_assert(kQBoxBytes % kSwizzleAlign == 0 && kKvBoxBytes % kSwizzleAlign == 0,
                "every box starts on a swizzle atom");
  static_assert(kBlockN % 16 == 0 && kBlockN <= 256, "wgmma n and the P V k16 steps");
  static_assert(kBytes <= 227 * 1024, "the opt-in shared memory of sm_90");
};

struct FwdArgs {
  AttentionFwdParams params;
  float scale_log2;  // scale * log2(e)
  int m_blocks;      // query blocks per (head, sequence)
};

// --- sm_90a helpers that hopper.cuh does not have ---------------------------------------

// 2^x with MUFU.EX2 (flushes denormals; exp2(-inf) = 0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// --- warpgroup MMA --------------------------------------------------------------------------
// The operand lists are long; the macros are expanded once per element type below.

#define FUSEDOPS_WGMMA_SS_64(TYPE)                                                          \
  asm volatile(                                                                             \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                          \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " "                       \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "             \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "   \
      "%32, %33, p, 1, 1, 0, 0;\n}\n"                                                       \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),             \
        "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),           \
        "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]),       \
        "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),       \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),       \
        "+f"(d[30]), "+f"(d[31])                                                            \
      : "l"(desc_a), "l"(desc_b), "r"(accumulate))

#define FUSEDOPS_WGMMA_SS_128(TYPE)                                                         \
  asm volatile(                                                                             \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                          \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " "                      \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "             \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "    \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "    \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "   \
      "%64, %65, p, 1, 1, 0, 0;\n}\n"                                                       \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),             \
        "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),           \
        "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]),       \
        "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),       \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),       \
        "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),       \
        "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),       \
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),       \
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]),       \
        "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]),       \
        "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])                                  \
      : "l"(desc_a), "l"(desc_b), "r"(accumulate))

#define FUSEDOPS_WGMMA_RS_64(TYPE)                                                          \
  asm volatile(                                                                             \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                          \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " "                       \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "             \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "   \
      "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                         \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),             \
        "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),           \
        "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]),       \
        "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),       \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),       \
        "+f"(d[30]), "+f"(d[31])                                                            \
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc_b), "r"(accumulate))

#define FUSEDOPS_WGMMA_RS_128(TYPE)                                                         \
  asm volatile(                                                                             \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                          \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " "                      \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "             \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "    \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "    \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "   \
      "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                         \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),             \
        "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),           \
        "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]),       \
        "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),       \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),       \
        "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),       \
        "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),       \
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),       \
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]),       \
        "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]),       \
        "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])                                  \
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc_b), "r"(accumulate))

#define FUSEDOPS_WGMMA_RS_256(TYPE)                                                         \
  asm volatile(                                                                             \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"                                         \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." TYPE "." TYPE " "                      \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "             \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "    \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "    \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "    \
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "    \
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "    \
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "\
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "\
      "{%128, %129, %130, %131}, %132, p, 1, 1, 1;\n}\n"                                    \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),             \
        "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),           \
        "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]),       \
        "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),       \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),       \
        "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),       \
        "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),       \
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),       \
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]),       \
        "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]),       \
        "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]),       \
        "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),       \
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]),       \
        "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]),       \
        "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]),       \
        "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),       \
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]),     \
        "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), \
        "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), \
        "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), \
        "+f"(d[126]), "+f"(d[127])                                                          \
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc_b), "r"(accumulate))

// d (64 x kN float32 of one warpgroup) (+)= A (64 x 16, K-major in smem) * B (kN x 16,
// K-major in smem)^T; accumulate = 0 overwrites d.
template <typename T, int kN>
__device__ __forceinline__ void wgmma_ss(float (&d)[kN / 2], uint64_t desc_a, uint64_t desc_b,
                                         uint32_t accumulate) {
#if FUSEDOPS_SM90A_ENABLED
  static_assert(kN == 64 || kN == 128, "the key blocks");
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  if constexpr (kN == 64) {
    if constexpr (kBf16) FUSEDOPS_WGMMA_SS_64("bf16"); else FUSEDOPS_WGMMA_SS_64("f16");
  } else {
    if constexpr (kBf16) FUSEDOPS_WGMMA_SS_128("bf16"); else FUSEDOPS_WGMMA_SS_128("f16");
  }
#endif
}

// d (64 x kN float32) (+)= A (64 x 16 16-bit values in registers a0..a3, the register-fragment
// layout at the top) * B (16 x kN, MN-major in smem: transpose immediate 1).
template <typename T, int kN>
__device__ __forceinline__ void wgmma_rs(float (&d)[kN / 2], uint32_t a0, uint32_t a1,
                                         uint32_t a2, uint32_t a3, uint64_t desc_b,
                                         uint32_t accumulate) {
#if FUSEDOPS_SM90A_ENABLED
  static_assert(kN == 64 || kN == 128 || kN == 256, "the head dims");
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  if constexpr (kN == 64) {
    if constexpr (kBf16) FUSEDOPS_WGMMA_RS_64("bf16"); else FUSEDOPS_WGMMA_RS_64("f16");
  } else if constexpr (kN == 128) {
    if constexpr (kBf16) FUSEDOPS_WGMMA_RS_128("bf16"); else FUSEDOPS_WGMMA_RS_128("f16");
  } else {
    if constexpr (kBf16) FUSEDOPS_WGMMA_RS_256("bf16"); else FUSEDOPS_WGMMA_RS_256("f16");
  }
#endif
}

#undef FUSEDOPS_WGMMA_SS_64
#undef FUSEDOPS_WGMMA_SS_128
#undef FUSEDOPS_WGMMA_RS_64
#undef FUSEDOPS_WGMMA_RS_128
#undef FUSEDOPS_WGMMA_RS_256

// --- the consumer's pieces -------------------------------------------------------------------

// S = Q K^T of one key block: kHeadDim / 16 wgmma k16 steps, the first one overwriting S.
template <typename T, int kHeadDim>
__device__ __forceinline__ void issue_qk(float (&s)[FwdSmem<kHeadDim>::kBlockN / 2],
                                         uint64_t desc_q, uint64_t desc_k) {
  using Smem = FwdSmem<kHeadDim>;
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {
    // Descriptor addresses are in 16-byte units; the offsets stay inside the 256 KB field.
    const uint64_t q_step = ((kk / 4) * Smem::kQBoxBytes + (kk % 4) * 32) >> 4;
    const uint64_t k_step = ((kk / 4) * Smem::kKvBoxBytes + (kk % 4) * 32) >> 4;
    wgmma_ss<T, Smem::kBlockN>(s, desc_q + q_step, desc_k + k_step, kk > 0 ? 1u : 0u);
  }
}

// O += P V of one key block: kBlockN / 16 k16 steps, P's registers 4t .. 4t+3 for step t.
template <typename T, int kHeadDim>
__device__ __forceinline__ void issue_pv(float (&o)[kHeadDim / 2],
                                         const uint32_t (&p)[FwdSmem<kHeadDim>::kBlockN / 4],
                                         uint64_t desc_v) {
  using Smem = FwdSmem<kHeadDim>;
#pragma unroll
  for (int t = 0; t < Smem::kBlockN / 16; ++t) {
    const uint64_t v_step = (t * 16 * kRowBytes) >> 4;
    wgmma_rs<T, kHeadDim>(o, p[4 * t], p[4 * t + 1], p[4 * t + 2], p[4 * t + 3],
                          desc_v + v_step, 1u);
  }
}

// The keys [first, last] of a row's window as columns of the block at key0, clipped to
// [0, kBlockN] and [-1, kBlockN - 1] (an empty window stays empty: lo > hi).
template <int kBlockN>
__device__ __forceinline__ int2 window_in_block(const KeyRange& window, int64_t key0) {
  int64_t lo = window.first - key0;
  int64_t hi = window.last - key0;
  lo = lo < 0 ? 0 : (lo > kBlockN ? kBlockN : lo);
  hi = hi > kBlockN - 1 ? kBlockN - 1 : (hi < -1 ? -1 : hi);
  return make_int2(static_cast<int>(lo), static_cast<int>(hi));
}

// The online softmax of one block of scores s (the accumulator layout: registers 4j + 2h + e
// are row h's column 8j + col0 + e, col0 = 2 (lane % 4)): scale, mask (window0/1 are the
// rows' visible columns), new max, alpha, s := exp2(s - max), partial row sums.
template <int kBlockN>
__device__ __forceinline__ void online_softmax(float (&s)[kBlockN / 2], float (&row_max)[2],
                                               float (&row_sum)[2], float (&alpha)[2],
                                               float scale_log2, bool masked, int2 window0,
                                               int2 window1, int col0) {
#pragma unroll
  for (int i = 0; i < kBlockN / 2; ++i) s[i] *= scale_log2;
  if (masked) {
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = 8 * j + col0 + e;
        if (c < window0.x || c > window0.y) s[4 * j + e] = -INFINITY;
        if (c < window1.x || c > window1.y) s[4 * j + 2 + e] = -INFINITY;
      }
    }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float mx = row_max[h];
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
      mx = fmaxf(mx, fmaxf(s[4 * j + 2 * h], s[4 * j + 2 * h + 1]));
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    // A row that has seen no visible key keeps -inf: exponentials relative to 0 are then 0.
    const float base = mx == -INFINITY ? 0.f : mx;
    alpha[h] = fast_exp2(row_max[h] - base);
    row_max[h] = mx;
    float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
      s[4 * j + 2 * h] = fast_exp2(s[4 * j + 2 * h] - base);
      s[4 * j + 2 * h + 1] = fast_exp2(s[4 * j + 2 * h + 1] - base);
      sum0 += s[4 * j + 2 * h];
      sum1 += s[4 * j + 2 * h + 1];
    }
    row_sum[h] = row_sum[h] * alpha[h] + (sum0 + sum1);
  }
}

template <int kHeadDim>
__device__ __forceinline__ void rescale(float (&o)[kHeadDim / 2], const float (&alpha)[2]) {
#pragma unroll
  for (int j = 0; j < kHeadDim / 8; ++j) {
    o[4 * j] *= alpha[0];
    o[4 * j + 1] *= alpha[0];
    o[4 * j + 2] *= alpha[1];
    o[4 * j + 3] *= alpha[1];
  }
}

// P (the A fragments of P V) from the probabilities in the accumulator layout.
template <typename T, int kBlockN>
__device__ __forceinline__ void convert_p(uint32_t (&p)[kBlockN / 4],
                                          const float (&s)[kBlockN / 2]) {
#pragma unroll
  for (int k = 0; k < kBlockN / 4; ++k) p[k] = pack2<T>(s[2 * k], s[2 * k + 1]);
}

// One K or V tile (or the Q tile): kHeadDim / 64 boxes of `rows` x 64 columns at row `row`.
template <int kHeadDim>
__device__ __forceinline__ void load_tile(uint8_t* dst, int box_bytes, const CUtensorMap* map,
                                          uint64_t* bar, int64_t row, int head, int batch,
                                          bool packed) {
#pragma unroll
  for (int c = 0; c < kHeadDim / kBoxColumns; ++c) {
    if (packed) {
      hopper::tma_load_3d(dst + c * box_bytes, map, bar, c * kBoxColumns,
                          static_cast<int32_t>(row), head);
    } else {
      hopper::tma_load_4d(dst + c * box_bytes, map, bar, c * kBoxColumns,
                          static_cast<int32_t>(row), head, batch);
    }
  }
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads, 1)
    attention_fwd_sm90_kernel(const __grid_constant__ CUtensorMap map_q,
                              const __grid_constant__ CUtensorMap map_k,
                              const __grid_constant__ CUtensorMap map_v, const FwdArgs args) {
#if FUSEDOPS_SM90A_ENABLED
  using Smem = FwdSmem<kHeadDim>;
  constexpr int kBlockN = Smem::kBlockN;
  constexpr int kStages = Smem::kStages;
  const AttentionProblem& problem = args.params.problem;
  const bool packed = problem.cu_seqlens_q != nullptr;

  // The tile: query block (last first), head, sequence.
  const int64_t heads_batch = static_cast<int64_t>(problem.heads_q) * problem.batch;
  const int64_t tile = blockIdx.x;
  const int m_block = args.m_blocks - 1 - static_cast<int>(tile / heads_batch);
  const int head = static_cast<int>((tile % heads_batch) % problem.heads_q);
  const int batch = static_cast<int>((tile % heads_batch) / problem.heads_q);
  const int head_kv = head / (problem.heads_q / problem.heads_kv);
  const SequenceRows rows_q =
      clamp_sequence(problem.cu_seqlens_q, batch, problem.total_q, problem.seqlen_q);
  const SequenceRows rows_k =
      clamp_sequence(problem.cu_seqlens_k, batch, problem.total_k, problem.seqlen_k);
  const int64_t len_q = rows_q.length;
  const int64_t len_k = rows_k.length;
  const int64_t m0 = static_cast<int64_t>(m_block) * kBlockM;
  if (m0 >= len_q) return;  // past this sequence's rows: every thread of the CTA leaves here
  const int left = problem.window_left;
  const int right = problem.window_right;

  // The key blocks that any of the CTA's rows sees (empty: the rows see no key at all).
  const KeyRange cta_keys = visible_keys(m0, m0 + kBlockM, len_q, len_k, left, right);
  const bool any_keys = cta_keys.last >= cta_keys.first;
  const int first_block = any_keys ? static_cast<int>(cta_keys.first / kBlockN) : 0;
  const int num_blocks =
      any_keys ? static_cast<int>(cta_keys.last / kBlockN) + 1 - first_block : 0;

  extern __shared__ uint8_t smem_raw[];
  // The 128-byte swizzle repeats every 1024 bytes, and TMA and wgmma agree on it only for
  // 1024-byte aligned buffers; dynamic shared memory is only 16-byte aligned.
  uint8_t* smem = reinterpret_cast<uint8_t*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + kSwizzleAlign - 1) & ~uintptr_t{kSwizzleAlign - 1});
  uint8_t* q_tile = smem;
  uint8_t* stages = smem + Smem::kQBytes;  // stage s: K at s * kStageBytes, V kKvBytes after
  uint64_t* q_full = reinterpret_cast<uint64_t*>(smem + Smem::kBarrierOffset);
  uint64_t* v_fixup = q_full + 1;          // the producer's own, for a V tile it must patch
  uint64_t* k_full = q_full + 2;
  uint64_t* v_full = k_full + kStages;
  uint64_t* k_empty = v_full + kStages;
  uint64_t* v_empty = k_empty + kStages;

  const int warpgroup = threadIdx.x / kWarpgroupThreads;
  const int thread = threadIdx.x % kWarpgroupThreads;
  if (threadIdx.x == 0) {
    hopper::mbarrier_init(q_full, 1);
    hopper::mbarrier_init(v_fixup, 1);
    for (int s = 0; s < kStages; ++s) {
      hopper::mbarrier_init(&k_full[s], 1);                 // the producer's arrival (+ bytes)
      hopper::mbarrier_init(&v_full[s], 1);
      hopper::mbarrier_init(&k_empty[s], kConsumers * 4);   // one per consumer warp
      hopper::mbarrier_init(&v_empty[s], kConsumers * 4);
    }
    hopper::mbarrier_init_fence();
  }
  __syncthreads();

  if (warpgroup == kConsumers) {
    // The producer: warp 0, lane 0 issues every copy; the warp patches a ragged V tile.
    hopper::release_registers<kProducerRegisters>();
    if (thread >= 32 || num_blocks == 0) return;
    const int lane = thread;
    const int64_t key_row0 = rows_k.begin + static_cast<int64_t>(first_block) * kBlockN;
    const int last = num_blocks - 1;
    const int64_t last_key0 = static_cast<int64_t>(first_block + last) * kBlockN;
    // The last block runs past the sequence into rows of the tensor (not TMA's zero fill).
    const bool patch_v = packed && last_key0 + kBlockN > len_k &&
                         rows_k.begin + len_k < problem.total_k;
    if (lane == 0) {
      hopper::tma_prefetch_descriptor(&map_q);
      hopper::tma_prefetch_descriptor(&map_k);
      hopper::tma_prefetch_descriptor(&map_v);
      hopper::mbarrier_arrive_expect_tx(q_full, Smem::kQBytes);
      load_tile<kHeadDim>(q_tile, Smem::kQBoxBytes, &map_q, q_full, rows_q.begin + m0, head,
                          batch, packed);
      // K0, K1, V0, K2, V1, ...: block i's K waits for stage i % kStages's K to be empty.
      for (int i = 0; i <= num_blocks; ++i) {
        if (i < num_blocks) {
          const int stage = i % kStages;
          hopper::mbarrier_wait(&k_empty[stage], ((i / kStages) & 1) ^ 1);
          hopper::mbarrier_arrive_expect_tx(&k_full[stage], Smem::kKvBytes);
          load_tile<kHeadDim>(stages + stage * Smem::kStageBytes, Smem::kKvBoxBytes, &map_k,
                              &k_full[stage], key_row0 + static_cast<int64_t>(i) * kBlockN,
                              head_kv, batch, packed);
        }
        if (i > 0) {
          const int j = i - 1;
          const int stage = j % kStages;
          hopper::mbarrier_wait(&v_empty[stage], ((j / kStages) & 1) ^ 1);
          uint64_t* bar = (patch_v && j == last) ? v_fixup : &v_full[stage];
          hopper::mbarrier_arrive_expect_tx(bar, Smem::kKvBytes);
          load_tile<kHeadDim>(stages + stage * Smem::kStageBytes + Smem::kKvBytes,
                              Smem::kKvBoxBytes, &map_v, bar,
                              key_row0 + static_cast<int64_t>(j) * kBlockN, head_kv, batch,
                              packed);
        }
      }
    }
    if (patch_v) {
      // Zero V's rows >= len_k (whole 128-byte rows: the swizzle permutes 16-byte chunks
      // within a row), then publish the tile to the consumers' wgmma (async proxy).
      __syncwarp();
      hopper::mbarrier_wait(v_fixup, 0);
      const int stage = last % kStages;
      uint8_t* v_tile = stages + stage * Smem::kStageBytes + Smem::kKvBytes;
      const int valid = static_cast<int>(len_k - last_key0);  // 0 < valid < kBlockN
      const int chunks_per_box = (kBlockN - valid) * (kRowBytes / 16);
      for (int c = lane; c < Smem::kBoxes * chunks_per_box; c += 32) {
        const int box = c / chunks_per_box;
        const int chunk = c % chunks_per_box;
        *reinterpret_cast<uint4*>(v_tile + box * Smem::kKvBoxBytes + valid * kRowBytes +
                                  chunk * 16) = make_uint4(0u, 0u, 0u, 0u);
      }
      hopper::fence_proxy_async_shared();
      __syncwarp();
      if (lane == 0) hopper::mbarrier_arrive(&v_full[stage]);
    }
    return;
  }

  // A consumer: query rows [m0 + 64 warpgroup, + 64) of the sequence.
  hopper::claim_registers<kConsumerRegisters>();
  const int warp = thread / 32;
  const int lane = thread % 32;
  const int64_t wg_row0 = m0 + warpgroup * kConsumerRows;
  const int row_in_wg = warp * 16 + lane / 4;  // and row_in_wg + 8
  const int64_t row0 = wg_row0 + row_in_wg;
  const int col0 = 2 * (lane % 4);

  float o[kHeadDim / 2];
#pragma unroll
  for (int i = 0; i < kHeadDim / 2; ++i) o[i] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};

  if (num_blocks > 0) {
    const KeyRange window0 = visible_keys(row0, row0 + 1, len_q, len_k, left, right);
    const KeyRange window1 = visible_keys(row0 + 8, row0 + 9, len_q, len_k, left, right);
    const KeyRange all_rows =
        keys_seen_by_all(wg_row0, wg_row0 + kConsumerRows, len_q, len_k, left, right);
    const uint64_t desc_q = hopper::smem_descriptor(
        q_tile + warpgroup * kConsumerRows * kRowBytes, /*leading_bytes=*/16,
        /*stride_bytes=*/1024);
    const uint64_t desc_k0 =
        hopper::smem_descriptor(stages, /*leading_bytes=*/16, /*stride_bytes=*/1024);
    const uint64_t desc_v0 = hopper::smem_descriptor(
        stages + Smem::kKvBytes, /*leading_bytes=*/Smem::kKvBoxBytes, /*stride_bytes=*/1024);
    constexpr uint64_t kStageStep = Smem::kStageBytes >> 4;  // in descriptor address units

    float s[kBlockN / 2];
    uint32_t p[kBlockN / 4];
    float alpha[2];
    // Scores of block i: scale, mask unless every row of this warpgroup sees all its keys,
    // online softmax.
    auto softmax_block = [&](int i) {
      const int64_t key0 = static_cast<int64_t>(first_block + i) * kBlockN;
      const bool full = all_rows.first <= key0 && key0 + kBlockN - 1 <= all_rows.last;
      online_softmax<kBlockN>(s, row_max, row_sum, alpha, args.scale_log2, !full,
                              window_in_block<kBlockN>(window0, key0),
                              window_in_block<kBlockN>(window1, key0), col0);
    };

    hopper::mbarrier_wait(q_full, 0);

    // Block 0: S alone.
    hopper::mbarrier_wait(&k_full[0], 0);
    hopper::wgmma_fence();
    issue_qk<T, kHeadDim>(s, desc_q, desc_k0);
    hopper::wgmma_commit_group();
    hopper::wgmma_wait_group<0>();
    hopper::fence_registers(s);
    if (lane == 0) hopper::mbarrier_arrive(&k_empty[0]);
    softmax_block(0);  // O is still 0: its alpha is not needed
    convert_p<T, kBlockN>(p, s);

    // Block i's S = Q K^T overlaps with block i - 1's P V; its softmax runs under the P V.
    // K_i is waited for at the end of the previous block (see below).
    if (num_blocks > 1) hopper::mbarrier_wait(&k_full[1 % kStages], (1 / kStages) & 1);
    for (int i = 1; i < num_blocks; ++i) {
      const int stage = i % kStages;
      const int previous = (i - 1) % kStages;
      hopper::wgmma_fence();
      issue_qk<T, kHeadDim>(s, desc_q, desc_k0 + stage * kStageStep);
      hopper::wgmma_commit_group();
      hopper::mbarrier_wait(&v_full[previous], ((i - 1) / kStages) & 1);
      hopper::wgmma_fence();  // again after the wait's loop, or ptxas inserts it (C7519)
      issue_pv<T, kHeadDim>(o, p, desc_v0 + previous * kStageStep);
      hopper::wgmma_commit_group();

      hopper::wgmma_wait_group<1>();  // S is done, the P V may still run
      hopper::fence_registers(s);
      if (lane == 0) hopper::mbarrier_arrive(&k_empty[stage]);
      softmax_block(i);
      // The next K's wait sits between the softmax and wait_group 0 on purpose: its try_wait
      // loop ends the basic block, and ptxas schedules WARPGROUP.DEPBAR at the top of its
      // block — in the softmax's block it would be hoisted above the softmax and serialize it
      // after the P V (seen in the SASS).
      if (i + 1 < num_blocks) {
        hopper::mbarrier_wait(&k_full[(i + 1) % kStages], ((i + 1) / kStages) & 1);
      }

      hopper::wgmma_wait_group<0>();  // the P V is done: O and P are free
      hopper::fence_registers(o);
      if (lane == 0) hopper::mbarrier_arrive(&v_empty[previous]);
      rescale<kHeadDim>(o, alpha);
      convert_p<T, kBlockN>(p, s);
    }

    // The last block's P V.
    const int last_stage = (num_blocks - 1) % kStages;
    hopper::mbarrier_wait(&v_full[last_stage], ((num_blocks - 1) / kStages) & 1);
    hopper::wgmma_fence();
    issue_pv<T, kHeadDim>(o, p, desc_v0 + last_stage * kStageStep);
    hopper::wgmma_commit_group();
    hopper::wgmma_wait_group<0>();
    hopper::fence_registers(o);
    if (lane == 0) hopper::mbarrier_arrive(&v_empty[last_stage]);
  }

  // The epilogue: l over the quad, out = O / l, lse = (m + log2 l) ln 2; rows seeing no key
  // (l = 0) get 0 and -inf.
  float inv_sum[2], lse[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = row_sum[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const bool sees_keys = l > 0.f;
    inv_sum[h] = sees_keys ? 1.f / l : 0.f;
    lse[h] = sees_keys ? (row_max[h] + log2f(l)) * kLn2 : -INFINITY;
  }
  if (lane % 4 == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = row0 + 8 * h;
      if (row < len_q) {
        args.params.lse[lse_index(problem, batch, head, rows_q.begin, row)] = lse[h];
      }
    }
  }

  // Stage the 16-bit rows in this warpgroup's half of the Q tile (box b holds columns
  // 64b .. 64b+63; the 16-byte chunk c of row r at chunk c ^ (r % 8)).
  uint8_t* staging = q_tile + warpgroup * kConsumerRows * kRowBytes;
#pragma unroll
  for (int j = 0; j < kHeadDim / 8; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = row_in_wg + 8 * h;
      uint8_t* at = staging + (j / 8) * Smem::kQBoxBytes + r * kRowBytes +
                    (((j % 8) ^ (r % 8)) * 16) + col0 * 2;
      *reinterpret_cast<uint32_t*>(at) =
          pack2<T>(o[4 * j + 2 * h] * inv_sum[h], o[4 * j + 2 * h + 1] * inv_sum[h]);
    }
  }
  hopper::named_barrier_sync(1 + warpgroup, kWarpgroupThreads);

  const AttentionTensor& out = args.params.out;
  T* out_rows = static_cast<T*>(out.data) + static_cast<int64_t>(head) * out.head_stride +
                (packed ? rows_q.begin * out.row_stride
                        : static_cast<int64_t>(batch) * out.batch_stride);
  constexpr int kChunksPerRow = kHeadDim / 8;
#pragma unroll
  for (int it = 0; it < kConsumerRows * kChunksPerRow / kWarpgroupThreads; ++it) {
    const int c = it * kWarpgroupThreads + thread;
    const int r = c / kChunksPerRow;
    const int chunk = c % kChunksPerRow;
    const int64_t row = wg_row0 + r;
    if (row < len_q) {
      const uint4 value = *reinterpret_cast<const uint4*>(
          staging + (chunk / 8) * Smem::kQBoxBytes + r * kRowBytes +
          (((chunk % 8) ^ (r % 8)) * 16));
      *reinterpret_cast<uint4*>(out_rows + row * out.row_stride + chunk * 8) = value;
    }
  }
#else
  __trap();  // built without sm_90a code: the launcher never starts this kernel then
#endif
}

// The TMA map of a q/k/v tensor: (d, row, head) packed, (d, row, head, batch) batched, boxes of
// 64 d-columns x box_rows rows with the 128-byte swizzle; rows past `rows` read as zeros. The
// stride of an extent-1 dimension is never used, so any valid value stands in for it.
cudaError_t make_rows_tensor_map(CUtensorMap* map, CUtensorMapDataType type,
                                 const AttentionTensor& tensor, int head_dim, int64_t rows,
                                 int heads, int batch, bool packed, uint32_t box_rows) {
  constexpr uint64_t kBytes = 2;
  const uint64_t dense = static_cast<uint64_t>(head_dim) * kBytes;
  auto stride = [&](int64_t extent, int64_t elements) {
    return extent > 1 ? static_cast<uint64_t>(elements) * kBytes : dense;
  };
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(head_dim), static_cast<cuuint64_t>(rows),
                              static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  const cuuint64_t strides[3] = {stride(rows, tensor.row_stride),
                                 stride(heads, tensor.head_stride),
                                 stride(batch, tensor.batch_stride)};
  const cuuint32_t box[4] = {kBoxColumns, box_rows, 1, 1};
  return make_tensor_map(map, tensor.data, type, packed ? 3 : 4, dims, strides, box);
}

// Whether TMA can address a q/k/v tensor: 16-byte aligned data, strides of whole 16 bytes
// below 2**40 bytes, and no zero stride on a dimension that has more than one index.
bool tma_addressable(const AttentionTensor& tensor, int64_t rows, int heads, int batch,
                     bool packed) {
  if (reinterpret_cast<uintptr_t>(tensor.data) % 16 != 0) return false;
  auto ok = [](int64_t extent, int64_t stride) {
    return stride >= 0 && stride % 8 == 0 && stride < (int64_t{1} << 39) &&
           (extent <= 1 || stride > 0);
  };
  return ok(rows, tensor.row_stride) && ok(heads, tensor.head_stride) &&
         (packed || ok(batch, tensor.batch_stride));
}

bool valid_head_dim(int d) {
  return d == 16 || d == 32 || d == 64 || d == 96 || d == 128 || d == 256;
}

// Arguments outside attention.h's ranges.
bool valid_arguments(const AttentionFwdParams& params) {
  const AttentionProblem& p = params.problem;
  const bool packed = p.cu_seqlens_q != nullptr;
  if (p.type != AttentionType::kFloat16 && p.type != AttentionType::kBFloat16) return false;
  if (!valid_head_dim(p.head_dim)) return false;
  if (p.batch < 0 || p.heads_q < 1 || p.heads_kv < 1 || p.heads_q % p.heads_kv != 0) {
    return false;
  }
  if (p.seqlen_q < 0 || p.seqlen_k < 0) return false;
  if (packed != (p.cu_seqlens_k != nullptr)) return false;
  if (packed && (p.total_q < 0 || p.total_k < 0)) return false;
  for (const AttentionTensor* t : {&p.q, &p.k, &p.v, &params.out}) {
    if (t->row_stride < 0 || t->head_stride < 0 || (!packed && t->batch_stride < 0)) {
      return false;
    }
  }
  return true;
}

int64_t query_rows(const AttentionProblem& p) {
  return p.cu_seqlens_q != nullptr ? p.total_q : p.seqlen_q;
}
int64_t key_rows(const AttentionProblem& p) {
  return p.cu_seqlens_k != nullptr ? p.total_k : p.seqlen_k;
}

// Query blocks per (head, sequence): no sequence is longer than max_seqlen_q (packed) nor than
// the tensor (a malformed max_seqlen_q cannot make the grid overflow).
int64_t query_blocks(const AttentionProblem& p) {
  const int64_t longest =
      p.cu_seqlens_q != nullptr ? std::min(p.seqlen_q, p.total_q) : p.seqlen_q;
  return (longest + kBlockM - 1) / kBlockM;
}

// CTAs of the launch; saturates instead of overflowing (rows < 2**31: blocks < 2**24).
int64_t fwd_grid(const AttentionProblem& p) {
  const int64_t per_sequence = query_blocks(p) * p.heads_q;
  return per_sequence > INT32_MAX ? INT64_MAX : per_sequence * p.batch;
}

template <typename T, int kHeadDim>
cudaError_t launch(const AttentionFwdParams& params, int device, cudaStream_t stream) {
  using Smem = FwdSmem<kHeadDim>;
  const AttentionProblem& p = params.problem;
  const bool packed = p.cu_seqlens_q != nullptr;
  const int64_t m_blocks = query_blocks(p);
  const int64_t grid = fwd_grid(p);
  if (grid > INT32_MAX) return cudaErrorInvalidValue;
  if (grid == 0) return cudaSuccess;

  CUtensorMap map_q, map_k, map_v;
  constexpr CUtensorMapDataType kType = tensor_map_type<T>();
  FUSEDOPS_RETURN_IF_ERROR(make_rows_tensor_map(&map_q, kType, p.q, kHeadDim, query_rows(p),
                                                p.heads_q, p.batch, packed, kBlockM));
  FUSEDOPS_RETURN_IF_ERROR(make_rows_tensor_map(&map_k, kType, p.k, kHeadDim, key_rows(p),
                                                p.heads_kv, p.batch, packed, Smem::kBlockN));
  FUSEDOPS_RETURN_IF_ERROR(make_rows_tensor_map(&map_v, kType, p.v, kHeadDim, key_rows(p),
                                                p.heads_kv, p.batch, packed, Smem::kBlockN));

  auto kernel = attention_fwd_sm90_kernel<T, kHeadDim>;
  // The attribute is per device; setting it again is cheap but not free, so remember it.
  static std::atomic<uint64_t> configured_devices{0};
  const uint64_t bit = uint64_t{1} << (device % 64);
  if ((configured_devices.load(std::memory_order_relaxed) & bit) == 0) {
    FUSEDOPS_RETURN_IF_ERROR(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(Smem::kBytes)));
    configured_devices.fetch_or(bit, std::memory_order_relaxed);
  }
  const FwdArgs args{params, p.scale * kLog2e, static_cast<int>(m_blocks)};
  kernel<<<static_cast<unsigned>(grid), kThreads, Smem::kBytes, stream>>>(map_q, map_k, map_v,
                                                                          args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_for_head_dim(const AttentionFwdParams& params, int device,
                                cudaStream_t stream) {
  switch (params.problem.head_dim) {
    case 64: return launch<T, 64>(params, device, stream);
    case 128: return launch<T, 128>(params, device, stream);
    case 256: return launch<T, 256>(params, device, stream);
  }
  return cudaErrorNotSupported;
}

}  // namespace

bool attention_sm90_available(int device) {
  static std::atomic<int> known[64] = {};
  const void* kernel =
      reinterpret_cast<const void*>(&attention_fwd_sm90_kernel<__nv_bfloat16, 128>);
  return fusedops::sm90a_code_runs(kernel, device, known);
}

bool attention_fwd_sm90_covers(const AttentionProblem& p) {
  if (p.type != AttentionType::kFloat16 && p.type != AttentionType::kBFloat16) return false;
  if (p.head_dim != 64 && p.head_dim != 128 && p.head_dim != 256) return false;
  if (p.heads_q < 1 || p.heads_kv < 1 || p.heads_q % p.heads_kv != 0 || p.batch < 0) {
    return false;
  }
  const bool packed = p.cu_seqlens_q != nullptr;
  if (packed != (p.cu_seqlens_k != nullptr)) return false;
  const int64_t rows_q = query_rows(p);
  const int64_t rows_k = key_rows(p);
  if (rows_q < 0 || rows_k < 0 || rows_q > kMaxRows || rows_k > kMaxRows) return false;
  if (p.seqlen_q < 0 || fwd_grid(p) > INT32_MAX) return false;  // a one-dimensional grid
  return tma_addressable(p.q, rows_q, p.heads_q, p.batch, packed) &&
         tma_addressable(p.k, rows_k, p.heads_kv, p.batch, packed) &&
         tma_addressable(p.v, rows_k, p.heads_kv, p.batch, packed);
}

cudaError_t attention_fwd_sm90(const AttentionFwdParams& params, cudaStream_t stream) {
  if (!valid_arguments(params)) return cudaErrorInvalidValue;
  const AttentionProblem& p = params.problem;
  // Zero rows or keys: nothing to launch (bindings.cpp fills the outputs of empty cases).
  if (p.batch == 0 || query_rows(p) == 0 || key_rows(p) == 0 || p.seqlen_q == 0) {
    return cudaSuccess;
  }
  if (p.q.data == nullptr || p.k.data == nullptr || p.v.data == nullptr ||
      params.out.data == nullptr || params.lse == nullptr) {
    return cudaErrorInvalidValue;
  }
  // The output is written with 16-byte stores of 8 elements.
  const AttentionTensor& out = params.out;
  const bool packed = p.cu_seqlens_q != nullptr;
  if (reinterpret_cast<uintptr_t>(out.data) % 16 != 0 || out.row_stride % 8 != 0 ||
      out.head_stride % 8 != 0 || (!packed && out.batch_stride % 8 != 0)) {
    return cudaErrorInvalidValue;
  }
  int device = 0;
  FUSEDOPS_RETURN_IF_ERROR(cudaGetDevice(&device));
  if (!attention_sm90_available(device) || !attention_fwd_sm90_covers(p)) {
    return cudaErrorNotSupported;
  }
  switch (p.type) {
    case AttentionType::kBFloat16:
      return launch_for_head_dim<__nv_bfloat16>(params, device, stream);
    case AttentionType::kFloat16: return launch_for_head_dim<__half>(params, device, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fusedops
