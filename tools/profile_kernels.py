#!/usr/bin/env python3
"""Workloads for Nsight Compute: each runs one fusedops op a few times on the GPU, so that
``ncu -k regex:<kernel> --launch-skip 1 --launch-count 1`` profiles one warm launch.

    ncu --set full -k regex:gemm_sm90_kernel --launch-skip 1 --launch-count 1 \\
        python tools/profile_kernels.py gemm

Workloads (bf16 unless said otherwise; the CUDA tier forced):
  gemm           fusedops.linear, M = K = N = 8192, no bias: the plain GEMM (sm_90a on an H100)
  gemm_sm80      the same with FUSEDOPS_GEMM_PATH=sm80 (the mma.sync kernel)
  linear_gelu    M = 16384, K = N = 4096, bias + gelu_tanh, forward and backward
  torch_mm       torch.mm at 8192³: cuBLAS, for a side-by-side profile
  attention      fusedops.attention, B = 4, H = 16, S = 4096, D = 128, causal, forward and
                 backward (sm_90a kernels on an H100)
  sdpa_flash     torch's SDPA flash backend on the same shapes, for comparison
tools/gpu_verify.sh's ncu stage runs them.
"""

from __future__ import annotations

import argparse
import os
import sys

WORKLOADS = ("gemm", "gemm_sm80", "linear_gelu", "torch_mm", "attention", "sdpa_flash", "conv",
             "conv_sm80", "cudnn_conv")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", choices=WORKLOADS)
    parser.add_argument("--repeat", type=int, default=3, help="calls (the first warms up)")
    args = parser.parse_args(argv)
    if args.workload == "gemm_sm80":
        os.environ["FUSEDOPS_GEMM_PATH"] = "sm80"
    if args.workload == "conv_sm80":
        os.environ["FUSEDOPS_CONV_PATH"] = "sm80"

    import torch

    import fusedops

    if not torch.cuda.is_available():
        print("profile_kernels: no CUDA device", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    if args.workload in ("gemm", "gemm_sm80", "torch_mm"):
        x, w = torch.randn(8192, 8192, **bf16), torch.randn(8192, 8192, **bf16) / 90
        for _ in range(args.repeat):
            if args.workload == "torch_mm":
                torch.mm(x, w.t())
            else:
                with fusedops.use_backend("cuda"):
                    fusedops.linear(x, w)
    elif args.workload in ("attention", "sdpa_flash"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q, k, v = (torch.randn(4, 16, 4096, 128, **bf16, requires_grad=True) for _ in range(3))
        grad = torch.randn(4, 16, 4096, 128, **bf16)
        for _ in range(args.repeat):
            if args.workload == "attention":
                with fusedops.use_backend("cuda"):
                    out = fusedops.attention(q, k, v, causal=True)
            else:
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    out = torch.nn.functional.scaled_dot_product_attention(q, k, v,
                                                                           is_causal=True)
            torch.autograd.grad(out, (q, k, v), grad)
    elif args.workload in ("conv", "conv_sm80", "cudnn_conv"):
        # A ResNet-50 3x3 layer (conv4_x: 256 channels at 14 x 14), batch 256, channels_last,
        # forward with bias + ReLU and the backward.
        cl = dict(memory_format=torch.channels_last)
        x = torch.randn(256, 256, 14, 14, **bf16).to(**cl).requires_grad_()
        w = (torch.randn(256, 256, 3, 3, **bf16) / 48).to(**cl).requires_grad_()
        b = torch.randn(256, **bf16, requires_grad=True)
        grad = torch.randn(256, 256, 14, 14, **bf16).to(**cl)
        for _ in range(args.repeat):
            if args.workload == "cudnn_conv":
                out = torch.relu(torch.nn.functional.conv2d(x, w, b, padding=1))
            else:
                with fusedops.use_backend("cuda"):
                    out = fusedops.conv2d(x, w, b, padding=1, activation="relu")
            torch.autograd.grad(out, (x, w, b), grad)
    else:
        x = torch.randn(16384, 4096, **bf16, requires_grad=True)
        w = (torch.randn(4096, 4096, **bf16) / 64).requires_grad_()
        b = torch.randn(4096, **bf16, requires_grad=True)
        grad = torch.randn(16384, 4096, **bf16)
        for _ in range(args.repeat):
            with fusedops.use_backend("cuda"):
                out = fusedops.linear(x, w, b, activation="gelu_tanh")
            torch.autograd.grad(out, (x, w, b), grad)
    torch.cuda.synchronize()
    print(f"profile_kernels: {args.workload} x{args.repeat} done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
