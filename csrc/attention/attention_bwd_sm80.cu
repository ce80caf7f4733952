// attention_bwd_sm80.cu — the FlashAttention-2 backward on sm_80 tensor cores: cp.async into
// shared memory, ldmatrix / ldmatrix.trans, mma.sync m16n8k16 (float16 or bfloat16 in, float32
// accumulation). It also runs on sm_90 (the fallback when the sm_90a kernels do not cover a
// call, or when forced).
//
// The math (attention.h; natural-log lse, base 2 inside). For query row i of a head and the
// keys j it sees (attention_mask.cuh):
//   s_ij = q_i . k_j * scale,   p_ij = exp(s_ij - lse_i) = exp2(q_i . k_j * scale log2(e)
//                                                               - lse_i log2(e)),
//   delta_i = sum_d dout_id out_id            (= sum_j p_ij dp_ij),
//   dv_j = sum_i p_ij dout_i,   dp_ij = dout_i . v_j,   ds_ij = p_ij (dp_ij - delta_i),
//   dk_j = scale sum_i ds_ij q_i,   dq_i = scale sum_j ds_ij k_j.
// A row that sees no key has lse = -inf; it is read as +inf, so its p (hence its ds) is 0 and
// it passes no gradient. Rows past a sequence's end read lse +inf (dQ kernel) or lie only in
// masked blocks where p is forced to 0 (dK/dV kernel); their q, dout, k and v are zero-filled
// so that nothing non-finite can reach a valid row through 0 * garbage.
//
// The kernels (launched in this order on the caller's stream):
//  1. preprocess: delta = rowsum(dout * out) in float32 into params.delta (lse's layout).
//     Grid (row blocks, Hq, sequences); a warp takes 32 / L rows at once, L = the power of two
//     >= D / 8 lanes per row, each lane one 16-byte chunk of out and of dout; the partial dot
//     products are summed with L-lane xor shuffles.
//  2. dK/dV: one CTA (8 warps) per (block of BN keys, kv head, sequence). It loads its K and V
//     tiles once, then loops over the query heads of the GQA group and, for each, over the
//     blocks of BM query rows that see the key block (query_blocks_seeing_keys, below),
//     recomputing S^T and P^T from Q, K and lse. dK and dV accumulate in registers over the
//     whole group (no atomics, K/V never repeated) and are written once, dK times scale. Key
//     blocks no query sees write zeros: the caller does not pre-zero grad_k / grad_v.
//     When !deterministic the same loop also adds this key block's share of dQ,
//     scale * dS K, into the float32 params.grad_q_accum (zeroed by the caller) with
//     atomics — red.global.add.f32, or red.global.add.v2.f32 on sm_90 (float2 atomicAdd);
//  3a. (!deterministic) convert: grad_q = grad_q_accum in grad_q's dtype and strides, 16-byte
//     stores, grid-stride over the whole accumulator (rows no key reaches stay 0).
//  3b. (deterministic) dQ: one CTA per (block of BMq query rows, query head, sequence) looping
//     over the key blocks its rows see, recomputing S and dP (7 block products in all with
//     the dK/dV kernel's 4, instead of 5), dQ in registers, no atomics: bitwise reproducible.
//
// The dK/dV kernel's step (one block of BM queries, the CTA's BN keys, head dim D). Operand
// roles, in mma.sync terms (A is M x K "row", B is K x N "col", i.e. B^T stored N-rows):
//   phase 1  S^T  = K Q^T    (BN x BM over D)  A = K   [key][d]   K-major: ldmatrix
//                                              B = Q   [query][d] K-major: ldmatrix
//            dP^T = V dO^T   (BN x BM over D)  A = V   [key][d]   K-major: ldmatrix
//                                              B = dO  [query][d] K-major: ldmatrix
//            P^T = exp2(S^T scale log2(e) - lse log2(e)) (0 where masked),
//            dS^T = P^T (dP^T - delta); both rounded to T into shared memory [key][query].
//   phase 2  dV  += P^T dO   (BN x D over BM)  A = P^T [key][query] K-major: ldmatrix
//                                              B = dO  [query][d] MN-major: ldmatrix.trans
//            dK  += dS^T Q   (BN x D over BM)  A = dS^T [key][query] K-major: ldmatrix
//                                              B = Q   [query][d] MN-major: ldmatrix.trans
//   phase 3  dQ   = dS K     (BM x D over BN)  A = dS, stored as dS^T [key][query]:
//            (atomic path only)                    MN-major: ldmatrix.trans
//                                              B = K   [key][d]   MN-major: ldmatrix.trans
// S^T (keys as M) rather than S puts the per-query lse and delta along N, and makes P^T and
// dS^T, the A operands of phase 2, land in shared memory in the K-major layout ldmatrix reads
// without a transpose. The three phases use three warp grids (table below), so P^T and dS^T
// go through shared memory (FlashAttention-2 does the same on sm_80): phase 1 splits the
// BN x BM scores over warps, phase 2 the BN x D accumulators, phase 3 the BM x D dQ share.
// Masking follows the Triton kernel: query blocks in [start, full_lo) and [full_hi, end) are
// partly masked, [full_lo, full_hi) fully visible and inside both sequences, and only the
// masked ones run any mask arithmetic (a block-uniform branch). Skipped blocks cost nothing.
//
// The dQ kernel's step (BMq rows = 16 per warp, one block of BNq keys). Each warp owns 16
// whole query rows, so its P and dS never leave registers:
//   S  = Q K^T   (A = Q [query][d] K-major: ldmatrix;  B = K [key][d] K-major: ldmatrix)
//   dP = dO V^T  (A = dO K-major: ldmatrix;            B = V [key][d] K-major: ldmatrix)
//   dS = P (dP - delta);  dQ += dS K  (A = dS from the accumulators: the m16n8 C fragments
//   of two adjacent key blocks of 8 are exactly the m16k16 A fragment, packed to T;
//   B = K [key][d] MN-major: ldmatrix.trans).
//
// Tiles (bwd_tiles: one table; unmeasured). Chosen so that nothing spills, each warp holds
// at most ~160 accumulator floats, D <= 96 fits the 99 KB per block of sm_86/sm_89 parts
// and D = 128, 256 an A100's 163 KB (227 KB on H100):
//     D   | dK/dV: BN  BM  phase-1 warps  phase-2 warps  phase-3 warps | dQ: BMq BNq warps
//     16  |        128 64  4x2 (32x32)    8x1 (16x16)    4x1 (16x16)*  |     128 64  8
//     32  |        128 64  4x2 (32x32)    8x1 (16x32)    4x2 (16x16)   |     128 64  8
//     64  |        128 32  4x2 (32x16)    4x2 (32x32)    2x4 (16x16)   |     128 64  8
//     96  |        128 32  4x2 (32x16)    4x2 (32x48)    2x3 (16x32)*  |     64  64  4
//     128 |        128 32  4x2 (32x16)    4x2 (32x64)    2x4 (16x32)   |     128 64  8
//     256 |        64  32  4x2 (16x16)    2x4 (32x64)    2x4 (16x64)   |     64  32  4
//   (warp grids as rows x columns of the product, each warp's tile in parentheses; * the
//   other warps sit phase 3 out.) Phase 2's tile is the dK and dV accumulators: 2 x 32 x 64
//   floats over 32 lanes = 128 per thread at D = 128 and 256. D = 256 halves the key block
//   to 64 and splits D four ways for that; its query step is 32 rows so that the
//   double-buffered Q/dO tiles fit next to K and V. The dQ kernel's warps own 16 whole rows,
//   so its dQ accumulators are D / 2 floats per thread (128 at D = 256: the tightest kernel,
//   254-255 registers with no spill).
// Head dim 96 is padded only in shared memory, like every D: it runs at its own width
// (6 k-steps of 16, 12 column blocks of 8, phase-2 warps 48 columns wide), not as 128.
//
// Shared memory. Every 16-bit tile is row-major with its rows padded by one 16-byte chunk:
// a row of C columns takes 2C + 16 bytes (tile_pitch), m = C / 8 + 1 chunks, and m is odd
// for every width used (D = 16 .. 256: 3, 5, 9, 13, 17, 33; BM = 32, 64: 5, 9). So the 8
// rows one 8x8 ldmatrix matrix reads (one chunk column of 8 consecutive rows, chunks
// r m + c) fall in 8 different 16-byte bank groups: conflict-free for ldmatrix and
// ldmatrix.trans alike, with no swizzle (which D = 96's rows of 12 chunks would not allow).
// The C-fragment stores (4 bytes at row g, column 2q) hit banks 4 (m g mod 8) + q: all 32.
// cp.async writes runs of consecutive chunks, at most 2-way conflicted where a run wraps.
//   dK/dV kernel: K, V (BN rows), Q[2], dO[2] (BM rows, double-buffered), lse[2], delta[2]
//     (BM floats), P^T, dS^T (BN x BM). Bytes: D=16 62,464; 32 78,848; 64 76,288;
//     96 100,864; 128 125,440; 256 145,920.
//   dQ kernel: Q, dO (BMq rows), K[2], V[2] (BNq rows). Bytes: D=16 24,576; 32 40,960;
//     64 73,728; 96 79,872; 128 139,264; 256 135,168.
// The launcher returns cudaErrorNotSupported on a device whose opt-in shared memory per
// block is smaller (D = 128 and 256 on the 99 KB parts).
//
// The pipelines. dK/dV: the prologue issues K, V and step 0's Q, dO, lse, delta as one
// cp.async group. Step t waits for its group, and one __syncthreads then both publishes it
// and proves that every warp is done with step t - 1 (its Q/dO/lse/delta stage, which step
// t + 1's copies overwrite next, and the P^T/dS^T tiles, which phase 1 overwrites); the
// copies of step t + 1 are issued right after, so they overlap the whole of step t's
// compute. A second barrier per step separates phase 1's P^T/dS^T stores from phases 2-3.
// dQ: the same with K/V stages and one barrier per key block. Loads use cp.async.cg (16
// bytes, L2 only) with zero fill for rows outside the sequence (src-size 0, from the
// tensor's base address: no address outside a tensor is formed for a read), and 4-byte
// cp.async.ca for lse and delta.
// The loops: the dK/dV kernel walks (group member, query block) as one flat sequence of
// G * blocks steps; the dQ kernel walks its key blocks; each step knows whether it is masked
// from the block range (masked: start <= block < full_lo or full_hi <= block < end).
//
// Fragments (PTX ISA, mma.m16n8k16, .f16/.bf16; g = lane / 4, q = lane % 4; a 32-bit register
// holds two consecutive-k elements, the lower k in the low half):
//   A (16x16): a0 = (row g, k 2q..2q+1), a1 = (g + 8, 2q..), a2 = (g, 2q + 8..), a3 = (g + 8,
//              2q + 8..);   B (16x8): b0 = (n g, k 2q..2q+1), b1 = (n g, k 2q + 8..);
//   C (16x8, f32): c0, c1 = (row g, col 2q, 2q + 1), c2, c3 = (row g + 8, same).
// ldmatrix.x4: lanes 8i .. 8i + 7 address the rows of 8x8 matrix i, register i of lane l gets
// (row l / 4, cols 2 (l % 4), +1) of matrix i (.trans: the transpose's). An A block (16 m x 16
// k) is read as matrices (m half, k half) = (0,0), (1,0), (0,1), (1,1) -> a0..a3; a B block
// (16 n x 16 k: two n8 blocks) as (n half, k half) = (0,0), (0,1), (1,0), (1,1) -> b0, b1 of
// the first n8 block, then of the second. Lane l's row (ldsm_lane_coord), in the stored tile:
//   A, stored [m][k] (no .trans) and B, stored [k][n] (.trans):  row l % 16, col 8 (l / 16);
//   A, stored [k][m] (.trans) and B, stored [n][k] (no .trans):  row 8 (l / 16) + l % 8,
//                                                                col 8 ((l / 8) % 2).
// and block (f, s) (the f-th 16 along m or n, the s-th 16 along k) lies 16 f rows + 16 s
// columns further when the stored rows run along m/n, 16 s rows + 16 f columns with .trans.
// The stores of C fragments into the shared tiles use acc_coord (row 16 f + g + 8 h, col
// 8 n + 2 q).
//
// Registers (ptxas -v, CUDA 13.0, __launch_bounds__(threads, 1); float16 = bfloat16 within
// a few): dK/dV 168-241, dQ 114-255, preprocess 27, convert 32; no stack frame, no spills
// at sm_80 or sm_90a. One CTA per SM for the tensor-core kernels (2 for the 4-warp dQ
// kernels of D = 96 where shared memory allows).
//
// Tuning left for a GPU (nothing here has been measured): the tile table, and tiles per
// device (FlashAttention-2 picks by shared memory: larger on H100, smaller on 99 KB parts,
// which would also let D = 128, 256 run there); P^T kept in registers for dV where a warp
// owns whole key rows; 2 CTAs per SM for small D; v4 reductions of the dQ share through a
// shared-memory transpose; Q/dO fragments kept in registers in the dQ kernel for small D.

#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/ampere.cuh"
#include "../common/check.cuh"
#include "../common/dtype.cuh"
#include "../common/vec.cuh"
#include "attention.h"
#include "attention_mask.cuh"

namespace fusedops {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kWarpThreads = 32;
constexpr int kMma = 16;      // m and k of mma.m16n8k16 (and the 16-row blocks of ldmatrix.x4)
constexpr int kMmaN = 8;
constexpr int kChunk = 16;    // bytes per cp.async / ldmatrix row
constexpr int kChunkElems = 8;  // 16-bit elements per chunk
// Relative mask bounds are clamped to this: |key - query| inside a tile is < 256.
constexpr int kMaskClamp = 1 << 20;

// ---- The tile table ----

struct BwdTiles {
  // dK/dV kernel, 8 warps.
  int keys;            // BN: keys per CTA
  int queries;         // BM: query rows per step
  int sdp_warps_keys;  // phase 1 (S^T, dP^T: BN x BM): warps along keys (the rest along queries)
  int kv_warps_keys;   // phase 2 (dK, dV: BN x D): warps along keys (the rest along D)
  int dq_warps_rows;   // phase 3 (dQ share: BM x D): warps along query rows ...
  int dq_warps_dim;    // ... and along D (their product may be < 8: the rest sit it out)
  // dQ kernel, 16 query rows per warp.
  int q_rows;          // BMq
  int q_keys;          // BNq: keys per step
};

__host__ __device__ constexpr BwdTiles bwd_tiles(int head_dim) {
  switch (head_dim) {
    case 16: return {128, 64, 4, 8, 4, 1, 128, 64};
    case 32: return {128, 64, 4, 8, 4, 2, 128, 64};
    case 64: return {128, 32, 4, 4, 2, 4, 128, 64};
    case 96: return {128, 32, 4, 4, 2, 3, 64, 64};
    case 128: return {128, 32, 4, 4, 2, 4, 128, 64};
    default: return {64, 32, 4, 2, 2, 4, 64, 32};  // 256
  }
}

// Bytes between the rows of a 16-bit shared tile of `cols` columns: one chunk of padding.
__host__ __device__ constexpr int tile_pitch(int cols) { return cols * 2 + kChunk; }

constexpr int kKvWarps = 8;
constexpr int kKvThreads = kKvWarps * kWarpThreads;

// The dK/dV kernel's geometry for head dim kD.
template <int kD>
struct KvGeometry {
  static constexpr BwdTiles kTiles = bwd_tiles(kD);
  static constexpr int kBN = kTiles.keys;
  static constexpr int kBM = kTiles.queries;
  static constexpr int kPitchD = tile_pitch(kD);   // K, V, Q, dO rows
  static constexpr int kPitchM = tile_pitch(kBM);  // P^T, dS^T rows
  // Phase 1: S^T and dP^T, BN x BM.
  static constexpr int kSdpWarpsN = kTiles.sdp_warps_keys;
  static constexpr int kSdpWarpsM = kKvWarps / kSdpWarpsN;
  static constexpr int kSdpKeys = kBN / kSdpWarpsN;     // warp tile rows (keys)
  static constexpr int kSdpQueries = kBM / kSdpWarpsM;  // warp tile columns (queries)
  static constexpr int kSdpMF = kSdpKeys / kMma;
  static constexpr int kSdpNF = kSdpQueries / kMmaN;
  // Phase 2: dK and dV, BN x D.
  static constexpr int kKvWarpsN = kTiles.kv_warps_keys;
  static constexpr int kKvWarpsD = kKvWarps / kKvWarpsN;
  static constexpr int kKvKeys = kBN / kKvWarpsN;
  static constexpr int kKvDims = kD / kKvWarpsD;
  static constexpr int kKvMF = kKvKeys / kMma;
  static constexpr int kKvNF = kKvDims / kMmaN;
  // Phase 3: the dQ share, BM x D.
  static constexpr int kDqWarpsM = kTiles.dq_warps_rows;
  static constexpr int kDqWarpsD = kTiles.dq_warps_dim;
  static constexpr int kDqWarps = kDqWarpsM * kDqWarpsD;
  static constexpr int kDqRows = kBM / kDqWarpsM;
  static constexpr int kDqDims = kD / kDqWarpsD;
  static constexpr int kDqMF = kDqRows / kMma;
  static constexpr int kDqNF = kDqDims / kMmaN;
  // Shared memory, in bytes.
  static constexpr int kKTile = 0;
  static constexpr int kVTile = kKTile + kBN * kPitchD;
  static constexpr int kQTiles = kVTile + kBN * kPitchD;     // 2 stages
  static constexpr int kDoTiles = kQTiles + 2 * kBM * kPitchD;
  static constexpr int kLse = kDoTiles + 2 * kBM * kPitchD;  // 2 stages of BM floats
  static constexpr int kDelta = kLse + 2 * kBM * 4;
  static constexpr int kPtTile = kDelta + 2 * kBM * 4;
  static constexpr int kDstTile = kPtTile + kBN * kPitchM;
  static constexpr int kSmemBytes = kDstTile + kBN * kPitchM;

  static_assert(kD % 16 == 0 && kBN % 16 == 0 && kBM % 16 == 0, "16-multiples");
  static_assert(kSdpWarpsN * kSdpWarpsM == kKvWarps && kKvWarpsN * kKvWarpsD == kKvWarps &&
                    kDqWarps <= kKvWarps, "warp grids");
  static_assert(kSdpKeys % 16 == 0 && kSdpQueries % 16 == 0, "phase-1 warp tile");
  static_assert(kKvKeys % 16 == 0 && kKvDims % 16 == 0, "phase-2 warp tile");
  static_assert(kDqRows % 16 == 0 && kDqDims % 16 == 0, "phase-3 warp tile");
  static_assert(kBM <= kKvThreads / 2, "one lse and one delta copy per thread");
  static_assert(kSmemBytes <= 166912, "fits an A100's shared memory per block");
};

// The dQ kernel's geometry.
template <int kD>
struct QGeometry {
  static constexpr BwdTiles kTiles = bwd_tiles(kD);
  static constexpr int kBM = kTiles.q_rows;
  static constexpr int kBN = kTiles.q_keys;
  static constexpr int kWarps = kBM / kMma;
  static constexpr int kThreads = kWarps * kWarpThreads;
  static constexpr int kPitchD = tile_pitch(kD);
  static constexpr int kNF = kBN / kMmaN;    // S, dP: 16 x BN per warp
  static constexpr int kDqNF = kD / kMmaN;   // dQ: 16 x D per warp
  static constexpr int kQTile = 0;
  static constexpr int kDoTile = kQTile + kBM * kPitchD;
  static constexpr int kKTiles = kDoTile + kBM * kPitchD;  // 2 stages
  static constexpr int kVTiles = kKTiles + 2 * kBN * kPitchD;
  static constexpr int kSmemBytes = kVTiles + 2 * kBN * kPitchD;
  static_assert(kBM % 16 == 0 && kBN % 16 == 0, "16-multiples");
  static_assert(kSmemBytes <= 166912, "fits an A100's shared memory per block");
};

// ---- Index arithmetic (__host__ too, so that it can be checked on the host) ----

struct TileCoord {
  int row;
  int col;
};

// The row (in the stored tile) and first column of the 16-byte row lane `lane` points
// ldmatrix.x4 at, for the 16 x 16 block at the tile's origin. kA: an A operand (matrices in
// the order (m half, k half) = (0,0), (1,0), (0,1), (1,1)); else B ((n half, k half) = (0,0),
// (0,1), (1,0), (1,1)). kTrans: the tile is stored k-rows (MN-major) and read with .trans.
template <bool kA, bool kTrans>
__host__ __device__ __forceinline__ TileCoord ldsm_lane_coord(int lane) {
  if constexpr (kA != kTrans) {  // A [m][k], or B [k][n]: row-half is bit 3, column-half bit 4
    return {lane % 16, 8 * (lane / 16)};
  } else {                       // A [k][m], or B [n][k]: column-half is bit 3, row-half bit 4
    return {8 * (lane / 16) + lane % 8, 8 * ((lane / 8) % 2)};
  }
}

// Byte offset of block (f, s) from block (0, 0): f counts 16s along m (A) or n (B, pairs of
// n8 blocks), s counts 16s along k. The stored rows run along m/n unless kTrans.
template <bool kTrans, int kPitch>
__host__ __device__ constexpr uint32_t ldsm_block_offset(int f, int s) {
  return kTrans ? static_cast<uint32_t>(16 * s * kPitch + 32 * f)
                : static_cast<uint32_t>(16 * f * kPitch + 32 * s);
}

// Byte offset of the element at (stored row, column) of a 16-bit tile.
template <int kPitch>
__host__ __device__ constexpr uint32_t tile_offset(int row, int col) {
  return static_cast<uint32_t>(row * kPitch + col * 2);
}

// Lane `lane`'s ldmatrix offset for an operand whose warp tile starts at m/n index mn0 and
// k index k0 of the stored tile.
template <bool kA, bool kTrans, int kPitch>
__host__ __device__ __forceinline__ uint32_t ldsm_offset(int lane, int mn0, int k0) {
  const TileCoord c = ldsm_lane_coord<kA, kTrans>(lane);
  return kTrans ? tile_offset<kPitch>(k0 + c.row, mn0 + c.col)
                : tile_offset<kPitch>(mn0 + c.row, k0 + c.col);
}

// Where accumulator c[2 h], c[2 h + 1] of fragment (f, n) lies in the warp's tile.
__host__ __device__ __forceinline__ TileCoord acc_coord(int lane, int f, int n, int h) {
  return {kMma * f + lane / 4 + 8 * h, kMmaN * n + 2 * (lane % 4)};
}

// Which query rows see which keys of one (query block, key block) pair: query qb + ii sees key
// kb + jj iff visible(ii, jj). The same predicate as key_visible (plus rows inside the
// sequence), with the window bounds made relative to the two block starts so that the
// per-element test is int32 (|jj - ii| < 256 inside a tile, so clamping to +-2**20 keeps it).
struct TileMask {
  int queries;  // query rows of the block inside the sequence
  int keys;     // keys of the block inside the sequence
  int lo, hi;   // ii sees jj iff lo <= jj - ii <= hi

  __host__ __device__ __forceinline__ bool visible(int ii, int jj) const {
    const int diff = jj - ii;
    return ii < queries && jj < keys && diff >= lo && diff <= hi;
  }
};

__host__ __device__ __forceinline__ int clamp_int(int64_t x, int64_t lo, int64_t hi) {
  return static_cast<int>(x < lo ? lo : (x > hi ? hi : x));
}

__host__ __device__ __forceinline__ TileMask make_tile_mask(int64_t qb, int64_t kb, int64_t len_q,
                                                           int64_t len_k, int window_left,
                                                           int window_right) {
  // Row i sits at key position i + len_k - len_q and sees keys j with
  // position - left <= j <= position + right: with i = qb + ii, j = kb + jj that is
  // qb - kb + offset - left <= jj - ii <= qb - kb + offset + right.
  const int64_t base = qb - kb + (len_k - len_q);
  return {clamp_int(len_q - qb, 0, kMaskClamp), clamp_int(len_k - kb, 0, kMaskClamp),
          clamp_int(base - window_left, -kMaskClamp, kMaskClamp),
          clamp_int(base + window_right, -kMaskClamp, kMaskClamp)};
}

// A range of blocks, as the Triton kernel's _visible_*_range: blocks starting in
// [start, full_lo) and [full_hi, end) need the mask; those in [full_lo, full_hi) are visible
// in full and lie inside both sequences. Multiples of the block size, except that end (and
// full_lo when it is clamped to end) need not be; start <= full_lo <= full_hi <= end.
struct BlockRange {
  int64_t start, full_lo, full_hi, end;
};

__host__ __device__ __forceinline__ int64_t round_down(int64_t x, int64_t m) {
  return x >= 0 ? x / m * m : -((-x + m - 1) / m) * m;
}

__host__ __device__ __forceinline__ BlockRange clamp_range(int64_t start, int64_t full_lo,
                                                           int64_t full_hi, int64_t end) {
  full_lo = full_lo < start ? start : (full_lo > end ? end : full_lo);
  full_hi = full_hi < full_lo ? full_lo : (full_hi > end ? end : full_hi);
  return {start, full_lo, full_hi, end};
}

// The query blocks (of block_m rows) that see any key of [kb, kb + block_n).
__host__ __device__ __forceinline__ BlockRange query_blocks_seeing_keys(
    int64_t kb, int64_t len_q, int64_t len_k, int window_left, int window_right,
    int block_m, int block_n) {
  const KeyRange rows = rows_seeing_keys(kb, kb + block_n, len_q, len_k, window_left,
                                         window_right);
  if (rows.last < rows.first) return {0, 0, 0, 0};
  const int64_t start = round_down(rows.first, block_m);
  const int64_t end = rows.last + 1;
  // Rows that see every key of the block: position + right >= last key and
  // position - left <= kb, i.e. last_key - offset - right <= i <= kb - offset + left; and
  // none when the block is ragged (keys past len_k need the mask).
  const int64_t offset = len_k - len_q;
  const int64_t last_key = (kb + block_n < len_k ? kb + block_n : len_k) - 1;
  int64_t all_first = last_key - offset - window_right;
  all_first = all_first < 0 ? 0 : all_first;
  const int64_t full_lo = round_down(all_first + block_m - 1, block_m);
  int64_t all_end = kb - offset + window_left + 1;
  all_end = all_end > len_q ? len_q : all_end;
  const int64_t full_hi = kb + block_n > len_k ? 0 : round_down(all_end, block_m);
  return clamp_range(start, full_lo, full_hi, end);
}

// The key blocks (of block_n keys) that rows [qb, qb + block_m) see.
__host__ __device__ __forceinline__ BlockRange key_blocks_seen_by_queries(
    int64_t qb, int64_t len_q, int64_t len_k, int window_left, int window_right,
    int block_m, int block_n) {
  const KeyRange any = visible_keys(qb, qb + block_m, len_q, len_k, window_left, window_right);
  if (any.last < any.first) return {0, 0, 0, 0};
  const KeyRange all =
      keys_seen_by_all(qb, qb + block_m, len_q, len_k, window_left, window_right);
  const int64_t start = round_down(any.first, block_n);
  const int64_t end = any.last + 1;
  const int64_t full_lo = round_down(all.first + block_n - 1, block_n);
  const int64_t full_hi = round_down(all.last + 1, block_n);
  return clamp_range(start, full_lo, full_hi, end);
}

// lse (natural log) to the base-2 value the kernels subtract: -inf (no key seen) to +inf.
__host__ __device__ __forceinline__ float lse_to_log2(float lse) {
  return lse == -INFINITY ? INFINITY : lse * kLog2e;
}

// ---- PTX wrappers ----

// Adds (x, y) to the two consecutive floats at p (8-byte aligned): one vector reduction on
// sm_90 (red.global.add.v2.f32), two scalar ones before.
__device__ __forceinline__ void red_add2(float* p, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(x, y));
#else
  atomicAdd(p, x);
  atomicAdd(p + 1, y);
#endif
}

// ---- Warp-level products on shared tiles ----

template <int kMF, int kNF>
__device__ __forceinline__ void zero(float (&acc)[kMF][kNF][4]) {
#pragma unroll
  for (int f = 0; f < kMF; ++f) {
#pragma unroll
    for (int n = 0; n < kNF; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[f][n][e] = 0.0f;
    }
  }
}

// acc (16 kMF x 8 kNF) += A (16 kMF x 16 kSteps) B (16 kSteps x 8 kNF), both operands read
// from shared tiles with ldmatrix: `a` and `b` are this lane's shared addresses of block
// (0, 0) (ldsm_offset), blocks (f, s) lie ldsm_block_offset further.
template <typename T, int kMF, int kNF, int kSteps, bool kATrans, bool kBTrans, int kAPitch,
          int kBPitch>
__device__ __forceinline__ void warp_mma(float (&acc)[kMF][kNF][4], uint32_t a, uint32_t b) {
  static_assert(kNF % 2 == 0, "B is read in pairs of n8 blocks");
  // Unrolled by at most 8 steps: with all 16 of D = 256 unrolled, ptxas hoists every step's
  // fragments ahead of the products and runs out of registers.
#pragma unroll(kSteps < 4 ? kSteps : 4)
  for (int s = 0; s < kSteps; ++s) {
    uint32_t af[kMF][4];
    uint32_t bf[kNF / 2][4];
#pragma unroll
    for (int f = 0; f < kMF; ++f) {
      ampere::ldmatrix_x4<kATrans>(af[f], a + ldsm_block_offset<kATrans, kAPitch>(f, s));
    }
#pragma unroll
    for (int j = 0; j < kNF / 2; ++j) {
      ampere::ldmatrix_x4<kBTrans>(bf[j], b + ldsm_block_offset<kBTrans, kBPitch>(j, s));
    }
#pragma unroll
    for (int f = 0; f < kMF; ++f) {
#pragma unroll
      for (int n = 0; n < kNF; ++n) {
        ampere::mma_m16n8k16<T>(acc[f][n], af[f], bf[n / 2][2 * (n % 2)],
                                bf[n / 2][2 * (n % 2) + 1]);
      }
    }
  }
}

// The same with A (16 x 16 kSteps) already in registers, as A fragments.
template <typename T, int kNF, int kSteps, bool kBTrans, int kBPitch>
__device__ __forceinline__ void warp_mma_a_regs(float (&acc)[1][kNF][4],
                                                const uint32_t (&a)[kSteps][4], uint32_t b) {
  static_assert(kNF % 2 == 0, "B is read in pairs of n8 blocks");
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
#pragma unroll
    for (int j = 0; j < kNF / 2; ++j) {
      uint32_t bf[4];
      ampere::ldmatrix_x4<kBTrans>(bf, b + ldsm_block_offset<kBTrans, kBPitch>(j, s));
      ampere::mma_m16n8k16<T>(acc[0][2 * j], a[s], bf[0], bf[1]);
      ampere::mma_m16n8k16<T>(acc[0][2 * j + 1], a[s], bf[2], bf[3]);
    }
  }
}

// Stores a warp's accumulators, times `scale`, rounded to T, into a shared tile at warp tile
// origin (row0, col0).
template <typename T, int kMF, int kNF, int kPitch>
__device__ __forceinline__ void store_acc(unsigned char* tile, const float (&acc)[kMF][kNF][4],
                                          int lane, int row0, int col0, float scale) {
#pragma unroll
  for (int f = 0; f < kMF; ++f) {
#pragma unroll
    for (int n = 0; n < kNF; ++n) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const TileCoord at = acc_coord(lane, f, n, h);
        *reinterpret_cast<uint32_t*>(tile + tile_offset<kPitch>(row0 + at.row, col0 + at.col)) =
            pack2<T>(acc[f][n][2 * h] * scale, acc[f][n][2 * h + 1] * scale);
      }
    }
  }
}

// ---- Global <-> shared tiles ----

// Element (sequence b, absolute row, head) of a q/k/v-shaped tensor: `row` counts from the
// sequence's first row in the packed layout (cu_seqlens) or from 0 in the batched one.
__device__ __forceinline__ int64_t tensor_offset(const AttentionTensor& t, bool packed, int b,
                                                 int head, int64_t row) {
  return (packed ? 0 : static_cast<int64_t>(b) * t.batch_stride) + row * t.row_stride +
         static_cast<int64_t>(head) * t.head_stride;
}

// Copies rows [0, kRows) x cols [0, kCols) of the 16-bit rows at `src` (row stride
// `row_stride` elements) into the shared tile at `tile` (pitch tile_pitch(kCols)); rows at or
// past `valid` are zero-filled and read nothing (their copies name `fallback`, the tensor's
// base, with src-size 0). All kThreads threads call it.
template <typename T, int kRows, int kCols, int kThreads>
__device__ __forceinline__ void load_tile(uint32_t tile, const T* src, int64_t row_stride,
                                          int valid, const void* fallback, int thread) {
  constexpr int kRowChunks = kCols / kChunkElems;
  constexpr int kChunks = kRows * kRowChunks;
  constexpr int kPitch = tile_pitch(kCols);
#pragma unroll
  for (int i = 0; i < (kChunks + kThreads - 1) / kThreads; ++i) {
    const int chunk = thread + i * kThreads;
    if (kChunks % kThreads == 0 || chunk < kChunks) {
      const int row = chunk / kRowChunks;
      const int col = chunk % kRowChunks;
      const bool inside = row < valid;
      const void* from =
          inside ? static_cast<const void*>(src + row * row_stride + col * kChunkElems) : fallback;
      ampere::cp_async_cg_16(tile + static_cast<uint32_t>(row * kPitch + col * kChunk), from,
                             inside ? 16u : 0u);
    }
  }
}

// Copies the shared tile's rows [0, valid) to the 16-bit rows at `dst` with 16-byte stores.
// `first` and `stride` pick the threads taking part: thread t copies chunks t - first,
// t - first + stride, ... (first = 0, stride = kThreads: the whole CTA; per warp: its lanes).
template <typename T, int kRows, int kCols>
__device__ __forceinline__ void store_tile(T* dst, int64_t row_stride, int valid,
                                           const unsigned char* tile, int index, int stride) {
  constexpr int kRowChunks = kCols / kChunkElems;
  constexpr int kPitch = tile_pitch(kCols);
  for (int chunk = index; chunk < kRows * kRowChunks; chunk += stride) {
    const int row = chunk / kRowChunks;
    const int col = chunk % kRowChunks;
    if (row < valid) {
      *reinterpret_cast<uint4*>(dst + row * row_stride + col * kChunkElems) =
          *reinterpret_cast<const uint4*>(tile + row * kPitch + col * kChunk);
    }
  }
}

// ---- 1. delta = rowsum(dout * out) ----

constexpr int kPrepThreads = 256;

// Lanes per row of the preprocess: the power of two >= head_dim / 8 (one 16-byte chunk each).
__host__ __device__ constexpr int prep_lanes_per_row(int head_dim) {
  return head_dim <= 16 ? 2 : head_dim <= 32 ? 4 : head_dim <= 64 ? 8 : head_dim <= 128 ? 16 : 32;
}

template <typename T>
__global__ void __launch_bounds__(kPrepThreads)
    attention_bwd_preprocess_kernel(const __grid_constant__ AttentionBwdParams params) {
  const AttentionProblem& pr = params.problem;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const bool packed = pr.cu_seqlens_q != nullptr;
  const SequenceRows seq = clamp_sequence(pr.cu_seqlens_q, batch, pr.total_q, pr.seqlen_q);
  const int lanes = prep_lanes_per_row(pr.head_dim);
  const int rows_per_warp = kWarpThreads / lanes;
  const int lane = threadIdx.x % kWarpThreads;
  const int warp = threadIdx.x / kWarpThreads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kPrepThreads / lanes) +
                      warp * rows_per_warp + lane / lanes;
  const int chunk = lane % lanes;
  float sum = 0.0f;
  if (row < seq.length && chunk < pr.head_dim / kChunkElems) {
    const T* o = static_cast<const T*>(params.out.data) +
                 tensor_offset(params.out, packed, batch, head, seq.begin + row) +
                 chunk * kChunkElems;
    const T* g = static_cast<const T*>(params.grad_out.data) +
                 tensor_offset(params.grad_out, packed, batch, head, seq.begin + row) +
                 chunk * kChunkElems;
    const Vec<T> ov = load_vec(o);
    const Vec<T> gv = load_vec(g);
#pragma unroll
    for (int i = 0; i < Vec<T>::kSize; ++i) sum = fmaf(to_float(ov.v[i]), to_float(gv.v[i]), sum);
  }
  for (int offset = lanes / 2; offset > 0; offset /= 2) {
    sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  }
  if (chunk == 0 && row < seq.length) {
    params.delta[lse_index(pr, batch, head, seq.begin, row)] = sum;
  }
}

// ---- 2. dK, dV (and, with atomics, the dQ shares) ----

template <typename T, int kD>
__global__ void __launch_bounds__(kKvThreads, 1)
    attention_bwd_dkdv_kernel(const __grid_constant__ AttentionBwdParams params,
                              const float scale_log2, const bool atomic_dq) {
  using G = KvGeometry<kD>;
  extern __shared__ __align__(16) unsigned char smem[];
  const uint32_t smem_base = ampere::smem_address(smem);
  const AttentionProblem& pr = params.problem;
  const int thread = threadIdx.x;
  const int lane = thread % kWarpThreads;
  const int warp = thread / kWarpThreads;
  const int head_kv = blockIdx.y;
  const int batch = blockIdx.z;
  const bool packed = pr.cu_seqlens_q != nullptr;
  const SequenceRows seq_q = clamp_sequence(pr.cu_seqlens_q, batch, pr.total_q, pr.seqlen_q);
  const SequenceRows seq_k = clamp_sequence(pr.cu_seqlens_k, batch, pr.total_k, pr.seqlen_k);
  const int64_t kb = static_cast<int64_t>(blockIdx.x) * G::kBN;
  if (kb >= seq_k.length) return;
  const int keys_valid = clamp_int(seq_k.length - kb, 0, G::kBN);
  const int group = pr.heads_q / pr.heads_kv;
  const BlockRange range = query_blocks_seeing_keys(kb, seq_q.length, seq_k.length,
                                                    pr.window_left, pr.window_right, G::kBM,
                                                    G::kBN);
  const int64_t blocks = (range.end - range.start + G::kBM - 1) / G::kBM;  // 0 when empty
  const int64_t steps = blocks * group;

  // K and V, once (not at all for keys no query sees: their gradients are the zeros below).
  if (steps > 0) {
    load_tile<T, G::kBN, kD, kKvThreads>(
        smem_base + G::kKTile,
        static_cast<const T*>(pr.k.data) +
            tensor_offset(pr.k, packed, batch, head_kv, seq_k.begin + kb),
        pr.k.row_stride, keys_valid, pr.k.data, thread);
    load_tile<T, G::kBN, kD, kKvThreads>(
        smem_base + G::kVTile,
        static_cast<const T*>(pr.v.data) +
            tensor_offset(pr.v, packed, batch, head_kv, seq_k.begin + kb),
        pr.v.row_stride, keys_valid, pr.v.data, thread);
  }

  // Q, dO, lse and delta of query block qb of group member `member` into stage `stage`.
  auto load_step = [&](int stage, int member, int64_t qb) {
    const int head = head_kv * group + member;
    const int rows = clamp_int(seq_q.length - qb, 0, G::kBM);
    const int64_t row = seq_q.begin + qb;
    load_tile<T, G::kBM, kD, kKvThreads>(
        smem_base + G::kQTiles + stage * G::kBM * G::kPitchD,
        static_cast<const T*>(pr.q.data) + tensor_offset(pr.q, packed, batch, head, row),
        pr.q.row_stride, rows, pr.q.data, thread);
    load_tile<T, G::kBM, kD, kKvThreads>(
        smem_base + G::kDoTiles + stage * G::kBM * G::kPitchD,
        static_cast<const T*>(params.grad_out.data) +
            tensor_offset(params.grad_out, packed, batch, head, row),
        params.grad_out.row_stride, rows, params.grad_out.data, thread);
    const int64_t stats = lse_index(pr, batch, head, seq_q.begin, qb);
    if (thread < 2 * G::kBM) {  // threads [0, BM) copy lse, [BM, 2 BM) delta
      const bool is_lse = thread < G::kBM;
      const int r = is_lse ? thread : thread - G::kBM;
      const float* base = is_lse ? params.lse : params.delta;
      const uint32_t dst = smem_base + (is_lse ? G::kLse : G::kDelta) + (stage * G::kBM + r) * 4;
      ampere::cp_async_ca_4(dst, r < rows ? base + stats + r : base, r < rows ? 4u : 0u);
    }
  };

  int member = 0;
  int64_t qb = range.start;
  if (steps > 0) load_step(0, member, qb);
  ampere::cp_async_commit();

  float dk[G::kKvMF][G::kKvNF][4];
  float dv[G::kKvMF][G::kKvNF][4];
  zero(dk);
  zero(dv);

  // Per-warp tile origins of the three phases.
  const int sdp_key0 = (warp / G::kSdpWarpsM) * G::kSdpKeys;
  const int sdp_q0 = (warp % G::kSdpWarpsM) * G::kSdpQueries;
  const int kv_key0 = (warp / G::kKvWarpsD) * G::kKvKeys;
  const int kv_d0 = (warp % G::kKvWarpsD) * G::kKvDims;
  const int dq_q0 = (warp / G::kDqWarpsD) * G::kDqRows;
  const int dq_d0 = (warp % G::kDqWarpsD) * G::kDqDims;
  const bool dq_warp = atomic_dq && warp < G::kDqWarps;
  const int64_t accum_row_stride = static_cast<int64_t>(pr.heads_q) * kD;
  // grad_q_accum row of sequence row 0: (B, Sq) rows batched, Tq rows packed.
  const int64_t accum_row0 = packed ? seq_q.begin : static_cast<int64_t>(batch) * pr.seqlen_q;

  const uint32_t k_tile = smem_base + G::kKTile;
  const uint32_t v_tile = smem_base + G::kVTile;
  const uint32_t pt_tile = smem_base + G::kPtTile;
  const uint32_t dst_tile = smem_base + G::kDstTile;

#pragma unroll 1
  for (int64_t step = 0; step < steps; ++step) {
    const int stage = static_cast<int>(step & 1);
    ampere::cp_async_wait<0>();  // this thread's copies of this step (and K, V) have landed
    __syncthreads();      // everyone's have; and every warp is done with step - 1
    int next_member = member;
    int64_t next_qb = qb + G::kBM;
    if (next_qb >= range.end) {
      next_qb = range.start;
      ++next_member;
    }
    if (step + 1 < steps) load_step(stage ^ 1, next_member, next_qb);
    ampere::cp_async_commit();

    const bool masked = qb < range.full_lo || qb >= range.full_hi;
    const uint32_t q_tile = smem_base + G::kQTiles + stage * G::kBM * G::kPitchD;
    const uint32_t do_tile = smem_base + G::kDoTiles + stage * G::kBM * G::kPitchD;

    // Phase 1: S^T = K Q^T and dP^T = V dO^T, then P^T and dS^T into shared memory.
    {
      float s[G::kSdpMF][G::kSdpNF][4];
      zero(s);
      warp_mma<T, G::kSdpMF, G::kSdpNF, kD / kMma, false, false, G::kPitchD, G::kPitchD>(
          s, k_tile + ldsm_offset<true, false, G::kPitchD>(lane, sdp_key0, 0),
          q_tile + ldsm_offset<false, false, G::kPitchD>(lane, sdp_q0, 0));
      const float* lse_s = reinterpret_cast<const float*>(smem + G::kLse) + stage * G::kBM;
      const float* delta_s = reinterpret_cast<const float*>(smem + G::kDelta) + stage * G::kBM;
      float lse2[G::kSdpNF][2];
#pragma unroll
      for (int n = 0; n < G::kSdpNF; ++n) {
        const int col = sdp_q0 + acc_coord(lane, 0, n, 0).col;
        const float2 l = *reinterpret_cast<const float2*>(lse_s + col);
        lse2[n][0] = lse_to_log2(l.x);
        lse2[n][1] = lse_to_log2(l.y);
      }
#pragma unroll
      for (int f = 0; f < G::kSdpMF; ++f) {
#pragma unroll
        for (int n = 0; n < G::kSdpNF; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[f][n][e] = exp2f(fmaf(s[f][n][e], scale_log2, -lse2[n][e % 2]));
          }
        }
      }
      if (masked) {
        const TileMask mask = make_tile_mask(qb, kb, seq_q.length, seq_k.length, pr.window_left,
                                             pr.window_right);
#pragma unroll
        for (int f = 0; f < G::kSdpMF; ++f) {
#pragma unroll
          for (int n = 0; n < G::kSdpNF; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const TileCoord at = acc_coord(lane, f, n, e / 2);  // (key, query) in the warp tile
              if (!mask.visible(sdp_q0 + at.col + e % 2, sdp_key0 + at.row)) s[f][n][e] = 0.0f;
            }
          }
        }
      }
      float dp[G::kSdpMF][G::kSdpNF][4];
      zero(dp);
      warp_mma<T, G::kSdpMF, G::kSdpNF, kD / kMma, false, false, G::kPitchD, G::kPitchD>(
          dp, v_tile + ldsm_offset<true, false, G::kPitchD>(lane, sdp_key0, 0),
          do_tile + ldsm_offset<false, false, G::kPitchD>(lane, sdp_q0, 0));
      float delta[G::kSdpNF][2];
#pragma unroll
      for (int n = 0; n < G::kSdpNF; ++n) {
        const int col = sdp_q0 + acc_coord(lane, 0, n, 0).col;
        const float2 d = *reinterpret_cast<const float2*>(delta_s + col);
        delta[n][0] = d.x;
        delta[n][1] = d.y;
      }
#pragma unroll
      for (int f = 0; f < G::kSdpMF; ++f) {
#pragma unroll
        for (int n = 0; n < G::kSdpNF; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) dp[f][n][e] = s[f][n][e] * (dp[f][n][e] - delta[n][e % 2]);
        }
      }
      store_acc<T, G::kSdpMF, G::kSdpNF, G::kPitchM>(smem + G::kPtTile, s, lane, sdp_key0, sdp_q0,
                                                     1.0f);
      store_acc<T, G::kSdpMF, G::kSdpNF, G::kPitchM>(smem + G::kDstTile, dp, lane, sdp_key0,
                                                     sdp_q0, 1.0f);
    }
    __syncthreads();  // P^T and dS^T are complete

    // Phase 2: dV += P^T dO, dK += dS^T Q.
    warp_mma<T, G::kKvMF, G::kKvNF, G::kBM / kMma, false, true, G::kPitchM, G::kPitchD>(
        dv, pt_tile + ldsm_offset<true, false, G::kPitchM>(lane, kv_key0, 0),
        do_tile + ldsm_offset<false, true, G::kPitchD>(lane, kv_d0, 0));
    warp_mma<T, G::kKvMF, G::kKvNF, G::kBM / kMma, false, true, G::kPitchM, G::kPitchD>(
        dk, dst_tile + ldsm_offset<true, false, G::kPitchM>(lane, kv_key0, 0),
        q_tile + ldsm_offset<false, true, G::kPitchD>(lane, kv_d0, 0));

    // Phase 3 (atomic dQ): grad_q_accum += scale * dS K for the rows inside the sequence.
    if (dq_warp) {
      float dq[G::kDqMF][G::kDqNF][4];
      zero(dq);
      warp_mma<T, G::kDqMF, G::kDqNF, G::kBN / kMma, true, true, G::kPitchM, G::kPitchD>(
          dq, dst_tile + ldsm_offset<true, true, G::kPitchM>(lane, dq_q0, 0),
          k_tile + ldsm_offset<false, true, G::kPitchD>(lane, dq_d0, 0));
      const int head = head_kv * group + member;
      const int rows = clamp_int(seq_q.length - qb, 0, G::kBM);
      float* accum = params.grad_q_accum + (accum_row0 + qb) * accum_row_stride +
                     static_cast<int64_t>(head) * kD;
#pragma unroll
      for (int f = 0; f < G::kDqMF; ++f) {
#pragma unroll
        for (int n = 0; n < G::kDqNF; ++n) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const TileCoord at = acc_coord(lane, f, n, h);
            const int r = dq_q0 + at.row;
            if (r < rows) {
              red_add2(accum + r * accum_row_stride + dq_d0 + at.col, pr.scale * dq[f][n][2 * h],
                       pr.scale * dq[f][n][2 * h + 1]);
            }
          }
        }
      }
    }
    member = next_member;
    qb = next_qb;
  }

  // dK (times scale) and dV through the K and V tiles, then 16-byte stores of the keys inside.
  ampere::cp_async_wait<0>();  // (nothing is in flight after the last step; the tiles are reused)
  __syncthreads();      // every warp is done reading K and V
  store_acc<T, G::kKvMF, G::kKvNF, G::kPitchD>(smem + G::kKTile, dk, lane, kv_key0, kv_d0,
                                               pr.scale);
  store_acc<T, G::kKvMF, G::kKvNF, G::kPitchD>(smem + G::kVTile, dv, lane, kv_key0, kv_d0, 1.0f);
  __syncthreads();
  store_tile<T, G::kBN, kD>(
      static_cast<T*>(params.grad_k.data) +
          tensor_offset(params.grad_k, packed, batch, head_kv, seq_k.begin + kb),
      params.grad_k.row_stride, keys_valid, smem + G::kKTile, thread, kKvThreads);
  store_tile<T, G::kBN, kD>(
      static_cast<T*>(params.grad_v.data) +
          tensor_offset(params.grad_v, packed, batch, head_kv, seq_k.begin + kb),
      params.grad_v.row_stride, keys_valid, smem + G::kVTile, thread, kKvThreads);
}

// ---- 3a. grad_q = grad_q_accum, cast ----

constexpr int kConvertThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kConvertThreads)
    attention_bwd_convert_dq_kernel(const __grid_constant__ AttentionBwdParams params,
                                    const int64_t rows) {
  const AttentionProblem& pr = params.problem;
  const bool packed = pr.cu_seqlens_q != nullptr;
  const int head_chunks = pr.head_dim / kChunkElems;
  const int64_t row_chunks = static_cast<int64_t>(pr.heads_q) * head_chunks;
  const int64_t chunks = rows * row_chunks;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kConvertThreads + threadIdx.x; i < chunks;
       i += static_cast<int64_t>(gridDim.x) * kConvertThreads) {
    const int64_t row = i / row_chunks;
    const int c = static_cast<int>(i - row * row_chunks);
    const int head = c / head_chunks;
    const int d = (c % head_chunks) * kChunkElems;
    // Batched rows are (b, s) pairs of a (B, Sq) grid; packed rows are the rows of q.
    const int b = packed ? 0 : static_cast<int>(row / pr.seqlen_q);
    const int64_t s = packed ? row : row - static_cast<int64_t>(b) * pr.seqlen_q;
    const float4* src = reinterpret_cast<const float4*>(params.grad_q_accum + i * kChunkElems);
    const float4 x0 = src[0];
    const float4 x1 = src[1];
    Vec<T> out;
    out.v[0] = from_float<T>(x0.x);
    out.v[1] = from_float<T>(x0.y);
    out.v[2] = from_float<T>(x0.z);
    out.v[3] = from_float<T>(x0.w);
    out.v[4] = from_float<T>(x1.x);
    out.v[5] = from_float<T>(x1.y);
    out.v[6] = from_float<T>(x1.z);
    out.v[7] = from_float<T>(x1.w);
    store_vec(static_cast<T*>(params.grad_q.data) +
                  tensor_offset(params.grad_q, packed, b, head, s) + d,
              out);
  }
}

// ---- 3b. dQ without atomics ----

template <typename T, int kD>
__global__ void __launch_bounds__(QGeometry<kD>::kThreads, 1)
    attention_bwd_dq_kernel(const __grid_constant__ AttentionBwdParams params,
                            const float scale_log2) {
  using G = QGeometry<kD>;
  extern __shared__ __align__(16) unsigned char smem[];
  const uint32_t smem_base = ampere::smem_address(smem);
  const AttentionProblem& pr = params.problem;
  const int thread = threadIdx.x;
  const int lane = thread % kWarpThreads;
  const int warp = thread / kWarpThreads;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const bool packed = pr.cu_seqlens_q != nullptr;
  const SequenceRows seq_q = clamp_sequence(pr.cu_seqlens_q, batch, pr.total_q, pr.seqlen_q);
  const SequenceRows seq_k = clamp_sequence(pr.cu_seqlens_k, batch, pr.total_k, pr.seqlen_k);
  // The last query blocks see the most keys under a causal mask: launch them first.
  const int64_t qb = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * G::kBM;
  if (qb >= seq_q.length) return;
  const int rows = clamp_int(seq_q.length - qb, 0, G::kBM);
  const int head_kv = head / (pr.heads_q / pr.heads_kv);
  const BlockRange range = key_blocks_seen_by_queries(qb, seq_q.length, seq_k.length,
                                                      pr.window_left, pr.window_right, G::kBM,
                                                      G::kBN);
  const int64_t row = seq_q.begin + qb;
  if (range.start < range.end) {  // (rows that see no key only store zeros)
    load_tile<T, G::kBM, kD, G::kThreads>(
        smem_base + G::kQTile,
        static_cast<const T*>(pr.q.data) + tensor_offset(pr.q, packed, batch, head, row),
        pr.q.row_stride, rows, pr.q.data, thread);
    load_tile<T, G::kBM, kD, G::kThreads>(
        smem_base + G::kDoTile,
        static_cast<const T*>(params.grad_out.data) +
            tensor_offset(params.grad_out, packed, batch, head, row),
        params.grad_out.row_stride, rows, params.grad_out.data, thread);
  }
  const T* k_rows = static_cast<const T*>(pr.k.data) +
                    tensor_offset(pr.k, packed, batch, head_kv, seq_k.begin);
  const T* v_rows = static_cast<const T*>(pr.v.data) +
                    tensor_offset(pr.v, packed, batch, head_kv, seq_k.begin);
  auto load_keys = [&](int stage, int64_t kb) {
    const int keys = clamp_int(seq_k.length - kb, 0, G::kBN);
    load_tile<T, G::kBN, kD, G::kThreads>(smem_base + G::kKTiles + stage * G::kBN * G::kPitchD,
                                          k_rows + kb * pr.k.row_stride, pr.k.row_stride, keys,
                                          pr.k.data, thread);
    load_tile<T, G::kBN, kD, G::kThreads>(smem_base + G::kVTiles + stage * G::kBN * G::kPitchD,
                                          v_rows + kb * pr.v.row_stride, pr.v.row_stride, keys,
                                          pr.v.data, thread);
  };
  if (range.start < range.end) load_keys(0, range.start);
  ampere::cp_async_commit();

  // lse (base 2) and delta of this thread's rows g and g + 8 of the warp's 16.
  const int64_t stats = lse_index(pr, batch, head, seq_q.begin, qb);
  float lse2[2];
  float delta[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = warp * kMma + acc_coord(lane, 0, 0, h).row;
    lse2[h] = r < rows ? lse_to_log2(params.lse[stats + r]) : INFINITY;
    delta[h] = r < rows ? params.delta[stats + r] : 0.0f;
  }

  float dq[1][G::kDqNF][4];
  zero(dq);
  // Q and dO are the A operands of S and dP (the warp's 16 rows), K and V their B operands.
  const uint32_t a_rows = ldsm_offset<true, false, G::kPitchD>(lane, warp * kMma, 0);
  const uint32_t q_frag = smem_base + G::kQTile + a_rows;
  const uint32_t do_frag = smem_base + G::kDoTile + a_rows;
  const uint32_t kv_b = ldsm_offset<false, false, G::kPitchD>(lane, 0, 0);     // K, V as B of S, dP
  const uint32_t k_trans = ldsm_offset<false, true, G::kPitchD>(lane, 0, 0);  // K as B of dQ

  int stage = 0;
#pragma unroll 1
  for (int64_t kb = range.start; kb < range.end; kb += G::kBN) {
    ampere::cp_async_wait<0>();
    __syncthreads();  // this block's K/V are in; every warp is done with the other stage
    if (kb + G::kBN < range.end) load_keys(stage ^ 1, kb + G::kBN);
    ampere::cp_async_commit();
    const uint32_t k_tile = smem_base + G::kKTiles + stage * G::kBN * G::kPitchD;
    const uint32_t v_tile = smem_base + G::kVTiles + stage * G::kBN * G::kPitchD;

    float s[1][G::kNF][4];
    zero(s);
    warp_mma<T, 1, G::kNF, kD / kMma, false, false, G::kPitchD, G::kPitchD>(s, q_frag,
                                                                           k_tile + kv_b);
#pragma unroll
    for (int n = 0; n < G::kNF; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[0][n][e] = exp2f(fmaf(s[0][n][e], scale_log2, -lse2[e / 2]));
    }
    if (kb < range.full_lo || kb >= range.full_hi) {
      const TileMask mask = make_tile_mask(qb, kb, seq_q.length, seq_k.length, pr.window_left,
                                           pr.window_right);
#pragma unroll
      for (int n = 0; n < G::kNF; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const TileCoord at = acc_coord(lane, 0, n, e / 2);  // (query, key) in the warp tile
          if (!mask.visible(warp * kMma + at.row, at.col + e % 2)) s[0][n][e] = 0.0f;
        }
      }
    }
    float dp[1][G::kNF][4];
    zero(dp);
    warp_mma<T, 1, G::kNF, kD / kMma, false, false, G::kPitchD, G::kPitchD>(dp, do_frag,
                                                                           v_tile + kv_b);
    // dS as A fragments: key step j is n8 blocks 2j (k 0-7) and 2j + 1 (k 8-15).
    uint32_t ds[G::kBN / kMma][4];
#pragma unroll
    for (int j = 0; j < G::kBN / kMma; ++j) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int n = 2 * j + half;
        ds[j][2 * half] = pack2<T>(s[0][n][0] * (dp[0][n][0] - delta[0]),
                                           s[0][n][1] * (dp[0][n][1] - delta[0]));
        ds[j][2 * half + 1] = pack2<T>(s[0][n][2] * (dp[0][n][2] - delta[1]),
                                               s[0][n][3] * (dp[0][n][3] - delta[1]));
      }
    }
    warp_mma_a_regs<T, G::kDqNF, G::kBN / kMma, true, G::kPitchD>(dq, ds, k_tile + k_trans);
    stage ^= 1;
  }

  // dQ (times scale) through the warp's own rows of the Q tile, then 16-byte stores.
  ampere::cp_async_wait<0>();
  __syncthreads();  // no copy is still landing in the Q tile (nor anywhere else)
  unsigned char* rows_tile = smem + G::kQTile + warp * kMma * G::kPitchD;
  store_acc<T, 1, G::kDqNF, G::kPitchD>(rows_tile, dq, lane, 0, 0, pr.scale);
  __syncwarp();
  store_tile<T, kMma, kD>(
      static_cast<T*>(params.grad_q.data) +
          tensor_offset(params.grad_q, packed, batch, head, row + warp * kMma),
      params.grad_q.row_stride, rows - warp * kMma, rows_tile, lane, kWarpThreads);
}

// ---- Argument checks ----

constexpr int kHeadDims[] = {16, 32, 64, 96, 128, 256};

int head_dim_index(int head_dim) {
  for (int i = 0; i < 6; ++i) {
    if (kHeadDims[i] == head_dim) return i;
  }
  return -1;
}

bool tensor_ok(const AttentionTensor& t, bool packed) {
  return t.data != nullptr && reinterpret_cast<uintptr_t>(t.data) % 16 == 0 &&
         t.row_stride >= 0 && t.row_stride % 8 == 0 && t.head_stride >= 0 &&
         t.head_stride % 8 == 0 && (packed || (t.batch_stride >= 0 && t.batch_stride % 8 == 0));
}

constexpr int64_t kMaxGridY = 65535;

bool params_ok(const AttentionBwdParams& params) {
  const AttentionProblem& p = params.problem;
  if (p.type != AttentionType::kFloat16 && p.type != AttentionType::kBFloat16) return false;
  if (head_dim_index(p.head_dim) < 0) return false;
  if (p.batch < 0 || p.batch > kMaxGridY) return false;
  if (p.heads_q < 1 || p.heads_kv < 1 || p.heads_q > kMaxGridY || p.heads_q % p.heads_kv != 0) {
    return false;
  }
  // Grid x counts blocks of >= 16 rows; lengths past int32 are refused.
  if (p.seqlen_q < 0 || p.seqlen_k < 0 || p.seqlen_q > INT32_MAX || p.seqlen_k > INT32_MAX) {
    return false;
  }
  const bool packed = p.cu_seqlens_q != nullptr;
  if (packed != (p.cu_seqlens_k != nullptr)) return false;
  if (packed && (p.total_q < 0 || p.total_k < 0)) return false;
  if (p.window_left < -kAttentionUnbounded || p.window_left > kAttentionUnbounded ||
      p.window_right < -kAttentionUnbounded || p.window_right > kAttentionUnbounded) {
    return false;
  }
  if (p.batch == 0) return true;  // nothing is read or written
  if (p.seqlen_q > 0) {
    if (!tensor_ok(p.q, packed) || !tensor_ok(params.out, packed) ||
        !tensor_ok(params.grad_out, packed) || !tensor_ok(params.grad_q, packed) ||
        params.lse == nullptr || params.delta == nullptr) {
      return false;
    }
    if (!params.deterministic &&
        (params.grad_q_accum == nullptr ||
         reinterpret_cast<uintptr_t>(params.grad_q_accum) % 16 != 0)) {
      return false;
    }
  }
  if (p.seqlen_k > 0) {
    if (!tensor_ok(p.k, packed) || !tensor_ok(p.v, packed) || !tensor_ok(params.grad_k, packed) ||
        !tensor_ok(params.grad_v, packed)) {
      return false;
    }
  }
  return true;
}

// ---- The launchers ----

// Raises the kernel's dynamic shared memory limit once per device (64 devices; any beyond
// set it on every launch), after checking that the device has that much.
template <typename Kernel>
cudaError_t prepare_kernel(Kernel kernel, int smem_bytes, std::atomic<uint64_t>& configured) {
  int device = 0;
  FUSEDOPS_RETURN_IF_ERROR(cudaGetDevice(&device));
  const uint64_t bit = device >= 0 && device < 64 ? uint64_t{1} << device : 0;
  if (bit != 0 && (configured.load(std::memory_order_relaxed) & bit) != 0) return cudaSuccess;
  int optin = 0;
  FUSEDOPS_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (smem_bytes > optin) return cudaErrorNotSupported;
  FUSEDOPS_RETURN_IF_ERROR(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  configured.fetch_or(bit, std::memory_order_relaxed);
  return cudaSuccess;
}

int64_t accum_rows(const AttentionProblem& p) {
  return p.cu_seqlens_q != nullptr ? p.total_q : static_cast<int64_t>(p.batch) * p.seqlen_q;
}

template <typename T, int kD>
cudaError_t launch_bwd(const AttentionBwdParams& params, cudaStream_t stream) {
  using KvG = KvGeometry<kD>;
  using QG = QGeometry<kD>;
  const AttentionProblem& p = params.problem;
  const float scale_log2 = p.scale * kLog2e;
  const unsigned heads_q = static_cast<unsigned>(p.heads_q);
  const unsigned batch = static_cast<unsigned>(p.batch);

  if (p.seqlen_q > 0) {
    const int rows_per_cta = kPrepThreads / prep_lanes_per_row(kD);
    const dim3 grid(static_cast<unsigned>((p.seqlen_q + rows_per_cta - 1) / rows_per_cta),
                    heads_q, batch);
    attention_bwd_preprocess_kernel<T><<<grid, kPrepThreads, 0, stream>>>(params);
    FUSEDOPS_RETURN_IF_ERROR(cudaGetLastError());
  }
  if (p.seqlen_k > 0) {  // also when no query: grad_k and grad_v are written as zeros
    static std::atomic<uint64_t> configured{0};
    auto kernel = attention_bwd_dkdv_kernel<T, kD>;
    FUSEDOPS_RETURN_IF_ERROR(prepare_kernel(kernel, KvG::kSmemBytes, configured));
    const dim3 grid(static_cast<unsigned>((p.seqlen_k + KvG::kBN - 1) / KvG::kBN),
                    static_cast<unsigned>(p.heads_kv), batch);
    kernel<<<grid, kKvThreads, KvG::kSmemBytes, stream>>>(params, scale_log2,
                                                          !params.deterministic);
    FUSEDOPS_RETURN_IF_ERROR(cudaGetLastError());
  }
  if (!params.deterministic) {
    const int64_t chunks = accum_rows(p) * p.heads_q * (kD / kChunkElems);
    if (p.seqlen_q > 0 && chunks > 0) {
      const int64_t blocks = (chunks + kConvertThreads - 1) / kConvertThreads;
      const unsigned grid = static_cast<unsigned>(blocks < 65536 ? blocks : 65536);
      attention_bwd_convert_dq_kernel<T><<<grid, kConvertThreads, 0, stream>>>(params,
                                                                              accum_rows(p));
      FUSEDOPS_RETURN_IF_ERROR(cudaGetLastError());
    }
  } else if (p.seqlen_q > 0) {  // also when no key: grad_q is written as zeros
    static std::atomic<uint64_t> configured{0};
    auto kernel = attention_bwd_dq_kernel<T, kD>;
    FUSEDOPS_RETURN_IF_ERROR(prepare_kernel(kernel, QG::kSmemBytes, configured));
    const dim3 grid(static_cast<unsigned>((p.seqlen_q + QG::kBM - 1) / QG::kBM), heads_q, batch);
    kernel<<<grid, QG::kThreads, QG::kSmemBytes, stream>>>(params, scale_log2);
    FUSEDOPS_RETURN_IF_ERROR(cudaGetLastError());
  }
  return cudaSuccess;
}

// The instantiations, all in one place: [type][head dim].
using Launcher = cudaError_t (*)(const AttentionBwdParams&, cudaStream_t);
constexpr Launcher kLaunchers[2][6] = {
    {launch_bwd<__half, 16>, launch_bwd<__half, 32>, launch_bwd<__half, 64>,
     launch_bwd<__half, 96>, launch_bwd<__half, 128>, launch_bwd<__half, 256>},
    {launch_bwd<__nv_bfloat16, 16>, launch_bwd<__nv_bfloat16, 32>, launch_bwd<__nv_bfloat16, 64>,
     launch_bwd<__nv_bfloat16, 96>, launch_bwd<__nv_bfloat16, 128>,
     launch_bwd<__nv_bfloat16, 256>}};
static_assert(static_cast<int>(AttentionType::kFloat16) == 0 &&
                  static_cast<int>(AttentionType::kBFloat16) == 1,
              "kLaunchers is indexed by AttentionType");

}  // namespace

AttentionBwdWorkspace attention_bwd_workspace(const AttentionProblem& problem, bool deterministic) {
  const bool packed = problem.cu_seqlens_q != nullptr;
  const int64_t rows =
      packed ? problem.total_q : static_cast<int64_t>(problem.batch) * problem.seqlen_q;
  AttentionBwdWorkspace w;
  w.delta_floats = rows * problem.heads_q;
  w.grad_q_accum_floats = deterministic ? 0 : rows * problem.heads_q * problem.head_dim;
  return w;
}

cudaError_t attention_bwd_sm80(const AttentionBwdParams& params, cudaStream_t stream) {
  if (!params_ok(params)) return cudaErrorInvalidValue;
  const AttentionProblem& p = params.problem;
  if (p.batch == 0 || (p.seqlen_q == 0 && p.seqlen_k == 0)) return cudaSuccess;
  return kLaunchers[static_cast<int>(p.type)][head_dim_index(p.head_dim)](params, stream);
}

}  // namespace fusedops
