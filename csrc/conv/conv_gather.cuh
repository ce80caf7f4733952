// conv_gather.cuh — what the implicit-GEMM convolution kernels (conv_implicit_gemm_sm80.cu,
// conv_implicit_gemm_sm90.cu) load: the three GEMM views of a convolution and the cp.async
// gathers that fill a stage's A and B operand tiles straight from the NHWC activations and
// the KRSC weight, so that no im2col matrix is ever materialized.
//
// Both kernels run 256 threads over a 128 x 128 output tile and a block_k<T>() deep stage
// (64 bytes of depth per K-major row: 32 16-bit or 16 float32 elements), and share
// gemm_sm80_tile.cuh's thread -> chunk assignment (copy_coord: two 16-byte chunks of A and two
// of B per thread and stage). Where a chunk lands in shared memory is the kernel's: a gather
// takes a `Layout` with
//   template <typename T, bool kMnMajor> static uint32_t chunk_offset(int row, int k)
// (the byte offset in an operand tile of the chunk whose first element is at tile
// coordinate (row, k)), the sm_80 kernel's swizzle for ldmatrix or the sm_90a kernel's for
// wgmma.
//
// The three GEMM views (conv.h; x (N, H, W, C), w (K, R, S, C), dz and out (N, P, Q, K); a
// "tap" is one filter position (r, s); A is (m, depth), B is (n, depth)):
//   forward  out (m = (n, oh, ow), n = k) over depth (r, s, c), c fastest:
//              A(m, (r,s,c)) = x[n, oh*sh - ph + r*dh, ow*sw - pw + s*dw, c]  gathered, K-major
//              B(k, (r,s,c)) = w[k, r, s, c]                                 K-major, ld R*S*C
//            then the full epilogue (bias, residual, activation, preact).
//   dgrad    grad_input (m = (n, h, w), n = c) over depth (r, s, k), k fastest:
//              A(m, (r,s,k)) = dz[n, oh, ow, k] with oh = (h + ph - r*dh) / sh when that
//                              divides exactly and lands in [0, P) (likewise ow), else 0:
//                              gathered, K-major
//              B(c, (r,s,k)) = w[k, r, s, c]: 8 consecutive c are contiguous, so MN-major,
//                              a depth row (r, s, k) at w + k*RSC + (rS+s)C
//            plain stores (epilogue with no bias, residual or activation). Every pixel of
//            grad_input is a GEMM row, so every element is written, 0 where no tap reaches.
//   wgrad    grad_weight (m = k, n = (r, s, c)) over depth = the N*P*Q output pixels:
//              A(k, pix) = dz[pix, k]                     MN-major, ld K (8 consecutive k)
//              B((r,s,c), pix) = x[n, oh*sh - ph + r*dh, ow*sw - pw + s*dw, c]  gathered,
//                              MN-major (8 consecutive c of one tap)
//
// Why a 16-byte chunk never straddles taps: cp.async moves 16 bytes (8 16-bit or 4 float32
// elements) along the chunk's direction. Along a depth ordered (r, s, c) with c fastest
// (forward A and B), chunks start at multiples of the chunk and C % 8 == 0, so a chunk is
// channels of one tap and one source address; the same holds for (r, s, k) with K % 8 == 0
// (dgrad A), and for the (r, s, c) columns of wgrad's B. So every chunk is either a contiguous
// 16-byte global read or wholly zero (outside the image, a stride that does not divide, past
// the GEMM's edge): a chunk that is zero copies 0 bytes from the tensor's base, so no
// out-of-bounds address is ever formed for a read. A stage's k block may cover several taps
// (C < block_k): each chunk decodes its own tap.
//
// Per tile, each thread works out once (divisions outside the k loop) what is fixed for its
// two A rows and two B rows: for the forward the (n, oh*sh - ph, ow*sw - pw) of its output
// pixels, for dgrad the (n, h + ph, w + pw) of its input pixels, for wgrad the (r, s, c) of
// its weight column. Along the k loop it carries the (r, s, c) or (r, s, k) of its chunks as
// counters advanced by block_k per block (a short carry loop, no division); only wgrad
// divides per block (pixel -> (n, oh, ow), two pixels per thread), and dgrad divides by the
// stride when it is not 1. Offsets are int64: N*H*W*C may pass 2**31.
//
// dgrad with stride > 1: for a given (h, r) only one tap in sh divides, so the tensor cores
// multiply zero chunks for the others (about (1 - 1/(sh*sw)) of the work is wasted). The
// copies of such chunks cost nothing (0 source bytes).
//
// wgrad's split over pixels: grid y numbers splits of split_pixels pixels each (a multiple
// of kSplitPixelAlign, so a whole number of k blocks for every element type); the last split
// may be short.
#pragma once

#include <cstdint>

#include "../common/ampere.cuh"
#include "../matmul/epilogue.cuh"
#include "../matmul/gemm.h"
#include "../matmul/gemm_sm80_tile.cuh"
#include "conv_implicit_gemm.h"

namespace fusedops {
namespace conv_gemm {

using sm80_tile::block_k;
using sm80_tile::copy_coord;
using sm80_tile::kMnMajorKStep;
using sm80_tile::TileCoord;

// wgrad splits (kSplitPixelAlign pixels, conv_implicit_gemm.h) are whole k blocks of every type.
static_assert(kSplitPixelAlign % block_k<__half>() == 0 &&
                  kSplitPixelAlign % block_k<float>() == 0,
              "a split is whole k blocks");

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

// Forward: A = im2col(x) rows (output pixels), B = w rows (output channels), both K-major
// along the depth (r, s, c). The two A chunks and the two B chunks of a thread share their
// depth position (column 8 (t % 4) of the block), so one (r, s, c) counter serves all four.
template <typename T, typename Layout>
struct FwdGather {
  static constexpr int kBlockK = block_k<T>();
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
      ampere::cp_async_cg_16(a_tile + Layout::template chunk_offset<T, false>(at.row, at.k), from,
                             ok ? 16u : 0u);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const TileCoord at = copy_coord<T, false>(thread, i);
      const bool ok = inside && b_off[i] >= 0;
      const T* from = ok ? w + b_off[i] + j : w;
      ampere::cp_async_cg_16(b_tile + Layout::template chunk_offset<T, false>(at.row, at.k), from,
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
template <typename T, typename Layout>
struct DgradGather {
  static constexpr int kBlockK = block_k<T>();
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
      ampere::cp_async_cg_16(a_tile + Layout::template chunk_offset<T, false>(at.row, at.k), from,
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
      ampere::cp_async_cg_16(b_tile + Layout::template chunk_offset<T, true>(at.row, at.k), from,
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
template <typename T, typename Layout>
struct WgradGather {
  static constexpr int kBlockK = block_k<T>();
  int pix;            // the pixel of k-row t/16 of the next block
  int pix_end;        // this split's end
  int a_k;            // A's output channel, or -1 past K
  int b_c, roff, soff;  // B's channel (-1 past R*S*C) and r*dh - ph, s*dw - pw

  __host__ __device__ __forceinline__ WgradGather(const ConvKernelParams& p, int64_t row0,
                                                  int64_t col0, int thread, int split) {
    const int64_t begin = static_cast<int64_t>(split) * p.split_pixels;
    const int64_t end = begin + p.split_pixels;
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
      ampere::cp_async_cg_16(a_tile + Layout::template chunk_offset<T, true>(at.row, at.k), a_from,
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
      ampere::cp_async_cg_16(b_tile + Layout::template chunk_offset<T, true>(at.row, at.k), b_from,
                             b_ok ? 16u : 0u);
    }
    pix += kBlockK;
  }
};

// dgrad's store: rows [row0, row0 + ROWS) x channels [col0, col0 + COLS) of the float32
// staging tile (row stride COLS + kTilePad) cast to T into grad_input (p.epi.out), 16-byte
// runs of 8 channels (C % 8 == 0, the base 16-byte aligned: every run is whole). GEMM row
// `row` is the input pixel the gather decoded it as (dgrad_pixel).
__host__ __device__ __forceinline__ int64_t dgrad_pixel(const ConvKernelParams& p,
                                                        int64_t row) {
  (void)p;
  return row;
}

template <typename T, int ROWS, int COLS, int THREADS>
__device__ __forceinline__ void dgrad_store_tile(const float* tile, int thread, int64_t row0,
                                                 int64_t col0, const ConvKernelParams& p) {
  static_assert(COLS % kEpilogueRun == 0, "tile columns must be runs of 8");
  constexpr int kRunsPerRow = COLS / kEpilogueRun;
  constexpr int kTileLd = COLS + kTilePad;
  T* out = static_cast<T*>(p.epi.out);
#pragma unroll 1
  for (int run = thread; run < ROWS * kRunsPerRow; run += THREADS) {
    const int r = run / kRunsPerRow;
    const int c = (run % kRunsPerRow) * kEpilogueRun;
    const int64_t row = row0 + r;
    const int64_t col = col0 + c;
    if (row >= p.m || col >= p.n) continue;
    Run<T> values;
#pragma unroll
    for (int e = 0; e < kEpilogueRun; ++e) values[e] = from_float<T>(tile[r * kTileLd + c + e]);
    store_run(out + dgrad_pixel(p, row) * p.n + col, values);
  }
}

}  // namespace conv_gemm
}  // namespace fusedops
