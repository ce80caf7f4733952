// hopper.cuh — the sm_90a building blocks of the warp-specialized tensor-core kernels:
// mbarriers, TMA tile loads (2-D, 3-D, 4-D), the async-proxy fence, warpgroup MMA (wgmma)
// fences and shared-memory descriptors, register reallocation and named barriers, as thin
// inline-PTX wrappers.
//
// Everything here compiles only where the sm_90a features exist (__CUDA_ARCH_FEAT_SM90_ALL);
// elsewhere the functions are empty, so a file that includes this header still compiles for
// sm_80 and for compute_80 PTX, and its sm_90a kernels guard their bodies with
// FUSEDOPS_SM90A_ENABLED.
//
// Shared-memory operand layout of the TMA-fed kernels (GEMM, attention): 128-byte swizzle, as
// TMA writes it with CU_TENSOR_MAP_SWIZZLE_128B into a 1024-byte aligned buffer. A box whose
// inner extent is 64 16-bit elements (128 bytes) lands as rows of 128 bytes, the 16-byte
// chunk c of row r stored at chunk c ^ (r % 8); 8 rows form a 1024-byte "swizzle atom".
// The wgmma descriptor of such a buffer (PTX ISA, "Matrix Descriptor Format"):
//   bits  0-13  start address >> 4
//   bits 16-29  leading-dimension byte offset >> 4 (LBO)
//   bits 32-45  stride-dimension byte offset >> 4 (SBO)
//   bits 62-63  swizzle mode: 1 = 128-byte
// K-major operand (rows along M/N, 64 K-elements per 128-byte row): SBO = 1024 (from one
//   8-row atom to the next), LBO unused (1); the k-th 16-element K step of one instruction
//   starts 32 * k bytes further (the swizzle is a function of the address bits, so an
//   offset inside the 128-byte row stays consistent with what TMA wrote).
// MN-major operand (rows along K, 64 M/N-elements per 128-byte row, one TMA box per 64
//   M/N-elements): LBO = the distance between those 64-element column blocks, SBO = 1024
//   (from 8 K-rows to the next 8); the k-th 16-row K step starts 16 * 128 = 2048 bytes on.
// The implicit-GEMM convolution (../conv/conv_implicit_gemm_sm90.cu) fills its stages with
// cp.async instead of TMA and uses make_smem_descriptor, which takes the swizzle mode: its
// K-major tiles have 64-byte rows (the 64-byte swizzle, mode 2: chunk c of row r at
// c ^ ((r / 2) % 4), repeating every 8 rows = 512 bytes, so SBO = 512 and LBO unused) and its
// MN-major tiles are the 128-byte layout above.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FUSEDOPS_SM90A_ENABLED 1
#else
#define FUSEDOPS_SM90A_ENABLED 0
#endif

namespace fusedops {
namespace hopper {

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// --- mbarriers ---------------------------------------------------------------------------

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t arrivals) {
#if FUSEDOPS_SM90A_ENABLED
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_address(bar)),
               "r"(arrivals));
#endif
}

// Makes initialized mbarriers visible to the async proxy (TMA) and the other threads.
__device__ __forceinline__ void mbarrier_init_fence() {
#if FUSEDOPS_SM90A_ENABLED
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}

__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
#if FUSEDOPS_SM90A_ENABLED
  asm volatile(
      "{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}" ::"r"(
          smem_address(bar))
      : "memory");
#endif
}

// Arrive and announce `bytes` of TMA transactions that will complete this phase.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#if FUSEDOPS_SM90A_ENABLED
  asm volatile(
      "{\n.reg .b64 state;\n"
      "mbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}" ::"r"(smem_address(bar)),
      "r"(bytes)
      : "memory");
#endif
}

// Blocks until the phase of parity `parity` has completed (parity 1 before any phase has
// completed counts as done: the "previous" phase of a fresh barrier).
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
#if FUSEDOPS_SM90A_ENABLED
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n"
      "}" ::"r"(smem_address(bar)),
      "r"(parity)
      : "memory");
#endif
}

// --- TMA ---------------------------------------------------------------------------------

// Loads the box at element coordinates (inner, outer) of the 2-D tensor map into `dst`
// (1024-byte aligned for the 128-byte swizzle), completing `bytes` on `bar`. Out-of-bounds
// elements are written as zeros and still count towards the transaction bytes.
__device__ __forceinline__ void tma_load_2d(void* dst, const void* tensor_map, uint64_t* bar,
                                            int32_t inner, int32_t outer) {
#if FUSEDOPS_SM90A_ENABLED
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
      "[%0], [%1, {%3, %4}], [%2];" ::"r"(smem_address(dst)),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(smem_address(bar)), "r"(inner),
      "r"(outer)
      : "memory");
#endif
}

// The same for 3-D and 4-D tensor maps, coordinates innermost first.
__device__ __forceinline__ void tma_load_3d(void* dst, const void* tensor_map, uint64_t* bar,
                                            int32_t c0, int32_t c1, int32_t c2) {
#if FUSEDOPS_SM90A_ENABLED
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
      "[%0], [%1, {%3, %4, %5}], [%2];" ::"r"(smem_address(dst)),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(smem_address(bar)), "r"(c0), "r"(c1),
      "r"(c2)
      : "memory");
#endif
}

__device__ __forceinline__ void tma_load_4d(void* dst, const void* tensor_map, uint64_t* bar,
                                            int32_t c0, int32_t c1, int32_t c2, int32_t c3) {
#if FUSEDOPS_SM90A_ENABLED
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
      "[%0], [%1, {%3, %4, %5, %6}], [%2];" ::"r"(smem_address(dst)),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(smem_address(bar)), "r"(c0), "r"(c1),
      "r"(c2), "r"(c3)
      : "memory");
#endif
}

__device__ __forceinline__ void tma_prefetch_descriptor(const void* tensor_map) {
#if FUSEDOPS_SM90A_ENABLED
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(tensor_map))
               : "memory");
#endif
}

// Orders this thread's generic-proxy shared-memory writes before later async-proxy accesses
// (wgmma operand reads, TMA writes) of the same memory that a barrier makes them visible to.
__device__ __forceinline__ void fence_proxy_async_shared() {
#if FUSEDOPS_SM90A_ENABLED
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}

// --- warpgroup MMA -----------------------------------------------------------------------

constexpr uint64_t kSwizzle128B = 1;

// The wgmma shared-memory descriptor of an operand tile starting at `p` (see the top).
__device__ __forceinline__ uint64_t smem_descriptor(const void* p, uint32_t leading_bytes,
                                                    uint32_t stride_bytes) {
  const uint64_t address = smem_address(p);
  return ((address & 0x3FFFF) >> 4) | (static_cast<uint64_t>((leading_bytes >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((stride_bytes >> 4) & 0x3FFF) << 32) | (kSwizzle128B << 62);
}

// Swizzle modes of bits 62-63 (PTX ISA, "Matrix Descriptor Format"): 0 none, 1 128-byte,
// 2 64-byte, 3 32-byte.
constexpr uint64_t kSwizzle64B = 2;

// The descriptor of an operand tile at shared-state-space address `address` (16-byte
// aligned; the tile's swizzle pattern must start on its own repeat, 1024 bytes for the
// 128-byte mode and 512 for the 64-byte one, so the base offset field stays 0), with the
// swizzle mode `swizzle` (kSwizzle128B, kSwizzle64B). __host__ too, so a host model can check
// the kernels' descriptor arithmetic.
__host__ __device__ __forceinline__ uint64_t make_smem_descriptor(uint32_t address,
                                                                  uint32_t leading_bytes,
                                                                  uint32_t stride_bytes,
                                                                  uint64_t swizzle) {
  return ((address & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((leading_bytes >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((stride_bytes >> 4) & 0x3FFF) << 32) | ((swizzle & 3) << 62);
}

// Orders the warpgroup's register accesses before the wgmma instructions that follow.
__device__ __forceinline__ void wgmma_fence() {
#if FUSEDOPS_SM90A_ENABLED
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#endif
}

__device__ __forceinline__ void wgmma_commit_group() {
#if FUSEDOPS_SM90A_ENABLED
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
#endif
}

// Waits until at most `kPending` committed wgmma groups of this warpgroup are in flight.
template <int kPending>
__device__ __forceinline__ void wgmma_wait_group() {
#if FUSEDOPS_SM90A_ENABLED
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
#endif
}

// Keeps the compiler from moving reads or writes of an accumulator register across the
// asynchronous wgmma that owns it.
__device__ __forceinline__ void fence_register(float& r) {
  asm volatile("" : "+f"(r)::"memory");
}

template <int kN>
__device__ __forceinline__ void fence_registers(float (&r)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) fence_register(r[i]);
}

// --- registers and barriers --------------------------------------------------------------

// Warpgroup-wide register reallocation: the producer gives registers back, the consumers
// (which hold the accumulators) take them.
template <uint32_t kRegisters>
__device__ __forceinline__ void release_registers() {
#if FUSEDOPS_SM90A_ENABLED
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegisters));
#endif
}

template <uint32_t kRegisters>
__device__ __forceinline__ void claim_registers() {
#if FUSEDOPS_SM90A_ENABLED
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegisters));
#endif
}

// Synchronizes `threads` threads (a multiple of 32) on hardware barrier `id` (1..15; 0 is
// __syncthreads'), e.g. the 128 threads of one warpgroup.
__device__ __forceinline__ void named_barrier_sync(uint32_t id, uint32_t threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace hopper
}  // namespace fusedops
