"""Fused linear ``act(F.linear(x, w, b) + r)``: cases, implementations, FLOP and byte counts.

Cases: M tokens in {4096, 16384} x (K, N) in {(4096, 4096), (4096, 14336), (14336, 4096),
(8192, 8192)} (a Llama-3-8B attention projection, its MLP up and down projections, and a
square 8192), bfloat16, with a bias and ``activation="gelu_tanh"``; plus M=16384 K=N=4096
with a residual as well; and the plain GEMM M = K = N = 8192 with neither bias nor activation,
forward (in ``--quick`` too). Forward alone, and forward+backward: ``torch.autograd.grad`` of the
output against a fixed random ``grad_out``, with respect to the input, the weight, the bias
(and the residual), so no ``.grad`` accumulates inside the timed call. ``--quick`` keeps
M=16384 K=N=4096 (forward, forward+backward, and forward+backward with the residual) and the
plain 8192³ GEMM.

Implementations:

- ``fusedops-triton``, ``fusedops-cuda``: ``fusedops.linear`` under
  ``fusedops.use_backend(tier)``. Skipped, with the reason, where ``fusedops.backends()``
  reports the tier unavailable, where ``fusedops.linear`` does not exist yet, or where a
  tiny probe call (bias, gelu_tanh, forward+backward) raises ``NotImplementedError``.
- ``addmm``: ``torch.addmm(b, x, w.t())`` (cuBLAS), the bias only — no activation, no
  residual: the GEMM itself, the rate every other row is compared with (``× addmm``);
  ``torch.mm(x, w.t())`` in the plain case.
- ``addmm_activation``: ``torch._addmm_activation(b, x, w.t(), use_gelu=True)``, cuBLASLt's
  fused bias + GELU epilogue. Its GELU is the tanh approximation on CUDA (on CPU it is the
  erf GELU), i.e. ``gelu_tanh``. With a residual, ``residual + b`` goes in as the (M, N)
  addend, which leaves the Lt epilogue for a cuBLAS GEMM with beta=1 and a separate GELU.
  Forward only: ``_addmm_activation`` has no autograd derivative, so its forward+backward
  cases are recorded as skipped, saying so.
- ``eager``: ``F.gelu(F.linear(x, w, b) + r, approximate="tanh")``.
- ``torch.compile``: the eager function under ``torch.compile(mode="max-autotune-no-cudagraphs",
  dynamic=False)``. Minutes of GEMM autotuning per case: left out of ``--quick``.

FLOPs (the GEMMs only; the bias, residual and activation are O(M·N), under 0.1%):
forward 2·M·N·K; forward+backward 6·M·N·K (grad_input = dz·W and grad_weight = dzᵀ·x,
2·M·N·K each). The percentage of cuBLAS is read two ways, both measured in the same run:
``% matmul`` against the bf16 8192³ ``torch.mm`` ceiling, and ``× addmm`` (time of addmm /
time of the row) against cuBLAS on the same shape.

Bytes (the fewest the op must move, e = 2 for bf16; a GEMM is compute-bound, so GB/s is
only context): forward reads x (M·K·e), W (N·K·e), b (N·e) and r (M·N·e) and writes the
output (M·N·e). Forward+backward also writes the pre-activation z (M·N·e) for the backward
(fusedops' contract: gelu' needs z), then reads grad_out and z (2·M·N·e), x and W again,
writes grad_input (M·K·e), grad_weight (N·K·e), grad_bias (N·e) and grad_residual (M·N·e).

Quick-profile estimate on an H100 (a GEMM call here is 0.7–3 ms): 3 cases x 5
implementations, about 2 s each to make inputs, time (do_bench, ~100 calls) and take the
peak memory → ~30 s, plus the first calls: Triton autotuning of fusedops' forward and two
backward GEMMs (~60–90 s; the residual case re-specialises the forward), cuBLAS and eager
warm-ups (seconds): about 1.5–2 minutes in all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import (
    bind_epilogue_op,
    compile_epilogue_op,
    eager_epilogue,
    element_bytes,
    epilogue_op_leaves,
    fusedops_implementation,
    fusedops_tier_unavailable,
    needs_grad,
    probe_device,
    rotating_over,
    saves_preactivation,
    torch_dtype,
)
from .registry import Case, Family, Implementation

TOKENS = (4096, 16384)
SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192))  # (K, N)
RESIDUAL_SHAPE = (16384, 4096, 4096)  # (M, K, N) of the case that adds a residual
QUICK_SHAPE = (16384, 4096, 4096)
# The plain GEMM (no bias, no activation), forward: the CUDA tier's target is 0.9x torch.mm.
PLAIN_SHAPE = (8192, 8192, 8192)
MODES = ("fwd", "fwd+bwd")
DTYPE = "bfloat16"
ACTIVATION = "gelu_tanh"
PROBE_SIZE = 64


def make_case(mode: str, m: int, k: int, n: int, *, residual: bool = False,
              dtype: str = DTYPE, activation: str | None = ACTIVATION,
              bias: bool = True, quick: bool | None = None) -> Case:
    in_quick = (m, k, n) == QUICK_SHAPE and (not residual or mode == "fwd+bwd")
    if quick is not None:
        in_quick = quick
    params = {"mode": mode, "M": m, "K": k, "N": n, "dtype": dtype, "bias": bias,
              "activation": activation, "residual": residual}
    epilogue = "_".join([activation or "none"] + ["nobias"] * (not bias) + ["res"] * residual)
    label = f"M={m} K={k} N={n}" + (" +res" if residual else "")
    return Case(id=f"{mode}_M{m}_K{k}_N{n}_{dtype}_{epilogue}", label=label, params=params,
                quick=in_quick)


def cases(quick: bool) -> list[Case]:
    out = []
    for mode in MODES:
        for m in TOKENS:
            for k, n in SHAPES:
                out.append(make_case(mode, m, k, n))
        out.append(make_case(mode, *RESIDUAL_SHAPE, residual=True))
    out.append(make_case("fwd", *PLAIN_SHAPE, activation=None, bias=False, quick=True))
    return [c for c in out if c.quick or not quick]


def flops(case: Case) -> int:
    """2·M·N·K forward; 4·M·N·K more for the backward (grad input + grad weight)."""
    m, k, n = case.params["M"], case.params["K"], case.params["N"]
    return 2 * m * n * k * (1 if case.params["mode"] == "fwd" else 3)


def bytes_moved(case: Case) -> int:
    """The fewest bytes the op must move (see the module docstring for the formula)."""
    m, k, n, e = case.params["M"], case.params["K"], case.params["N"], element_bytes(case)
    bias = n * e if case.params["bias"] else 0
    residual = m * n * e if case.params["residual"] else 0
    forward = m * k * e + n * k * e + bias + residual + m * n * e
    if case.params["mode"] == "fwd":
        return forward
    saved = m * n * e if saves_preactivation(case) else 0
    backward = (m * n * e + saved  # read grad_out and z
                + m * k * e + n * k * e  # read x and W again
                + m * k * e + n * k * e + bias + residual)  # write the gradients
    return forward + saved + backward


def input_bytes(case: Case) -> int:
    m, k, n, e = case.params["M"], case.params["K"], case.params["N"], element_bytes(case)
    total = m * k * e + n * k * e
    total += n * e if case.params["bias"] else 0
    total += m * n * e if case.params["residual"] else 0
    total += m * n * e if needs_grad(case) else 0  # grad_out
    return total


def make_inputs(case: Case, device) -> dict:
    """Random x, W (scaled by K^-1/2, so the outputs are O(1)), b, r and grad_out."""
    m, k, n = case.params["M"], case.params["K"], case.params["N"]
    dtype = torch_dtype(case.params["dtype"])
    train = needs_grad(case)
    inputs = {
        "input": torch.randn(m, k, device=device, dtype=dtype),
        "weight": torch.randn(n, k, device=device, dtype=dtype) * k ** -0.5,
        "bias": torch.randn(n, device=device, dtype=dtype) if case.params["bias"] else None,
        "residual": (torch.randn(m, n, device=device, dtype=dtype)
                     if case.params["residual"] else None),
        "grad_out": torch.randn(m, n, device=device, dtype=dtype) if train else None,
    }
    if train:
        for leaf in epilogue_op_leaves(inputs):
            leaf.requires_grad_(True)
    return inputs


def reference(inputs: dict, activation: str | None):
    """What every implementation computes, in torch: act(x·Wᵀ + b + r)."""
    z = F.linear(inputs["input"], inputs["weight"], inputs["bias"])
    return eager_epilogue(z, inputs["residual"], activation)


# The timed callable of one input set: the output, or the gradients of <output, grad_out>
# with respect to x, W, b and r (common.bind_epilogue_op).
_bind = bind_epilogue_op
_rotating = rotating_over(_bind)


# --- fusedops tiers ---------------------------------------------------------------------

_probed: dict[str, str | None] = {}


def fusedops_unavailable(tier: str) -> str | None:
    """Why ``fusedops.linear`` cannot be timed on ``tier`` (a 64³ forced forward probes it)."""

    def probe():
        import fusedops

        case = make_case("fwd+bwd", PROBE_SIZE, PROBE_SIZE, PROBE_SIZE)
        inputs = make_inputs(case, probe_device())

        def forward(inputs):
            with fusedops.use_backend(tier):
                return fusedops.linear(inputs["input"], inputs["weight"], inputs["bias"],
                                       activation=ACTIVATION)

        _bind(forward, case, inputs)()

    return fusedops_tier_unavailable(tier, "linear", probe, _probed)


def _fusedops_tier(tier: str) -> Implementation:
    def setup(case, input_sets):
        import fusedops

        activation, residual = case.params["activation"], case.params["residual"]

        def forward(inputs):
            with fusedops.use_backend(tier):
                return fusedops.linear(inputs["input"], inputs["weight"], inputs["bias"],
                                       activation=activation,
                                       residual=inputs["residual"] if residual else None)

        return _rotating(forward, case, input_sets)

    return fusedops_implementation(tier, setup, unavailable=lambda: fusedops_unavailable(tier))


# --- baselines --------------------------------------------------------------------------


def _addmm_setup(case, input_sets):
    def forward(inputs):  # the GEMM and its bias: cuBLAS's rate on this shape
        if inputs["bias"] is None:  # the plain GEMM case
            return torch.mm(inputs["input"], inputs["weight"].t())
        return torch.addmm(inputs["bias"], inputs["input"], inputs["weight"].t())

    # grad_out meets the GEMM's output directly: no activation to differentiate.
    own = [{**inputs, "residual": None} for inputs in input_sets]
    return _rotating(forward, case, own)


def addmm_activation_unsupported(case: Case) -> str | None:
    if case.params["mode"] != "fwd":
        return ("forward only: torch._addmm_activation has no autograd derivative "
                "(derivative for aten::_addmm_activation is not implemented)")
    if case.params["activation"] not in ("gelu_tanh", "relu"):
        return (f"torch._addmm_activation has only relu and gelu_tanh epilogues, not "
                f"{case.params['activation']!r}")
    if not case.params["bias"]:
        return "torch._addmm_activation needs a bias"
    return None


def _addmm_activation_setup(case, input_sets):
    reason = addmm_activation_unsupported(case)
    if reason is not None:
        raise NotImplementedError(reason)
    use_gelu = case.params["activation"] == "gelu_tanh"

    def forward(inputs):
        addend = inputs["bias"]
        if inputs["residual"] is not None:  # an (M, N) addend: not the Lt epilogue's path
            addend = inputs["residual"] + addend
        return torch._addmm_activation(addend, inputs["input"], inputs["weight"].t(),
                                       use_gelu=use_gelu)

    return _rotating(forward, case, input_sets)


def _eager_setup(case, input_sets):
    activation = case.params["activation"]
    return _rotating(lambda inputs: reference(inputs, activation), case, input_sets)


def _compile_setup(case, input_sets):
    activation = case.params["activation"]

    def eager(x, w, b, r):
        return eager_epilogue(F.linear(x, w, b), r, activation)

    return compile_epilogue_op(eager, case, input_sets, _rotating)


IMPLEMENTATIONS = (
    _fusedops_tier("triton"),
    _fusedops_tier("cuda"),
    Implementation(name="addmm", setup=_addmm_setup,
                   note="torch.addmm(b, x, w.t()): cuBLAS, bias only (no activation or "
                        "residual): the GEMM rate of this shape"),
    Implementation(name="addmm_activation", setup=_addmm_activation_setup,
                   unsupported=addmm_activation_unsupported,
                   note="torch._addmm_activation(b, x, w.t(), use_gelu=True): cuBLASLt "
                        "bias+GELU epilogue (tanh GELU on CUDA); forward only"),
    Implementation(name="eager", setup=_eager_setup,
                   note='F.gelu(F.linear(x, w, b) + r, approximate="tanh")'),
    Implementation(name="torch.compile", setup=_compile_setup, quick=False,
                   note='torch.compile(eager, mode="max-autotune-no-cudagraphs")'),
)

FORMULAS = (
    "FLOPs: forward 2·M·N·K; forward+backward 6·M·N·K (grad input and grad weight, 2·M·N·K "
    "each); the bias, residual and activation are not counted. `% matmul` is against the "
    "bf16 8192³ cuBLAS ceiling, `× addmm` against cuBLAS addmm on the same shape (bias "
    "only), both measured in this run. Bytes (e = 2 for bf16): forward = M·K·e + N·K·e + "
    "N·e + M·N·e (+ M·N·e residual); forward+backward adds the saved pre-activation M·N·e, "
    "reads grad_out and it (2·M·N·e), x and W again, and writes grad input, weight, bias "
    "(and residual). addmm_activation's GELU is the tanh approximation (gelu_tanh); it has "
    "no backward."
)

FAMILY = Family(
    name="linear",
    description="fused linear act(x·Wᵀ + b + r), bf16, bias, gelu_tanh",
    cases=cases,
    implementations=IMPLEMENTATIONS,
    make_inputs=make_inputs,
    bytes_moved=bytes_moved,
    flops=flops,
    input_bytes=input_bytes,
    bound="compute",
    ratio_baselines=("addmm", "addmm_activation", "eager", "torch.compile"),
    panel_key="mode",
    formulas=FORMULAS,
)
