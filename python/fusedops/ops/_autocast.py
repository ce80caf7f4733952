"""Autocast's casting rule for the ops that replace lower-precision torch ops.

Custom ops are not autocast by torch, so the functional layer casts its inputs itself, as
autocast casts F.linear, F.conv2d and F.scaled_dot_product_attention: float16, bfloat16
and float32 tensors go to autocast's dtype; float64 and everything else stay. It casts
before the argument checks, because under autocast a bfloat16 activation legitimately meets
float32 parameters.
"""

from __future__ import annotations

import torch

ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def cast_like_autocast(device_type: str, *tensors):
    """``tensors`` cast as autocast would cast a lower-precision op's arguments on
    ``device_type`` (unchanged when autocast is off there; None and non-tensors pass)."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in ELIGIBLE else t
                 for t in tensors)
