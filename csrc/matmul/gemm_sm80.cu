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
// coordinate of a chunk's first element to a byte offset (smem_chunk_offset, in
// gemm_sm80_tile.cuh with the rest of the tile's index arithmetic, the MMA step and the
// spill), and the copies and the ldmatrix reads both go through it, so they agree by
// construction.
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
#include "gemm_sm80_tile.cuh"

namespace fusedops {
namespace {

using namespace sm80_tile;

// ---- Global addressing of the operands (the loader's) ----

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
  zero_accumulators(acc);

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
      uint32_t b[kFragsN / 2][4];
      load_fragments<T, kAMnMajor, kBMnMajor>(a, b, a_tile, b_tile, a_offset0, b_offset0, kk);
      mma_fragments<T>(acc, a, b);
    }
    read_stage = read_stage == kStages - 1 ? 0 : read_stage + 1;
    write_stage = write_stage == kStages - 1 ? 0 : write_stage + 1;
  }

  // Only empty groups can still be pending, but the ring is about to be overwritten.
  ampere::cp_async_wait<0>();
  __syncthreads();  // every warp is done reading the ring

  float* staging = reinterpret_cast<float*>(smem);
  spill_accumulators(staging, acc, warp, lane);
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
