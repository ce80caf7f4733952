"""Comparison against float64 references, with tolerances that can fail."""

import torch

# ‖out − ref‖ / ‖ref‖ bounds per dtype of the inputs (DESIGN.md, Correctness).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ over the finite reference entries; NaN and ±inf must match exactly."""
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if not torch.equal(torch.isnan(out), torch.isnan(ref)):
        return float("inf")
    infinite = torch.isinf(ref)
    if not torch.equal(torch.isinf(out), infinite) or not torch.equal(out[infinite],
                                                                        ref[infinite]):
        return float("inf")
    finite = torch.isfinite(ref)
    diff = (out[finite] - ref[finite]).norm()
    scale = ref[finite].norm()
    return float(diff / scale) if scale > 0 else float(diff)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "",
                 factor: float = 1.0) -> None:
    error = relative_error(out, ref)
    bound = TOLERANCE[dtype] * factor
    assert error <= bound, f"{what}: relative error {error:.3e} > {bound:.1e} ({dtype})"
