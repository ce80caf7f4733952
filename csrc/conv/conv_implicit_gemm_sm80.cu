// conv_implicit_gemm_sm80.cu — the groups == 1 convolution (forward, grad_input, grad_weight)
// as implicit GEMMs on sm_80 tensor cores: gemm_sm80.cu's pipeline (cp.async zero-fill into a
// 4-stage XOR-swizzled shared-memory ring, ldmatrix / ldmatrix.trans, mma.sync m16n8k16 with
// float32 accumulation, 128 x 128 x 32 tiles, 256 threads, the float32 staging tile and
// epilogue.cuh) with its global -> shared copies replaced by conv_gather.cuh's gathers, so
// that no im2col matrix is ever materialized. It also runs on sm_90, where
// conv_implicit_gemm_sm90.cu's wgmma kernels take what they cover.
//
// float32 inputs are multiplied in tf32 (mma.sync m16n8k8, operands rounded with
// cvt.rna.tf32.f32, float32 accumulation; 128 x 128 x 16 tiles, the same 64 KB ring): the
// caller allows it as torch allows cuDNN to (conv.h). The forward's operands are K-major
// (ldmatrix, as the GEMM's float32); dgrad's B and both of wgrad's operands are MN-major,
// which ldmatrix.trans cannot transpose for 32-bit elements, so gemm_sm80_tile.cuh reads
// those fragments one float per lane with ld.shared.b32 from a layout swizzled for it, with
// the warps' fragments of such an operand interleaved (a_fragment_row, b_fragment_col) so
// that one or two address registers serve them; the spill follows the same placement.
//
// Left for a GPU to tune (nothing here has been measured): the tile shape for small K or C
// (a 64-wide tile for K = 64 layers), block_k = 64, an incremental pixel decode for wgrad
// instead of two divisions per block, and the split count's target.

#include <atomic>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/ampere.cuh"
#include "../common/check.cuh"
#include "../common/vec.cuh"
#include "../matmul/epilogue.cuh"
#include "../matmul/gemm.h"
#include "../matmul/gemm_sm80_tile.cuh"
#include "conv_gather.cuh"
#include "conv_implicit_gemm.h"

namespace fusedops {
namespace {

using namespace sm80_tile;
using conv_gemm::ConvKernelParams;
using conv_gemm::ConvOp;

// Where a gathered chunk lands: gemm_sm80's XOR-swizzled layouts, read by ldmatrix.
struct Sm80Layout {
  template <typename T, bool kMnMajor>
  __host__ __device__ __forceinline__ static uint32_t chunk_offset(int row, int k) {
    return smem_chunk_offset<T, kMnMajor>(row, k);
  }
};

// The tile, warp and pipeline shape, the shared-memory layout, the fragment loads, the MMA
// step and the accumulator spill are gemm_sm80's (gemm_sm80_tile.cuh; gemm_sm80.cu's top
// comment explains the swizzles, the fragment layouts and the register / shared-memory
// budget; gemm_sm80_tile.cuh the float32 MN-major tiles).
static_assert(block_k<__half>() == 32 && block_k<float>() == 16 &&
                  kKMajorRowStep * 2 == kTileRows &&
                  mn_major_k_step<__half>() * 2 == block_k<__half>() &&
                  mn_major_k_step<float>() * 2 == block_k<float>(),
              "2 chunks each");

template <typename T, ConvOp kOp>
using OpTraits = conv_gemm::ConvOpTraits<T, kOp, Sm80Layout>;

// ---- The kernels ----

template <typename T, ConvOp kOp>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    conv_sm80_kernel(const __grid_constant__ ConvKernelParams params, const bool vectorizable) {
  using Traits = OpTraits<T, kOp>;
  constexpr bool kAMnMajor = Traits::kAMnMajor;
  constexpr bool kBMnMajor = Traits::kBMnMajor;
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

  const int k_blocks = conv_gemm::conv_k_blocks(params, kOp, blockIdx.y, block_k<T>());
  auto gather = conv_gemm::make_gather<T, kOp, Sm80Layout>(params, row0, col0, thread);
  auto load_block = [&](int stage) {
    const uint32_t a_tile = smem_base + stage * kStageBytes;
    gather.load(params, a_tile, a_tile + kOperandBytes, thread);
  };

  // The pipeline is gemm_sm80's: blocks 0..2 in flight before the loop, one barrier per block.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_blocks) load_block(s);
    ampere::cp_async_commit();
  }

  float acc[kFragsM][kFragsN][4];
  zero_accumulators(acc);

  const uint32_t a_offset0 = a_fragment_offset0<T, kAMnMajor>(lane, warp);
  const uint32_t b_offset0 = b_fragment_offset0<T, kBMnMajor>(lane, warp);

  int read_stage = 0;
  int write_stage = kStages - 1;
#pragma unroll 1
  for (int kb = 0; kb < k_blocks; ++kb) {
    ampere::cp_async_wait<kStages - 2>();
    __syncthreads();
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

  ampere::cp_async_wait<0>();
  __syncthreads();  // every warp is done reading the ring: it becomes the staging tile

  float* staging = reinterpret_cast<float*>(smem);
  spill_accumulators<kScalarFragments<T, kAMnMajor>, kScalarFragments<T, kBMnMajor>>(
      staging, acc, warp, lane);
  __syncthreads();
  conv_gemm::store_conv_tile<T, kOp, kBlockM, kBlockN, kThreads>(staging, thread, row0, col0,
                                                                 params, vectorizable);
}

template <typename Kernel>
cudaError_t configure(Kernel kernel, std::atomic<uint64_t>& configured_devices) {
  int device = 0;
  FUSEDOPS_RETURN_IF_ERROR(cudaGetDevice(&device));
  const uint64_t bit = device >= 0 && device < 64 ? uint64_t{1} << device : 0;
  if (bit == 0 || (configured_devices.load(std::memory_order_relaxed) & bit) == 0) {
    FUSEDOPS_RETURN_IF_ERROR(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
    configured_devices.fetch_or(bit, std::memory_order_relaxed);
  }
  return cudaSuccess;
}

template <typename T, ConvOp kOp>
cudaError_t launch_conv(const ConvKernelParams& params, int splits, cudaStream_t stream) {
  auto kernel = conv_sm80_kernel<T, kOp>;
  static std::atomic<uint64_t> configured_devices{0};
  FUSEDOPS_RETURN_IF_ERROR(configure(kernel, configured_devices));
  dim3 grid;
  if (!conv_gemm::conv_grid(params, splits, kBlockM, grid)) return cudaErrorInvalidValue;
  const bool vectorizable = epilogue_vectorizable(params.epi);
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(params, vectorizable);
  return cudaGetLastError();
}

// The instantiations, all in one place: [op][GemmType] (float32 in tf32).
using ConvLauncher = cudaError_t (*)(const ConvKernelParams&, int, cudaStream_t);
constexpr ConvLauncher kConvLaunchers[3][3] = {
    {launch_conv<__half, ConvOp::kFwd>, launch_conv<__nv_bfloat16, ConvOp::kFwd>,
     launch_conv<float, ConvOp::kFwd>},
    {launch_conv<__half, ConvOp::kDgrad>, launch_conv<__nv_bfloat16, ConvOp::kDgrad>,
     launch_conv<float, ConvOp::kDgrad>},
    {launch_conv<__half, ConvOp::kWgrad>, launch_conv<__nv_bfloat16, ConvOp::kWgrad>,
     launch_conv<float, ConvOp::kWgrad>}};
static_assert(static_cast<int>(GemmType::kFloat16) == 0 &&
                  static_cast<int>(GemmType::kBFloat16) == 1 &&
                  static_cast<int>(GemmType::kFloat32) == 2,
              "kConvLaunchers is indexed by GemmType");
}  // namespace

namespace conv_gemm {

cudaError_t conv_sm80_launch(ConvOp op, GemmType type, const ConvKernelParams& params,
                             int splits, cudaStream_t stream) {
  if (type != GemmType::kFloat16 && type != GemmType::kBFloat16 && type != GemmType::kFloat32) {
    return cudaErrorInvalidValue;
  }
  return kConvLaunchers[static_cast<int>(op)][static_cast<int>(type)](params, splits, stream);
}

}  // namespace conv_gemm
}  // namespace fusedops
