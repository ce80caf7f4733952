// gemm_sm80.cu — the sm_80 GEMM with fused epilogue: cp.async into a multi-stage shared-memory
// ring, ldmatrix, and mma.sync tensor-core instructions (m16n8k16 for float16/bfloat16,
// m16n8k8 tf32 for float32). It also runs on sm_90 (the fallback when the sm_90a kernel is
// unavailable, or when forced).
//
// The math is gemm.h's: z = A B^T in float32, out = act(z + bias + residual) (or out += z
// into a float32 out), for float16 or bfloat16 A and B, each K-major or MN-major, or for
// float32 A and B, both K-major, multiplied in tf32.
//
// Everything below is laid out in bytes, and float32 only changes how many elements a byte
// range holds: a 16-byte chunk is 8 16-bit or 4 float32 elements (chunk_elems), a stage's
// k block (a 64-byte K-major row) 32 or 16 (block_k), an mma step (32 bytes of k) 16 or 8
// (mma_k). Where k counts are quoted they are for the 16-bit types; halve them for float32.
//
// The work. The (m, n) output is cut in 128 x 128 tiles, one CTA of 256 threads (8 warps)
// each, visited in a grouped order: blockIdx.x is linear over the tiles, and runs of
// kGroupM = 8 tile-rows are walked column by column, so the 8 A row-panels of a group and
// the B panel of the current column stay in L2 while the group is being worked on (a plain
// row-major order would stream all of B once per tile-row). The CTA walks k in blocks of
// block_k = 32; the warps sit in a 2 (m) x 4 (n) grid and each owns a 64 x 32 piece of the
// tile: per 16-deep k step (two per block) it loads 4 A fragments (16 x 16) and 4 B
// fragments (8 x 16) with 4 + 2 ldmatrix.x4 and issues 4 x 4 mma.m16n8k16, into 64 float32
// accumulators per thread.
//
// The pipeline. kStages = 4 shared-memory stages, each holding one k block of A (128 x 32)
// and of B (128 x 32), 8 KB each. The prologue issues the copies of blocks 0..2 (one
// cp.async group each, committed even when empty so that the group count stays uniform).
// Iteration kb waits until at most kStages - 2 groups are pending (block kb has landed for
// this thread), and a __syncthreads then makes every thread's copies visible and also
// proves that every warp has finished reading the stage of block kb - 1, which is the stage
// block kb + 3 is copied into right after. So the copies of three blocks are in flight
// while one is multiplied, and a single barrier per block suffices.
//
// Loading. Every operand tile is moved in 16-byte chunks with cp.async.cg (L2 only: each
// tile is read once per CTA, L1 would only be polluted), 512 chunks per operand per stage,
// two per thread:
//   K-major tile (128 rows of A or B x 32 k): 4 chunks per row; thread t copies row t/4
//     (and t/4 + 64), k 8 (t % 4) .. + 7. Four consecutive threads read 64 contiguous bytes.
//   MN-major tile (16-bit types only; 32 k x 128 rows along M or N, stored k-row by k-row as
//     it lies in memory): 16 chunks per k-row; thread t copies k-row t/16 (and t/16 + 16),
//     rows 8 (t % 16) .. + 7. Sixteen consecutive threads read 256 contiguous bytes.
// Ragged edges use the zero-fill form cp.async [dst], [src], 16, src_bytes: the bytes past
// src_bytes are written as zeros, which contributes nothing to the dot products. A chunk is
// partly valid along k (K-major, when k % chunk_elems != 0: 2-byte granular for 16-bit
// types, 4-byte for float32) or along M/N (MN-major, when m or n % 8 != 0); since leading
// dimensions are multiples of 8 elements and bases are 16-byte aligned, every chunk starts
// 16-byte aligned and its valid part is a whole number of elements. A chunk wholly outside
// copies 0 bytes from the operand's base pointer, so no address outside the operand is ever
// formed for a read. Offsets are int64 (row * ld can exceed 2**31).
//
// Shared-memory layouts, XOR-swizzled in 16-byte chunks. Both layouts map the tile
// coordinate of a chunk's first element to a byte offset (smem_chunk_offset below), and the
// copies and the ldmatrix reads both go through it, so they agree by construction.
// Bank conflicts are counted per 128 bytes (32 banks of 4 bytes, i.e. eight 16-byte
// "slots"): a warp's 16-byte accesses are served 8 lanes at a time (a cp.async phase, one
// 8 x 8 matrix of an ldmatrix), and those 8 are conflict free when they hit 8 different
// slots (address / 16 mod 8).
//   K-major: rows of 64 bytes (4 chunks). Chunk (row r, k-chunk c) is at
//     r * 64 + 16 * (c ^ ((r / 2) % 4)). Without the XOR, 8 consecutive rows at one c
//     would fall in 2 slots (4-way conflict). With it, the slot is 4 (r % 2) + (c ^ (r/2 % 4)):
//     over 8 consecutive rows from a multiple of 8 (an ldmatrix matrix), the pair
//     (r % 2, r/2 % 4) takes all 8 values, so the 8 slots differ. A cp.async phase (8
//     consecutive threads) writes rows 2j and 2j + 1, all 4 chunks of each: again 8 slots.
//   MN-major: k-rows of 256 bytes (16 chunks). Chunk (k-row k, row-chunk c) is at
//     k * 256 + 16 * (c ^ (k % 8)). Without the XOR, one ldmatrix matrix (8 consecutive
//     k-rows at one c) would be an 8-way conflict; with it the slots are (c % 8) ^ (k % 8),
//     8 different ones. A cp.async phase writes one k-row, c = 8j .. 8j + 7: 8 slots.
//
// Fragments (PTX ISA, mma.m16n8k16 with .f16/.bf16 inputs; g = lane / 4, q = lane % 4; each
// 32-bit register holds two consecutive-k elements, the lower k in the low half):
//   A (16 x 16, "row"): a[0] = (row g, k 2q..2q+1), a[1] = (g + 8, 2q..), a[2] = (g, 2q+8..),
//                       a[3] = (g + 8, 2q+8..).
//   B (16 x 8, "col", i.e. B^T rows n): b[0] = (n g, k 2q..2q+1), b[1] = (n g, k 2q+8..).
//   C (16 x 8, f32):    c[0], c[1] = (row g, col 2q, 2q+1); c[2], c[3] = (row g + 8, same).
// With .tf32 inputs, mma.m16n8k8 (each register holds one element; C as above):
//   A (16 x 8): a[0] = (row g, k q), a[1] = (g + 8, q), a[2] = (g, q + 4), a[3] = (g + 8, q + 4).
//   B (8 x 8):  b[0] = (n g, k q), b[1] = (n g, k q + 4).
// ldmatrix.x4: lanes 8i .. 8i + 7 give the addresses of the 8 rows (16 bytes each) of matrix
// i; register i of lane l receives row l / 4, elements 2 (l % 4) and +1 of matrix i (with
// .trans: elements (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4), i.e. the transpose).
// One ldmatrix.x4 loads a block of 16 rows (of M or N) x 16 k as four 8 x 8 quarters; matrix
// i is the quarter at row half rh and k half kh:
//   A: (rh, kh) = (i % 2, i / 2), so the four registers are a[0..3] as they come;
//   B: (rh, kh) = (i / 2, i % 2), so registers 0, 1 are b[0], b[1] of the n8 block of rows
//      0-7 and registers 2, 3 those of rows 8-15: adjacent pairs, as HMMA takes its B
//      operand (A's order would cost two register moves per mma).
// The lane addresses (ldmatrix_coord), with i = l / 8 and (rh, kh) as above:
//   K-major (no .trans; a stored 16-byte row is 8 consecutive k of one row):
//     lane l -> row 8 rh + l % 8, k 8 kh .. + 7 (for A: row l % 16, k 8 (l / 16)).
//     Lane l receives row g, k 2q and 2q + 1 of the quarter: the fragment element.
//   MN-major (.trans; a stored 16-byte row is 8 consecutive rows of one k):
//     lane l -> k 8 kh + l % 8, rows 8 rh .. + 7 (for A: k l % 8 + 8 (l / 16), rows
//     8 ((l / 8) % 2) ..). .trans hands lane l the stored elements at k-rows 2q and 2q + 1,
//     column g: the same (row g, k 2q..2q+1) pair, so the fragments equal the K-major ones.
//   float32 (K-major only; .trans would swap 16-bit halves, not float32 elements): the same
//     addresses, byte for byte. A stored 16-byte row is 4 consecutive k, so an 8 x 8 b16
//     matrix is 8 rows x 4 float32, and register i of lane l receives b16 elements
//     2 (l % 4), +1 of row l / 4, i.e. bytes 4 (l % 4) .. + 3: the whole float32 (row l / 4,
//     k l % 4) of the matrix, low half in the low half. The quarter (rh, kh) is rows 8 rh ..
//     + 7, k 4 kh .. + 3, so lane l receives (row 8 rh + g, k 4 kh + q): in A's order a[0..3]
//     exactly, in B's order b[0], b[1] of rows 0-7 then of rows 8-15. Each register then goes
//     through cvt.rna.tf32.f32 (round to nearest, ties away, as CUTLASS rounds float operands
//     for tf32; without it the tensor cores ignore the low 13 mantissa bits, i.e. truncate,
//     which is what the sm_90a kernel's wgmma does: the two paths differ in the last bits).
// Every ldmatrix address is a per-lane offset fixed for the whole kernel, XOR or plus a
// compile-time constant (ldmatrix_offset), plus the stage's base.
//
// The epilogue. After the main loop the pipeline's shared memory is reused as the float32
// staging tile of epilogue.cuh (128 x (128 + 4) floats = 67,584 bytes, a little more than the
// 65,536 of the ring: the dynamic allocation is the larger of the two). Each thread spills
// its 64 accumulators, then epilogue_store_tile applies bias, residual, activation and the
// cast with 16-byte stores. The spill uses 4-byte stores in a lane-dependent order: with a
// row stride of 132 floats (4 banks mod 32), lanes q = 2, 3 store their odd column first.
// Then in each store the 32 lanes hit banks 4 g + {0, 2, 5, 7}[q] (+ const), or
// 4 g + {1, 3, 4, 6}[q] in the second: 32 different banks. Plain float2 stores would be
// 2-way conflicted (rows g and g + 1 overlap by 4 banks).
//
// Registers and occupancy: 64 accumulators + 24 fragment registers + addressing fit the
// 128 registers that __launch_bounds__(256, 2) allows (ptxas: 120-128, no spills, at sm_80
// and sm_90a), and 2 x 67.6 KB of shared memory fit an A100 SM (164 KB), so two CTAs (16
// warps) share an SM and one's barrier waits and epilogue overlap the other's MMAs. A k
// block costs a warp about 140 instructions: 32 HMMA, 12 LDSM, 4 LDGSTS and the rest
// mostly the copies' bounds and zero-fill arithmetic. For float32 about 240: the 48
// conversions cost two each (cvt.rna.tf32.f32 is a finiteness test and a predicated
// integer add of 0x1000 in SASS), for a k block half as deep.
//
// Tuning left for a GPU (nothing here has been measured): block_k = 64 with 3 stages, a
// 128 x 256 tile, a split-k path for small m n and large k, and keeping the fragments of
// the next k step in flight explicitly (left to the compiler's scheduling now). For float32,
// whether the tf32 rounding's instructions limit issue (truncating instead costs none),
// and a deeper k block (BK = 32 floats, 128-byte rows).

#include <atomic>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/ampere.cuh"
#include "../common/check.cuh"
#include "epilogue.cuh"
#include "gemm.h"

namespace fusedops {
namespace {

constexpr int kBlockM = 128;
constexpr int kBlockN = 128;
constexpr int kStages = 4;
constexpr int kGroupM = 8;        // tile-rows per group of the tile order
constexpr int kThreads = 256;
constexpr int kMinBlocksPerSm = 2;
constexpr int kWarpsM = 2;
constexpr int kWarpsN = 4;
constexpr int kWarpTileM = kBlockM / kWarpsM;  // 64
constexpr int kWarpTileN = kBlockN / kWarpsN;  // 32
constexpr int kMmaM = 16;
constexpr int kMmaN = 8;
constexpr int kFragsM = kWarpTileM / kMmaM;    // 4 A fragments per k step
constexpr int kFragsN = kWarpTileN / kMmaN;    // 4 B fragments per k step
constexpr int kChunkBytes = 16;

// The k extents depend on the element size; the bytes do not. A K-major stage row is
// kKChunks = 4 chunks (64 bytes) and an mma step reads 32 bytes of it.
constexpr int kKChunks = 4;                    // 16-byte chunks per K-major row of a stage
constexpr int kKSteps = 2;                     // mma k steps per stage (32 bytes of k each)
template <typename T>
__host__ __device__ constexpr int chunk_elems() {  // elements per chunk: 8, or 4 (float32)
  return kChunkBytes / static_cast<int>(sizeof(T));
}
template <typename T>
__host__ __device__ constexpr int block_k() {      // k per stage: 32, or 16 (float32)
  return kKChunks * chunk_elems<T>();
}
template <typename T>
__host__ __device__ constexpr int mma_k() {        // k per mma: 16, or 8 (tf32)
  return block_k<T>() / kKSteps;
}

// Both operand tiles are 128 (M or N) x block_k (k) elements, 8 KB.
constexpr int kTileRows = 128;
static_assert(kBlockM == kTileRows && kBlockN == kTileRows, "A and B tiles share one shape");
constexpr int kOperandBytes = kTileRows * kKChunks * kChunkBytes;    // 8 KB
constexpr int kStageBytes = 2 * kOperandBytes;                       // A, then B
constexpr int kPipelineBytes = kStages * kStageBytes;                // 64 KB
constexpr int kTileLd = kBlockN + kTilePad;                          // staging row stride
constexpr int kStagingBytes = kBlockM * kTileLd * static_cast<int>(sizeof(float));
constexpr int kSmemBytes = kPipelineBytes > kStagingBytes ? kPipelineBytes : kStagingBytes;

constexpr int kChunksPerTile = kOperandBytes / kChunkBytes;          // 512
constexpr int kChunksPerThread = kChunksPerTile / kThreads;          // 2
static_assert(kChunksPerThread * kThreads == kChunksPerTile, "chunks split evenly");
// MN-major tiles (16-bit types only): 32 k-rows of 128 elements, 16 chunks each.
constexpr int kRowChunks = kTileRows / chunk_elems<__half>();        // 16 per MN-major k-row
static_assert(kKChunks == 4 && kRowChunks == 16, "the swizzles below assume these");
// The second chunk of a thread lies this many rows (K-major) or k (MN-major) past its first.
constexpr int kKMajorRowStep = kThreads / kKChunks;                  // 64
constexpr int kMnMajorKStep = kThreads / kRowChunks;                 // 16
static_assert(kKMajorRowStep * kKChunks * kChunksPerThread == kTileRows * kKChunks, "");
static_assert(kMnMajorKStep * kChunksPerThread == block_k<__half>(), "");
static_assert(kRowChunks * kChunkBytes * block_k<__half>() == kOperandBytes, "");
static_assert(mma_k<__half>() == 16 && mma_k<float>() == 8, "m16n8k16, m16n8k8 (tf32)");

// MN-major operands are 16-bit only: ldmatrix.trans transposes 16-bit elements.
template <typename T, bool kMnMajor>
constexpr bool kLayoutSupported = !kMnMajor || sizeof(T) == 2;

// ---- Index arithmetic (__host__ too, so that it can be checked on the host) ----

// The byte offset in an operand tile of the 16-byte chunk whose first element is at tile
// coordinate (row, k): row in [0, 128) along M or N, k in [0, block_k). For K-major tiles k is
// a multiple of chunk_elems (the chunk runs along k); for MN-major tiles row is (the chunk
// runs along row).
template <typename T, bool kMnMajor>
__host__ __device__ __forceinline__ uint32_t smem_chunk_offset(int row, int k) {
  static_assert(kLayoutSupported<T, kMnMajor>, "MN-major operands are 16-bit");
  if constexpr (kMnMajor) {
    return static_cast<uint32_t>(k * (kRowChunks * kChunkBytes) +
                                 (((row / chunk_elems<T>()) ^ (k % 8)) * kChunkBytes));
  } else {
    return static_cast<uint32_t>(row * (kKChunks * kChunkBytes) +
                                 (((k / chunk_elems<T>()) ^ ((row / 2) % 4)) * kChunkBytes));
  }
}

struct TileCoord {
  int row;
  int k;
};

// The tile coordinate of the first element of chunk i (0 or 1) that `thread` copies.
template <typename T, bool kMnMajor>
__host__ __device__ __forceinline__ TileCoord copy_coord(int thread, int i) {
  static_assert(kLayoutSupported<T, kMnMajor>, "MN-major operands are 16-bit");
  if constexpr (kMnMajor) {
    return {(thread % kRowChunks) * chunk_elems<T>(), thread / kRowChunks + i * kMnMajorKStep};
  } else {
    return {thread / kKChunks + i * kKMajorRowStep, (thread % kKChunks) * chunk_elems<T>()};
  }
}

// The tile coordinate of the first element of the 16-byte row that `lane` points ldmatrix.x4
// at, for the block of 16 rows x one mma step of k (32 bytes) starting at (row16, k0). Matrix
// i = lane / 8 is the quarter at row half rh and k half kh, with (rh, kh) = (i % 2, i / 2)
// for A and (i / 2, i % 2) for B (kBOrder). See the top comment.
template <typename T, bool kMnMajor, bool kBOrder>
__host__ __device__ __forceinline__ TileCoord ldmatrix_coord(int lane, int row16, int k0) {
  static_assert(kLayoutSupported<T, kMnMajor>, "MN-major operands are 16-bit");
  const int matrix = lane / 8;
  const int rh = kBOrder ? matrix / 2 : matrix % 2;
  const int kh = kBOrder ? matrix % 2 : matrix / 2;
  if constexpr (kMnMajor) {  // the 8 lanes of a matrix point at its 8 k-rows
    return {row16 + 8 * rh, k0 + 8 * kh + lane % 8};
  } else {                   // ... at its 8 rows (a k half is one chunk)
    return {row16 + 8 * rh + lane % 8, k0 + chunk_elems<T>() * kh};
  }
}

// The same offset for block f (rows row16 + 16 f) at k step kk (k0 = mma_k kk), from the one
// for block 0 at step 0. K-major: 16 rows further is 1024 bytes and keeps (row / 2) % 4;
// the next step (32 bytes further) flips bit 1 of the k-chunk index, i.e. bit 5 of the
// offset. MN-major: 16 k-rows further is 4096 bytes and keeps k % 8; the next block flips
// bit 1 or 2 of the row-chunk index (bits 5, 6), which the starting chunk index leaves
// clear (f < 4 for A, whose warps start at rows 0 or 64; f < 2 for B, whose warps start at
// multiples of 32). Equal to smem_chunk_offset(ldmatrix_coord(lane, row16 + 16 f, mma_k kk))
// for every lane.
template <typename T, bool kMnMajor>
__host__ __device__ __forceinline__ uint32_t ldmatrix_offset(uint32_t offset0, int f, int kk) {
  static_assert(kLayoutSupported<T, kMnMajor>, "MN-major operands are 16-bit");
  if constexpr (kMnMajor) {
    return (offset0 ^ static_cast<uint32_t>(f * 2 * kChunkBytes)) +
           static_cast<uint32_t>(kk * mma_k<T>() * kRowChunks * kChunkBytes);
  } else {
    return (offset0 ^ static_cast<uint32_t>(kk * 2 * kChunkBytes)) +
           static_cast<uint32_t>(f * kMmaM * kKChunks * kChunkBytes);
  }
}

// The bytes of the 16-byte chunk whose first element is operand element (row, k) that lie
// inside the operand (`rows` x `depth`): a multiple of sizeof(T) in [0, 16].
template <typename T, bool kMnMajor>
__host__ __device__ __forceinline__ uint32_t chunk_valid_bytes(int64_t row, int64_t k,
                                                               int64_t rows, int64_t depth) {
  if (row >= rows || k >= depth) return 0;
  const int64_t left = kMnMajor ? rows - row : depth - k;  // elements along the chunk
  return static_cast<uint32_t>((left < chunk_elems<T>() ? left : chunk_elems<T>()) *
                               static_cast<int64_t>(sizeof(T)));
}

// The element offset of operand element (row, k).
template <bool kMnMajor>
__host__ __device__ __forceinline__ int64_t element_offset(int64_t row, int64_t k, int64_t ld) {
  return kMnMajor ? k * ld + row : row * ld + k;
}

// The grouped tile order: tile `tile` (< tiles_m * tiles_n < 2**31) to its (tile-row,
// tile-column). Groups of kGroupM tile-rows (the last one may be shorter) are walked column
// by column, each column top to bottom.
__host__ __device__ __forceinline__ void tile_position(uint32_t tile, uint32_t tiles_m,
                                                       uint32_t tiles_n, uint32_t& tile_m,
                                                       uint32_t& tile_n) {
  const uint32_t group_size = kGroupM * tiles_n;  // < 2**31 since tiles_n < 2**24
  const uint32_t group = tile / group_size;
  const uint32_t first_m = group * kGroupM;
  const uint32_t rows_in_group =
      tiles_m - first_m < static_cast<uint32_t>(kGroupM) ? tiles_m - first_m : kGroupM;
  const uint32_t in_group = tile - group * group_size;
  tile_m = first_m + in_group % rows_in_group;
  tile_n = in_group / rows_in_group;
}

// Where a warp's piece of the tile starts (rows, columns of the 128 x 128 tile).
__host__ __device__ __forceinline__ int warp_tile_row(int warp) {
  return (warp / kWarpsN) * kWarpTileM;
}
__host__ __device__ __forceinline__ int warp_tile_col(int warp) {
  return (warp % kWarpsN) * kWarpTileN;
}

// This lane's ldmatrix offsets in an operand tile for the warp's first 16-row block at k
// step 0 (ldmatrix_offset derives the others), and which register of B's ldmatrix j holds
// b-register r (0, 1) of n8 block fn = 2 j + (0 or 1): with the B matrix order, block 2j
// is registers 0, 1 and block 2j + 1 registers 2, 3, adjacent pairs as HMMA wants them.
template <typename T, bool kMnMajor>
__host__ __device__ __forceinline__ uint32_t a_ldmatrix_offset0(int lane, int warp) {
  const TileCoord at = ldmatrix_coord<T, kMnMajor, false>(lane, warp_tile_row(warp), 0);
  return smem_chunk_offset<T, kMnMajor>(at.row, at.k);
}
template <typename T, bool kMnMajor>
__host__ __device__ __forceinline__ uint32_t b_ldmatrix_offset0(int lane, int warp) {
  const TileCoord at = ldmatrix_coord<T, kMnMajor, true>(lane, warp_tile_col(warp), 0);
  return smem_chunk_offset<T, kMnMajor>(at.row, at.k);
}
__host__ __device__ constexpr int b_ldmatrix_reg(int fn, int r) { return 2 * (fn % 2) + r; }

// The s-th (0, 1) of the two 4-byte spill stores of accumulators c[2h], c[2h + 1] of
// fragment (fm, fn): which one (c[2h + e]) and where in the staging tile. Lanes with
// q = lane % 4 >= 2 store their odd column first (bank-conflict free, top comment).
struct SpillSlot {
  int row;
  int col;
  int e;
};
__host__ __device__ __forceinline__ SpillSlot spill_slot(int warp, int lane, int fm, int fn,
                                                         int h, int s) {
  const int g = lane / 4;
  const int q = lane % 4;
  const int e = s ^ (q / 2);
  return {warp_tile_row(warp) + fm * kMmaM + g + 8 * h,
          warp_tile_col(warp) + fn * kMmaN + 2 * q + e, e};
}

// One mma step, c (16 x 8, float32) += a b, fragments as in the top comment (and
// ../common/ampere.cuh): m16n8k16 for the 16-bit types (a 16 x 16, b 16 x 8), m16n8k8 tf32
// for float32 (a 16 x 8, b 8 x 8; the registers already hold tf32 bits, ampere::to_tf32).
template <typename T>
__device__ __forceinline__ void mma_step(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (std::is_same_v<T, float>) {
    ampere::mma_m16n8k8_tf32(c, a, b0, b1);
  } else {
    ampere::mma_m16n8k16<T>(c, a, b0, b1);
  }
}

// ---- The kernel ----

// One thread's share of the copies of one operand: two 16-byte chunks per k block. What
// does not change from block to block (whether the rows are inside, the source address up
// to a fixed step) is worked out once; per block only the k bounds and the pointer step
// remain. The base and the leading dimension stay in the kernel's parameter space
// (constant-bank operands) rather than in registers.
template <typename T, bool kMnMajor>
struct OperandLoader {
  const GemmOperand& operand;
  const T* src;         // chunk 0's first element in the next block (unused while outside)
  int along;            // K-major: chunk 0's k in the block; MN-major: its k-row in the block
  uint32_t fixed;       // K-major: bit i set when chunk i's row is inside; MN-major: the valid
                        // bytes along the rows (both chunks cover the same rows)

  __host__ __device__ __forceinline__ OperandLoader(const GemmOperand& op, int64_t rows,
                                                    int64_t row0, int thread)
      : operand(op) {
    const TileCoord first = copy_coord<T, kMnMajor>(thread, 0);
    const TileCoord next = copy_coord<T, kMnMajor>(thread, 1);
    src = base() + element_offset<kMnMajor>(row0 + first.row, first.k, operand.ld);
    along = first.k;
    if constexpr (kMnMajor) {
      fixed = chunk_valid_bytes<T, kMnMajor>(row0 + first.row, 0, rows, 1);
    } else {
      fixed = (row0 + first.row < rows ? 1u : 0u) | (row0 + next.row < rows ? 2u : 0u);
    }
  }

  __host__ __device__ __forceinline__ const T* base() const {
    return static_cast<const T*>(operand.data);
  }

  // Chunk i of the next block, of whose k the first k_left (>= 1) are inside the operand:
  // where to copy from and how many bytes (the rest of the 16 are zero-filled).
  __host__ __device__ __forceinline__ void chunk(int i, int k_left, const T*& from,
                                                 uint32_t& bytes) const {
    if constexpr (kMnMajor) {
      bytes = along + i * kMnMajorKStep < k_left ? fixed : 0u;
    } else {
      const int left = k_left - along;
      const uint32_t along_k = left <= 0                 ? 0u
                               : left >= chunk_elems<T>() ? 16u
                                                          : static_cast<uint32_t>(left * sizeof(T));
      bytes = (fixed >> i) & 1u ? along_k : 0u;
    }
    // Chunk i lies 64 rows (K-major) or 16 k (MN-major) past chunk 0.
    const int64_t offset =
        i == 0 ? 0
               : element_offset<kMnMajor>(kMnMajor ? 0 : kKMajorRowStep,
                                          kMnMajor ? kMnMajorKStep : 0, operand.ld);
    from = bytes != 0 ? src + offset : base();
  }

  __host__ __device__ __forceinline__ void advance() {
    src += element_offset<kMnMajor>(0, block_k<T>(), operand.ld);
  }

  // Issues the copies of the next block into the operand tile at shared address `tile`.
  __device__ __forceinline__ void load(uint32_t tile, int k_left, int thread) {
#pragma unroll
    for (int i = 0; i < kChunksPerThread; ++i) {
      const T* from;
      uint32_t bytes;
      chunk(i, k_left, from, bytes);
      const TileCoord at = copy_coord<T, kMnMajor>(thread, i);
      ampere::cp_async_cg_16(tile + smem_chunk_offset<T, kMnMajor>(at.row, at.k), from, bytes);
    }
    advance();
  }
};

template <typename T, bool kAMnMajor, bool kBMnMajor>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    gemm_sm80_kernel(const __grid_constant__ GemmParams params, const bool vectorizable) {
  constexpr bool kTf32 = std::is_same_v<T, float>;
  constexpr int kBlockK = block_k<T>();
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t smem_base = ampere::smem_address(smem);

  const int thread = threadIdx.x;
  const int lane = thread % 32;
  const int warp = thread / 32;

  const uint32_t tiles_m = static_cast<uint32_t>((params.m + kBlockM - 1) / kBlockM);
  const uint32_t tiles_n = static_cast<uint32_t>((params.n + kBlockN - 1) / kBlockN);
  uint32_t tile_m, tile_n;
  tile_position(blockIdx.x, tiles_m, tiles_n, tile_m, tile_n);
  const int64_t row0 = static_cast<int64_t>(tile_m) * kBlockM;
  const int64_t col0 = static_cast<int64_t>(tile_n) * kBlockN;

  const int64_t k_blocks = (params.k + kBlockK - 1) / kBlockK;
  OperandLoader<T, kAMnMajor> a_loader(params.a, params.m, row0, thread);
  OperandLoader<T, kBMnMajor> b_loader(params.b, params.n, col0, thread);
  // Blocks are loaded in order; k_left is how much of the next one lies inside the operands.
  int64_t k_left = params.k;
  auto load_block = [&](int stage) {
    const uint32_t a_tile = smem_base + stage * kStageBytes;
    const int left = k_left < kBlockK ? static_cast<int>(k_left) : kBlockK;
    a_loader.load(a_tile, left, thread);
    b_loader.load(a_tile + kOperandBytes, left, thread);
    k_left -= kBlockK;
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_blocks) load_block(s);
    ampere::cp_async_commit();
  }

  float acc[kFragsM][kFragsN][4];
#pragma unroll
  for (int fm = 0; fm < kFragsM; ++fm) {
#pragma unroll
    for (int fn = 0; fn < kFragsN; ++fn) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[fm][fn][e] = 0.0f;
    }
  }

  const uint32_t a_offset0 = a_ldmatrix_offset0<T, kAMnMajor>(lane, warp);
  const uint32_t b_offset0 = b_ldmatrix_offset0<T, kBMnMajor>(lane, warp);

  int read_stage = 0;
  int write_stage = kStages - 1;
#pragma unroll 1
  for (int64_t kb = 0; kb < k_blocks; ++kb) {
    ampere::cp_async_wait<kStages - 2>();  // this thread's copies of block kb have landed
    __syncthreads();               // everyone's have; and block kb - 1's stage is free
    if (kb + kStages - 1 < k_blocks) load_block(write_stage);
    ampere::cp_async_commit();

    const uint32_t a_tile = smem_base + read_stage * kStageBytes;
    const uint32_t b_tile = a_tile + kOperandBytes;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      uint32_t a[kFragsM][4];
      uint32_t b[kFragsN / 2][4];  // ldmatrix j: n8 blocks 2j and 2j + 1
#pragma unroll
      for (int fm = 0; fm < kFragsM; ++fm) {
        ampere::ldmatrix_x4<kAMnMajor>(a[fm],
                                       a_tile + ldmatrix_offset<T, kAMnMajor>(a_offset0, fm, kk));
      }
#pragma unroll
      for (int j = 0; j < kFragsN / 2; ++j) {
        ampere::ldmatrix_x4<kBMnMajor>(b[j],
                                       b_tile + ldmatrix_offset<T, kBMnMajor>(b_offset0, j, kk));
      }
      if constexpr (kTf32) {  // once per loaded register: 16 + 8 per step
#pragma unroll
        for (int r = 0; r < 4; ++r) {
#pragma unroll
          for (int fm = 0; fm < kFragsM; ++fm) a[fm][r] = ampere::to_tf32(a[fm][r]);
#pragma unroll
          for (int j = 0; j < kFragsN / 2; ++j) b[j][r] = ampere::to_tf32(b[j][r]);
        }
      }
#pragma unroll
      for (int fm = 0; fm < kFragsM; ++fm) {
#pragma unroll
        for (int fn = 0; fn < kFragsN; ++fn) {
          mma_step<T>(acc[fm][fn], a[fm], b[fn / 2][b_ldmatrix_reg(fn, 0)],
                      b[fn / 2][b_ldmatrix_reg(fn, 1)]);
        }
      }
    }
    read_stage = read_stage == kStages - 1 ? 0 : read_stage + 1;
    write_stage = write_stage == kStages - 1 ? 0 : write_stage + 1;
  }

  // Only empty groups can still be pending, but the ring is about to be overwritten.
  ampere::cp_async_wait<0>();
  __syncthreads();  // every warp is done reading the ring

  float* staging = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int fm = 0; fm < kFragsM; ++fm) {
#pragma unroll
    for (int fn = 0; fn < kFragsN; ++fn) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          const SpillSlot at = spill_slot(warp, lane, fm, fn, h, s);
          // A select, not acc[..][2 h + at.e]: a lane-dependent index would put acc in memory.
          staging[at.row * kTileLd + at.col] = at.e == 0 ? acc[fm][fn][2 * h]
                                                         : acc[fm][fn][2 * h + 1];
        }
      }
    }
  }
  __syncthreads();
  epilogue_store_tile<T, kBlockM, kBlockN, kThreads>(staging, thread, row0, col0, params,
                                                     vectorizable);
}

// ---- The launcher ----

template <typename T, bool kAMnMajor, bool kBMnMajor>
cudaError_t launch(const GemmParams& params, cudaStream_t stream) {
  auto kernel = gemm_sm80_kernel<T, kAMnMajor, kBMnMajor>;
  int device = 0;
  FUSEDOPS_RETURN_IF_ERROR(cudaGetDevice(&device));
  // The attribute is per device (per context); remember where it is set (64 devices; any
  // beyond set it on every launch).
  static std::atomic<uint64_t> configured_devices{0};
  const uint64_t bit = device >= 0 && device < 64 ? uint64_t{1} << device : 0;
  if (bit == 0 || (configured_devices.load(std::memory_order_relaxed) & bit) == 0) {
    FUSEDOPS_RETURN_IF_ERROR(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
    configured_devices.fetch_or(bit, std::memory_order_relaxed);
  }
  const int64_t tiles =
      ((params.m + kBlockM - 1) / kBlockM) * ((params.n + kBlockN - 1) / kBlockN);
  kernel<<<static_cast<unsigned>(tiles), kThreads, kSmemBytes, stream>>>(
      params, epilogue_vectorizable(params));
  return cudaGetLastError();
}

// The instantiations, all in one place: [type][a.mn_major][b.mn_major]. For the 16-bit types
// all 4 operand majors: (K, K) forward, (K, MN) grad_input, (MN, MN) grad_weight; (MN, K) for
// completeness. For float32 (tf32) only (K, K): a null entry is refused.
using Launcher = cudaError_t (*)(const GemmParams&, cudaStream_t);
constexpr Launcher kLaunchers[3][2][2] = {
    {{launch<__half, false, false>, launch<__half, false, true>},                  // kFloat16
     {launch<__half, true, false>, launch<__half, true, true>}},
    {{launch<__nv_bfloat16, false, false>, launch<__nv_bfloat16, false, true>},    // kBFloat16
     {launch<__nv_bfloat16, true, false>, launch<__nv_bfloat16, true, true>}},
    {{launch<float, false, false>, nullptr}, {nullptr, nullptr}}};                 // kFloat32
static_assert(static_cast<int>(GemmType::kFloat16) == 0 &&
                  static_cast<int>(GemmType::kBFloat16) == 1 &&
                  static_cast<int>(GemmType::kFloat32) == 2,
              "kLaunchers is indexed by GemmType");

bool operand_ok(const GemmOperand& operand) {
  return operand.data != nullptr && reinterpret_cast<uintptr_t>(operand.data) % 16 == 0 &&
         operand.ld >= 0 && operand.ld % 8 == 0;
}

bool params_ok(const GemmParams& p) {
  if (p.m < 1 || p.n < 1 || p.k < 1 || p.m > INT32_MAX || p.n > INT32_MAX) return false;
  if (p.type != GemmType::kFloat16 && p.type != GemmType::kBFloat16 &&
      p.type != GemmType::kFloat32) {
    return false;
  }
  if (static_cast<int>(p.activation) < static_cast<int>(Activation::kNone) ||
      static_cast<int>(p.activation) > static_cast<int>(Activation::kSilu)) {
    return false;
  }
  if (!operand_ok(p.a) || !operand_ok(p.b) || p.out == nullptr) return false;
  // out += z touches nothing else (epilogue.cuh): refuse arguments it would ignore.
  if (p.accumulate && (p.bias != nullptr || p.residual != nullptr || p.preact != nullptr ||
                       p.activation != Activation::kNone)) {
    return false;
  }
  // blockIdx.x numbers the tiles: at most 2**31 - 1 of them.
  const int64_t tiles = ((p.m + kBlockM - 1) / kBlockM) * ((p.n + kBlockN - 1) / kBlockN);
  return tiles <= INT32_MAX;
}

}  // namespace

cudaError_t gemm_sm80(const GemmParams& params, cudaStream_t stream) {
  if (!params_ok(params)) return cudaErrorInvalidValue;
  const Launcher launcher = kLaunchers[static_cast<int>(params.type)][params.a.mn_major ? 1 : 0]
                                      [params.b.mn_major ? 1 : 0];
  // Float32 with an MN-major operand: the caller makes K-major copies (gemm.h).
  if (launcher == nullptr) return cudaErrorInvalidValue;
  return launcher(params, stream);
}

}  // namespace fusedops
