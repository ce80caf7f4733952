"""What the op families (the ``cases_*`` modules) share, written once.

A family module keeps what is its own (cases, formulas, inputs, the calls it times); the
pieces every family needs the same way live here, so that a skip reason, a probe's caching
or the rotation through input sets reads the same in every family's results:

- dtypes: ``torch_dtype``, ``element_bytes`` (the ``e`` of the byte formulas), ``needs_grad``
- rotation: ``rotating_over`` turns a family's one-input-set binder into the timed callable
  that cycles through all the input sets (``timing.rotate``)
- fused epilogue ops ``act(op(x, W) + b + r)`` (linear, conv2d): their differentiated
  tensors, bound callable, eager epilogue and torch.compile row
- class targets with ~1% ``ignore_index`` (cross-entropy, linear + cross-entropy)
- skip reasons and probes: ``needs_cuda``, ``package_missing``, ``probe_once`` and the
  fusedops tiers' ``fusedops_tier_unavailable``, ``fusedops_case_unsupported`` and
  ``fusedops_implementation`` (the row of fusedops forced onto one tier)

Like the rest of the package, nothing here imports triton.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .registry import Case, Implementation
from .timing import rotate

NEEDS_CUDA = "needs a CUDA device"

# Targets: int64 class indices, about 1% of them ignore_index (never counted in the loss).
IGNORE_INDEX = -100
IGNORE_FRACTION = 0.01
TARGET_BYTES = 8  # one int64 class index per row
ROW_OUTPUT_BYTES = 4  # one float32 per row: the loss, or the lse a backward needs

# fusedops' activation names -> the same function in torch (the eager baselines' epilogue)
TORCH_ACTIVATIONS: dict[str | None, Callable[[torch.Tensor], torch.Tensor]] = {
    None: lambda z: z,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
}

# The tensors of a fused epilogue op that its backward differentiates (bias and residual
# are None in a case without them), in the order the op takes them.
EPILOGUE_OP_LEAVES = ("input", "weight", "bias", "residual")

# --- dtypes and modes -------------------------------------------------------------------


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype a case names in its params (``"bfloat16"`` -> ``torch.bfloat16``)."""
    return getattr(torch, name)


def element_bytes(case: Case) -> int:
    """Bytes per element of the case's dtype: the ``e`` of the families' byte formulas."""
    return torch_dtype(case.params["dtype"]).itemsize


def needs_grad(case: Case) -> bool:
    """Whether the case's mode runs a backward (every mode but the forward alone)."""
    return case.params["mode"] != "fwd"


def saves_preactivation(case: Case) -> bool:
    """Whether a fused epilogue op keeps its pre-activation z for the backward: act' needs z
    (gelu, gelu_tanh, silu); relu's derivative reads the output, no activation needs none."""
    return case.params["activation"] not in (None, "relu")


# --- the timed callables ----------------------------------------------------------------


def rotating_over(bind: Callable[[Any, Case, dict], Callable[[], Any]]):
    """``rotating(fn, case, input_sets)`` for a family whose ``bind(fn, case, inputs)`` makes
    the timed callable of one input set: one callable that runs them in turn, one input set
    per call (``timing.rotate``), so that every timed call reads inputs the flush left cold."""

    def rotating(fn, case: Case, input_sets: Sequence[dict]) -> Callable[[], Any]:
        return rotate([bind(fn, case, inputs) for inputs in input_sets])

    return rotating


def fresh_dynamo_cache() -> None:
    """Reset Dynamo before a torch.compile row compiles a case: every (shape, grad mode)
    compiles anew under dynamic=False, and one code object would otherwise hit the
    recompile limit."""
    torch._dynamo.reset()


# --- fused epilogue ops act(op(x, W) + b + r) -------------------------------------------


def epilogue_op_leaves(inputs: dict) -> list[torch.Tensor]:
    """x, W, b and r: those of them the inputs have."""
    return [inputs[name] for name in EPILOGUE_OP_LEAVES if inputs[name] is not None]


def bind_epilogue_op(forward, case: Case, inputs: dict) -> Callable[[], Any]:
    """The timed callable of a fused epilogue op: ``forward(inputs)`` (fwd), or the gradients
    of <output, grad_out> with respect to x, W, b and r (fwd+bwd): ``torch.autograd.grad``,
    so no ``.grad`` accumulates inside the timed call."""
    if case.params["mode"] == "fwd":
        return lambda: forward(inputs)
    wrt, grad_out = epilogue_op_leaves(inputs), inputs["grad_out"]
    return lambda: torch.autograd.grad(forward(inputs), wrt, grad_out)


def eager_epilogue(z: torch.Tensor, residual: torch.Tensor | None,
                   activation: str | None) -> torch.Tensor:
    """``act(z + r)`` in eager torch ops, after the op and its bias (r may be None)."""
    if residual is not None:
        z = z + residual
    return TORCH_ACTIVATIONS[activation](z)


def compile_epilogue_op(eager: Callable, case: Case, input_sets: Sequence[dict], rotating):
    """The torch.compile row of a fused epilogue op: ``eager(x, w, b, r)`` under
    ``torch.compile(mode="max-autotune-no-cudagraphs", dynamic=False)`` (minutes of GEMM or
    convolution autotuning per case), from a fresh Dynamo cache."""
    fresh_dynamo_cache()
    compiled = torch.compile(eager, mode="max-autotune-no-cudagraphs", dynamic=False)

    def forward(inputs):
        return compiled(*(inputs[name] for name in EPILOGUE_OP_LEAVES))

    return rotating(forward, case, input_sets)


# --- class targets ----------------------------------------------------------------------


def random_targets(rows: int, classes: int, ignore_fraction: float, device) -> torch.Tensor:
    """Random int64 class indices, about ``ignore_fraction`` of them ``IGNORE_INDEX``."""
    target = torch.randint(0, classes, (rows,), device=device, dtype=torch.int64)
    ignored = torch.rand(rows, device=device) < ignore_fraction
    return target.masked_fill(ignored, IGNORE_INDEX)


# --- skip reasons and probes ------------------------------------------------------------


def probe_device() -> str:
    """Where the tiny probe calls run: the GPU when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def needs_cuda(because: str = "") -> str | None:
    """The skip reason of an implementation that runs only on a CUDA device (``because``
    says why, in parentheses), or None where there is one."""
    if torch.cuda.is_available():
        return None
    return f"{NEEDS_CUDA} ({because})" if because else NEEDS_CUDA


def package_missing(module: str, pip_name: str) -> Callable[[], str | None]:
    """An ``unavailable`` for a baseline from an optional package: why not, when it is absent."""

    def unavailable() -> str | None:
        if importlib.util.find_spec(module) is None:
            return f"{pip_name} is not installed"
        return None

    return unavailable


def probe_once(cache: dict, key: Hashable, call: Callable[[], Any],
               say: Callable[[BaseException], str],
               catch: tuple[type[BaseException], ...] = (NotImplementedError,)) -> str | None:
    """Why ``call()`` — a tiny call standing in for a measurement — fails with one of
    ``catch`` (``say(exc)`` words it), or None; probed once per ``key`` of ``cache``. Any
    other failure is left for the measurement itself to record, with its traceback."""
    if key not in cache:
        cache[key] = None
        try:
            call()
        except catch as exc:
            cache[key] = say(exc)
        except Exception:  # noqa: BLE001 - the measurement records it, with its traceback
            pass
    return cache[key]


def tier_unavailable(tier: str) -> str | None:
    """fusedops' own reason why ``tier`` cannot run here (``fusedops.backends()``), or None."""
    import fusedops

    return fusedops.backends().get(tier, f"fusedops has no {tier!r} tier")


def fusedops_tier_unavailable(tier: str, op_name: str, probe: Callable[[], Any],
                              cache: dict[str, str | None]) -> str | None:
    """Why fusedops' ``tier`` cannot time ``fusedops.<op_name>`` here, or None.

    The tier's own reason (``fusedops.backends()``), the op missing from this fusedops, or
    ``probe()`` — a tiny call of the op with the tier forced — raising NotImplementedError
    (the tier does not cover the op). Any other failure of the probe is left for the
    measurement itself to record as an error, with its traceback. Probed once per tier.
    """
    import fusedops

    reason = tier_unavailable(tier)
    if reason is not None:
        return reason
    if not hasattr(fusedops, op_name):
        return f"fusedops.{op_name} does not exist yet"
    return probe_once(cache, tier, probe,
                      lambda exc: f"fusedops.{op_name} raises NotImplementedError: {exc}")


def fusedops_case_unsupported(tier: str, op_name: str, description: str,
                              call: Callable[[], Any], key: Hashable,
                              cache: dict) -> str | None:
    """Why fusedops' ``tier`` does not run one case (``description`` says which): ``call()``,
    a tiny forced call like it, raises NotImplementedError. Probed once per ``key``."""
    return probe_once(cache, key, call,
                      lambda exc: f"fusedops.{op_name} does not run {description} on {tier}: "
                                  f"{exc}")


def fusedops_implementation(tier: str,
                            setup: Callable[[Case, Sequence[Any]], Callable[[], Any]], *,
                            unavailable: Callable[[], str | None],
                            unsupported: Callable[[Case], str | None] = lambda case: None,
                            variant: str = "", note: str = "",
                            quick: bool = True) -> Implementation:
    """The row of fusedops forced onto ``tier``: ``fusedops-<tier>`` (``-<variant>`` after
    it), never a baseline, its note the ``use_backend`` call (``note`` follows it)."""
    return Implementation(name=f"fusedops-{tier}" + (f"-{variant}" if variant else ""),
                          setup=setup, unavailable=unavailable, unsupported=unsupported,
                          baseline=False, quick=quick,
                          note=f'fusedops.use_backend("{tier}")' + note)
