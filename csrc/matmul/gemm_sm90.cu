// gemm_sm90.cu — the sm_90a GEMM with fused epilogue: TMA, wgmma, a warp-specialized
// pipeline and a persistent tile scheduler.
//
// The math is gemm.h's: out = act(A @ B^T + bias + residual), float32 accumulation, for
// float16 and bfloat16 operands (wgmma k16) and float32 ones multiplied in tf32 (k8; the
// tensor cores read the top 19 bits of each float32, i.e. truncate to tf32).
//
// The work: the (m, n) output is cut in 128 x 128 tiles (K blocks of 128 bytes: 64 16-bit
// or 32 float32 elements, so the shared-memory geometry is the same for every type), visited in a grouped order (8
// tile-rows at a time, so the B tiles of a group stay in L2 while its A tiles stream). One
// persistent CTA per SM walks the tiles blockIdx.x, blockIdx.x + gridDim.x, ...
//
// The CTA: three warpgroups of 128 threads.
//   * The producer (warpgroup 2; one thread works, after giving its registers back with
//     setmaxnreg) loops over every tile's K blocks of 64, and for each waits until a stage
//     of the 4-stage shared-memory ring is empty, then has TMA copy the A tile (128 x 64) and
//     the B tile (128 x 64) into it; the stage's "full" mbarrier completes when TMA has
//     written all 32 KB. TMA zero-fills what lies outside the matrices, so ragged m, n and k
//     need no masking in the main loop.
//   * Two consumers (warpgroups 0 and 1) each own 64 rows of the tile: per K block they wait
//     for the stage to be full, issue four wgmma m64n128k16 (k8 for tf32; 64 float32 accumulators per
//     thread), commit, and once the previous block's group has retired (wait_group 1) mark
//     that block's stage empty — so one group of MMAs is always in flight while the next
//     stage's wait is resolved.
//   * At the end of a tile each consumer writes its accumulators to its own float32 staging
//     tile in shared memory and stores them through the shared epilogue (epilogue.cuh:
//     bias, residual, activation, cast, 16-byte stores). Meanwhile the producer is already
//     filling the ring with the next tile's first K blocks.
//
// Operand majors: each operand is K-major (the forward's x and W) or MN-major (dz for the
// weight gradient, W and x in the backward): see hopper.cuh for the two shared-memory
// layouts and their descriptors. An MN-major 128-wide operand tile is two TMA boxes of 64.
//
// Shared memory: 4 stages x 32 KB + 2 x 64 x 132 floats of staging + barriers ≈ 195 KB, one
// CTA per SM. Tuning left for a GPU: a 128 x 256 tile (cuBLAS's usual choice), two
// consumer warpgroups ping-ponging tiles so that one's epilogue overlaps the other's MMAs,
// TMA multicast across a cluster of 2, and a TMA store of the output.
#include <algorithm>
#include <atomic>
#include <type_traits>
#include <cstdint>

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/check.cuh"
#include "../common/hopper.cuh"
#include "../common/tensor_map.h"
#include "epilogue.cuh"
#include "gemm.h"
#include "wgmma.cuh"

// The sm_80 and compute_80 passes compile the kernel body out (FUSEDOPS_SM90A_ENABLED), which
// leaves the constants and helpers below unused there: not worth a warning per pass.
#pragma nv_diag_suppress 177

namespace fusedops {
namespace {

constexpr int kBlockM = 128;
constexpr int kBlockN = 128;
constexpr int kRowBytes = 128;         // one 128-byte swizzled row of k per operand row
constexpr int kStepBytes = 32;         // the k of one wgmma: 16 16-bit or 8 float32 elements

// The K block of a stage, in elements: 64 for 16-bit types, 32 for float32 (tf32).
template <typename T>
__host__ __device__ constexpr int block_k() {
  return kRowBytes / static_cast<int>(sizeof(T));
}
constexpr int kStages = 4;
constexpr int kGroupM = 8;             // tile-rows per group of the tile order
constexpr int kWarpgroupThreads = 128;
constexpr int kConsumers = 2;          // warpgroups, 64 rows of the tile each
constexpr int kConsumerRows = kBlockM / kConsumers;
constexpr int kThreads = (kConsumers + 1) * kWarpgroupThreads;
constexpr int kProducerRegisters = 40;
constexpr int kConsumerRegisters = 232;  // 2 x 232 + 40 = 504 <= 512 per lane across 3 groups

constexpr int kBoxBytes = 64 * 64 * 2;              // one 64 x 64 TMA box, 8 KB
constexpr int kOperandBytes = kBlockM * kRowBytes;     // one operand's stage, 16 KB
static_assert(kBlockM == kBlockN, "both operands' stages have the same size");
constexpr int kStageBytes = 2 * kOperandBytes;
constexpr int kTileLd = kBlockN + kTilePad;
constexpr int kStagingBytes = kConsumers * kConsumerRows * kTileLd * 4;
constexpr int kSwizzleAlign = 1024;
constexpr size_t kSmemBytes =
    kSwizzleAlign + kStages * kStageBytes + kStagingBytes + 2 * kStages * sizeof(uint64_t);

struct TileCoords {
  int64_t m0, n0;
};

// The grouped tile order: kGroupM tile-rows at a time, column by column within a group.
__device__ __forceinline__ TileCoords tile_coords(int64_t tile, int64_t tiles_m,
                                                  int64_t tiles_n) {
  const int64_t group_size = kGroupM * tiles_n;
  const int64_t first_m = (tile / group_size) * kGroupM;
  const int64_t rows_in_group = min(tiles_m - first_m, static_cast<int64_t>(kGroupM));
  const int64_t in_group = tile % group_size;
  return {(first_m + in_group % rows_in_group) * kBlockM, (in_group / rows_in_group) * kBlockN};
}

// One operand's K block: rows [row0, row0 + 128) x k [k0, k0 + 64).
template <bool kMnMajor>
__device__ __forceinline__ void load_operand(uint8_t* dst, const CUtensorMap* map,
                                             uint64_t* full, int64_t row0, int64_t k0) {
  if constexpr (kMnMajor) {  // boxes of 64 rows-along-MN x 64 k, the k rows 128 bytes apart
    hopper::tma_load_2d(dst, map, full, static_cast<int32_t>(row0), static_cast<int32_t>(k0));
    hopper::tma_load_2d(dst + kBoxBytes, map, full, static_cast<int32_t>(row0 + 64),
                        static_cast<int32_t>(k0));
  } else {  // one box of 128 rows x 64 k
    hopper::tma_load_2d(dst, map, full, static_cast<int32_t>(k0), static_cast<int32_t>(row0));
  }
}

// The descriptor of the 16-wide K step `kk` of an operand stage, starting at MN row
// `row_offset` (0 or 64) of the stage.
template <bool kMnMajor>
__device__ __forceinline__ uint64_t operand_descriptor(const uint8_t* stage, int row_offset,
                                                       int kk) {
  if constexpr (kMnMajor) {
    return hopper::smem_descriptor(stage + (row_offset / 64) * kBoxBytes + kk * 16 * kRowBytes,
                                   /*leading_bytes=*/kBoxBytes, /*stride_bytes=*/1024);
  } else {
    return hopper::smem_descriptor(stage + row_offset * kRowBytes + kk * kStepBytes,
                                   /*leading_bytes=*/16,
                                   /*stride_bytes=*/1024);
  }
}

template <typename T, bool kAMnMajor, bool kBMnMajor>
__global__ void __launch_bounds__(kThreads, 1)
    gemm_sm90_kernel(const __grid_constant__ CUtensorMap map_a,
                     const __grid_constant__ CUtensorMap map_b, const GemmParams params,
                     const bool vectorizable) {
#if FUSEDOPS_SM90A_ENABLED
  extern __shared__ uint8_t smem_raw[];
  // The 128-byte swizzle repeats every 1024 bytes, and TMA and wgmma agree on it only for
  // 1024-byte aligned buffers; dynamic shared memory is only 16-byte aligned.
  uint8_t* smem = reinterpret_cast<uint8_t*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + kSwizzleAlign - 1) & ~uintptr_t{kSwizzleAlign - 1});
  uint8_t* stages = smem;
  float* staging = reinterpret_cast<float*>(smem + kStages * kStageBytes);
  uint64_t* full = reinterpret_cast<uint64_t*>(staging + kConsumers * kConsumerRows * kTileLd);
  uint64_t* empty = full + kStages;

  const int warpgroup = threadIdx.x / kWarpgroupThreads;
  const int thread = threadIdx.x % kWarpgroupThreads;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      hopper::mbarrier_init(&full[s], 1);                        // the producer's arrival
      hopper::mbarrier_init(&empty[s], kConsumers * 4);          // one per consumer warp
    }
    hopper::mbarrier_init_fence();
  }
  __syncthreads();

  const int64_t tiles_m = (params.m + kBlockM - 1) / kBlockM;
  const int64_t tiles_n = (params.n + kBlockN - 1) / kBlockN;
  const int64_t num_tiles = tiles_m * tiles_n;
  constexpr int kBlockK = block_k<T>();
  const int k_blocks = static_cast<int>((params.k + kBlockK - 1) / kBlockK);

  if (warpgroup == kConsumers) {
    // The producer.
    hopper::release_registers<kProducerRegisters>();
    if (thread == 0) {
      hopper::tma_prefetch_descriptor(&map_a);
      hopper::tma_prefetch_descriptor(&map_b);
      int stage = 0;
      uint32_t phase = 0;
      for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
        const TileCoords at = tile_coords(tile, tiles_m, tiles_n);
        for (int kb = 0; kb < k_blocks; ++kb) {
          hopper::mbarrier_wait(&empty[stage], phase ^ 1);
          hopper::mbarrier_arrive_expect_tx(&full[stage], kStageBytes);
          uint8_t* a_stage = stages + stage * kStageBytes;
          load_operand<kAMnMajor>(a_stage, &map_a, &full[stage], at.m0,
                                  static_cast<int64_t>(kb) * kBlockK);
          load_operand<kBMnMajor>(a_stage + kOperandBytes, &map_b, &full[stage], at.n0,
                                  static_cast<int64_t>(kb) * kBlockK);
          if (++stage == kStages) {
            stage = 0;
            phase ^= 1;
          }
        }
      }
    }
    return;
  }

  // A consumer: rows [warpgroup * 64, warpgroup * 64 + 64) of every tile.
  hopper::claim_registers<kConsumerRegisters>();
  const int lane = thread % 32;
  float* my_staging = staging + warpgroup * kConsumerRows * kTileLd;
  float d[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) d[i] = 0.f;
  int stage = 0;
  uint32_t phase = 0;
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const TileCoords at = tile_coords(tile, tiles_m, tiles_n);
    int previous_stage = 0;
    for (int kb = 0; kb < k_blocks; ++kb) {
      hopper::mbarrier_wait(&full[stage], phase);
      const uint8_t* a_stage = stages + stage * kStageBytes;
      const uint8_t* b_stage = a_stage + kOperandBytes;
      hopper::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kRowBytes / kStepBytes; ++kk) {
        hopper::wgmma_m64n128k16<T, kAMnMajor, kBMnMajor>(
            d, operand_descriptor<kAMnMajor>(a_stage, warpgroup * kConsumerRows, kk),
            operand_descriptor<kBMnMajor>(b_stage, 0, kk), (kb > 0 || kk > 0) ? 1u : 0u);
      }
      hopper::wgmma_commit_group();
      hopper::wgmma_wait_group<1>();  // the previous K block's MMAs are done with its stage
      if (kb > 0 && lane == 0) {
        hopper::mbarrier_arrive(&empty[previous_stage]);
      }
      previous_stage = stage;
      if (++stage == kStages) {
        stage = 0;
        phase ^= 1;
      }
    }
    hopper::wgmma_wait_group<0>();
    if (lane == 0) {
      hopper::mbarrier_arrive(&empty[previous_stage]);
    }
    static_assert(kBlockN == 128 && kConsumerRows == 64, "one m64n128 accumulator per consumer");
    hopper::spill_m64n128(my_staging, d, thread);
    hopper::named_barrier_sync(1 + warpgroup, kWarpgroupThreads);
    epilogue_store_tile<T, kConsumerRows, kBlockN, kWarpgroupThreads>(
        my_staging, thread, at.m0 + warpgroup * kConsumerRows, at.n0, params, vectorizable);
    hopper::named_barrier_sync(1 + warpgroup, kWarpgroupThreads);  // staging free again
  }
#else
  __trap();  // built without sm_90a code: the launcher never starts this kernel then
#endif
}

// The TMA descriptor of an operand with `rows` rows along M or N and depth k.
template <typename T>
cudaError_t operand_tensor_map(CUtensorMap* map, const GemmOperand& operand, int64_t rows,
                               int64_t k) {
  constexpr int kBytes = static_cast<int>(sizeof(T));
  if (operand.mn_major) {  // boxes of 64 elements along M/N (128 bytes) x one K block
    return make_tensor_map_2d(map, operand.data, tensor_map_type<T>(), kBytes, rows, k,
                              operand.ld, kRowBytes / kBytes, block_k<T>());
  }
  return make_tensor_map_2d(map, operand.data, tensor_map_type<T>(), kBytes, k, rows,
                            operand.ld, block_k<T>(), kBlockM);
}

int multiprocessor_count(int device) {
  static std::atomic<int> counts[64] = {};
  if (device < 0 || device >= 64) return 0;
  int count = counts[device].load(std::memory_order_relaxed);
  if (count == 0) {
    if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      return 0;
    }
    counts[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

template <typename T, bool kAMnMajor, bool kBMnMajor>
cudaError_t launch(const GemmParams& params, int device, cudaStream_t stream) {
  CUtensorMap map_a, map_b;
  FUSEDOPS_RETURN_IF_ERROR(operand_tensor_map<T>(&map_a, params.a, params.m, params.k));
  FUSEDOPS_RETURN_IF_ERROR(operand_tensor_map<T>(&map_b, params.b, params.n, params.k));
  auto kernel = gemm_sm90_kernel<T, kAMnMajor, kBMnMajor>;
  // The attribute is per device; setting it again is cheap but not free, so remember it.
  static std::atomic<uint64_t> configured_devices{0};
  const uint64_t bit = uint64_t{1} << (device % 64);
  if ((configured_devices.load(std::memory_order_relaxed) & bit) == 0) {
    FUSEDOPS_RETURN_IF_ERROR(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmemBytes)));
    configured_devices.fetch_or(bit, std::memory_order_relaxed);
  }
  const int64_t tiles = ((params.m + kBlockM - 1) / kBlockM) * ((params.n + kBlockN - 1) / kBlockN);
  const int sms = std::max(1, multiprocessor_count(device));
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(tiles, sms));
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(map_a, map_b, params,
                                                 epilogue_vectorizable(params));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_for_majors(const GemmParams& params, int device, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {  // wgmma has no transposed tf32 operand
    if (params.a.mn_major || params.b.mn_major) return cudaErrorInvalidValue;
    return launch<float, false, false>(params, device, stream);
  } else if (params.a.mn_major) {
    return params.b.mn_major ? launch<T, true, true>(params, device, stream)
                             : launch<T, true, false>(params, device, stream);
  } else {
    return params.b.mn_major ? launch<T, false, true>(params, device, stream)
                             : launch<T, false, false>(params, device, stream);
  }
}

}  // namespace

bool gemm_sm90_available(int device) {
  static std::atomic<int> known[64] = {};
  const void* kernel =
      reinterpret_cast<const void*>(&gemm_sm90_kernel<__nv_bfloat16, false, false>);
  return fusedops::sm90a_code_runs(kernel, device, known);
}

cudaError_t gemm_sm90(const GemmParams& params, int device, cudaStream_t stream) {
  if (!gemm_sm90_available(device)) {
    return cudaErrorNotSupported;
  }
  if (params.k > INT32_MAX || params.m > INT32_MAX || params.n > INT32_MAX) {
    return cudaErrorInvalidValue;  // TMA coordinates are 32-bit
  }
  switch (params.type) {
    case GemmType::kBFloat16: return launch_for_majors<__nv_bfloat16>(params, device, stream);
    case GemmType::kFloat16: return launch_for_majors<__half>(params, device, stream);
    case GemmType::kFloat32: return launch_for_majors<float>(params, device, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fusedops
