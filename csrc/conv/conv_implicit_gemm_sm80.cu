// conv_implicit_gemm_sm80.cu — the groups == 1 convolution (forward, grad_input, grad_weight)
// as implicit GEMMs on sm_80 tensor cores: gemm_sm80.cu's pipeline (cp.async zero-fill into a
// 4-stage XOR-swizzled shared-memory ring, ldmatrix / ldmatrix.trans, mma.sync m16n8k16 with
// float32 accumulation, 128 x 128 x 32 tiles, 256 threads, the float32 staging tile and
// epilogue.cuh) with its global -> shared copies replaced by gathers, so that no im2col
// matrix is ever materialized. float16 and bfloat16 only. It also runs on sm_90: there is no
// sm_90a (wgmma / TMA) convolution kernel yet, see conv_implicit_gemm_sm90_available.
//
// The three GEMM views (conv.h; x (N, H, W, C), w (K, R, S, C), dz and out (N, P, Q, K); a
// "tap" is one filter position (r, s); gemm_sm80's A is (m, depth), B is (n, depth)):
//   forward  out (m = (n, oh, ow), n = k) over depth (r, s, c), c fastest:
//              A(m, (r,s,c)) = x[n, oh*sh - ph + r*dh, ow*sw - pw + s*dw, c]  gathered, K-major
//              B(k, (r,s,c)) = w[k, r, s, c]                                 K-major, ld R*S*C
//            then the full epilogue (bias, residual, activation, preact).
//   dgrad    grad_input (m = (n, h, w), n = c) over depth (r, s, k), k fastest:
//              A(m, (r,s,k)) = dz[n, oh, ow, k] with oh = (h + ph - r*dh) / sh when that
//                              divides exactly and lands in [0, P) (likewise ow), else 0:
//                              gathered, K-major
//              B(c, (r,s,k)) = w[k, r, s, c]: 8 consecutive c are contiguous, so MN-major
//                              (ldmatrix.trans), a depth row (r, s, k) at w + k*RSC + (rS+s)C
//            plain stores (epilogue with no bias, residual or activation). Every pixel of
//            grad_input is a GEMM row, so every element is written, 0 where no tap reaches.
//   wgrad    grad_weight (m = k, n = (r, s, c)) over depth = the N*P*Q output pixels:
//              A(k, pix) = dz[pix, k]                     MN-major, ld K (8 consecutive k)
//              B((r,s,c), pix) = x[n, oh*sh - ph + r*dh, ow*sw - pw + s*dw, c]  gathered,
//                              MN-major (8 consecutive c of one tap)
//
// Why a 16-byte chunk never straddles taps: cp.async moves 8 consecutive elements along the
// chunk's direction. Along a depth ordered (r, s, c) with c fastest (forward A and B), chunks
// start at multiples of 8 and C % 8 == 0, so a chunk is 8 channels of one tap and one source
// address; the same holds for (r, s, k) with K % 8 == 0 (dgrad A), and for the (r, s, c)
// columns of wgrad's B. So every chunk is either a contiguous 16-byte global read or
// wholly zero (outside the image, a stride that does not divide, past the GEMM's edge): a
// chunk that is zero copies 0 bytes from the tensor's base, so no out-of-bounds address is
// ever formed for a read. A stage's 32-deep k block may cover several taps (C < 32): each
// chunk decodes its own tap.
//
// The gathers. Per tile, each thread works out once (divisions outside the k loop) what is
// fixed for its two A rows and two B rows: for the forward the (n, oh*sh - ph, ow*sw - pw)
// of its output pixels, for dgrad the (n, h + ph, w + pw) of its input pixels, for wgrad
// the (r, s, c) of its weight column. Along the k loop it carries the (r, s, c) or (r, s, k)
// of its chunks as counters advanced by 32 per block (a short carry loop, no division); only
// wgrad divides per block (pixel -> (n, oh, ow), two pixels per thread), and dgrad divides by
// the stride when it is not 1. Offsets are int64: N*H*W*C may pass 2**31.
//
// dgrad with stride > 1: for a given (h, r) only one tap in sh divides, so the tensor cores
// multiply zero chunks for the others (about (1 - 1/(sh*sw)) of the work is wasted). The
// copies of such chunks cost nothing (0 source bytes). Skipping them — decomposing dgrad
// into sh*sw sub-convolutions, one per output phase, each with only its own taps — is future
// tuning.
//
// wgrad's split over pixels. The (K, R*S*C) output is often a handful of tiles while the depth
// N*P*Q is huge, so the pixel range is cut in `splits` parts (grid y), chosen from the
// geometry alone (wgrad_splits) so that tiles * splits is about 2 waves of two CTAs per SM on
// 108-132 SMs, and so that each split keeps at least kWgradMinBlocks k blocks. Each CTA writes
// its float32 partial tile to workspace[split] with plain stores (no atomics, no zeroing);
// then wgrad_reduce_kernel sums the splits in order 0, 1, ... per element and casts to the
// weight's type: the result is bitwise the same for the same inputs.
//
// Left for a GPU to tune (nothing here has been measured): the tile shape for small K or C
// (a 64-wide tile for K = 64 layers), block_k = 64, dgrad's stride phases (above), an
// incremental pixel decode for wgrad instead of two divisions per block, the split count's
// target, and an sm_90a kernel (TMA im2col mode + wgmma).

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
#include "conv.h"

namespace fusedops {
namespace {

using namespace sm80_tile;

// The tile, warp and pipeline shape, the shared-memory layout, the fragment loads, the MMA
// step and the accumulator spill are gemm_sm80's (gemm_sm80_tile.cuh; gemm_sm80.cu's top
// comment explains the swizzles, the fragment layouts and the register / shared-memory
// budget), 16-bit types only.
constexpr int kBlockK = block_k<__half>();  // 32
static_assert(kBlockK == 32 && kKMajorRowStep * 2 == kTileRows && kMnMajorKStep * 2 == kBlockK,
              "2 chunks each");

// wgrad's split: the CTA count aimed at (2 waves of 2 CTAs on 128 SMs) and the fewest k blocks
// (32 pixels each) a split keeps, so the partials' traffic stays small next to the gathers.
constexpr int64_t kWgradTargetCtas = 2 * 2 * 128;
constexpr int64_t kWgradMinBlocks = 8;
constexpr int kReduceThreads = 256;

// ---- Depth arithmetic (__host__ too so a host model can check it) ----

// Advances a (tap, channel) position along a depth ordered (r, s, ch) with ch fastest by
// `step` (<= 32) channels: ch < channels afterwards. At most 32 / channels + 1 carries.
__host__ __device__ __forceinline__ void advance_tap(int& ch, int& s, int& r, int step,
                                                     int channels, int taps_w) {
  ch += step;
#pragma unroll 1
  while (ch >= channels) {
    ch -= channels;
    if (++s == taps_w) {
      s = 0;
      ++r;
    }
  }
}

// q = num / d when num >= 0 divides exactly and q < limit (d >= 1): the output pixel a dgrad
// tap reads, or false.
__host__ __device__ __forceinline__ bool exact_quotient(int num, int d, int limit, int& q) {
  if (num < 0) return false;
  if (d == 1) {
    q = num;
  } else {
    q = static_cast<int>(static_cast<uint32_t>(num) / static_cast<uint32_t>(d));
    if (q * d != num) return false;
  }
  return q < limit;
}

// ---- The gathers ----

enum class ConvOp : int { kFwd = 0, kDgrad = 1, kWgrad = 2 };

// What the kernels read, as 32-bit sizes where the launcher has checked they fit (every
// intermediate below stays within int: see geometry_ok).
struct ConvKernelParams {
  int batch, in_h, in_w, in_c, out_c, taps_h, taps_w, out_h, out_w;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t m, n;       // the GEMM's rows and columns
  int depth;          // fwd: R*S*C; dgrad: R*S*K; wgrad: unused (pixels)
  int rsc;            // R*S*C: the weight's row length
  int pixels;         // wgrad: N*P*Q, the depth
  int k_blocks;       // fwd, dgrad: the whole depth's blocks; wgrad: blocks per split
  int64_t split_floats;  // wgrad: K*R*S*C, one split's partials
  const void* act;    // fwd, wgrad: x; dgrad: dz
  const void* other;  // fwd, dgrad: w; wgrad: dz
  GemmParams epi;     // the epilogue's view (out, ld, bias, residual, activation)
};

// Forward: A = im2col(x) rows (output pixels), B = w rows (output channels), both K-major
// along the depth (r, s, c). The two A chunks and the two B chunks of a thread share their
// depth position (column 8 (t % 4) of the block), so one (r, s, c) counter serves all four.
template <typename T>
struct FwdGather {
  int64_t a_base[2];  // n*H*W*C of the A row, or -1 when the row is past m
  int ih0[2], iw0[2];  // oh*sh - ph, ow*sw - pw
  int64_t b_off[2];   // k*RSC of the B row, or -1 when past K
  int j, ch, s, r;    // depth position of this thread's chunks: flat, and (r, s, c)

  __host__ __device__ __forceinline__ FwdGather(const ConvKernelParams& p, int64_t row0,
                                                int64_t col0, int thread) {
    const int pq = p.out_h * p.out_w;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const TileCoord at = copy_coord<T, false>(thread, i);
      const int64_t row = row0 + at.row;
      if (row < p.m) {
        const int pix = static_cast<int>(row);
        const int n = pix / pq;
        const int rem = pix - n * pq;
        const int oh = rem / p.out_w;
        const int ow = rem - oh * p.out_w;
        a_base[i] = static_cast<int64_t>(n) * p.in_h * p.in_w * p.in_c;
        ih0[i] = oh * p.stride_h - p.pad_h;
        iw0[i] = ow * p.stride_w - p.pad_w;
      } else {
        a_base[i] = -1;
        ih0[i] = 0;
        iw0[i] = 0;
      }
      const int64_t col = col0 + at.row;
      b_off[i] = col < p.n ? col * p.rsc : -1;
    }
    j = copy_coord<T, false>(thread, 0).k;
    ch = 0;
    s = 0;
    r = 0;
    advance_tap(ch, s, r, j, p.in_c, p.taps_w);
  }

  __device__ __forceinline__ void load(const ConvKernelParams& p, uint32_t a_tile,
                                       uint32_t b_tile, int thread) {
    const T* x = static_cast<const T*>(p.act);
    const T* w = static_cast<const T*>(p.other);
    const bool inside = j < p.depth;
    const int dh = r * p.dil_h;
    const int dw = s * p.dil_w;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const TileCoord at = copy_coord<T, false>(thread, i);
      const int ih = ih0[i] + dh;
      const int iw = iw0[i] + dw;
      const bool ok = inside && a_base[i] >= 0 &&
                      static_cast<unsigned>(ih) < static_cast<unsigned>(p.in_h) &&
                      static_cast<unsigned>(iw) < static_cast<unsigned>(p.in_w);
      const T* from =
          ok ? x + a_base[i] + (static_cast<int64_t>(ih) * p.in_w + iw) * p.in_c + ch : x;
      ampere::cp_async_cg_16(a_tile + smem_chunk_offset<T, false>(at.row, at.k), from,
                             ok ? 16u : 0u);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const TileCoord at = copy_coord<T, false>(thread, i);
      const bool ok = inside && b_off[i] >= 0;
      const T* from = ok ? w + b_off[i] + j : w;
      ampere::cp_async_cg_16(b_tile + smem_chunk_offset<T, false>(at.row, at.k), from,
                             ok ? 16u : 0u);
    }
    j += kBlockK;
    advance_tap(ch, s, r, kBlockK, p.in_c, p.taps_w);
  }
};

// dgrad: A = dz gathered for input pixels (K-major along (r, s, k)); B = w, MN-major (a depth
// row (r, s, k) holds the C contiguous channels w[k, r, s, :]). A's chunks share the depth
// column 8 (t % 4); B's two chunks are depth rows t/16 and t/16 + 16, each with its own
// (tap, k) counter.
template <typename T>
struct DgradGather {
  int64_t a_base[2];  // n*P*Q*K of the A row, or -1 past m
  int hp[2], wp[2];   // h + ph, w + pw
  int kc, s, r;       // A's depth position (r, s, k)
  int b_k[2], b_tap[2];  // B's depth rows: (k, r*S + s)
  int b_c;            // B's channel, or -1 past C

  __host__ __device__ __forceinline__ DgradGather(const ConvKernelParams& p, int64_t row0,
                                                  int64_t col0, int thread) {
    const int hw = p.in_h * p.in_w;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const TileCoord at = copy_coord<T, false>(thread, i);
      const int64_t row = row0 + at.row;
      if (row < p.m) {
        const int pix = static_cast<int>(row);
        const int n = pix / hw;
        const int rem = pix - n * hw;
        const int h = rem / p.in_w;
        const int w = rem - h * p.in_w;
        a_base[i] = static_cast<int64_t>(n) * p.out_h * p.out_w * p.out_c;
        hp[i] = h + p.pad_h;
        wp[i] = w + p.pad_w;
      } else {
        a_base[i] = -1;
        hp[i] = 0;
        wp[i] = 0;
      }
    }
    kc = 0;
    s = 0;
    r = 0;
    advance_tap(kc, s, r, copy_coord<T, false>(thread, 0).k, p.out_c, p.taps_w);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      int k = 0, tap_s = 0, tap_r = 0;  // taps counted flat: r*S + s as "s" with S = infinity
      advance_tap(k, tap_s, tap_r, copy_coord<T, true>(thread, i).k, p.out_c, INT32_MAX);
      b_k[i] = k;
      b_tap[i] = tap_s;
    }
    const int64_t c = col0 + copy_coord<T, true>(thread, 0).row;
    b_c = c < p.n ? static_cast<int>(c) : -1;
  }

  __device__ __forceinline__ void load(const ConvKernelParams& p, uint32_t a_tile,
                                       uint32_t b_tile, int thread) {
    const T* dz = static_cast<const T*>(p.act);
    const T* w = static_cast<const T*>(p.other);
    const bool inside = r < p.taps_h;
    const int dh = r * p.dil_h;
    const int dw = s * p.dil_w;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const TileCoord at = copy_coord<T, false>(thread, i);
      int oh = 0, ow = 0;
      const bool ok = inside && a_base[i] >= 0 &&
                      exact_quotient(hp[i] - dh, p.stride_h, p.out_h, oh) &&
                      exact_quotient(wp[i] - dw, p.stride_w, p.out_w, ow);
      const T* from =
          ok ? dz + a_base[i] + (static_cast<int64_t>(oh) * p.out_w + ow) * p.out_c + kc : dz;
      ampere::cp_async_cg_16(a_tile + smem_chunk_offset<T, false>(at.row, at.k), from,
                             ok ? 16u : 0u);
    }
    const int taps = p.taps_h * p.taps_w;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const TileCoord at = copy_coord<T, true>(thread, i);
      const bool ok = b_c >= 0 && b_tap[i] < taps;
      const T* from = ok ? w + static_cast<int64_t>(b_k[i]) * p.rsc +
                               static_cast<int64_t>(b_tap[i]) * p.in_c + b_c
                         : w;
      ampere::cp_async_cg_16(b_tile + smem_chunk_offset<T, true>(at.row, at.k), from,
                             ok ? 16u : 0u);
    }
    advance_tap(kc, s, r, kBlockK, p.out_c, p.taps_w);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      int unused = 0;
      advance_tap(b_k[i], b_tap[i], unused, kBlockK, p.out_c, INT32_MAX);
    }
  }
};

// wgrad: A = dz^T (rows k, MN-major along pixels), B = im2col(x)^T (rows (r, s, c), MN-major
// along pixels, gathered). Both of a thread's chunk pairs sit on pixel rows t/16 and t/16 + 16
// of the block; its B column (r, s, c) is fixed for the whole tile.
template <typename T>
struct WgradGather {
  int pix;            // the pixel of k-row t/16 of the next block
  int pix_end;        // this split's end
  int a_k;            // A's output channel, or -1 past K
  int b_c, roff, soff;  // B's channel (-1 past R*S*C) and r*dh - ph, s*dw - pw

  __host__ __device__ __forceinline__ WgradGather(const ConvKernelParams& p, int64_t row0,
                                                  int64_t col0, int thread, int split) {
    const int64_t begin = static_cast<int64_t>(split) * p.k_blocks * kBlockK;
    const int64_t end = begin + static_cast<int64_t>(p.k_blocks) * kBlockK;
    pix = static_cast<int>(begin) + copy_coord<T, true>(thread, 0).k;
    pix_end = static_cast<int>(end < p.pixels ? end : p.pixels);
    const int64_t k = row0 + copy_coord<T, true>(thread, 0).row;
    a_k = k < p.m ? static_cast<int>(k) : -1;
    const int64_t col = col0 + copy_coord<T, true>(thread, 0).row;
    if (col < p.n) {
      const int j = static_cast<int>(col);
      const int tap = j / p.in_c;
      b_c = j - tap * p.in_c;
      const int r = tap / p.taps_w;
      const int s = tap - r * p.taps_w;
      roff = r * p.dil_h - p.pad_h;
      soff = s * p.dil_w - p.pad_w;
    } else {
      b_c = -1;
      roff = 0;
      soff = 0;
    }
  }

  __device__ __forceinline__ void load(const ConvKernelParams& p, uint32_t a_tile,
                                       uint32_t b_tile, int thread) {
    const T* x = static_cast<const T*>(p.act);
    const T* dz = static_cast<const T*>(p.other);
    const int pq = p.out_h * p.out_w;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const TileCoord at = copy_coord<T, true>(thread, i);
      const int px = pix + i * kMnMajorKStep;
      const bool in_split = px < pix_end;
      const bool a_ok = in_split && a_k >= 0;
      const T* a_from = a_ok ? dz + static_cast<int64_t>(px) * p.out_c + a_k : dz;
      ampere::cp_async_cg_16(a_tile + smem_chunk_offset<T, true>(at.row, at.k), a_from,
                             a_ok ? 16u : 0u);
      // The pixel's (n, oh, ow) only matter when the chunk is read.
      const int q = in_split ? px : 0;
      const int n = q / pq;
      const int rem = q - n * pq;
      const int oh = rem / p.out_w;
      const int ow = rem - oh * p.out_w;
      const int ih = oh * p.stride_h + roff;
      const int iw = ow * p.stride_w + soff;
      const bool b_ok = in_split && b_c >= 0 &&
                        static_cast<unsigned>(ih) < static_cast<unsigned>(p.in_h) &&
                        static_cast<unsigned>(iw) < static_cast<unsigned>(p.in_w);
      const T* b_from =
          b_ok ? x + ((static_cast<int64_t>(n) * p.in_h + ih) * p.in_w + iw) * p.in_c + b_c : x;
      ampere::cp_async_cg_16(b_tile + smem_chunk_offset<T, true>(at.row, at.k), b_from,
                             b_ok ? 16u : 0u);
    }
    pix += kBlockK;
  }
};

template <typename T, ConvOp kOp>
struct OpTraits;
template <typename T>
struct OpTraits<T, ConvOp::kFwd> {
  using Gather = FwdGather<T>;
  using Out = T;
  static constexpr bool kAMnMajor = false, kBMnMajor = false;
};
template <typename T>
struct OpTraits<T, ConvOp::kDgrad> {
  using Gather = DgradGather<T>;
  using Out = T;
  static constexpr bool kAMnMajor = false, kBMnMajor = true;
};
template <typename T>
struct OpTraits<T, ConvOp::kWgrad> {
  using Gather = WgradGather<T>;
  using Out = float;  // the split's partials
  static constexpr bool kAMnMajor = true, kBMnMajor = true;
};

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

  int k_blocks = params.k_blocks;
  if constexpr (kOp == ConvOp::kWgrad) {  // the last split may be short (or, never, empty)
    const int64_t begin = static_cast<int64_t>(blockIdx.y) * params.k_blocks * kBlockK;
    const int64_t left = params.pixels - begin;
    const int64_t left_blocks = left <= 0 ? 0 : (left + kBlockK - 1) / kBlockK;
    k_blocks = left_blocks < k_blocks ? static_cast<int>(left_blocks) : k_blocks;
  }
  typename Traits::Gather gather = [&] {
    if constexpr (kOp == ConvOp::kWgrad) {
      return typename Traits::Gather(params, row0, col0, thread, static_cast<int>(blockIdx.y));
    } else {
      return typename Traits::Gather(params, row0, col0, thread);
    }
  }();
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

  const uint32_t a_offset0 = a_ldmatrix_offset0<T, kAMnMajor>(lane, warp);
  const uint32_t b_offset0 = b_ldmatrix_offset0<T, kBMnMajor>(lane, warp);

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
  spill_accumulators(staging, acc, warp, lane);
  __syncthreads();
  if constexpr (kOp == ConvOp::kWgrad) {
    // This split's partials: workspace[split] as a (K, R*S*C) float32 matrix.
    GemmParams epi = params.epi;
    epi.out = static_cast<float*>(epi.out) + blockIdx.y * params.split_floats;
    epilogue_store_tile<float, kBlockM, kBlockN, kThreads>(staging, thread, row0, col0, epi,
                                                           vectorizable);
  } else {
    epilogue_store_tile<T, kBlockM, kBlockN, kThreads>(staging, thread, row0, col0,
                                                       params.epi, vectorizable);
  }
}

// grad_weight[e] = sum over splits (in order) of workspace[split][e], cast to T; 8 elements per
// thread and step (count % 8 == 0: R*S*C is a multiple of 8), grid-stride.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    wgrad_reduce_kernel(const float* __restrict__ workspace, int splits, int64_t count,
                        T* __restrict__ grad_weight) {
  const int64_t runs = count / kEpilogueRun;
  for (int64_t run = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x;
       run < runs; run += static_cast<int64_t>(gridDim.x) * kReduceThreads) {
    const float* src = workspace + run * kEpilogueRun;
    float sum[kEpilogueRun];
#pragma unroll
    for (int e = 0; e < kEpilogueRun; ++e) sum[e] = 0.0f;
#pragma unroll 1
    for (int split = 0; split < splits; ++split) {
      const float4 lo = *reinterpret_cast<const float4*>(src);
      const float4 hi = *reinterpret_cast<const float4*>(src + 4);
      sum[0] += lo.x; sum[1] += lo.y; sum[2] += lo.z; sum[3] += lo.w;
      sum[4] += hi.x; sum[5] += hi.y; sum[6] += hi.z; sum[7] += hi.w;
      src += count;
    }
    Vec<T> out;
#pragma unroll
    for (int e = 0; e < kEpilogueRun; ++e) out.v[e] = from_float<T>(sum[e]);
    store_vec(grad_weight + run * kEpilogueRun, out);
  }
}

// ---- Arguments ----

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Every size the kernels hold in an int fits: pixel counts (N*P*Q, N*H*W), the GEMM depths,
// and the input coordinates oh*sh - ph + r*dh (and h + ph) in [-2**30, 2**30].
bool geometry_ok(const ConvGeometry& g) {
  constexpr int64_t kIntMax = INT32_MAX;
  constexpr int64_t kCoordMax = int64_t{1} << 30;
  if (g.batch < 1 || g.in_h < 1 || g.in_w < 1 || g.in_channels < 8 || g.out_channels < 8 ||
      g.kernel_h < 1 || g.kernel_w < 1 || g.out_h < 1 || g.out_w < 1 || g.stride_h < 1 ||
      g.stride_w < 1 || g.pad_h < 0 || g.pad_w < 0 || g.dilation_h < 1 || g.dilation_w < 1) {
    return false;
  }
  if (g.in_channels % 8 != 0 || g.out_channels % 8 != 0) return false;
  if (g.in_h > kCoordMax || g.in_w > kCoordMax || g.out_h > kCoordMax || g.out_w > kCoordMax ||
      g.in_channels > kIntMax || g.out_channels > kIntMax || g.pad_h > kCoordMax ||
      g.pad_w > kCoordMax) {
    return false;
  }
  // Coordinates: |oh*sh - ph + r*dh|, h + ph, ...
  if (g.out_h * g.stride_h + g.pad_h + g.kernel_h * int64_t{g.dilation_h} + g.in_h > kCoordMax ||
      g.out_w * g.stride_w + g.pad_w + g.kernel_w * int64_t{g.dilation_w} + g.in_w > kCoordMax) {
    return false;
  }
  const int64_t taps = int64_t{g.kernel_h} * g.kernel_w;
  if (taps > kIntMax || taps * g.in_channels > kIntMax - kBlockK ||
      taps * g.out_channels > kIntMax - kBlockK) {
    return false;
  }
  // Pixel counts (with room for a block's overshoot); N*P*Q < 2**31 also bounds the tiles.
  const int64_t out_pixels = g.out_h * g.out_w;  // <= 2**60
  const int64_t in_pixels = g.in_h * g.in_w;
  if (out_pixels > kIntMax || in_pixels > kIntMax) return false;
  if (g.batch > (kIntMax - 2 * kBlockK) / out_pixels ||
      g.batch > (kIntMax - 2 * kBlockK) / in_pixels) {
    return false;
  }
  return true;
}

ConvKernelParams kernel_params(const ConvGeometry& g) {
  ConvKernelParams p{};
  p.batch = static_cast<int>(g.batch);
  p.in_h = static_cast<int>(g.in_h);
  p.in_w = static_cast<int>(g.in_w);
  p.in_c = static_cast<int>(g.in_channels);
  p.out_c = static_cast<int>(g.out_channels);
  p.taps_h = g.kernel_h;
  p.taps_w = g.kernel_w;
  p.out_h = static_cast<int>(g.out_h);
  p.out_w = static_cast<int>(g.out_w);
  p.stride_h = g.stride_h;
  p.stride_w = g.stride_w;
  p.pad_h = g.pad_h;
  p.pad_w = g.pad_w;
  p.dil_h = g.dilation_h;
  p.dil_w = g.dilation_w;
  p.rsc = static_cast<int>(int64_t{g.kernel_h} * g.kernel_w * g.in_channels);
  p.pixels = static_cast<int>(g.batch * g.out_h * g.out_w);
  return p;
}

GemmParams plain_epilogue(GemmType type, void* out, int64_t m, int64_t n) {
  GemmParams e{};
  e.m = m;
  e.n = n;
  e.k = 1;
  e.type = type;
  e.activation = Activation::kNone;
  e.out = out;
  e.ld_out = n;
  return e;
}

// wgrad's split count, from the geometry alone (conv_wgrad_workspace_floats must agree with
// the launch): enough CTAs for ~2 waves, at least kWgradMinBlocks blocks per split, and no
// empty split (the blocks per split are rounded up, then the count recomputed).
struct WgradSplit {
  int splits;
  int blocks_per_split;
};
WgradSplit wgrad_split(const ConvGeometry& g) {
  const int64_t rsc = int64_t{g.kernel_h} * g.kernel_w * g.in_channels;
  const int64_t tiles =
      ((g.out_channels + kBlockM - 1) / kBlockM) * ((rsc + kBlockN - 1) / kBlockN);
  const int64_t blocks = (g.batch * g.out_h * g.out_w + kBlockK - 1) / kBlockK;
  int64_t splits = (kWgradTargetCtas + tiles - 1) / tiles;
  const int64_t most = (blocks + kWgradMinBlocks - 1) / kWgradMinBlocks;
  splits = splits < most ? splits : most;
  splits = splits < 1 ? 1 : splits;
  const int64_t per_split = (blocks + splits - 1) / splits;
  splits = (blocks + per_split - 1) / per_split;
  return {static_cast<int>(splits), static_cast<int>(per_split)};
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
  const int64_t tiles =
      ((params.m + kBlockM - 1) / kBlockM) * ((params.n + kBlockN - 1) / kBlockN);
  // blockIdx.x numbers the tiles (and tile_position's uint32 arithmetic needs no more).
  if (tiles > INT32_MAX) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
  const bool vectorizable = epilogue_vectorizable(params.epi);
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(params, vectorizable);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_reduce(const float* workspace, int splits, int64_t count, void* grad_weight,
                          cudaStream_t stream) {
  const int64_t runs = count / kEpilogueRun;
  int64_t blocks = (runs + kReduceThreads - 1) / kReduceThreads;
  blocks = blocks < 65535 ? blocks : 65535;  // grid-stride beyond
  auto kernel = wgrad_reduce_kernel<T>;
  auto* out = static_cast<T*>(grad_weight);
  const dim3 grid(static_cast<unsigned>(blocks));
  kernel<<<grid, kReduceThreads, 0, stream>>>(workspace, splits, count, out);
  return cudaGetLastError();
}

// The instantiations, all in one place: [op][type] (kFloat32 has none: refused), and the
// reduction per type.
using ConvLauncher = cudaError_t (*)(const ConvKernelParams&, int, cudaStream_t);
constexpr ConvLauncher kConvLaunchers[3][2] = {
    {launch_conv<__half, ConvOp::kFwd>, launch_conv<__nv_bfloat16, ConvOp::kFwd>},
    {launch_conv<__half, ConvOp::kDgrad>, launch_conv<__nv_bfloat16, ConvOp::kDgrad>},
    {launch_conv<__half, ConvOp::kWgrad>, launch_conv<__nv_bfloat16, ConvOp::kWgrad>}};
using ReduceLauncher = cudaError_t (*)(const float*, int, int64_t, void*, cudaStream_t);
constexpr ReduceLauncher kReduceLaunchers[2] = {launch_reduce<__half>,
                                                launch_reduce<__nv_bfloat16>};
static_assert(static_cast<int>(GemmType::kFloat16) == 0 &&
                  static_cast<int>(GemmType::kBFloat16) == 1,
              "the launcher tables are indexed by GemmType");

bool type_ok(GemmType type) {
  return type == GemmType::kFloat16 || type == GemmType::kBFloat16;
}

}  // namespace

// No sm_90a (TMA im2col + wgmma) convolution kernel exists yet: the sm_80 kernels serve
// Hopper too.
bool conv_implicit_gemm_sm90_available(int device) {
  (void)device;
  return false;
}

int64_t conv_wgrad_workspace_floats(const ConvGeometry& geometry) {
  if (!geometry_ok(geometry)) return 0;
  const int64_t rsc = int64_t{geometry.kernel_h} * geometry.kernel_w * geometry.in_channels;
  return int64_t{wgrad_split(geometry).splits} * geometry.out_channels * rsc;
}

cudaError_t conv_fwd_sm80(const ConvFwdParams& params, cudaStream_t stream) {
  const ConvGeometry& g = params.geometry;
  if (!geometry_ok(g) || !type_ok(params.type)) return cudaErrorInvalidValue;
  if (params.input == nullptr || params.weight == nullptr || params.out == nullptr ||
      !aligned16(params.input) || !aligned16(params.weight)) {
    return cudaErrorInvalidValue;
  }
  if (static_cast<int>(params.activation) < static_cast<int>(Activation::kNone) ||
      static_cast<int>(params.activation) > static_cast<int>(Activation::kSilu)) {
    return cudaErrorInvalidValue;
  }
  ConvKernelParams p = kernel_params(g);
  p.m = p.pixels;
  p.n = g.out_channels;
  p.depth = p.rsc;
  p.k_blocks = (p.depth + kBlockK - 1) / kBlockK;
  p.act = params.input;
  p.other = params.weight;
  p.epi = plain_epilogue(params.type, params.out, p.m, p.n);
  p.epi.k = p.depth;
  p.epi.bias = params.bias;
  p.epi.residual = params.residual;
  p.epi.ld_residual = g.out_channels;
  p.epi.activation = params.activation;
  p.epi.preact = params.preact;
  p.epi.ld_preact = g.out_channels;
  return kConvLaunchers[0][static_cast<int>(params.type)](p, 1, stream);
}

cudaError_t conv_dgrad_sm80(const ConvDgradParams& params, cudaStream_t stream) {
  const ConvGeometry& g = params.geometry;
  if (!geometry_ok(g) || !type_ok(params.type)) return cudaErrorInvalidValue;
  if (params.dz == nullptr || params.weight == nullptr || params.grad_input == nullptr ||
      !aligned16(params.dz) || !aligned16(params.weight)) {
    return cudaErrorInvalidValue;
  }
  ConvKernelParams p = kernel_params(g);
  p.m = g.batch * g.in_h * g.in_w;
  p.n = g.in_channels;
  p.depth = static_cast<int>(int64_t{g.kernel_h} * g.kernel_w * g.out_channels);
  p.k_blocks = (p.depth + kBlockK - 1) / kBlockK;
  p.act = params.dz;
  p.other = params.weight;
  p.epi = plain_epilogue(params.type, params.grad_input, p.m, p.n);
  p.epi.k = p.depth;
  return kConvLaunchers[1][static_cast<int>(params.type)](p, 1, stream);
}

cudaError_t conv_wgrad_sm80(const ConvWgradParams& params, cudaStream_t stream) {
  const ConvGeometry& g = params.geometry;
  if (!geometry_ok(g) || !type_ok(params.type)) return cudaErrorInvalidValue;
  if (params.dz == nullptr || params.input == nullptr || params.grad_weight == nullptr ||
      params.workspace == nullptr || !aligned16(params.dz) || !aligned16(params.input) ||
      !aligned16(params.grad_weight) || !aligned16(params.workspace)) {
    return cudaErrorInvalidValue;
  }
  const WgradSplit split = wgrad_split(g);
  if (split.splits > 65535) return cudaErrorInvalidValue;  // grid y (never with the target)
  ConvKernelParams p = kernel_params(g);
  p.m = g.out_channels;
  p.n = p.rsc;
  p.depth = p.pixels;
  p.k_blocks = split.blocks_per_split;
  p.split_floats = p.m * p.n;
  p.act = params.input;
  p.other = params.dz;
  p.epi = plain_epilogue(GemmType::kFloat32, params.workspace, p.m, p.n);
  p.epi.k = p.pixels;
  const int type = static_cast<int>(params.type);
  FUSEDOPS_RETURN_IF_ERROR(kConvLaunchers[2][type](p, split.splits, stream));
  return kReduceLaunchers[type](params.workspace, split.splits, p.split_floats,
                                params.grad_weight, stream);
}

}  // namespace fusedops
