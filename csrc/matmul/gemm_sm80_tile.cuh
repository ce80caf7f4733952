// gemm_sm80_tile.cuh — the 128x128 mma.sync tile both the GEMM (gemm_sm80.cu) and the
// implicit-GEMM convolution (../conv/conv_implicit_gemm_sm80.cu) run: smem layout, fragment
// loads, MMA step, accumulator spill. The tile, warp and pipeline shape, the XOR-swizzled
// shared-memory chunk layout, the ldmatrix addresses, the per-stage warp MMA step and the spill
// of the accumulators into epilogue.cuh's float32 staging tile are defined here once; the
// layouts, fragments and bank-conflict arguments are explained in gemm_sm80.cu's top comment.
// What fills the tile (cp.async loaders, gathers) stays with each kernel.

#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/ampere.cuh"
#include "epilogue.cuh"

namespace fusedops {
namespace sm80_tile {

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
// for A and (i / 2, i % 2) for B (kBOrder). See gemm_sm80.cu's top comment.
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
// q = lane % 4 >= 2 store their odd column first (bank-conflict free, gemm_sm80.cu's top comment).
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

// One mma step, c (16 x 8, float32) += a b, fragments as in gemm_sm80.cu's top comment (and
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

// A warp's fragments for mma k step kk of a stage: its kFragsM A fragments and kFragsN B
// fragments (B's ldmatrix j holds n8 blocks 2j and 2j + 1, b_ldmatrix_reg), loaded with
// ldmatrix.x4 from the operand tiles at shared addresses a_tile and b_tile (a_offset0,
// b_offset0: a_ldmatrix_offset0 and b_ldmatrix_offset0), and rounded to tf32 for float32.
template <typename T, bool kAMnMajor, bool kBMnMajor>
__device__ __forceinline__ void load_fragments(uint32_t (&a)[kFragsM][4],
                                               uint32_t (&b)[kFragsN / 2][4], uint32_t a_tile,
                                               uint32_t b_tile, uint32_t a_offset0,
                                               uint32_t b_offset0, int kk) {
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
  if constexpr (std::is_same_v<T, float>) {  // once per loaded register: 16 + 8 per step
#pragma unroll
    for (int r = 0; r < 4; ++r) {
#pragma unroll
      for (int fm = 0; fm < kFragsM; ++fm) a[fm][r] = ampere::to_tf32(a[fm][r]);
#pragma unroll
      for (int j = 0; j < kFragsN / 2; ++j) b[j][r] = ampere::to_tf32(b[j][r]);
    }
  }
}

// The k step's kFragsM x kFragsN mma steps into a thread's accumulators.
template <typename T>
__device__ __forceinline__ void mma_fragments(float (&acc)[kFragsM][kFragsN][4],
                                              const uint32_t (&a)[kFragsM][4],
                                              const uint32_t (&b)[kFragsN / 2][4]) {
#pragma unroll
  for (int fm = 0; fm < kFragsM; ++fm) {
#pragma unroll
    for (int fn = 0; fn < kFragsN; ++fn) {
      mma_step<T>(acc[fm][fn], a[fm], b[fn / 2][b_ldmatrix_reg(fn, 0)],
                  b[fn / 2][b_ldmatrix_reg(fn, 1)]);
    }
  }
}

// Zeroes a thread's accumulators.
__device__ __forceinline__ void zero_accumulators(float (&acc)[kFragsM][kFragsN][4]) {
#pragma unroll
  for (int fm = 0; fm < kFragsM; ++fm) {
#pragma unroll
    for (int fn = 0; fn < kFragsN; ++fn) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[fm][fn][e] = 0.0f;
    }
  }
}

// Stores a thread's accumulators into the float32 staging tile (kBlockM x kTileLd floats), in
// spill_slot's bank-conflict-free order.
__device__ __forceinline__ void spill_accumulators(float* staging,
                                                   const float (&acc)[kFragsM][kFragsN][4],
                                                   int warp, int lane) {
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
}

}  // namespace sm80_tile
}  // namespace fusedops
