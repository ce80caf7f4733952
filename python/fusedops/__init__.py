"""fusedops: fused GPU kernels for PyTorch, in CUDA C++ and Triton.

The public API, nothing else. See the README for the support matrix and DESIGN.md for the
path of one call.
"""

from fusedops import nn
from fusedops.dispatch import backends, use_backend
from fusedops.ops.attention import attention, attention_varlen
from fusedops.ops.conv import conv2d
from fusedops.ops.cross_entropy import cross_entropy
from fusedops.ops.linear import linear
from fusedops.ops.linear_cross_entropy import linear_cross_entropy
from fusedops.ops.sdpa import fused_sdpa, scaled_dot_product_attention
from fusedops.patch import PatchReport, fx_fuse, patch, unpatch

__version__ = "0.1.0"

__all__ = ["PatchReport", "attention", "attention_varlen", "backends", "conv2d",
           "cross_entropy", "fused_sdpa", "fx_fuse", "linear", "linear_cross_entropy", "nn",
           "patch", "scaled_dot_product_attention", "unpatch", "use_backend"]
