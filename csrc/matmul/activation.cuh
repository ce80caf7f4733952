// activation.cuh — the fused linear's activations and their derivatives, in float32.
//
// The definitions are torch's: relu, gelu (erf form), gelu with approximate="tanh", and silu.
// The derivative of relu is taken from the output (relu'(z) = [out > 0], which is what the
// forward keeps for it, see linear_contract.SAVES); the others from the pre-activation z.
#pragma once

#include "gemm.h"

namespace fusedops {

constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluTanhCubic = 0.044715f;

__device__ __forceinline__ float activate(float z, Activation activation) {
  switch (activation) {
    case Activation::kRelu:
      return z > 0.f ? z : 0.f;
    case Activation::kGelu:
      return 0.5f * z * (1.f + erff(z * kInvSqrt2));
    case Activation::kGeluTanh:
      return 0.5f * z * (1.f + tanhf(kSqrt2OverPi * (z + kGeluTanhCubic * z * z * z)));
    case Activation::kSilu:
      return z / (1.f + expf(-z));
    default:
      return z;
  }
}

// act'(z); for kRelu, `z_or_out` is the forward's output.
__device__ __forceinline__ float activation_derivative(float z_or_out, Activation activation) {
  const float z = z_or_out;
  switch (activation) {
    case Activation::kRelu:
      return z > 0.f ? 1.f : 0.f;
    case Activation::kGelu:
      return 0.5f * (1.f + erff(z * kInvSqrt2)) + z * kInvSqrt2Pi * expf(-0.5f * z * z);
    case Activation::kGeluTanh: {
      const float inner = kSqrt2OverPi * (z + kGeluTanhCubic * z * z * z);
      const float t = tanhf(inner);
      const float inner_derivative = kSqrt2OverPi * (1.f + 3.f * kGeluTanhCubic * z * z);
      return 0.5f * (1.f + t) + 0.5f * z * (1.f - t * t) * inner_derivative;
    }
    case Activation::kSilu: {
      const float s = 1.f / (1.f + expf(-z));
      return s * (1.f + z * (1.f - s));
    }
    default:
      return 1.f;
  }
}

}  // namespace fusedops
