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
//            plain stores (epilogue with no bias, residual or activation). Run as one GEMM
//            per stride phase (below): every pixel of grad_input is a row of exactly one
//            phase's GEMM, so every element is written, 0 where no tap reaches.
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
// 16-byte global read or wholly zero (outside the image, past the GEMM's edge): a chunk
// that is zero copies 0 bytes from the tensor's base, so no out-of-bounds address is ever
// formed for a read. A stage's k block may cover several taps (C < block_k): each chunk
// decodes its own tap.
//
// Per tile, each thread works out once (divisions outside the k loop) what is fixed for its
// two A rows and two B rows: for the forward the (n, oh*sh - ph, ow*sw - pw) of its output
// pixels, for dgrad the image and the dz row and column its input pixels read at the phase's
// first tap, for wgrad the (r, s, c) of its weight column. Along the k loop it carries the
// (r, s, c) or (r, s, k) of its chunks as counters advanced by block_k per block (a short
// carry loop, no division); only wgrad divides per block (pixel -> (n, oh, ow), two pixels
// per thread). Offsets are int64: N*H*W*C may pass 2**31.
//
// dgrad's stride phases. Input row h meets only the taps r with r*dh ≡ h + ph (mod sh); for
// the others (h + ph - r*dh) / sh is not whole. One GEMM over every (h, r) would copy those
// chunks for free (0 source bytes) but still multiply them: (1 - 1/(sh*sw)) of its tensor
// work would be zeros. So conv_dgrad (dgrad_for_each_phase) splits the pixels by their phase
// (a, b) = ((h + ph) % sh, (w + pw) % sw) and runs one GEMM per phase over its own pixels and
// its own taps only (the columns below likewise):
//   rows   h = h0 + i*sh, i < ceil((H - h0) / sh), h0 the smallest h >= 0 of phase a (a phase
//          is named by h0 < min(sh, H): the others have no pixel); row (n, i, j) n-major,
//          m = N * rows * cols.
//   taps   r = r0 + t*r_step, t < taps_h: r*dh ≡ a (mod sh) has solutions iff
//          g = gcd(sh, dh) divides a, and they repeat every r_step = sh / g, from
//          r0 = (a/g) * (dh/g)^-1 mod r_step (none in the phase when r0 >= R). depth =
//          taps_h * taps_w * K, k fastest; B(c, (t_r, t_s, k)) = w[k, r, s, c].
//   A      for those (h, r) the division is whole by construction, and
//          oh = (h + ph - r*dh) / sh = oh0 + i - t*oh_step with oh0 = (h0 + ph - r0*dh) / sh
//          and oh_step = r_step*dh / sh = dh / g, both from the host: the k loop does no
//          division at all, only a multiply by the step and the range check 0 <= oh < P.
//   store  GEMM row (n, i, j) -> pixel (n, h0 + i*sh, w0 + j*sw) (dgrad_pixel: two divisions
//          per 8-channel run, as the gather's constructor has per A row).
// The counters run over the phase's taps (advance_tap carries at the phase's taps_w) and
// the tap's (r, s) and the dz pixel are formed from them by multiply-adds. Stride 1 is the
// one phase h0 = 0, every tap (r0 = 0, r_step = 1), oh0 = ph, oh_step = dh: the same GEMM
// and per-block arithmetic as without phases (and dgrad_pixel is the identity).
// A phase with pixels but no tap (three of the four phases of a 1x1 stride-2 layer) still
// owns its pixels, whose gradient is 0, and nothing else writes them: it runs with depth 0,
// so 0 k blocks (both kernels guard their prologue and k loop by the count and start from
// zeroed accumulators) and stores zeros. When more than kDgradTaplessLaunches phases have no
// tap (a stride well past the kernel's reach), one memset of grad_input replaces their
// launches and only the phases with taps run: at most min(R, sh) * min(S, sw) +
// kDgradTaplessLaunches launches either way. The tensor work falls to about 1/(sh*sw) of
// the single GEMM's (each phase rounds its own rows up to 128 and its depth up to block_k,
// which small images feel).
// Bounds: for a chunk inside the depth every value the A arithmetic forms (oh0, t*oh_step,
// oh) is a (h + ph - r*dh) / sh or a difference of two with h < H, r < R, within +-2**30 by
// geometry_ok. It is formed in uint32, so that chunks past the depth (whose counters run up
// to a few taps past R, never read) wrap harmlessly, and 0 <= oh < P is one unsigned
// compare; addresses are formed only for chunks that are read.
//
// wgrad's split over pixels: grid y numbers splits of split_pixels pixels each (a multiple
// of kSplitPixelAlign, so a whole number of k blocks for every element type); the last split
// may be short.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <type_traits>

#include "../common/ampere.cuh"
#include "../common/dtype.cuh"
#include "../matmul/epilogue.cuh"
#include "../matmul/gemm.h"
#include "../matmul/gemm_sm80_tile.cuh"
#include "conv_implicit_gemm.h"

namespace fusedops {
namespace conv_gemm {

using sm80_tile::block_k;
using sm80_tile::copy_coord;
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

// GEMM row `row` (< m) of a dgrad phase as (image, the phase's input row i, its column j):
// input pixel (n, phase_h0 + i*stride_h, phase_w0 + j*stride_w).
struct DgradPhaseRow {
  int n, i, j;
};
__host__ __device__ __forceinline__ DgradPhaseRow dgrad_phase_row(const ConvKernelParams& p,
                                                                  int row) {
  const int per_image = p.phase_rows * p.phase_cols;
  const int n = row / per_image;
  const int rem = row - n * per_image;
  const int i = rem / p.phase_cols;
  return {n, i, rem - i * p.phase_cols};
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

// dgrad over one stride phase (ConvKernelParams' phase_* fields, the top comment): A = dz
// gathered for the phase's input pixels, K-major along the phase's depth (t_r, t_s, k); B = w
// at the phase's taps, MN-major (a depth row (t_r, t_s, k) holds the C contiguous channels
// w[k, r, s, :]). A thread's chunks sit at fixed depth offsets in the block (A's two at the
// column of copy_coord<T, false>, B's at the rows of copy_coord<T, true>), so it keeps one
// counter, the block's first depth position (the same in every thread: the compiler holds
// it in uniform registers), and advances a copy of it to each chunk's position per block.
// One counter instead of three per-chunk ones keeps the sm_80 kernel within its 128
// registers with no spill.
template <typename T, typename Layout>
struct DgradGather {
  static constexpr int kBlockK = block_k<T>();
  int a_image_row[2];    // n*P of the A row (dz as N*P rows of Q pixels), or -1 past m
  int oh0[2], ow0[2];    // the dz row and column the A row reads at the phase's first tap
  int block_kc, block_ts, block_tr;  // the next block's first depth position (t_r, t_s, k)
  int b_c;               // B's channel, or -1 past C

  __host__ __device__ __forceinline__ DgradGather(const ConvKernelParams& p, int64_t row0,
                                                  int64_t col0, int thread) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const TileCoord at = copy_coord<T, false>(thread, i);
      const int64_t row = row0 + at.row;
      if (row < p.m) {
        const DgradPhaseRow q = dgrad_phase_row(p, static_cast<int>(row));
        a_image_row[i] = q.n * p.out_h;
        oh0[i] = p.phase_oh0 + q.i;
        ow0[i] = p.phase_ow0 + q.j;
      } else {
        a_image_row[i] = -1;
        oh0[i] = 0;
        ow0[i] = 0;
      }
    }
    block_kc = 0;
    block_ts = 0;
    block_tr = 0;
    const int64_t c = col0 + copy_coord<T, true>(thread, 0).row;
    b_c = c < p.n ? static_cast<int>(c) : -1;
  }

  // One k block's four chunks, each handed to copy(shared address, source, source bytes) as
  // cp.async takes them (load: the device's cp.async; a host model passes a recorder). A
  // phase without taps runs no block (depth 0), so its phase_taps_w of 0 is never carried.
#pragma nv_exec_check_disable
  template <typename Copy>
  __host__ __device__ __forceinline__ void load_with(const ConvKernelParams& p, uint32_t a_tile,
                                                     uint32_t b_tile, int thread, Copy copy) {
    const T* dz = static_cast<const T*>(p.act);
    const T* w = static_cast<const T*>(p.other);
    int kc = block_kc, a_ts = block_ts, a_tr = block_tr;
    advance_tap(kc, a_ts, a_tr, copy_coord<T, false>(thread, 0).k, p.out_c, p.phase_taps_w);
    const bool inside = a_tr < p.phase_taps_h;
    // In uint32: in range iff 0 <= oh < P is one unsigned compare, and the chunks past the
    // depth (never read) may wrap without harm.
    const uint32_t oh_back = static_cast<uint32_t>(a_tr) * static_cast<uint32_t>(p.phase_oh_step);
    const uint32_t ow_back = static_cast<uint32_t>(a_ts) * static_cast<uint32_t>(p.phase_ow_step);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const TileCoord at = copy_coord<T, false>(thread, i);
      const uint32_t oh = static_cast<uint32_t>(oh0[i]) - oh_back;
      const uint32_t ow = static_cast<uint32_t>(ow0[i]) - ow_back;
      const bool ok = inside && a_image_row[i] >= 0 && oh < static_cast<uint32_t>(p.out_h) &&
                      ow < static_cast<uint32_t>(p.out_w);
      // A read chunk's dz pixel (n*P + oh)*Q + ow < N*P*Q fits an int.
      const T* from = ok ? dz + static_cast<int64_t>((a_image_row[i] + static_cast<int>(oh)) *
                                                         p.out_w +
                                                     static_cast<int>(ow)) *
                                    p.out_c +
                               kc
                         : dz;
      copy(a_tile + Layout::template chunk_offset<T, false>(at.row, at.k), from, ok ? 16u : 0u);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const TileCoord at = copy_coord<T, true>(thread, i);
      int b_k = block_kc, b_ts = block_ts, b_tr = block_tr;
      advance_tap(b_k, b_ts, b_tr, at.k, p.out_c, p.phase_taps_w);
      const bool ok = b_c >= 0 && b_tr < p.phase_taps_h;
      // A read chunk's tap r*S + s < R*S, and (r*S + s)*C + c < R*S*C, fit an int.
      const T* from = ok ? w + static_cast<int64_t>(b_k) * p.rsc +
                               (p.phase_tap0 + b_tr * p.phase_tap_step_r +
                                b_ts * p.phase_tap_step_s) *
                                   p.in_c +
                               b_c
                         : w;
      copy(b_tile + Layout::template chunk_offset<T, true>(at.row, at.k), from, ok ? 16u : 0u);
    }
    advance_tap(block_kc, block_ts, block_tr, kBlockK, p.out_c, p.phase_taps_w);
  }

  __device__ __forceinline__ void load(const ConvKernelParams& p, uint32_t a_tile,
                                       uint32_t b_tile, int thread) {
    load_with(p, a_tile, b_tile, thread, [](uint32_t dst, const T* src, uint32_t bytes) {
      ampere::cp_async_cg_16(dst, src, bytes);
    });
  }
};

// wgrad: A = dz^T (rows k, MN-major along pixels), B = im2col(x)^T (rows (r, s, c), MN-major
// along pixels, gathered). Both of a thread's chunk pairs sit on the block's pixel rows of
// copy_coord<T, true> (t/16 and t/16 + 16 for the 16-bit types, t/32 and t/32 + 8 for
// float32); its B column (r, s, c) is fixed for the whole tile.
template <typename T, typename Layout>
struct WgradGather {
  static constexpr int kBlockK = block_k<T>();
  int pix;            // the pixel of this thread's first k-row of the next block
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
      // pix is the pixel of this thread's chunk 0; copy_coord puts chunk i this many k past it.
      const int px = pix + i * sm80_tile::mn_major_k_step<T>();
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
// `row` (< m) is the input pixel the gather decoded it as (dgrad_pixel): itself with stride
// 1 (one phase of all pixels, row-major), else the phase's pixel (n, h0 + i*sh, w0 + j*sw).
__host__ __device__ __forceinline__ int64_t dgrad_pixel(const ConvKernelParams& p,
                                                        int64_t row) {
  if (p.stride_h == 1 && p.stride_w == 1) return row;
  const DgradPhaseRow q = dgrad_phase_row(p, static_cast<int>(row));
  return (static_cast<int64_t>(q.n) * p.in_h + p.phase_h0 + q.i * p.stride_h) * p.in_w +
         p.phase_w0 + q.j * p.stride_w;
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
    const float4 lo = *reinterpret_cast<const float4*>(tile + r * kTileLd + c);
    const float4 hi = *reinterpret_cast<const float4*>(tile + r * kTileLd + c + 4);
    T* to = out + dgrad_pixel(p, row) * p.n + col;
    // 16-bit types: packed by hand into one 16-byte st.global.cg; a plain 16-byte assignment
    // here compiled to four 32-bit stores.
    if constexpr (std::is_same_v<T, float>) {
      reinterpret_cast<float4*>(to)[0] = lo;
      reinterpret_cast<float4*>(to)[1] = hi;
    } else {
      __stcg(reinterpret_cast<uint4*>(to), make_uint4(pack2<T>(lo.x, lo.y), pack2<T>(lo.z, lo.w),
                                                      pack2<T>(hi.x, hi.y), pack2<T>(hi.z, hi.w)));
    }
  }
}

// ---- Around the gathers: what both kernel families do the same way ----

// The gather and the operand majors of each op, for a kernel's shared-memory Layout.
template <typename T, ConvOp kOp, typename Layout>
struct ConvOpTraits;
template <typename T, typename Layout>
struct ConvOpTraits<T, ConvOp::kFwd, Layout> {
  using Gather = FwdGather<T, Layout>;
  static constexpr bool kAMnMajor = false, kBMnMajor = false;
};
template <typename T, typename Layout>
struct ConvOpTraits<T, ConvOp::kDgrad, Layout> {
  using Gather = DgradGather<T, Layout>;
  static constexpr bool kAMnMajor = false, kBMnMajor = true;
};
template <typename T, typename Layout>
struct ConvOpTraits<T, ConvOp::kWgrad, Layout> {
  using Gather = WgradGather<T, Layout>;
  static constexpr bool kAMnMajor = true, kBMnMajor = true;
};

// The CTA's gather for the tile at (row0, col0); wgrad's also takes its split (grid y).
template <typename T, ConvOp kOp, typename Layout>
__device__ __forceinline__ typename ConvOpTraits<T, kOp, Layout>::Gather make_gather(
    const ConvKernelParams& p, int64_t row0, int64_t col0, int thread) {
  using Gather = typename ConvOpTraits<T, kOp, Layout>::Gather;
  if constexpr (kOp == ConvOp::kWgrad) {
    return Gather(p, row0, col0, thread, static_cast<int>(blockIdx.y));
  } else {
    return Gather(p, row0, col0, thread);
  }
}

// The CTA's output tile from the float32 staging tile (row stride COLS + kTilePad): the fused
// epilogue for the forward, dgrad_store_tile for grad_input, and for wgrad this split's
// float32 partials, workspace[split] as a (K, R*S*C) matrix.
template <typename T, ConvOp kOp, int ROWS, int COLS, int THREADS>
__device__ __forceinline__ void store_conv_tile(const float* staging, int thread, int64_t row0,
                                                int64_t col0, const ConvKernelParams& p,
                                                bool vectorizable) {
  if constexpr (kOp == ConvOp::kWgrad) {
    GemmParams epi = p.epi;
    epi.out = static_cast<float*>(epi.out) + blockIdx.y * p.split_floats;
    epilogue_store_tile<float, ROWS, COLS, THREADS>(staging, thread, row0, col0, epi,
                                                    vectorizable);
  } else if constexpr (kOp == ConvOp::kDgrad) {
    dgrad_store_tile<T, ROWS, COLS, THREADS>(staging, thread, row0, col0, p);
  } else {
    epilogue_store_tile<T, ROWS, COLS, THREADS>(staging, thread, row0, col0, p.epi,
                                                vectorizable);
  }
}

// The launch grid of `params`: its 128 x 128 output tiles (grid x; tile_position's uint32
// arithmetic needs no more than 2**31 of them) by `splits` (grid y).
inline bool conv_grid(const ConvKernelParams& params, int splits, int tile, dim3& grid) {
  const int64_t tiles = ((params.m + tile - 1) / tile) * ((params.n + tile - 1) / tile);
  if (tiles > INT32_MAX) return false;
  grid = dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
  return true;
}

// ---- dgrad's stride phases on the host (conv_dgrad; a host model runs them too) ----

// More phases with pixels but no tap than this are zeroed by one memset instead of a launch
// each (the top comment).
constexpr int64_t kDgradTaplessLaunches = 8;

// x in [0, m) with (a * x) % m == 1, for gcd(a, m) == 1 and m >= 1 (0 when m == 1).
inline int64_t inverse_mod(int64_t a, int64_t m) {
  // Extended Euclid carrying the invariant r ≡ x * a (mod m) for both remainders.
  int64_t r_prev = m, r = a % m, x_prev = 0, x = 1;
  while (r != 0) {
    const int64_t q = r_prev / r;
    const int64_t r_next = r_prev - q * r;
    const int64_t x_next = x_prev - q * x;
    r_prev = r;
    r = r_next;
    x_prev = x;
    x = x_next;
  }
  return (x_prev % m + m) % m;
}

// One axis of a phase (rows: size H, kernel R, stride sh, pad ph, dilation dh; columns
// likewise), named by its first input coordinate `first` in [0, min(stride, size)).
struct DgradAxisPhase {
  int first, count;           // the input coordinates first + i*stride, i < count
  int tap0, tap_step, taps;   // the taps tap0 + t*tap_step, t < taps (0: none)
  int out0, out_step;         // what (i, t) reads: output coordinate out0 + i - t*out_step
};

inline DgradAxisPhase dgrad_axis_phase(int size, int kernel, int stride, int pad, int dil,
                                       int first) {
  DgradAxisPhase a{};
  a.first = first;
  a.count = (size - first + stride - 1) / stride;
  // The taps t with t*dil ≡ residue (mod stride): none unless g = gcd(stride, dil) divides
  // the residue, else t ≡ (residue/g) * (dil/g)^-1 (mod stride/g).
  const int64_t residue = (int64_t{first} + pad) % stride;
  const int64_t g = std::gcd(int64_t{stride}, int64_t{dil});
  a.tap_step = static_cast<int>(stride / g);
  if (residue % g != 0) return a;
  const int64_t tap0 = residue / g * inverse_mod(dil / g % a.tap_step, a.tap_step) % a.tap_step;
  if (tap0 >= kernel) return a;
  a.tap0 = static_cast<int>(tap0);
  a.taps = static_cast<int>((kernel - tap0 + a.tap_step - 1) / a.tap_step);
  // Exact: first + pad ≡ residue ≡ tap0*dil (mod stride), and tap_step*dil = stride * dil/g.
  a.out0 = static_cast<int>((int64_t{first} + pad - tap0 * dil) / stride);
  a.out_step = static_cast<int>(dil / g);
  return a;
}

// dgrad's params (`base`: the geometry's, with n, act and other set) narrowed to the phase
// whose first input pixel is (first_h, first_w): its phase fields, m and depth (0 when the
// phase has no tap: a GEMM of 0 k blocks that writes its pixels' zeros).
inline ConvKernelParams dgrad_phase_params(const ConvKernelParams& base, int first_h,
                                           int first_w) {
  const DgradAxisPhase h = dgrad_axis_phase(base.in_h, base.taps_h, base.stride_h, base.pad_h,
                                            base.dil_h, first_h);
  const DgradAxisPhase w = dgrad_axis_phase(base.in_w, base.taps_w, base.stride_w, base.pad_w,
                                            base.dil_w, first_w);
  ConvKernelParams p = base;
  p.phase_h0 = h.first;
  p.phase_w0 = w.first;
  p.phase_rows = h.count;
  p.phase_cols = w.count;
  p.phase_taps_h = h.taps;
  p.phase_taps_w = w.taps;
  // With two taps or more along an axis, step*S <= (R - 1)*S fits an int; with one the step
  // is never taken.
  p.phase_tap0 = h.taps > 0 && w.taps > 0 ? h.tap0 * base.taps_w + w.tap0 : 0;
  p.phase_tap_step_r = h.taps > 1 ? h.tap_step * base.taps_w : 0;
  p.phase_tap_step_s = w.taps > 1 ? w.tap_step : 0;
  p.phase_oh0 = h.out0;
  p.phase_ow0 = w.out0;
  p.phase_oh_step = h.out_step;
  p.phase_ow_step = w.out_step;
  p.m = int64_t{p.batch} * h.count * w.count;
  p.depth = static_cast<int>(int64_t{h.taps} * w.taps * p.out_c);
  return p;
}

// Runs dgrad's phases: launch(phase params) for every phase with pixels, or, when more than
// kDgradTaplessLaunches of them have no tap, zero() (all of grad_input) and then launch for
// the phases with taps only. Returns the first error.
template <typename Zero, typename Launch>
cudaError_t dgrad_for_each_phase(const ConvKernelParams& base, Zero zero, Launch launch) {
  // Along an axis the phases with pixels are those of the first coordinates
  // [0, min(stride, size)); the phases with taps are those of the taps [0, min(kernel,
  // stride / gcd(stride, dil))), whose t*dil are distinct modulo the stride. A tap's phase
  // has first coordinate (t*dil - pad) mod stride.
  struct Axis {
    int size, kernel, stride, pad, dil;
    int64_t with_pixels() const { return std::min(stride, size); }
    int64_t tap_phases() const {
      return std::min<int64_t>(kernel, stride / std::gcd(stride, dil));
    }
    int64_t first_of_tap(int64_t t) const {
      return ((t * dil - pad) % stride + stride) % stride;
    }
    int64_t tapped_with_pixels() const {
      int64_t count = 0;
      for (int64_t t = 0; t < tap_phases(); ++t) count += first_of_tap(t) < size ? 1 : 0;
      return count;
    }
  };
  const Axis rows{base.in_h, base.taps_h, base.stride_h, base.pad_h, base.dil_h};
  const Axis cols{base.in_w, base.taps_w, base.stride_w, base.pad_w, base.dil_w};
  const int64_t tapless = rows.with_pixels() * cols.with_pixels() -
                          rows.tapped_with_pixels() * cols.tapped_with_pixels();
  if (tapless <= kDgradTaplessLaunches) {
    // At most min(R, sh) * min(S, sw) + kDgradTaplessLaunches launches.
    for (int first_h = 0; first_h < rows.with_pixels(); ++first_h) {
      for (int first_w = 0; first_w < cols.with_pixels(); ++first_w) {
        const cudaError_t error = launch(dgrad_phase_params(base, first_h, first_w));
        if (error != cudaSuccess) return error;
      }
    }
    return cudaSuccess;
  }
  const cudaError_t zeroed = zero();
  if (zeroed != cudaSuccess) return zeroed;
  bool launched = false;
  for (int64_t r = 0; r < rows.tap_phases(); ++r) {
    const int64_t first_h = rows.first_of_tap(r);
    if (first_h >= rows.size) continue;
    for (int64_t s = 0; s < cols.tap_phases(); ++s) {
      const int64_t first_w = cols.first_of_tap(s);
      if (first_w >= cols.size) continue;
      const cudaError_t error = launch(dgrad_phase_params(base, static_cast<int>(first_h),
                                                          static_cast<int>(first_w)));
      if (error != cudaSuccess) return error;
      launched = true;
    }
  }
  // No pixel meets a tap (all of grad_input is the zeros just written): one tapless phase
  // still runs, so that the path is chosen, checked and reported as for any other shape.
  return launched ? cudaSuccess : launch(dgrad_phase_params(base, 0, 0));
}

}  // namespace conv_gemm
}  // namespace fusedops
