// conv_implicit_gemm_sm90.cu — the groups == 1 convolution (forward, grad_input, grad_weight)
// as implicit GEMMs on sm_90a tensor cores: wgmma fed by conv_gather.cuh's cp.async gathers.
//
// The CTA: 256 threads = two warpgroups, a 128 x 128 output tile, warpgroup w owning rows
// [64 w, 64 w + 64) as one wgmma m64n128 accumulator (64 float32 registers per thread). The
// k loop walks block_k<T>() deep stages (64 bytes of depth per K-major row: 32 16-bit
// elements = 2 wgmma k16 steps, or 16 float32 = 2 tf32 k8 steps) through a kStages-deep ring
// that all 256 threads fill; there is no producer warp. At the end the accumulators go through
// a float32 staging tile (the ring's memory) to the same stores as the sm_80 kernel:
// epilogue.cuh's fused epilogue for the forward, conv_gather.cuh's dgrad_store_tile for
// grad_input, float32 partials per split for grad_weight. Grid, tile order, outputs and
// coverage of the gathers are conv_implicit_gemm_sm80.cu's, so the two paths are
// interchangeable (conv_implicit_gemm.cu picks one). float32 (the forward only: its operands
// are K-major) is multiplied in tf32 as wgmma reads it, the top 19 bits of each float
// (truncation, as gemm_sm90.cu; the sm_80 kernel rounds with cvt.rna instead).
//
// Why cp.async gathers and not TMA (its im2col mode): the gathers are the sm_80 kernel's,
// shared through conv_gather.cuh, so both paths read exactly the same elements and a fix to
// one reaches both. They decode every 16-byte chunk on its own, so they take in their stride
// what TMA's boxes do not express in one descriptor: dgrad's division by the stride (a tap
// contributes only where it divides exactly, else the chunk is zero), any dilation, and a k
// block that spans several taps when C is small. Nor does anything need a tensor map built
// on the host per call.
//
// Shared-memory layouts (Sm90Layout, read through operand_descriptor; both are __host__ too, so
// a host model can check every element of a tile against the descriptors' canonical layouts):
//   K-major tiles (forward A and B, dgrad A): the sm_80 kernel's, rows of 64 bytes with chunk
//     c of row r at c ^ ((r / 2) % 4). That is exactly wgmma's 64-byte swizzle (address bits
//     [7, 9) XORed into [4, 6)) when the tile starts on a 512-byte boundary, read with
//     SBO = 512 (8 rows of 64 bytes), LBO unused; k step kk starts 32 kk bytes further, and
//     warpgroup w's A rows 64 w * 64 bytes further.
//   MN-major tiles (dgrad B, wgrad A and B; 16-bit only: wgmma has no transposed tf32): two
//     panels of 64 elements along M/N, each block_k rows of 128 bytes along k, in wgmma's
//     128-byte swizzle (chunk c of k-row k at c ^ (k % 8)); LBO = 4096 (panel to panel),
//     SBO = 1024 (8 k-rows), k step kk (16 k-rows) 2048 bytes further, warpgroup w's A rows
//     in panel w. This needs 1024-byte aligned tiles: the dynamic shared memory is aligned by
//     hand and every stage and operand is a multiple of 1024 bytes.
//
// The pipeline, per k block kb (kStages = S stages, S - 2 blocks in flight):
//   cp.async.wait_group(S - 3)   this thread's copies of block kb have landed
//   fence.proxy.async            ... and are visible to the async proxy wgmma reads through:
//                                cp.async writes are generic-proxy writes
//   __syncthreads                everyone's copies of block kb, and everyone past the
//                                wgmma wait of iteration kb - 1
//   gather block kb + S - 2 into stage (kb + S - 2) % S, commit (an empty group past the end
//                                keeps the wait counts uniform)
//   wgmma fence, 2 wgmma on stage kb % S, commit, wgmma.wait_group(1)
// Stage reuse: stage (kb + S - 2) % S last held block kb - 2. wait_group(1) at the end of
// iteration kb - 1 retired every wgmma group but kb - 1's in each warpgroup, kb - 2's
// included, and the barrier of iteration kb orders both warpgroups' waits before any thread's
// new copies into that stage. Block kb - 1's group may still be reading its stage, which is
// why the distance is S - 2 and not S - 1 as on sm_80 (whose mma.sync reads are done when
// the barrier is reached).
//
// Budget: 6 stages x 16 KB + 1 KB for the alignment = 97 KB of shared memory (plus the 1 KB
// the system reserves per CTA) and __launch_bounds__(256, 2) (at most 128 registers; ptxas
// needs 106-115 and spills nothing), so two CTAs share an SM and one's epilogue overlaps the
// other's main loop.
//
// Left for a GPU to tune (nothing here has been measured): warp specialization (a producer
// warpgroup gathering into mbarrier-guarded stages while two consumer warpgroups only issue
// wgmma, with setmaxnreg moving registers to the consumers), TMA for the weight operand of the
// forward (a plain 2-D K-major matrix), 128 x 256 tiles (two m64n256 per CTA, or one per
// consumer with a third warpgroup producing), the stage count, and a persistent tile loop.

#include <atomic>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/ampere.cuh"
#include "../common/check.cuh"
#include "../common/hopper.cuh"
#include "../common/tensor_map.h"
#include "../matmul/epilogue.cuh"
#include "../matmul/gemm.h"
#include "../matmul/gemm_sm80_tile.cuh"
#include "../matmul/wgmma.cuh"
#include "conv_gather.cuh"
#include "conv_implicit_gemm.h"

// The sm_80 and compute_80 passes compile the kernel body out (FUSEDOPS_SM90A_ENABLED), which
// leaves some constants and helpers unused there.
#pragma nv_diag_suppress 177

namespace fusedops {
namespace {

using conv_gemm::ConvKernelParams;
using conv_gemm::ConvOp;
using sm80_tile::block_k;
using sm80_tile::chunk_elems;
using sm80_tile::mma_k;

constexpr int kBlockM = 128;
constexpr int kBlockN = 128;
constexpr int kThreads = 256;              // what the gathers are written for
constexpr int kWarpgroupThreads = 128;
constexpr int kWarpgroupRows = 64;         // one wgmma m64 per warpgroup
constexpr int kMinBlocksPerSm = 2;
constexpr int kStages = 6;
static_assert(kStages >= 3, "the prefetch distance is kStages - 2");
static_assert(kBlockM == sm80_tile::kBlockM && kBlockN == sm80_tile::kBlockN &&
                  kThreads == sm80_tile::kThreads,
              "the gathers' tile and thread count");
static_assert(kThreads / kWarpgroupThreads * kWarpgroupRows == kBlockM, "two warpgroups");

// Byte geometry, the same for every element type (block_k<T>() elements = 64 bytes of depth).
constexpr int kKRowBytes = sm80_tile::kKChunks * sm80_tile::kChunkBytes;  // 64: K-major row
constexpr int kStepBytes = 32;              // one wgmma k step of a K-major row
constexpr int kKSteps = kKRowBytes / kStepBytes;                         // 2 per stage
constexpr int kOperandBytes = kBlockM * kKRowBytes;                       // 8 KB
constexpr int kStageBytes = 2 * kOperandBytes;                            // A, then B
constexpr int kPipelineBytes = kStages * kStageBytes;                     // 96 KB
// MN-major (16-bit): panels of 64 elements (128 bytes) along M/N, block_k k-rows each.
constexpr int kMnRowBytes = 128;
constexpr int kMnPanelRows = kMnRowBytes / 2;                             // 64 elements
constexpr int kMnPanelBytes = block_k<__half>() * kMnRowBytes;            // 4096
constexpr int kMnStepBytes = mma_k<__half>() * kMnRowBytes;               // 2048: 16 k-rows
static_assert(2 * kMnPanelBytes == kOperandBytes, "an MN-major tile is two panels");
static_assert(kKSteps == sm80_tile::kKSteps && mma_k<__half>() * 2 == kStepBytes &&
                  mma_k<float>() * 4 == kStepBytes,
              "k16 (16-bit) and k8 (tf32) steps are 32 bytes of a K-major row");

// The swizzle patterns repeat every 512 (64-byte mode) and 1024 (128-byte mode) bytes; the
// descriptors assume every tile starts on such a boundary (base offset 0).
constexpr int kSwizzleAlign = 1024;
static_assert(kOperandBytes % kSwizzleAlign == 0 && kMnPanelBytes % kSwizzleAlign == 0 &&
                  (kWarpgroupRows * kKRowBytes) % 512 == 0,
              "tiles, panels and warpgroup row blocks stay on the swizzle repeat");

constexpr int kTileLd = kBlockN + kTilePad;                                // staging stride
constexpr int kStagingBytes = kBlockM * kTileLd * static_cast<int>(sizeof(float));
constexpr int kSmemBytes =
    kSwizzleAlign + (kPipelineBytes > kStagingBytes ? kPipelineBytes : kStagingBytes);
static_assert(kSmemBytes * kMinBlocksPerSm + 2 * 1024 <= 228 * 1024,
              "two CTAs per SM (plus the 1 KB each the system reserves)");

// Where a gathered chunk lands (conv_gather.cuh's Layout interface): K-major = the sm_80
// layout, which is wgmma's 64-byte swizzle; MN-major = panels in the 128-byte swizzle.
struct Sm90Layout {
  template <typename T, bool kMnMajor>
  __host__ __device__ __forceinline__ static uint32_t chunk_offset(int row, int k) {
    if constexpr (kMnMajor) {
      static_assert(sizeof(T) == 2, "MN-major operands are 16-bit");
      const int in_panel = row % kMnPanelRows;
      return static_cast<uint32_t>((row / kMnPanelRows) * kMnPanelBytes + k * kMnRowBytes +
                                   (((in_panel / chunk_elems<T>()) ^ (k % 8)) *
                                    sm80_tile::kChunkBytes));
    } else {
      return sm80_tile::smem_chunk_offset<T, false>(row, k);
    }
  }
};

// The wgmma descriptor of k step `kk` of the operand tile at shared address `tile`, for the
// wgmma M or N rows starting at tile row `row0` (0 or 64 for a warpgroup's A, 0 for B).
template <bool kMnMajor>
__host__ __device__ __forceinline__ uint64_t operand_descriptor(uint32_t tile, int row0,
                                                               int kk) {
  if constexpr (kMnMajor) {
    return hopper::make_smem_descriptor(
        tile + static_cast<uint32_t>((row0 / kMnPanelRows) * kMnPanelBytes + kk * kMnStepBytes),
        /*leading_bytes=*/kMnPanelBytes, /*stride_bytes=*/8 * kMnRowBytes, hopper::kSwizzle128B);
  } else {
    return hopper::make_smem_descriptor(
        tile + static_cast<uint32_t>(row0 * kKRowBytes + kk * kStepBytes),
        /*leading_bytes=*/16, /*stride_bytes=*/8 * kKRowBytes, hopper::kSwizzle64B);
  }
}

template <typename T, ConvOp kOp>
using OpTraits = conv_gemm::ConvOpTraits<T, kOp, Sm90Layout>;

// ---- The kernel ----

template <typename T, ConvOp kOp>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    conv_sm90_kernel(const __grid_constant__ ConvKernelParams params, const bool vectorizable) {
#if FUSEDOPS_SM90A_ENABLED
  using Traits = OpTraits<T, kOp>;
  constexpr bool kAMnMajor = Traits::kAMnMajor;
  constexpr bool kBMnMajor = Traits::kBMnMajor;
  static_assert(sizeof(T) == 2 || (!kAMnMajor && !kBMnMajor), "tf32 operands are K-major");
  extern __shared__ uint8_t smem_raw[];
  // Dynamic shared memory is only 16-byte aligned; the swizzles need 1024.
  const uint32_t raw_base = hopper::smem_address(smem_raw);
  const uint32_t smem_base = (raw_base + kSwizzleAlign - 1) & ~uint32_t{kSwizzleAlign - 1};
  float* staging = reinterpret_cast<float*>(smem_raw + (smem_base - raw_base));

  const int thread = threadIdx.x;
  const int warpgroup = thread / kWarpgroupThreads;

  const uint32_t tiles_m = static_cast<uint32_t>((params.m + kBlockM - 1) / kBlockM);
  const uint32_t tiles_n = static_cast<uint32_t>((params.n + kBlockN - 1) / kBlockN);
  uint32_t tile_m, tile_n;
  sm80_tile::tile_position(blockIdx.x, tiles_m, tiles_n, tile_m, tile_n);
  const int64_t row0 = static_cast<int64_t>(tile_m) * kBlockM;
  const int64_t col0 = static_cast<int64_t>(tile_n) * kBlockN;

  const int k_blocks = conv_gemm::conv_k_blocks(params, kOp, blockIdx.y, block_k<T>());
  auto gather = conv_gemm::make_gather<T, kOp, Sm90Layout>(params, row0, col0, thread);
  // The gather walks the k blocks in order, one per call.
  auto load_block = [&](int stage) {
    const uint32_t a_tile = smem_base + static_cast<uint32_t>(stage * kStageBytes);
    gather.load(params, a_tile, a_tile + kOperandBytes, thread);
  };

#pragma unroll
  for (int s = 0; s < kStages - 2; ++s) {
    if (s < k_blocks) load_block(s);
    ampere::cp_async_commit();
  }

  // Zero, so that an empty wgrad split (k_blocks == 0) stores zeros; every wgmma accumulates.
  float d[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) d[i] = 0.0f;

  int read_stage = 0;
  int write_stage = kStages - 2;
#pragma unroll 1
  for (int kb = 0; kb < k_blocks; ++kb) {
    ampere::cp_async_wait<kStages - 3>();
    hopper::fence_proxy_async_shared();
    __syncthreads();
    if (kb + kStages - 2 < k_blocks) load_block(write_stage);
    ampere::cp_async_commit();

    const uint32_t a_tile = smem_base + static_cast<uint32_t>(read_stage * kStageBytes);
    const uint32_t b_tile = a_tile + kOperandBytes;
    hopper::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      hopper::wgmma_m64n128k16<T, kAMnMajor, kBMnMajor>(
          d, operand_descriptor<kAMnMajor>(a_tile, warpgroup * kWarpgroupRows, kk),
          operand_descriptor<kBMnMajor>(b_tile, 0, kk), 1u);
    }
    hopper::wgmma_commit_group();
    hopper::wgmma_wait_group<1>();  // block kb - 1's MMAs are done with its stage
    read_stage = read_stage == kStages - 1 ? 0 : read_stage + 1;
    write_stage = write_stage == kStages - 1 ? 0 : write_stage + 1;
  }
  hopper::wgmma_wait_group<0>();
  ampere::cp_async_wait<0>();  // only empty groups are left, but the ring is about to go
  __syncthreads();             // every warpgroup is done reading the ring: it becomes staging

  hopper::spill_m64n128(staging + warpgroup * kWarpgroupRows * kTileLd, d,
                        thread % kWarpgroupThreads);
  __syncthreads();
  conv_gemm::store_conv_tile<T, kOp, kBlockM, kBlockN, kThreads>(staging, thread, row0, col0,
                                                                 params, vectorizable);
#else
  (void)params, (void)vectorizable;
  __trap();  // built without sm_90a code: conv_sm90_runs is false then, nothing launches this
#endif
}

template <typename T, ConvOp kOp>
cudaError_t launch_conv(const ConvKernelParams& params, int splits, cudaStream_t stream) {
  auto kernel = conv_sm90_kernel<T, kOp>;
  // The attribute is per device; setting it again is cheap but not free, so remember it.
  static std::atomic<uint64_t> configured_devices{0};
  int device = 0;
  FUSEDOPS_RETURN_IF_ERROR(cudaGetDevice(&device));
  const uint64_t bit = device >= 0 && device < 64 ? uint64_t{1} << device : 0;
  if (bit == 0 || (configured_devices.load(std::memory_order_relaxed) & bit) == 0) {
    FUSEDOPS_RETURN_IF_ERROR(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
    // Two CTAs need 2 x (97 + 1 reserved) KB of the 228 KB: ask for the largest carveout
    // rather than leave the split with L1 to the driver's default (the operands bypass L1).
    FUSEDOPS_RETURN_IF_ERROR(cudaFuncSetAttribute(
        kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
    configured_devices.fetch_or(bit, std::memory_order_relaxed);
  }
  dim3 grid;
  if (!conv_gemm::conv_grid(params, splits, kBlockM, grid)) return cudaErrorInvalidValue;
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(params, epilogue_vectorizable(params.epi));
  return cudaGetLastError();
}

// The instantiations, all in one place: [op][type], nullptr where not covered (float32 is
// tf32 and K-major only, so the forward alone).
using ConvLauncher = cudaError_t (*)(const ConvKernelParams&, int, cudaStream_t);
constexpr ConvLauncher kConvLaunchers[3][3] = {
    {launch_conv<__half, ConvOp::kFwd>, launch_conv<__nv_bfloat16, ConvOp::kFwd>,
     launch_conv<float, ConvOp::kFwd>},
    {launch_conv<__half, ConvOp::kDgrad>, launch_conv<__nv_bfloat16, ConvOp::kDgrad>, nullptr},
    {launch_conv<__half, ConvOp::kWgrad>, launch_conv<__nv_bfloat16, ConvOp::kWgrad>, nullptr}};
static_assert(static_cast<int>(GemmType::kFloat16) == 0 &&
                  static_cast<int>(GemmType::kBFloat16) == 1 &&
                  static_cast<int>(GemmType::kFloat32) == 2 &&
                  static_cast<int>(ConvOp::kFwd) == 0 && static_cast<int>(ConvOp::kDgrad) == 1 &&
                  static_cast<int>(ConvOp::kWgrad) == 2,
              "the launcher table is indexed by ConvOp and GemmType");

ConvLauncher launcher(ConvOp op, GemmType type) {
  const int o = static_cast<int>(op);
  const int t = static_cast<int>(type);
  if (o < 0 || o > 2 || t < 0 || t > 2) return nullptr;
  return kConvLaunchers[o][t];
}

}  // namespace

namespace conv_gemm {

bool conv_sm90_runs(int device) {
  static std::atomic<int> known[64] = {};
  const void* kernel =
      reinterpret_cast<const void*>(&conv_sm90_kernel<__nv_bfloat16, ConvOp::kFwd>);
  return fusedops::sm90a_code_runs(kernel, device, known);
}

bool conv_sm90_covers(ConvOp op, GemmType type) { return launcher(op, type) != nullptr; }

cudaError_t conv_sm90_launch(ConvOp op, GemmType type, const ConvKernelParams& params,
                             int splits, cudaStream_t stream) {
  const ConvLauncher launch = launcher(op, type);
  if (launch == nullptr) return cudaErrorNotSupported;
  return launch(params, splits, stream);
}

}  // namespace conv_gemm
}  // namespace fusedops
