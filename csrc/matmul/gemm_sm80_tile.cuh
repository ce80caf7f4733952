// gemm_sm80_tile.cuh — the 128x128 mma.sync tile both the GEMM (gemm_sm80.cu) and the
// implicit-GEMM convolution (../conv/conv_implicit_gemm_sm80.cu) run: smem layout, fragment
// loads, MMA step, accumulator spill. The tile, warp and pipeline shape, the XOR-swizzled
// shared-memory chunk layout, the ldmatrix addresses, the per-stage warp MMA step and the spill
// of the accumulators into epilogue.cuh's float32 staging tile are defined here once; the
// layouts, fragments and bank-conflict arguments are explained in gemm_sm80.cu's top comment,
// but for the float32 MN-major tiles (the convolution's dgrad and wgrad views), which are
// explained below where they are defined. What fills the tile (cp.async loaders, gathers)
// stays with each kernel.

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
// MN-major tiles: block_k k-rows of 128 elements, stored k-row by k-row as they lie in
// memory: 16 chunks (256 bytes) per k-row for the 16-bit types, 32 (512 bytes) for float32.
template <typename T>
__host__ __device__ constexpr int row_chunks() {
  return kTileRows / chunk_elems<T>();
}
// The second chunk of a thread lies this many rows (K-major) or k (MN-major) past its first.
constexpr int kKMajorRowStep = kThreads / kKChunks;                  // 64
template <typename T>
__host__ __device__ constexpr int mn_major_k_step() {                // 16, or 8 (float32)
  return kThreads / row_chunks<T>();
}
// The 16-bit values under their historical names (the GEMM's MN-major operands are 16-bit).
constexpr int kRowChunks = row_chunks<__half>();                     // 16
constexpr int kMnMajorKStep = mn_major_k_step<__half>();             // 16
static_assert(kKChunks == 4 && kRowChunks == 16 && row_chunks<float>() == 32,
              "the swizzles below assume these");
static_assert(kKMajorRowStep * kKChunks * kChunksPerThread == kTileRows * kKChunks, "");
static_assert(mn_major_k_step<__half>() * kChunksPerThread == block_k<__half>() &&
                  mn_major_k_step<float>() * kChunksPerThread == block_k<float>(),
              "a thread's two MN-major chunks cover the stage's k-rows");
static_assert(row_chunks<__half>() * kChunkBytes * block_k<__half>() == kOperandBytes &&
                  row_chunks<float>() * kChunkBytes * block_k<float>() == kOperandBytes,
              "an MN-major stage is as large as a K-major one");
static_assert(mma_k<__half>() == 16 && mma_k<float>() == 8, "m16n8k16, m16n8k8 (tf32)");

// How a warp reads its fragments from an operand tile: ldmatrix.x4 (16-bit types either way,
// float32 K-major), or, for float32 MN-major, one ld.shared.b32 per element: ldmatrix.trans
// transposes 16-bit elements, which would split each float32.
template <typename T, bool kMnMajor>
constexpr bool kScalarFragments = kMnMajor && sizeof(T) == 4;
template <typename T, bool kMnMajor>
constexpr bool kLdmatrixFragments = !kScalarFragments<T, kMnMajor>;

// ---- Index arithmetic (__host__ too, so that it can be checked on the host) ----

// float32 MN-major tiles (the convolution's dgrad B and wgrad A and B). A stage is 16 k-rows
// of 128 floats, 32 chunks (512 bytes) per k-row; chunk (k-row k, row-chunk c) holds rows
// 4c .. 4c + 3 and sits at k * 512 + 16 (c ^ 2 (k % 4)). The fragments are read with one
// ld.shared.b32 per element, and a warp's 32-bit access is one wavefront when its 32 lanes
// hit 32 different banks. Element (row, k) lies in bank 4 ((c ^ 2 (k % 4)) % 8) + row % 4
// with c = row / 4 (a k-row spans all 32 banks four times, so k itself moves nothing). Each
// fragment register of a tf32 mma (mma_step) has lane (g = lane / 4, q = lane % 4) read
// row row8 + g at k k4 + q, with row8 a multiple of 8 and k4 of 4 (tf32_fragment_coord): so
// row % 4 = g % 4, c % 8 = (row8 / 4) % 8 + g / 4 with g / 4 alone in bit 0, and k % 4 = q.
// The bank is 4 ((((row8 / 4) % 8) | g / 4) ^ 2q) + g % 4: g / 4 picks bit 0 of the 16-byte
// slot, q flips bits 1 and 2, g % 4 the bank within the slot, 32 different banks. Without
// the XOR the four q of one g would share a bank (4-way conflicts). A cp.async phase (8
// consecutive threads) writes chunks 8j .. 8j + 7 of one k-row, which an XOR below 8 only
// permutes: 8 different slots.
template <typename T>
__host__ __device__ constexpr int mn_major_swizzle(int k) {  // the XOR of k-row k's chunks
  if constexpr (sizeof(T) == 2) {
    return k % 8;  // gemm_sm80.cu's top comment
  } else {
    return 2 * (k % 4);
  }
}

// The byte offset in an operand tile of the 16-byte chunk whose first element is at tile
// coordinate (row, k): row in [0, 128) along M or N, k in [0, block_k). For K-major tiles k is
// a multiple of chunk_elems (the chunk runs along k); for MN-major tiles row is (the chunk
// runs along row).
template <typename T, bool kMnMajor>
__host__ __device__ __forceinline__ uint32_t smem_chunk_offset(int row, int k) {
  if constexpr (kMnMajor) {
    return static_cast<uint32_t>(k * (row_chunks<T>() * kChunkBytes) +
                                 (((row / chunk_elems<T>()) ^ mn_major_swizzle<T>(k)) *
                                  kChunkBytes));
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
  if constexpr (kMnMajor) {
    return {(thread % row_chunks<T>()) * chunk_elems<T>(),
            thread / row_chunks<T>() + i * mn_major_k_step<T>()};
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
  static_assert(kLdmatrixFragments<T, kMnMajor>, "float32 MN-major tiles are read by element");
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
  static_assert(kLdmatrixFragments<T, kMnMajor>, "float32 MN-major tiles are read by element");
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

// The first row of a warp's A fragment fm (16 rows) and the first column of its B fragment
// fn (8 columns). Operands read with ldmatrix give each warp its contiguous 64 x 32 piece.
// Operands read element by element (kScalarFragments: float32 MN-major) interleave the warps
// instead (kInterleaved): fragment fm of warp row wm covers rows 16 wm + 32 fm .. + 15, and
// fragment fn of warp column wn columns 8 wn + 32 fn .. + 7. Both are permutations of the
// tile's 128 rows and columns (the spill puts every accumulator back where it belongs), and
// interleaved, a warp's fragments lie 32 rows (8 chunks, 128 bytes: a multiple of the bank
// width) apart, so that their addresses differ by constants (scalar_fragment_offset).
constexpr int kInterleavedStepM = kWarpsM * kMmaM;  // 32
constexpr int kInterleavedStepN = kWarpsN * kMmaN;  // 32
template <bool kInterleaved>
__host__ __device__ __forceinline__ int a_fragment_row(int warp, int fm) {
  if constexpr (kInterleaved) {
    return (warp / kWarpsN) * kMmaM + fm * kInterleavedStepM;
  } else {
    return warp_tile_row(warp) + fm * kMmaM;
  }
}
template <bool kInterleaved>
__host__ __device__ __forceinline__ int b_fragment_col(int warp, int fn) {
  if constexpr (kInterleaved) {
    return (warp % kWarpsN) * kMmaN + fn * kInterleavedStepN;
  } else {
    return warp_tile_col(warp) + fn * kMmaN;
  }
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

// ---- float32 MN-major fragments, one ld.shared.b32 per element (kScalarFragments) ----

// The byte offset of element (row, k) of an MN-major tile: its chunk's, plus its place in it.
template <typename T>
__host__ __device__ __forceinline__ uint32_t mn_major_element_offset(int row, int k) {
  const int in_chunk = row % chunk_elems<T>();
  return smem_chunk_offset<T, true>(row - in_chunk, k) +
         static_cast<uint32_t>(in_chunk * static_cast<int>(sizeof(T)));
}

// The tile coordinate of the element that register r of `lane`'s tf32 fragment holds, for
// the fragment whose rows (of M for A, of N for B) start at row0 and whose k starts at k0
// (ampere.cuh's conventions, g = lane / 4, q = lane % 4): A (16 x 8, r = 0..3) row
// row0 + g + 8 (r % 2), k k0 + q + 4 (r / 2); B (8 x 8, r = 0, 1) row row0 + g, k k0 + q + 4 r.
template <bool kB>
__host__ __device__ __forceinline__ TileCoord tf32_fragment_coord(int lane, int row0, int k0,
                                                                  int r) {
  const int g = lane / 4;
  const int q = lane % 4;
  if constexpr (kB) {
    return {row0 + g, k0 + q + 4 * r};
  } else {
    return {row0 + g + 8 * (r % 2), k0 + q + 4 * (r / 2)};
  }
}

// This lane's offset of element (row0 + g, q), g = lane / 4, q = lane % 4: register 0 of its
// first fragment (rows row0) at k step 0.
template <typename T>
__host__ __device__ __forceinline__ uint32_t scalar_offset0(int lane, int row0) {
  static_assert(sizeof(T) == 4, "16-bit tiles are read with ldmatrix");
  return mn_major_element_offset<T>(row0 + lane / 4, lane % 4);
}

// The offset of the element row_delta rows and k_delta k past the one at offset0
// (scalar_offset0), for row_delta a multiple of 8 and k_delta of 4 (every other register of a
// warp's interleaved fragments: 32 fm + 8 (r % 2) for A, 32 fn for B). k_delta keeps k % 4,
// so the XOR, and adds whole k-rows. row_delta adds row_delta / 4 to the chunk index c: its
// part below 8 (bit 1: A's 8 rows between a[0] and a[1]) is XORed in, because the lane's XOR
// 2 (k % 4) sits in the same bits; the multiples of 8 (32 rows: the next fragment) are added
// past the XOR. Exact when the lane's own chunk index has no bit in common with the XORed
// part (no carry out of it): interleaved, c = 4 wm + g / 4 for A (bits 0, 2 against bit 1)
// and 2 wn + g / 4 for B (nothing XORed). Equal to mn_major_element_offset at
// tf32_fragment_coord for every lane and register (a host model checks it): A needs two
// address registers per stage (offset0 and offset0 ^ 32), B one, all else immediates.
template <typename T>
__host__ __device__ __forceinline__ uint32_t scalar_fragment_offset(uint32_t offset0,
                                                                    int row_delta, int k_delta) {
  static_assert(sizeof(T) == 4, "16-bit tiles are read with ldmatrix");
  constexpr int kBankSlots = 8;  // 16-byte slots across the 32 banks: the chunk bits XORed
  const int chunk_delta = row_delta / chunk_elems<T>();
  return (offset0 ^ static_cast<uint32_t>((chunk_delta % kBankSlots) * kChunkBytes)) +
         static_cast<uint32_t>((chunk_delta - chunk_delta % kBankSlots) * kChunkBytes +
                               k_delta * row_chunks<T>() * kChunkBytes);
}

// The per-lane base offsets load_fragments takes for A and B: ldmatrix's (a_ldmatrix_offset0,
// b_ldmatrix_offset0) or, for float32 MN-major tiles, the scalar loads' (scalar_offset0 at
// the warp's first interleaved fragment).
template <typename T, bool kMnMajor>
__host__ __device__ __forceinline__ uint32_t a_fragment_offset0(int lane, int warp) {
  if constexpr (kScalarFragments<T, kMnMajor>) {
    return scalar_offset0<T>(lane, a_fragment_row<true>(warp, 0));
  } else {
    return a_ldmatrix_offset0<T, kMnMajor>(lane, warp);
  }
}
template <typename T, bool kMnMajor>
__host__ __device__ __forceinline__ uint32_t b_fragment_offset0(int lane, int warp) {
  if constexpr (kScalarFragments<T, kMnMajor>) {
    return scalar_offset0<T>(lane, b_fragment_col<true>(warp, 0));
  } else {
    return b_ldmatrix_offset0<T, kMnMajor>(lane, warp);
  }
}

// The offsets of register r of a warp's A fragment fm and of B's fragment fn at k step kk,
// from the lane's a_offset0, b_offset0 (a_fragment_offset0, b_fragment_offset0): lane 0's
// coordinates (g = q = 0) in warp 0's interleaved fragments are what every lane of every warp
// adds to its own register 0's.
template <typename T>
__host__ __device__ __forceinline__ uint32_t a_scalar_offset(uint32_t a_offset0, int fm, int kk,
                                                             int r) {
  const TileCoord delta =
      tf32_fragment_coord<false>(0, a_fragment_row<true>(0, fm), mma_k<T>() * kk, r);
  return scalar_fragment_offset<T>(a_offset0, delta.row, delta.k);
}
template <typename T>
__host__ __device__ __forceinline__ uint32_t b_scalar_offset(uint32_t b_offset0, int fn, int kk,
                                                             int r) {
  const TileCoord delta =
      tf32_fragment_coord<true>(0, b_fragment_col<true>(0, fn), mma_k<T>() * kk, r);
  return scalar_fragment_offset<T>(b_offset0, delta.row, delta.k);
}

// volatile, as ampere::ldmatrix_x4: an asm without side effects could be moved across the
// pipeline's __syncthreads, or merged with the same address's load a stage earlier.
__device__ __forceinline__ uint32_t ld_shared_b32(uint32_t addr) {
  uint32_t value;
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(value) : "r"(addr));
  return value;
}

// The s-th (0, 1) of the two 4-byte spill stores of accumulators c[2h], c[2h + 1] of
// fragment (fm, fn): which one (c[2h + e]) and where in the staging tile. Lanes with
// q = lane % 4 >= 2 store their odd column first (bank-conflict free, gemm_sm80.cu's top
// comment; the fragments' first rows and columns are multiples of 8, interleaved or not, so
// the argument holds for both). kInterleavedM, kInterleavedN: A's rows, B's columns as
// a_fragment_row, b_fragment_col place them.
struct SpillSlot {
  int row;
  int col;
  int e;
};
template <bool kInterleavedM = false, bool kInterleavedN = false>
__host__ __device__ __forceinline__ SpillSlot spill_slot(int warp, int lane, int fm, int fn,
                                                         int h, int s) {
  const int g = lane / 4;
  const int q = lane % 4;
  const int e = s ^ (q / 2);
  return {a_fragment_row<kInterleavedM>(warp, fm) + g + 8 * h,
          b_fragment_col<kInterleavedN>(warp, fn) + 2 * q + e, e};
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
// b_offset0: a_fragment_offset0 and b_fragment_offset0), or element by element from float32
// MN-major tiles into the same registers, and rounded to tf32 for float32.
template <typename T, bool kAMnMajor, bool kBMnMajor>
__device__ __forceinline__ void load_fragments(uint32_t (&a)[kFragsM][4],
                                               uint32_t (&b)[kFragsN / 2][4], uint32_t a_tile,
                                               uint32_t b_tile, uint32_t a_offset0,
                                               uint32_t b_offset0, int kk) {
  if constexpr (kScalarFragments<T, kAMnMajor>) {
#pragma unroll
    for (int fm = 0; fm < kFragsM; ++fm) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        a[fm][r] = ld_shared_b32(a_tile + a_scalar_offset<T>(a_offset0, fm, kk, r));
      }
    }
  } else {
#pragma unroll
    for (int fm = 0; fm < kFragsM; ++fm) {
      ampere::ldmatrix_x4<kAMnMajor>(a[fm],
                                     a_tile + ldmatrix_offset<T, kAMnMajor>(a_offset0, fm, kk));
    }
  }
  if constexpr (kScalarFragments<T, kBMnMajor>) {
#pragma unroll
    for (int fn = 0; fn < kFragsN; ++fn) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        b[fn / 2][b_ldmatrix_reg(fn, r)] =
            ld_shared_b32(b_tile + b_scalar_offset<T>(b_offset0, fn, kk, r));
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < kFragsN / 2; ++j) {
      ampere::ldmatrix_x4<kBMnMajor>(b[j],
                                     b_tile + ldmatrix_offset<T, kBMnMajor>(b_offset0, j, kk));
    }
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
// spill_slot's bank-conflict-free order, at the rows and columns its fragments cover
// (kInterleavedM, kInterleavedN: interleaved A rows, B columns; load_fragments interleaves an
// operand's fragments exactly when it reads them element by element).
template <bool kInterleavedM = false, bool kInterleavedN = false>
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
          const SpillSlot at =
              spill_slot<kInterleavedM, kInterleavedN>(warp, lane, fm, fn, h, s);
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
