"""fusedops linear_cross_entropy against float64 torch: values, gradients, chunking, errors.

The reference is ``reference_loss`` of test_cross_entropy (F.cross_entropy, plus z_loss and
softcap in float64 torch ops) applied to ``F.linear`` of the float64-upcast inputs. The chunk
budget is set tiny (a few rows) so every case runs over several chunks, the last one short.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from reference import assert_close
from test_cross_entropy import reference_loss
from torch.utils._python_dispatch import TorchDispatchMode

import fusedops
from fusedops import dispatch
from fusedops.ops import linear_cross_entropy as lce_module
from fusedops.ops.linear_cross_entropy import chunk_rows, linear_cross_entropy

CHUNK = 5  # rows per chunk in these tests: odd, so the last chunk is a short one
HIDDEN, VOCAB = 24, 37

OPTIONS = {
    "plain": {},
    "class_weight+ignore": dict(weighted=True, ignore_fraction=0.3),
    "label_smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=1e-2),
    "softcap": dict(softcap=3.0),
    "everything": dict(weighted=True, ignore_fraction=0.3, label_smoothing=0.2, z_loss=1e-3,
                       softcap=5.0),
}


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of CHUNK rows for float32 logits of VOCAB classes."""
    monkeypatch.setattr(lce_module, "CHUNK_BYTES", CHUNK * VOCAB * 4)


def require_linear(tier):
    """Skip a tier that has no fused linear yet (the op then refuses it, see below)."""
    module = dispatch.TIERS[tier]
    if not hasattr(module, "linear_fwd"):
        pytest.skip(f"tier {tier!r} has no linear_fwd / linear_bwd yet")


def make_inputs(batch_shape, hidden, vocab, dtype, *, bias=True, weighted=False,
                ignore_fraction=0.0, target_dtype=torch.int64):
    x = torch.randn(*batch_shape, hidden, device=DEVICE).to(dtype)
    w = (torch.randn(vocab, hidden, device=DEVICE) / math.sqrt(hidden) * 3).to(dtype)
    b = torch.randn(vocab, device=DEVICE).to(dtype) if bias else None
    target = torch.randint(0, vocab, batch_shape, device=DEVICE)
    if ignore_fraction and target.numel():
        target[torch.rand(batch_shape, device=DEVICE) < ignore_fraction] = -100
        target.view(-1)[0] = 0  # at least one counted row
    cw = torch.rand(vocab, device=DEVICE) + 0.5 if weighted else None
    return x, w, b, target.to(target_dtype), cw


def reference(x64, w64, b64, target, cw, reduction="mean", **options):
    """float64 torch: cross-entropy of the full logits, reshaped like our result."""
    vocab = w64.shape[0]
    logits = F.linear(x64, w64, b64).reshape(-1, vocab)
    out = reference_loss(logits, target.reshape(-1), cw, reduction=reduction, **options)
    return out.reshape(target.shape) if reduction == "none" else out


def for_tier(tier, *tensors):
    """The CUDA tier multiplies float32 only in tf32 (not at these tests' default full
    precision): float32 cases run it on float16 copies of the inputs instead."""
    if tier != "cuda":
        return tensors
    return tuple(t.half() if t is not None and t.dtype == torch.float32 else t for t in tensors)


def check(tier, x, w, b, target, cw, *, dtype, factor=1.0, **options):
    """Our loss and the gradients of input, weight and bias against float64 torch."""
    x, w, b = for_tier(tier, x, w, b)
    dtype = x.dtype
    leaves = [t.detach().clone().requires_grad_() for t in (x, w)]
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w)]
    if b is not None:
        leaves.append(b.detach().clone().requires_grad_())
        leaves64.append(b.detach().double().requires_grad_())
    b_ours = leaves[2] if b is not None else None
    b_ref = leaves64[2] if b is not None else None
    with fusedops.use_backend(tier):
        loss = linear_cross_entropy(leaves[0], leaves[1], target, b_ours, class_weight=cw,
                                    **options)
    ref = reference(leaves64[0], leaves64[1], b_ref, target, cw, **options)
    assert loss.dtype == x.dtype
    assert loss.shape == ref.shape
    assert_close(loss, ref, dtype, "loss", factor)
    upstream = torch.randn(ref.shape, dtype=torch.float64, device=DEVICE)
    ref.backward(upstream)
    loss.backward(upstream.to(loss.dtype))
    for name, ours, theirs in zip(("input", "weight", "bias"), leaves, leaves64):
        assert ours.grad.dtype == ours.dtype, name
        assert_close(ours.grad, theirs.grad, dtype, f"grad of {name}", factor)
    return loss


def split_options(options):
    options = dict(options)
    make = {k: options.pop(k) for k in ("weighted", "ignore_fraction") if k in options}
    return make, options


# --- values and gradients -------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(OPTIONS), ids=str)
def test_matches_reference(tier, small_chunks, case, reduction):
    require_linear(tier)
    make, options = split_options(OPTIONS[case])
    x, w, b, target, cw = make_inputs((2, 9), HIDDEN, VOCAB, torch.float32, **make)
    check(tier, x, w, b, target, cw, dtype=torch.float32, reduction=reduction, **options)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_bias_leading_dims_and_int32_targets(tier, small_chunks, reduction):
    require_linear(tier)
    x, w, _, target, cw = make_inputs((2, 3, 4), HIDDEN, VOCAB, torch.float32, bias=False,
                                      weighted=True, ignore_fraction=0.2,
                                      target_dtype=torch.int32)
    check(tier, x, w, None, target, cw, dtype=torch.float32, reduction=reduction,
          label_smoothing=0.05)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_single_token_input(tier, reduction):
    require_linear(tier)
    x, w, b, target, _ = make_inputs((), HIDDEN, VOCAB, torch.float32)
    loss = check(tier, x, w, b, target, None, dtype=torch.float32, reduction=reduction)
    assert loss.shape == ()


def test_uint8_targets_and_odd_chunk_budget(tier, monkeypatch):
    require_linear(tier)
    monkeypatch.setattr(lce_module, "CHUNK_BYTES", 1)  # one row per chunk
    x, w, b, target, _ = make_inputs((7,), HIDDEN, VOCAB, torch.float32,
                                     target_dtype=torch.uint8)
    check(tier, x, w, b, target, None, dtype=torch.float32, z_loss=1e-3)


def test_non_contiguous_input(tier, small_chunks):
    require_linear(tier)
    wide = torch.randn(11, 2 * HIDDEN, device=DEVICE)
    x = wide[:, ::2]  # strided rows and columns
    _, w, b, target, cw = make_inputs((11,), HIDDEN, VOCAB, torch.float32, weighted=True)
    check(tier, x, w, b, target, cw, dtype=torch.float32, label_smoothing=0.1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_other_dtypes(small_chunks, dtype):
    # The torch tier: low-precision logits are rounded once, as F.linear in that dtype does.
    x, w, b, target, cw = make_inputs((13,), HIDDEN, VOCAB, dtype, weighted=True,
                                      ignore_fraction=0.2)
    check("torch", x, w, b, target, cw, dtype=dtype, reduction="mean", z_loss=1e-3,
          label_smoothing=0.1)


def test_triton_tier_low_precision(small_chunks):
    if fusedops.backends()["triton"] is not None:
        pytest.skip(f"triton unavailable: {fusedops.backends()['triton']}")
    require_linear("triton")
    x, w, b, target, cw = make_inputs((13,), HIDDEN, VOCAB, torch.float16, weighted=True)
    check("triton", x, w, b, target, cw, dtype=torch.float16, reduction="sum", softcap=4.0)


def test_only_some_arguments_require_grad(small_chunks):
    x, w, b, target, _ = make_inputs((12,), HIDDEN, VOCAB, torch.float32)
    x64, w64, b64 = x.double(), w.double(), b.double()
    x.requires_grad_()
    x64.requires_grad_()
    linear_cross_entropy(x, w, target, b).backward()
    reference(x64, w64, b64, target, None).backward()
    assert_close(x.grad, x64.grad, torch.float32, "input grad, frozen weight and bias")
    x.grad = None
    w = w.requires_grad_()
    loss = linear_cross_entropy(x.detach(), w, target, b, reduction="none")
    loss.sum().backward()
    w64.requires_grad_()
    reference(x64.detach(), w64, b64, target, None, reduction="none").sum().backward()
    assert_close(w.grad, w64.grad, torch.float32, "weight grad, frozen input and bias")


def test_backward_twice_with_retained_graph(small_chunks):
    x, w, b, target, _ = make_inputs((12,), HIDDEN, VOCAB, torch.float32)
    w.requires_grad_()
    loss = linear_cross_entropy(x, w, target, b)
    loss.backward(retain_graph=True)
    first = w.grad.clone()
    loss.backward()
    assert_close(w.grad, 2 * first, torch.float32, "second backward adds the same gradient")


# --- chunking -------------------------------------------------------------------------------


def test_chunk_rows_rule():
    mib = 1024 * 1024
    assert chunk_rows(10, 37, 4, budget=CHUNK * 37 * 4) == CHUNK
    assert chunk_rows(3, 37, 4, budget=CHUNK * 37 * 4) == 3  # never more rows than there are
    assert chunk_rows(10, 37, 4, budget=1) == 1  # at least one row
    assert chunk_rows(0, 37, 4) == 1
    # 128k vocabulary, bfloat16, 256 MiB: 1024 rows (a multiple of 128 within the budget).
    rows = chunk_rows(10**6, 128256, 2, budget=256 * mib)
    assert rows % 128 == 0 and rows * 128256 * 2 <= 256 * mib < (rows + 128) * 128256 * 2
    assert chunk_rows(10**6, 1000, 4, budget=1000 * 4 * 300) == 256  # rounded down to 128s


class RecordShapes(TorchDispatchMode):
    """Every op (custom ops included, not their insides) and the shapes of its outputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else (out,)
        shapes = [tuple(t.shape) for t in flat if isinstance(t, torch.Tensor)]
        self.calls.append((str(func), shapes))
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_never_allocates_the_full_logits(small_chunks, reduction):
    rows = 40
    x, w, b, target, _ = make_inputs((rows,), 8, VOCAB, torch.float32)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    recorder = RecordShapes()
    with recorder:
        loss = linear_cross_entropy(*leaves[:2], target, leaves[2], reduction=reduction)
        loss.backward(torch.ones_like(loss))
    linear_fwd = [shapes for name, shapes in recorder.calls if "linear_fwd" in name]
    # One GEMM per chunk forward, and for "none" once more in backward.
    assert len(linear_fwd) == math.ceil(rows / CHUNK) * (2 if reduction == "none" else 1)
    assert all(shapes[0][0] <= CHUNK and shapes[0][1] == VOCAB for shapes in linear_fwd)
    biggest = max(math.prod(s) for _, shapes in recorder.calls for s in shapes)
    assert biggest <= max(CHUNK * VOCAB, VOCAB * 8, rows * 8) < rows * VOCAB
    ref = reference(*(t.detach().double() for t in (x, w, b)), target, None,
                    reduction=reduction)
    assert_close(loss, ref, torch.float32, "loss")


# --- edge cases -----------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_tokens(tier, reduction):
    require_linear(tier)
    x, w, b, target, _ = make_inputs((0,), HIDDEN, VOCAB, torch.float32)
    x, w, b = for_tier(tier, x, w, b)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    with fusedops.use_backend(tier):
        loss = linear_cross_entropy(*leaves[:2], target, leaves[2], reduction=reduction)
    theirs = F.cross_entropy(F.linear(x, w, b), target, reduction=reduction)
    assert loss.shape == theirs.shape
    assert torch.equal(torch.isnan(loss), torch.isnan(theirs))
    if reduction == "sum":
        assert loss.item() == 0.0
    loss.sum().backward()
    for leaf in leaves:
        assert torch.equal(leaf.grad, torch.zeros_like(leaf))


def test_all_ignored_batch(tier, small_chunks):
    require_linear(tier)
    x, w, b, target, _ = make_inputs((11,), HIDDEN, VOCAB, torch.float32)
    x, w, b = for_tier(tier, x, w, b)
    target.fill_(-100)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    with fusedops.use_backend(tier):
        loss = linear_cross_entropy(*leaves[:2], target, leaves[2], label_smoothing=0.1)
    assert torch.isnan(loss)
    assert torch.isnan(F.cross_entropy(F.linear(x, w, b), target))
    loss.backward()  # torch passes zero gradients here too
    for leaf in leaves:
        assert torch.equal(leaf.grad, torch.zeros_like(leaf))
        leaf.grad = None
    with fusedops.use_backend(tier):
        total = linear_cross_entropy(*leaves[:2], target, leaves[2], reduction="sum")
    total.backward()
    assert total.item() == 0.0
    for leaf in leaves:
        assert torch.equal(leaf.grad, torch.zeros_like(leaf))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_grad_does_no_gradient_work(small_chunks, reduction):
    x, w, b, target, _ = make_inputs((12,), HIDDEN, VOCAB, torch.float32)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    expected = reference(*(t.detach().double() for t in leaves), target, None,
                         reduction=reduction)
    for context in (torch.no_grad, torch.inference_mode):
        recorder = RecordShapes()
        with context(), recorder:
            loss = linear_cross_entropy(*leaves[:2], target, leaves[2], reduction=reduction)
        assert loss.grad_fn is None and not loss.requires_grad
        assert not any("ce_bwd" in name or "linear_bwd" in name for name, _ in recorder.calls)
        assert_close(loss, expected, torch.float32, "loss under no_grad")
    recorder = RecordShapes()
    with recorder:  # nothing requires grad
        linear_cross_entropy(*(t.detach() for t in leaves[:2]), target, leaves[2].detach())
    assert not any("ce_bwd" in name or "linear_bwd" in name for name, _ in recorder.calls)


def test_autocast_runs_the_linear_in_low_precision_and_returns_float32(small_chunks):
    x, w, b, target, _ = make_inputs((13,), HIDDEN, VOCAB, torch.float32)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        ours = linear_cross_entropy(*leaves[:2], target, leaves[2])
        theirs = F.cross_entropy(F.linear(*leaves[:2], leaves[2]), target)
    assert ours.dtype == theirs.dtype == torch.float32
    low64 = [t.detach().to(torch.bfloat16).double().requires_grad_() for t in leaves]
    ref = reference(*low64[:2], low64[2], target, None)
    assert_close(ours, ref, torch.bfloat16, "autocast loss")
    ours.backward()
    assert all(leaf.grad.dtype == torch.float32 for leaf in leaves)
    ref.backward()
    for name, leaf, ref_leaf in zip(("input", "weight", "bias"), leaves, low64):
        assert_close(leaf.grad, ref_leaf.grad, torch.bfloat16, f"autocast grad of {name}")


# --- tiers ----------------------------------------------------------------------------------


def test_a_tier_without_the_fused_linear_is_refused_with_the_reason():
    class CrossEntropyOnly:
        NAME = "ce-only"

        @staticmethod
        def ce_unsupported(logits, target, *, probability_target):
            return None

    x, w, b, target, _ = make_inputs((3,), HIDDEN, VOCAB, torch.float32)
    reason = lce_module.tier_unsupported(CrossEntropyOnly, x, w, b, target)
    assert "linear_fwd" in reason
    assert lce_module.tier_unsupported(dispatch.TIERS["torch"], x, w, b, target) is None
    if not hasattr(dispatch.TIERS["triton"], "linear_fwd"):
        with fusedops.use_backend("triton"), pytest.raises(NotImplementedError,
                                                           match="linear_fwd"):
            linear_cross_entropy(x, w, target, b)


# --- torch.compile --------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiles_without_graph_breaks(small_chunks, backend, reduction):
    torch._dynamo.reset()
    x, w, b, target, cw = make_inputs((3, 4), HIDDEN, VOCAB, torch.float32, weighted=True,
                                      ignore_fraction=0.2)

    def loss_fn(x, w, b):
        out = linear_cross_entropy(x, w, target, b, class_weight=cw, reduction=reduction,
                                   label_smoothing=0.1, z_loss=1e-3, softcap=20.0)
        return out if reduction == "mean" else (out * out).sum()

    def run(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        loss = fn(*leaves)
        loss.backward()
        return loss.detach(), [leaf.grad for leaf in leaves]

    loss, grads = run(torch.compile(loss_fn, fullgraph=True, backend=backend))
    eager_loss, eager_grads = run(loss_fn)
    assert_close(loss, eager_loss, torch.float32, "compiled loss")
    for name, ours, theirs in zip(("input", "weight", "bias"), grads, eager_grads):
        assert_close(ours, theirs, torch.float32, f"compiled grad of {name}")


# --- bad input ------------------------------------------------------------------------------

X = torch.randn(4, 6, device=DEVICE)
W = torch.randn(5, 6, device=DEVICE)
T = torch.tensor([0, 1, 4, 2], device=DEVICE)

BAD_CALLS = {
    "input not a tensor": (dict(input=[[1.0] * 6]), TypeError, "input must be a Tensor"),
    "weight not a tensor": (dict(weight=[[1.0] * 6]), TypeError, "weight must be a Tensor"),
    "target not a tensor": (dict(target=[0, 1, 2, 3]), TypeError, "target must be a Tensor"),
    "bias not a tensor": (dict(bias=[0.0] * 5), TypeError, "bias must be a Tensor or None"),
    "integer input": (dict(input=X.long()), TypeError, "input must be float16"),
    "0-d input": (dict(input=torch.tensor(1.0, device=DEVICE), target=T[0]), ValueError,
                  "at least 1 dimension"),
    "1-d weight": (dict(weight=W[0]), ValueError, "weight must be 2-D"),
    "hidden mismatch": (dict(weight=torch.randn(5, 7, device=DEVICE)), ValueError,
                        "must equal weight's hidden size"),
    "no classes": (dict(weight=torch.randn(0, 6, device=DEVICE), target=T * 0), ValueError,
                   "0 classes"),
    "bias shape": (dict(bias=torch.randn(6, device=DEVICE)), ValueError, r"bias must have "
                                                                        r"shape \(5,\)"),
    "class_weight shape": (dict(class_weight=torch.ones(4, device=DEVICE)), ValueError,
                           r"class_weight must have shape \(5,\)"),
    "class_weight dtype": (dict(class_weight=torch.ones(5, dtype=torch.int64, device=DEVICE)),
                           TypeError, "class_weight must be floating"),
    "target shape": (dict(target=T[:3]), ValueError, r"target must have shape \(4,\)"),
    "float target": (dict(target=T.float()), TypeError, "class indices"),
    "int16 target": (dict(target=T.to(torch.int16)), TypeError, "class indices"),
    "weight dtype": (dict(weight=W.double()), TypeError, "weight's dtype"),
    "bias dtype": (dict(bias=torch.randn(5, dtype=torch.float16, device=DEVICE)), TypeError,
                   "bias's dtype"),
    "weight device": (dict(weight=W.to("meta")), ValueError, "weight is on"),
    "target device": (dict(target=T.to("meta")), ValueError, "target is on"),
    "class_weight device": (dict(class_weight=torch.ones(5, device="meta")), ValueError,
                            "class_weight is on"),
    "reduction": (dict(reduction="avg"), ValueError, "reduction must be one of"),
    "smoothing > 1": (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    "smoothing < 0": (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    "z_loss < 0": (dict(z_loss=-1.0), ValueError, "z_loss"),
    "z_loss nan": (dict(z_loss=float("nan")), ValueError, "z_loss"),
    "softcap 0": (dict(softcap=0.0), ValueError, "softcap"),
    "softcap inf": (dict(softcap=float("inf")), ValueError, "softcap"),
    "ignore_index float": (dict(ignore_index=1.5), TypeError, "ignore_index"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS), ids=str)
def test_bad_input_is_a_clear_error_before_any_launch(case):
    overrides, error, message = BAD_CALLS[case]
    kwargs = dict(input=X, weight=W, target=T, bias=None)
    kwargs.update(overrides)
    args = (kwargs.pop("input"), kwargs.pop("weight"), kwargs.pop("target"), kwargs.pop("bias"))
    recorder = RecordShapes()
    with pytest.raises(error, match=f"fusedops.linear_cross_entropy: .*{message}"), recorder:
        linear_cross_entropy(*args, **kwargs)
    assert not any("fusedops" in name for name, _ in recorder.calls)


def test_out_of_range_target_is_an_error_on_cpu():
    if DEVICE.type != "cpu":
        pytest.skip("on the GPU an out-of-range class gives a NaN row, without a host sync")
    with pytest.raises(ValueError, match="outside"):
        linear_cross_entropy(X, W, torch.tensor([0, 1, 5, 2], device=DEVICE), None)


def test_chunk_budget_from_the_environment():
    env = dict(os.environ, FUSEDOPS_LCE_CHUNK_BYTES="12345")
    out = subprocess.run([sys.executable, "-c", "from fusedops.ops import linear_cross_entropy "
                          "as m; print(m.CHUNK_BYTES)"], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "12345"


def test_module_matches_the_functional_and_keeps_class_weight_as_buffer():
    import fusedops

    class_weight = torch.rand(11) + 0.5
    module = fusedops.nn.LinearCrossEntropyLoss(class_weight=class_weight, label_smoothing=0.1,
                                                z_loss=1e-3)
    assert "class_weight" in module.state_dict()
    x, weight = torch.randn(6, 8), torch.randn(11, 8)
    target = torch.randint(0, 11, (6,))
    expected = fusedops.linear_cross_entropy(x, weight, target, class_weight=class_weight,
                                             label_smoothing=0.1, z_loss=1e-3)
    assert torch.equal(module(x, weight, target), expected)
