"""The parity self-check ``fusedops-bench`` runs where there is no GPU to time on.

For each tier (the torch tier, the Triton tier — in Triton's interpreter on CPU tensors,
which needs ``TRITON_INTERPRET=1`` set before triton is first imported — and, on a GPU, the
CUDA tier) it runs ``fusedops.cross_entropy`` forced onto that tier at a few small odd shapes
with a few options, and compares the loss and the gradient of the input with float64
``F.cross_entropy`` on the same inputs upcast:

    relative error = ||out - ref|| / ||ref||   (Frobenius; NaN never passes)
    float32 < 1e-5, float16 < 2e-3, bfloat16 < 1e-2 (bfloat16 on a GPU only)

A tier that is unavailable here is reported with the reason and left out; a FAIL makes the
command exit non-zero. It takes a few seconds on a 2-core CPU.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SHAPES = ((7, 37), (7, 1037))
# (name, keyword arguments of cross_entropy, how many rows to set to ignore_index)
OPTIONS = (
    ("mean", {}, 0),
    ("weight, sum", {"weight": True, "reduction": "sum"}, 0),
    ("label_smoothing=0.1", {"label_smoothing": 0.1}, 0),
    ("ignore_index=-100 x2", {}, 2),
    ("ignore_index=3, none", {"ignore_index": 3, "reduction": "none"}, 2),
)


@dataclass
class Check:
    tier: str
    dtype: torch.dtype
    shape: tuple[int, int]
    option: str
    loss_error: float = float("nan")
    grad_error: float = float("nan")
    error: str = ""

    @property
    def tolerance(self) -> float:
        return TOLERANCES[self.dtype]

    @property
    def passed(self) -> bool:
        # NaN compares False: a NaN error never passes.
        return (not self.error and self.loss_error < self.tolerance
                and self.grad_error < self.tolerance)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (the absolute norm when ref is all zeros)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        return float("nan")
    diff = torch.linalg.vector_norm(out - ref).item()
    scale = torch.linalg.vector_norm(ref).item()
    return diff / scale if scale > 0 else diff


def run_check(tier: str, dtype: torch.dtype, shape: tuple[int, int], option: str,
              kwargs: dict, ignored_rows: int, device: torch.device) -> Check:
    import fusedops

    check = Check(tier, dtype, shape, option)
    rows, classes = shape
    kwargs = dict(kwargs)
    ignore_index = kwargs.setdefault("ignore_index", -100)
    logits = (torch.randn(rows, classes, dtype=torch.float64) * 3).to(device, dtype)
    target = torch.randint(0, classes, (rows,))
    if ignored_rows:
        target[torch.randperm(rows)[:ignored_rows]] = ignore_index
    target = target.to(device)
    weight = None
    if kwargs.pop("weight", False):
        weight = (torch.rand(classes, dtype=torch.float64) + 0.5).to(device, torch.float32)
    x = logits.clone().requires_grad_(True)
    x64 = logits.double().requires_grad_(True)
    ref = F.cross_entropy(x64, target, None if weight is None else weight.double(), **kwargs)
    grad_out = torch.rand_like(ref) + 0.5
    (ref_grad,) = torch.autograd.grad(ref, x64, grad_out)
    try:
        with fusedops.use_backend(tier):
            out = fusedops.cross_entropy(x, target, weight, **kwargs)
            same_dtype_weight = None if weight is None else weight.to(dtype)
            expected = F.cross_entropy(logits, target, same_dtype_weight, **kwargs)
            if out.dtype != expected.dtype or out.shape != expected.shape:
                raise AssertionError(f"output {out.dtype} {tuple(out.shape)}, torch gives "
                                     f"{expected.dtype} {tuple(expected.shape)}")
            (grad,) = torch.autograd.grad(out, x, grad_out.to(out.dtype))
    except Exception as exc:  # noqa: BLE001 - reported as a FAIL with its message
        check.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        return check
    check.loss_error = relative_error(out, ref)
    check.grad_error = relative_error(grad, ref_grad)
    return check


def checks_to_run(device: torch.device) -> list[tuple]:
    dtypes = [torch.float32, torch.float16]
    if device.type == "cuda":
        dtypes.append(torch.bfloat16)
    return [(dtype, shape, name, kwargs, ignored)
            for dtype in dtypes for shape in SHAPES for name, kwargs, ignored in OPTIONS]


def format_row(check: Check) -> str:
    verdict = "PASS" if check.passed else "FAIL"
    dtype = str(check.dtype).replace("torch.", "")
    shape = f"{check.shape[0]}x{check.shape[1]}"
    if check.error:
        errors = f"{check.error}"
    else:
        errors = f"{check.loss_error:10.2e}  {check.grad_error:10.2e}  {check.tolerance:7.0e}"
    return f"{check.tier:<7} {dtype:<8} {shape:<7} {check.option:<22} {errors}  {verdict}"


def run(device: torch.device | None = None, say=print, seed: int | None = None) -> int:
    """Run the self-check, print the table; returns the number of failed checks."""
    import fusedops

    device = device or (torch.device("cuda") if torch.cuda.is_available()
                        else torch.device("cpu"))
    seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    started = time.perf_counter()
    say(f"Parity self-check of fusedops.cross_entropy on {device.type} against float64 "
        f"F.cross_entropy (loss and input gradient; seed {seed}).")
    say(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '(unset)')}")
    available = fusedops.backends()
    tiers = ["torch", "triton", "cuda"]
    say("")
    say(f"{'tier':<7} {'dtype':<8} {'shape':<7} {'options':<22} {'loss err':>10}  "
        f"{'grad err':>10}  {'tol':>7}  result")
    failures = passes = 0
    for tier in tiers:
        reason = available.get(tier, f"fusedops has no {tier!r} tier")
        if reason is None and tier == "cuda" and device.type != "cuda":
            reason = "the CUDA tier runs on CUDA tensors only"
        if reason is not None:
            say(f"{tier:<7} unavailable here, not checked: {reason}")
            continue
        for dtype, shape, name, kwargs, ignored in checks_to_run(device):
            with warnings.catch_warnings():
                # The interpreter evaluates masked-off lanes too; numpy warns about their
                # inf/NaN, which the kernels never store.
                warnings.filterwarnings("ignore", category=RuntimeWarning,
                                        module=r"triton\.runtime\.interpreter")
                check = run_check(tier, dtype, shape, name, kwargs, ignored, device)
            say(format_row(check))
            if check.passed:
                passes += 1
            else:
                failures += 1
    say("")
    say(f"({time.perf_counter() - started:.1f} s)")
    say(f"self-check: {passes} passed, {failures} failed")
    return failures
