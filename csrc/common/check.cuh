// check.cuh — CUDA error handling for torch-free code.
//
// Kernel files and their launchers never throw and never include torch: a launcher returns
// the cudaError_t of its launch (FUSEDOPS_RETURN_IF_ERROR), and bindings.cpp, the only
// torch-aware file, turns a non-success into a TORCH_CHECK with cudaGetErrorString.
// FUSEDOPS_CUDA_CHECK is for standalone programs (benchmarks, experiments): print and abort.
#pragma once

#include <cstdio>
#include <cstdlib>

#include <cuda_runtime_api.h>

#define FUSEDOPS_RETURN_IF_ERROR(expr)                 \
  do {                                                 \
    const cudaError_t fusedops_err_ = (expr);          \
    if (fusedops_err_ != cudaSuccess) {                \
      return fusedops_err_;                            \
    }                                                  \
  } while (0)

#define FUSEDOPS_CUDA_CHECK(expr)                                              \
  do {                                                                         \
    const cudaError_t fusedops_err_ = (expr);                                  \
    if (fusedops_err_ != cudaSuccess) {                                        \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n",                     \
                   cudaGetErrorName(fusedops_err_), __FILE__, __LINE__,        \
                   cudaGetErrorString(fusedops_err_));                         \
      std::abort();                                                            \
    }                                                                          \
  } while (0)
