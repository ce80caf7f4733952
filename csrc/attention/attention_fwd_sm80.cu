// attention_fwd_sm80.cu — the FlashAttention-2 forward on sm_80 tensor cores: cp.async into a
// double-buffered shared-memory ring, ldmatrix, mma.sync m16n8k16, and the online softmax in
// registers. It also runs on sm_90 (for the head dims the sm_90a kernel does not cover, and
// when forced).
//
// The math is attention.h's. For one query row i of a sequence and the keys j it sees,
//
//   s_ij = q_i . k_j * scale,   lse_i = log sum_j exp(s_ij),   out_i = sum_j exp(s_ij - lse_i) v_j,
//
// computed one block of keys at a time without ever holding more than one block of scores
// (FlashAttention's online softmax): with a running maximum m and sum l,
//
//   m' = max(m, max_j s_ij),   l' = l exp(m - m') + sum_j exp(s_ij - m'),
//   acc' = acc exp(m - m') + sum_j exp(s_ij - m') v_j,   and at the end out = acc / l,
//   lse = m + log l.
//
// Everything is in base 2: the scores are multiplied once by scale * log2(e), so every
// exponential is one ex2.approx (MUFU.EX2), and lse = (m + log2 l) ln 2 at the end. The scores
// are scaled before the maximum is taken (not FA2's max-then-FFMA), since scale may be
// negative. A row that has seen no key yet has m = -inf; its exponentials are taken against
// 0 instead (exp2(-inf - 0) = 0), so it stays at acc = 0, l = 0, and if it never sees a key
// it writes out 0 and lse -inf. P is rounded to 16 bits for the P V product; l sums the
// float32 probabilities (as FA2 does).
//
// The work (FlashAttention-2's partitioning). One CTA per (block of 128 query rows, query
// head, sequence): blockIdx.x is linear over them, the query block fastest (so the CTAs that
// read one head's K and V run together and share them through L2) and reversed (the last
// query block first: under a causal mask it sees the most keys, so the longest CTAs start
// first and the short ones fill the tail). Each warp owns 16 or 32 query rows (one or two
// m16 tiles: kMTiles) and the whole row of scores of a key block in registers; two m tiles
// halve the shared-memory reads of K and V per multiply (each ldmatrix feeds 4 mma instead
// of 2), one frees the registers that D >= 96 needs. The CTA walks the key blocks its rows
// see, in order:
//   * blocks of keys that no row of the CTA sees are never loaded (visible_keys);
//   * blocks that every row sees whole (keys_seen_by_all) run without any mask arithmetic;
//     the ones before them (a window's left edge) and after them (the causal diagonal, a
//     window's right edge, the ragged end of the keys) are masked per element.
//
// The pipeline. Two shared-memory stages, each holding one key block of K and of V. Block n's
// iteration waits for its own copies (cp.async.wait_group 0), then one __syncthreads makes
// every thread's copies visible and proves that every warp is done with block n - 1's stage,
// into which the copies of block n + 1 are issued at once: they land while block n is
// multiplied. Q is copied once, at the start. Where its A fragments live in registers
// (kQInRegisters: D = 16, 32, 96, 128), Q is staged in stage 1 (and past it if larger), read
// into registers with ldmatrix, and its shared memory is free again: the first prefetch,
// issued behind the first iteration's barrier, overwrites it. Elsewhere (D = 64 with two m
// tiles, and D = 256, where the fragments would cost D / 2 or 64 registers on top of the
// accumulators: ptxas spills) Q keeps its own region and is read with one ldmatrix per
// 16-deep k step, as FlashAttention-2 does for every head dim.
//
// Loading. Every tile is moved in 16-byte chunks (8 elements of a row) with cp.async.cg
// (L2 only: K and V are shared by the CTAs of a head through L2, not L1). A row past the end
// of its sequence (query or key) is zero-filled (src-size 0, from the tensor's base pointer,
// so no address outside the tensor is formed): zero K rows give scores that the mask
// removes, zero V rows keep the products finite. Thread t copies chunk column t % kCopyCols
// (+ multiples of kCopyCols) of rows t / kCopyCols (+ multiples of kCopyRows); kCopyCols is
// the widest divisor of the row's chunks that leaves whole multiples of 8 rows per pass (4 at
// D = 96: 12 chunks a row). Offsets are int64; sequences are clamped (attention_mask.cuh).
//
// Shared-memory layout, XOR-swizzled in 16-byte chunks. Every tile (Q, K, V, the output
// staging) stores its rows one after the other, kRowBytes = 2 D bytes each, and chunk c of
// row r at chunk position
//     (c & ~(G - 1)) | ((c ^ (r >> kSwizzleShift)) & (G - 1))          (tile_offset)
// a permutation of the chunks within each group of G:
//     D = 64, 128, 256 (8, 16, 32 chunks a row):  G = 8, c ^ r          (FA2's Swizzle<3,3,3>)
//     D = 32, 96       (4, 12 chunks):            G = 4, c ^ (r / 2)
//     D = 16           (2 chunks):                G = 2, c ^ (r / 4)
// Bank conflicts are counted in eight 16-byte "slots" per 128 bytes: an ldmatrix serves one
// 8 x 8 matrix, 8 rows of 16 bytes at one logical chunk, at a time, and those 8 rows (8
// consecutive rows from a multiple of 8) are conflict free when they hit 8 different slots.
// Row r starts at slot (r kRowBytes / 16) mod 8: always 0 for G = 8, 4 (r mod 2) for 4 or
// 12 chunks a row, 2 (r mod 4) for 2 chunks; the XOR term supplies exactly the slot bits
// the row start leaves constant (r mod 8; (r / 2) mod 4; (r / 4) mod 2), so the 8 rows land
// in 8 different slots. (Checked by enumeration in a host emulation of this kernel, which
// counts one wavefront per 8 x 8 matrix for every ldmatrix of every head dim.)
//
// Fragments (PTX ISA, mma.m16n8k16, .f16/.bf16 inputs, f32 accumulators; g = lane / 4,
// q = lane % 4; a 32-bit register holds two elements consecutive along k, the lower k low):
//   A (16 x 16): a0 = (row g, k 2q..2q+1), a1 = (g + 8, 2q..), a2 = (g, 2q+8..), a3 = (g+8, 2q+8..)
//   B (16 x 8):  b0 = (k 2q..2q+1, col g), b1 = (k 2q+8.., col g)
//   C (16 x 8):  c0, c1 = (row g, col 2q, 2q+1), c2, c3 = (row g + 8, col 2q, 2q+1)
// S = Q K^T: A = 16 query rows x 16 of d; B = K^T, i.e. K stored key-major (d contiguous) is
// the "col" B operand as it lies: ldmatrix.x4 without .trans, matrix i = key half i / 2, d
// half i % 2, so registers 0, 1 are b0, b1 of keys 0-7 and 2, 3 those of keys 8-15.
// O += P V: A = P, 16 rows x 16 keys, and the C fragments of S already are A fragments of P
// (FA2's register reuse): a0 = S block 2t (c0, c1), a1 = block 2t (c2, c3), a2 = block 2t+1
// (c0, c1), a3 = block 2t+1 (c2, c3), converted to 16 bits in registers. B = V, stored
// key-major, i.e. MN-major for this product: ldmatrix.x4.trans, matrix i = key half i % 2,
// d half i / 2, hands lane l keys 2q, 2q + 1 of column g: registers 0, 1 are b0, b1 of d 0-7,
// registers 2, 3 those of d 8-15. The lane addresses of the three forms: Q (A order) and V
// (.trans): row l % 16, chunk l / 16; K: row 8 (l / 16) + l % 8, chunk (l / 8) % 2. Going 16
// rows further keeps the swizzle term and going 2 chunks further flips in-group bits, so the
// swizzled offset changes by an added constant and an XOR with a constant (step_offset):
// every address is a per-lane base fixed for the whole kernel.
//
// The epilogue. out = acc / l is rounded to 16 bits and written into shared memory in the
// same swizzled layout (one 32-bit store per pair: the 8 rows x 4 lanes of a store hit 32
// different banks), then copied out in 16-byte chunks to the rows inside the sequence;
// lse = (m + log2 l) ln 2 goes straight to memory (one float per row).
//
// Tile sizes: the one table, FwdTile below. Per thread, kMTiles x (S: kBlockN / 2 floats,
// the output accumulator: D / 2 floats, Q's fragments: D / 4 registers when kept). The
// choices are the largest tiles ptxas keeps spill-free at both sm_80 and sm_90a (registers
// in the table; 255 is the cap), closest to FA2's (4 warps x 32 rows, keys 128 at D = 64, 64
// at 96 and 128, 8 warps at 256):
//   D = 16, 32: 4 warps x 32 rows, 64 keys, Q in registers (128 keys spill at D = 32);
//   D = 64: 4 warps x 32 rows, 64 keys, Q in shared memory (Q in registers spills 60 bytes
//     at sm_80; 128 keys spill 240);
//   D = 96, 128: 8 warps x 16 rows, 64 keys, Q in registers (32 rows a warp spill);
//   D = 256: 8 warps x 16 rows, 32 keys, Q in shared memory: 128 accumulators + 16 scores;
//     64-key blocks would double-buffer 128 KB of K and V, past an A100's 163 KB with Q's
//     64 KB.
// D = 96 is its own instantiation (6 k steps of 16, 12 chunks a row), not padded to 128: a
// padded tile would copy and multiply a third more for nothing. Dynamic shared memory: 8, 16,
// 48, 48, 64 and 128 KB for D = 16, 32, 64, 96, 128, 256 (so D = 256 needs an A100/H100 class
// SM: consumer Ampere and Ada allow 99 KB and refuse the launch). Occupancy at 4 warps a CTA:
// 3 CTAs (D = 16) or 2 an SM; at 8 warps one.
//
// Nothing here has been timed yet. Tuning left for a GPU: 4 warps x 32 rows at D = 96/128
// (half the K/V shared-memory reads per mma; needs registers freed elsewhere, e.g. Q from
// shared memory), 128-key blocks at D <= 64, skipping the accumulator rescale when no row
// maximum moved (warp vote), and K / V in separate cp.async groups so S = Q K^T starts before
// V lands. FUSEDOPS_FWD_SM80_TILES overrides the table at compile time for such sweeps.

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
#include "attention.h"
#include "attention_mask.cuh"

namespace fusedops {
namespace {

// ---- The tile table ----

// Per head dim: warps, m16 tiles per warp (a warp owns 16 or 32 query rows), keys per block,
// and whether Q's A fragments live in registers. kBlockM = 16 * kMTiles * kWarps = 128.
#ifndef FUSEDOPS_FWD_SM80_TILES
#define FUSEDOPS_FWD_SM80_TILES                                                              \
  /*   D  warps  m16/warp  keys  Q in registers     registers sm_80 / sm_90a, no spills */   \
  TILE(16,   4,     2,     64,   true)   /*  168 / 167 */                                    \
  TILE(32,   4,     2,     64,   true)   /*  181 / 184 */                                    \
  TILE(64,   4,     2,     64,   false)  /*  255 / 244 */                                    \
  TILE(96,   8,     1,     64,   true)   /*  185 / 196 */                                    \
  TILE(128,  8,     1,     64,   true)   /*  245 / 222 */                                    \
  TILE(256,  8,     1,     32,   false)  /*  244 / 241 */
#endif

template <int kHeadDim> struct FwdTile;
#define TILE(D, WARPS, MTILES, KEYS, QREG)                                                   \
  template <> struct FwdTile<D> {                                                            \
    static constexpr int kWarps = WARPS, kMTiles = MTILES, kBlockN = KEYS;                   \
    static constexpr bool kQInRegisters = QREG;                                              \
  };
FUSEDOPS_FWD_SM80_TILES
#undef TILE

constexpr int kChunkBytes = 16;
constexpr int kChunkElems = 8;  // 16-bit elements per chunk
constexpr int kMmaM = 16;       // rows of one mma tile

template <int kHeadDim>
struct FwdConfig {
  using Tile = FwdTile<kHeadDim>;
  static constexpr int kWarps = Tile::kWarps;
  static constexpr int kMTiles = Tile::kMTiles;       // m16 tiles per warp
  static constexpr int kWarpRows = kMmaM * kMTiles;   // query rows per warp
  static constexpr int kBlockM = kWarpRows * kWarps;  // query rows per CTA
  static constexpr int kBlockN = Tile::kBlockN;       // keys per block
  static constexpr bool kQInRegisters = Tile::kQInRegisters;
  static constexpr int kThreads = 32 * kWarps;

  static constexpr int kChunks = kHeadDim / kChunkElems;  // 16-byte chunks per row
  static constexpr int kRowBytes = kHeadDim * 2;
  static constexpr int kDSteps = kHeadDim / 16;   // k steps of Q K^T; d pairs of n8 in P V
  static constexpr int kKeySteps = kBlockN / 16;  // k steps of P V; key pairs of n8 in Q K^T
  static constexpr int kSBlocks = kBlockN / 8;    // n8 blocks of a warp's scores
  static constexpr int kOBlocks = kHeadDim / 8;   // n8 blocks of a warp's output

  static constexpr int kQBytes = kBlockM * kRowBytes;
  static constexpr int kKVBytes = kBlockN * kRowBytes;  // one of K, V
  static constexpr int kStageBytes = 2 * kKVBytes;      // K, then V
  // Q in registers: Q is staged from stage 1 on, free once read (see the top). Else Q first.
  static constexpr int kQOffset = kQInRegisters ? kStageBytes : 0;
  static constexpr int kStagesOffset = kQInRegisters ? 0 : kQBytes;
  static constexpr int kSmemBytes = kQInRegisters
                                        ? (kQBytes > kStageBytes ? kStageBytes + kQBytes
                                                                 : 2 * kStageBytes)
                                        : kQBytes + 2 * kStageBytes;
  static constexpr int kStagingOffset = 0;  // the output tile, after the last barrier
  static_assert(kQBytes <= kSmemBytes, "the staging tile fits");

  // The copies: thread t owns chunk column t % kCopyCols of rows t / kCopyCols + kCopyRows p
  // (+ kCopyCols g): kCopyCols the widest whole number of swizzle groups that divides a row
  // and leaves a multiple of 8 rows per pass.
  static constexpr int copy_cols() {
    for (int cols = kChunks; cols > 1; --cols) {
      if (kChunks % cols == 0 && kThreads % cols == 0 && (kThreads / cols) % 8 == 0) {
        return cols;
      }
    }
    return 1;
  }
  static constexpr int kCopyCols = copy_cols();
  static constexpr int kCopyRows = kThreads / kCopyCols;
  static constexpr int kCopyGroups = kChunks / kCopyCols;  // column groups per row
  static_assert(kChunks % kCopyCols == 0 && kThreads % kCopyCols == 0, "copies split evenly");
  static_assert(kBlockM % kCopyRows == 0 && kBlockN % kCopyRows == 0, "copies split evenly");

  // The swizzle group (see the top).
  static constexpr int kSwizzleGroup = kChunks % 8 == 0 ? 8 : (kChunks % 4 == 0 ? 4 : 2);
  static constexpr int kSwizzleShift = kSwizzleGroup == 8 ? 0 : (kSwizzleGroup == 4 ? 1 : 2);
  static_assert(kChunks % kSwizzleGroup == 0, "whole swizzle groups per row");
  // Moving kCopyRows rows or kCopyCols chunks keeps the swizzle pattern (copy_offset).
  static_assert(kCopyRows % 8 == 0 && kCopyCols % kSwizzleGroup == 0, "");
  static_assert(kHeadDim % 16 == 0 && kBlockN % 16 == 0, "");
};

// ---- Index arithmetic (__host__ too, so that it can be checked on the host) ----

// The byte offset in a tile of chunk `chunk` (elements 8 chunk .. + 7) of row `row`.
template <int kHeadDim>
__host__ __device__ __forceinline__ uint32_t tile_offset(int row, int chunk) {
  using C = FwdConfig<kHeadDim>;
  constexpr int kGroup = C::kSwizzleGroup;
  const int swizzled =
      (chunk & ~(kGroup - 1)) | ((chunk ^ (row >> C::kSwizzleShift)) & (kGroup - 1));
  return static_cast<uint32_t>(row * C::kRowBytes + swizzled * kChunkBytes);
}

// tile_offset(row + 16 a, chunk + 2 b) from base = tile_offset(row, chunk), for chunk in
// {0, 1} and row anything: 16 rows further keep row >> shift modulo the group, and 2 b
// further flips the in-group bits of 2 b (an XOR) and adds the rest.
template <int kHeadDim>
__host__ __device__ __forceinline__ uint32_t step_offset(uint32_t base, int a, int b) {
  using C = FwdConfig<kHeadDim>;
  constexpr int kGroup = C::kSwizzleGroup;
  return (base ^ static_cast<uint32_t>(((2 * b) & (kGroup - 1)) * kChunkBytes)) +
         static_cast<uint32_t>(((2 * b) & ~(kGroup - 1)) * kChunkBytes + 16 * a * C::kRowBytes);
}

// The tile-relative row and chunk that `lane` points an ldmatrix.x4 at, for the 16 x 16 block
// at rows 0-15, chunks 0-1 (see the top): A order (Q, and V with .trans), and K's order.
struct LaneCoord {
  int row;
  int chunk;
};
__host__ __device__ __forceinline__ LaneCoord ldmatrix_a_coord(int lane) {
  return {lane % 16, lane / 16};
}
__host__ __device__ __forceinline__ LaneCoord ldmatrix_k_coord(int lane) {
  return {8 * (lane / 16) + lane % 8, (lane / 8) % 2};
}

// The first chunk thread `thread` copies, and the offset of its chunk (pass p, group g):
// rows kCopyRows further and columns kCopyCols further keep the swizzle pattern.
template <int kHeadDim>
__host__ __device__ __forceinline__ LaneCoord copy_coord(int thread) {
  using C = FwdConfig<kHeadDim>;
  return {thread / C::kCopyCols, thread % C::kCopyCols};
}
template <int kHeadDim>
__host__ __device__ __forceinline__ uint32_t copy_offset(uint32_t base, int p, int g) {
  using C = FwdConfig<kHeadDim>;
  return base + static_cast<uint32_t>(p * C::kCopyRows * C::kRowBytes +
                                      g * C::kCopyCols * kChunkBytes);
}

// ---- PTX wrappers (the sm_80 ones are in ../common/ampere.cuh) ----

// 2^x, MUFU.EX2 (flushes denormal results to 0; exp2(-inf) = 0).
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// ---- end of PTX wrappers ----

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---- The kernel ----

__device__ __forceinline__ int clamp_to_int(int64_t x, int lo, int hi) {
  return static_cast<int>(x < lo ? lo : (x > hi ? hi : x));
}

// Issues the copies of `rows` tile rows starting at `src` (the element of the first row at
// this thread's chunk column) into the tile at shared address `tile`; rows at or past
// `rows_left` are zero-filled from `fallback`.
template <typename T, int kHeadDim, int kRows>
__device__ __forceinline__ void copy_tile(uint32_t tile, uint32_t thread_offset, const T* src,
                                          int64_t row_stride, int copy_row, int rows_left,
                                          const T* fallback) {
  using C = FwdConfig<kHeadDim>;
#pragma unroll
  for (int p = 0; p < kRows / C::kCopyRows; ++p) {
    const bool inside = copy_row + p * C::kCopyRows < rows_left;
    const T* row = src + static_cast<int64_t>(p * C::kCopyRows) * row_stride;
#pragma unroll
    for (int g = 0; g < C::kCopyGroups; ++g) {
      ampere::cp_async_cg_16(tile + copy_offset<kHeadDim>(thread_offset, p, g),
                             inside ? row + g * C::kCopyCols * kChunkElems : fallback,
                             inside ? 16u : 0u);
    }
  }
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(FwdConfig<kHeadDim>::kThreads)
    attention_fwd_sm80_kernel(const __grid_constant__ AttentionFwdParams params, int m_blocks) {
  using C = FwdConfig<kHeadDim>;
  constexpr int kBlockM = C::kBlockM;
  constexpr int kBlockN = C::kBlockN;
  constexpr int kMTiles = C::kMTiles;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t smem_base = ampere::smem_address(smem);
  const AttentionProblem& pr = params.problem;

  const int thread = threadIdx.x;
  const int lane = thread % 32;
  const int warp = thread / 32;
  const int g = lane / 4;
  const int q = lane % 4;

  // Which (query block, head, sequence): the query block fastest, last first.
  const int linear = blockIdx.x;
  const int m_block = m_blocks - 1 - linear % m_blocks;
  const int head = (linear / m_blocks) % pr.heads_q;
  const int batch = (linear / m_blocks) / pr.heads_q;
  const int kv_head = head / (pr.heads_q / pr.heads_kv);

  const SequenceRows seq_q = clamp_sequence(pr.cu_seqlens_q, batch, pr.total_q, pr.seqlen_q);
  const SequenceRows seq_k = clamp_sequence(pr.cu_seqlens_k, batch, pr.total_k, pr.seqlen_k);
  const int64_t len_q = seq_q.length;
  const int64_t len_k = seq_k.length;
  const int64_t row0 = static_cast<int64_t>(m_block) * kBlockM;
  if (row0 >= len_q) return;  // a packed sequence shorter than max_seqlen_q

  const bool packed = pr.cu_seqlens_q != nullptr;
  const T* q_base = static_cast<const T*>(pr.q.data);
  const T* k_base = static_cast<const T*>(pr.k.data);
  const T* v_base = static_cast<const T*>(pr.v.data);
  const int64_t q_seq = (packed ? seq_q.begin * pr.q.row_stride : batch * pr.q.batch_stride) +
                        head * pr.q.head_stride;
  const int64_t k_seq = (packed ? seq_k.begin * pr.k.row_stride : batch * pr.k.batch_stride) +
                        kv_head * pr.k.head_stride;
  const int64_t v_seq = (packed ? seq_k.begin * pr.v.row_stride : batch * pr.v.batch_stride) +
                        kv_head * pr.v.head_stride;

  // The keys the block's rows see, in key blocks: [n_first, n_last], of which
  // [full_begin, full_end) need no mask.
  const KeyRange visible = visible_keys(row0, row0 + kBlockM, len_q, len_k, pr.window_left,
                                        pr.window_right);
  const KeyRange all = keys_seen_by_all(row0, row0 + kBlockM, len_q, len_k, pr.window_left,
                                        pr.window_right);
  const bool any_key = visible.first <= visible.last;
  // (Block indices fit in int: a sequence has fewer than 2**31 keys.)
  const int n_first = any_key ? static_cast<int>(visible.first / kBlockN) : 0;
  const int n_last = any_key ? static_cast<int>(visible.last / kBlockN) : -1;
  int full_begin = static_cast<int>((all.first + kBlockN - 1) / kBlockN);
  int full_end = static_cast<int>((all.last + 1) / kBlockN);
  if (all.first > all.last || full_begin >= full_end) full_begin = full_end = n_last + 1;

  // This thread's copy coordinates, the same in every tile.
  const LaneCoord copy = copy_coord<kHeadDim>(thread);
  const uint32_t copy_base = tile_offset<kHeadDim>(copy.row, copy.chunk);
  const int64_t copy_elem = static_cast<int64_t>(copy.chunk) * kChunkElems;

  // The running softmax state of this thread's rows: m tile mt, rows g and g + 8 (h = 0, 1)
  // of it. m in base-2 units; l the thread's partial sum (its quad's four add up at the end).
  float row_max[kMTiles][2];
  float row_sum[kMTiles][2];
  float acc[kMTiles][C::kOBlocks][4];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_max[mt][h] = -INFINITY;
      row_sum[mt][h] = 0.0f;
    }
#pragma unroll
    for (int ob = 0; ob < C::kOBlocks; ++ob) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][ob][e] = 0.0f;
    }
  }

  if (any_key) {
    const uint32_t q_tile = smem_base + C::kQOffset;
    const uint32_t stages = smem_base + C::kStagesOffset;

    // Q (one group), then the first key block (another).
    const int q_rows = len_q - row0 < kBlockM ? static_cast<int>(len_q - row0) : kBlockM;
    copy_tile<T, kHeadDim, kBlockM>(
        q_tile, copy_base, q_base + q_seq + (row0 + copy.row) * pr.q.row_stride + copy_elem,
        pr.q.row_stride, copy.row, q_rows, q_base);
    ampere::cp_async_commit();
    const int64_t key0 = static_cast<int64_t>(n_first) * kBlockN + copy.row;
    const T* k_src = k_base + k_seq + key0 * pr.k.row_stride + copy_elem;
    const T* v_src = v_base + v_seq + key0 * pr.v.row_stride + copy_elem;
    auto load_block = [&](int n, int stage) {
      const uint32_t k_tile = stages + stage * C::kStageBytes;
      const int64_t left = len_k - static_cast<int64_t>(n) * kBlockN;
      const int keys_left = left < kBlockN ? static_cast<int>(left) : kBlockN;
      copy_tile<T, kHeadDim, kBlockN>(k_tile, copy_base, k_src, pr.k.row_stride, copy.row,
                                      keys_left, k_base);
      copy_tile<T, kHeadDim, kBlockN>(k_tile + C::kKVBytes, copy_base, v_src, pr.v.row_stride,
                                      copy.row, keys_left, v_base);
      k_src += kBlockN * pr.k.row_stride;
      v_src += kBlockN * pr.v.row_stride;
    };
    load_block(n_first, 0);
    ampere::cp_async_commit();

    // The ldmatrix lane bases (tile-relative), fixed for the whole kernel. Q's 16-row block
    // of m tile mt is block warp * kMTiles + mt.
    const LaneCoord a_at = ldmatrix_a_coord(lane);
    const LaneCoord k_at = ldmatrix_k_coord(lane);
    const uint32_t a_lane = tile_offset<kHeadDim>(a_at.row, a_at.chunk);  // Q and V
    const uint32_t k_lane = tile_offset<kHeadDim>(k_at.row, k_at.chunk);

    // Q's A fragments [m tile][k step][register], when they live in registers.
    constexpr int kQTiles = C::kQInRegisters ? kMTiles : 1;
    constexpr int kQSteps = C::kQInRegisters ? C::kDSteps : 1;
    uint32_t q_frag[kQTiles][kQSteps][4];
    if constexpr (C::kQInRegisters) {
      ampere::cp_async_wait<1>();  // this thread's Q copies have landed
      __syncthreads();     // everyone's have
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int kk = 0; kk < C::kDSteps; ++kk) {
          ampere::ldmatrix_x4<false>(
              q_frag[mt][kk], q_tile + step_offset<kHeadDim>(a_lane, warp * kMTiles + mt, kk));
        }
      }
      // The first iteration's barrier ends every warp's reads of Q before block n_first + 1
      // is copied over it.
    }

    const float scale_log2 = pr.scale * 1.4426950408889634f;
    int stage = 0;
    auto process_block = [&](int n, auto masked) {
      constexpr bool kMasked = decltype(masked)::value;
      ampere::cp_async_wait<0>();  // this thread's copies of block n have landed
      __syncthreads();     // everyone's have, and block n - 1's stage (or Q) is free
      if (n < n_last) load_block(n + 1, stage ^ 1);
      ampere::cp_async_commit();

      const uint32_t k_tile = stages + stage * C::kStageBytes;
      const uint32_t v_tile = k_tile + C::kKVBytes;

      // S = Q K^T for the warp's rows x kBlockN keys. A K fragment serves every m tile.
      float s[kMTiles][C::kSBlocks][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int nb = 0; nb < C::kSBlocks; ++nb) {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][nb][e] = 0.0f;
        }
      }
#pragma unroll
      for (int kk = 0; kk < C::kDSteps; ++kk) {
        uint32_t a[kMTiles][4];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          if constexpr (C::kQInRegisters) {
#pragma unroll
            for (int r = 0; r < 4; ++r) a[mt][r] = q_frag[mt][kk][r];
          } else {
            ampere::ldmatrix_x4<false>(
                a[mt], q_tile + step_offset<kHeadDim>(a_lane, warp * kMTiles + mt, kk));
          }
        }
#pragma unroll
        for (int j = 0; j < C::kKeySteps; ++j) {
          uint32_t b[4];
          ampere::ldmatrix_x4<false>(b, k_tile + step_offset<kHeadDim>(k_lane, j, kk));
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            ampere::mma_m16n8k16<T>(s[mt][2 * j], a[mt], b[0], b[1]);
            ampere::mma_m16n8k16<T>(s[mt][2 * j + 1], a[mt], b[2], b[3]);
          }
        }
      }

      // Scale to base 2, mask, and the online softmax, row by row. In a masked block, tile row
      // r sees the block's columns [first0 + r, min(last0 + r, end)] (clamped to the block):
      // first0 and last0 are those of row 0, clamped into int range beforehand (a value past
      // the block by more than kBlockM rows stays past it for every row).
      int first0 = 0, last0 = 0, end = 0;
      if constexpr (kMasked) {
        const int64_t n0 = static_cast<int64_t>(n) * kBlockN;
        const int64_t position0 = row0 + len_k - len_q - n0;  // row 0's key position - n0
        first0 = clamp_to_int(position0 - pr.window_left, -kBlockM - 1, kBlockN);
        last0 = clamp_to_int(position0 + pr.window_right, -kBlockM - 1, kBlockN);
        end = clamp_to_int(len_k - 1 - n0, -kBlockM - 1, kBlockN);
      }
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          // Visible columns [lo, hi] of this row, relative to 2q.
          int lo = 0, hi = 0;
          if constexpr (kMasked) {
            const int r = warp * C::kWarpRows + kMmaM * mt + g + 8 * h;
            lo = first0 + r - 2 * q;
            hi = min(last0 + r, end) - 2 * q;
          }
          float block_max = -INFINITY;
#pragma unroll
          for (int nb = 0; nb < C::kSBlocks; ++nb) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float x = s[mt][nb][2 * h + e] * scale_log2;
              if constexpr (kMasked) {
                const int col = 8 * nb + e;  // + 2q
                x = col >= lo && col <= hi ? x : -INFINITY;
              }
              s[mt][nb][2 * h + e] = x;
              block_max = fmaxf(block_max, x);
            }
          }
          block_max = quad_max(block_max);
          const float new_max = fmaxf(row_max[mt][h], block_max);
          const float base = new_max == -INFINITY ? 0.0f : new_max;  // no key seen yet
          const float rescale = exp2_approx(row_max[mt][h] - base);
          row_max[mt][h] = new_max;
          float sum = 0.0f;
#pragma unroll
          for (int nb = 0; nb < C::kSBlocks; ++nb) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float p = exp2_approx(s[mt][nb][2 * h + e] - base);
              s[mt][nb][2 * h + e] = p;
              sum += p;
            }
          }
          row_sum[mt][h] = row_sum[mt][h] * rescale + sum;
#pragma unroll
          for (int ob = 0; ob < C::kOBlocks; ++ob) {
            acc[mt][ob][2 * h] *= rescale;
            acc[mt][ob][2 * h + 1] *= rescale;
          }
        }
      }

      // O += P V, P's A fragments made from S's C fragments in registers. A V fragment
      // serves every m tile.
#pragma unroll
      for (int t = 0; t < C::kKeySteps; ++t) {
        uint32_t a[kMTiles][4];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          a[mt][0] = pack2<T>(s[mt][2 * t][0], s[mt][2 * t][1]);
          a[mt][1] = pack2<T>(s[mt][2 * t][2], s[mt][2 * t][3]);
          a[mt][2] = pack2<T>(s[mt][2 * t + 1][0], s[mt][2 * t + 1][1]);
          a[mt][3] = pack2<T>(s[mt][2 * t + 1][2], s[mt][2 * t + 1][3]);
        }
#pragma unroll
        for (int dd = 0; dd < C::kDSteps; ++dd) {
          uint32_t b[4];
          ampere::ldmatrix_x4<true>(b, v_tile + step_offset<kHeadDim>(a_lane, t, dd));
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            ampere::mma_m16n8k16<T>(acc[mt][2 * dd], a[mt], b[0], b[1]);
            ampere::mma_m16n8k16<T>(acc[mt][2 * dd + 1], a[mt], b[2], b[3]);
          }
        }
      }
      stage ^= 1;
    };

    // The masked head, the fully visible middle, the masked tail.
    int n = n_first;
#pragma unroll 1
    for (; n < full_begin; ++n) process_block(n, std::true_type{});
#pragma unroll 1
    for (; n < full_end; ++n) process_block(n, std::false_type{});
#pragma unroll 1
    for (; n <= n_last; ++n) process_block(n, std::true_type{});

    ampere::cp_async_wait<0>();
    __syncthreads();  // every warp is done with the stages before the staging tile reuses them
  }

  // The epilogue: out = acc / l through the staging tile, lse straight to memory.
  unsigned char* staging = smem + C::kStagingOffset;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float sum = quad_sum(row_sum[mt][h]);
      const float inverse = sum > 0.0f ? 1.0f / sum : 0.0f;
      const int r = warp * C::kWarpRows + kMmaM * mt + g + 8 * h;
#pragma unroll
      for (int ob = 0; ob < C::kOBlocks; ++ob) {
        *reinterpret_cast<uint32_t*>(staging + tile_offset<kHeadDim>(r, ob) + 4 * q) =
            pack2<T>(acc[mt][ob][2 * h] * inverse, acc[mt][ob][2 * h + 1] * inverse);
      }
      const int64_t i = row0 + r;
      if (q == 0 && i < len_q) {
        constexpr float kLn2 = 0.6931471805599453f;
        params.lse[lse_index(pr, batch, head, seq_q.begin, i)] =
            sum > 0.0f ? (row_max[mt][h] + log2f(sum)) * kLn2 : -INFINITY;
      }
    }
  }
  __syncthreads();
  T* out_base = static_cast<T*>(params.out.data);
  const int64_t out_seq = (packed ? seq_q.begin * params.out.row_stride
                                  : batch * params.out.batch_stride) +
                          head * params.out.head_stride;
  const int64_t rows_left = len_q - row0;
  T* out_rows = out_base + out_seq + (row0 + copy.row) * params.out.row_stride + copy_elem;
#pragma unroll
  for (int p = 0; p < kBlockM / C::kCopyRows; ++p) {
    if (copy.row + p * C::kCopyRows < rows_left) {
      T* row = out_rows + static_cast<int64_t>(p * C::kCopyRows) * params.out.row_stride;
#pragma unroll
      for (int gr = 0; gr < C::kCopyGroups; ++gr) {
        *reinterpret_cast<uint4*>(row + gr * C::kCopyCols * kChunkElems) =
            *reinterpret_cast<const uint4*>(staging + copy_offset<kHeadDim>(copy_base, p, gr));
      }
    }
  }
}

// ---- The launcher ----

template <typename T, int kHeadDim>
cudaError_t launch(const AttentionFwdParams& params, int64_t ctas, int m_blocks,
                   cudaStream_t stream) {
  using C = FwdConfig<kHeadDim>;
  auto kernel = attention_fwd_sm80_kernel<T, kHeadDim>;
  int device = 0;
  FUSEDOPS_RETURN_IF_ERROR(cudaGetDevice(&device));
  // The attribute is per device (per context); remember where it is set (64 devices; any
  // beyond set it on every launch).
  static std::atomic<uint64_t> configured_devices{0};
  const uint64_t bit = device >= 0 && device < 64 ? uint64_t{1} << device : 0;
  if (bit == 0 || (configured_devices.load(std::memory_order_relaxed) & bit) == 0) {
    FUSEDOPS_RETURN_IF_ERROR(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes));
    configured_devices.fetch_or(bit, std::memory_order_relaxed);
  }
  kernel<<<static_cast<unsigned>(ctas), C::kThreads, C::kSmemBytes, stream>>>(params,
                                                                              m_blocks);
  return cudaGetLastError();
}

using Launcher = cudaError_t (*)(const AttentionFwdParams&, int64_t, int, cudaStream_t);
constexpr int kHeadDims[] = {16, 32, 64, 96, 128, 256};
constexpr int kNumHeadDims = 6;
// [type][head dim index]; kFloat16 = 0, kBFloat16 = 1.
constexpr Launcher kLaunchers[2][kNumHeadDims] = {
    {launch<__half, 16>, launch<__half, 32>, launch<__half, 64>, launch<__half, 96>,
     launch<__half, 128>, launch<__half, 256>},
    {launch<__nv_bfloat16, 16>, launch<__nv_bfloat16, 32>, launch<__nv_bfloat16, 64>,
     launch<__nv_bfloat16, 96>, launch<__nv_bfloat16, 128>, launch<__nv_bfloat16, 256>}};
static_assert(static_cast<int>(AttentionType::kFloat16) == 0 &&
                  static_cast<int>(AttentionType::kBFloat16) == 1,
              "kLaunchers is indexed by AttentionType");

int head_dim_index(int head_dim) {
  for (int i = 0; i < kNumHeadDims; ++i) {
    if (kHeadDims[i] == head_dim) return i;
  }
  return -1;
}

int block_m_of(int head_dim) {
  switch (head_dim) {
    case 16: return FwdConfig<16>::kBlockM;
    case 32: return FwdConfig<32>::kBlockM;
    case 64: return FwdConfig<64>::kBlockM;
    case 96: return FwdConfig<96>::kBlockM;
    case 128: return FwdConfig<128>::kBlockM;
    default: return FwdConfig<256>::kBlockM;
  }
}

// attention.h's layout rules: 16-byte aligned data, strides in whole 16-byte chunks.
bool tensor_ok(const AttentionTensor& t, bool batched, bool needed) {
  if (needed && t.data == nullptr) return false;
  if (reinterpret_cast<uintptr_t>(t.data) % 16 != 0) return false;
  if (t.row_stride < 0 || t.row_stride % 8 != 0) return false;
  if (t.head_stride < 0 || t.head_stride % 8 != 0) return false;
  if (batched && (t.batch_stride < 0 || t.batch_stride % 8 != 0)) return false;
  return true;
}

}  // namespace

cudaError_t attention_fwd_sm80(const AttentionFwdParams& params, cudaStream_t stream) {
  const AttentionProblem& p = params.problem;
  if (p.type != AttentionType::kFloat16 && p.type != AttentionType::kBFloat16) {
    return cudaErrorInvalidValue;
  }
  const int dim = head_dim_index(p.head_dim);
  if (dim < 0) return cudaErrorInvalidValue;
  if (p.batch < 0 || p.heads_q < 1 || p.heads_kv < 1 || p.heads_q % p.heads_kv != 0) {
    return cudaErrorInvalidValue;
  }
  if (p.seqlen_q < 0 || p.seqlen_q > INT32_MAX || p.seqlen_k < 0 || p.seqlen_k > INT32_MAX) {
    return cudaErrorInvalidValue;
  }
  const bool packed = p.cu_seqlens_q != nullptr;
  if (packed != (p.cu_seqlens_k != nullptr)) return cudaErrorInvalidValue;
  if (packed && (p.total_q < 0 || p.total_k < 0)) return cudaErrorInvalidValue;

  const bool any_rows = p.batch > 0 && p.seqlen_q > 0 && (!packed || p.total_q > 0);
  const bool any_keys = packed ? p.total_k > 0 : p.seqlen_k > 0;
  if (!tensor_ok(p.q, !packed, any_rows) || !tensor_ok(params.out, !packed, any_rows) ||
      !tensor_ok(p.k, !packed, any_rows && any_keys) ||
      !tensor_ok(p.v, !packed, any_rows && any_keys)) {
    return cudaErrorInvalidValue;
  }
  if (any_rows && (params.lse == nullptr || reinterpret_cast<uintptr_t>(params.lse) % 4 != 0)) {
    return cudaErrorInvalidValue;
  }
  if (!any_rows) return cudaSuccess;  // nothing to write

  // One CTA per (query block, head, sequence), numbered by blockIdx.x.
  const int block_m = block_m_of(p.head_dim);
  const int64_t m_blocks = (p.seqlen_q + block_m - 1) / block_m;
  const int64_t heads = p.heads_q * static_cast<int64_t>(p.batch);  // < 2**62
  if (heads > INT32_MAX || m_blocks > INT32_MAX / heads) return cudaErrorInvalidValue;
  const int64_t ctas = m_blocks * heads;
  return kLaunchers[static_cast<int>(p.type)][dim](params, ctas, static_cast<int>(m_blocks),
                                                   stream);
}

}  // namespace fusedops
