"""fusedops.cross_entropy on every available tier against float64 torch: values and gradients.

The reference is F.cross_entropy in float64 on the same inputs upcast; z_loss and softcap,
which torch does not have, are added around it with float64 torch ops and autograd.
Without a GPU the tiers are torch (CPU) and triton (interpreter), at small odd sizes.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, HAS_CUDA
from reference import assert_close

import fusedops

# (rows, classes): odd sizes that are multiples of no block size, size 1, more than one block.
SHAPES = [(1, 1), (3, 5), (7, 37), (5, 1037), (2, 4099)]
if HAS_CUDA:
    SHAPES += [(257, 50257), (33, 128256), (1031, 32000)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(rows, classes, dtype, *, ignore_fraction=0.0, weighted=False, scale=4.0,
                target_dtype=torch.int64, row_padding=0, generator=None):
    """Random logits (optionally a column slice of a wider tensor), targets and class weights."""
    wide = torch.randn(rows, classes + row_padding, generator=generator) * scale
    logits = wide.to(DEVICE, dtype)[:, row_padding // 2: row_padding // 2 + classes]
    target = torch.randint(0, classes, (rows,), generator=generator)
    if ignore_fraction:
        target[torch.rand(rows, generator=generator) < ignore_fraction] = -100
        target[0] = 0  # at least one counted row: all-ignored batches have their own test
    weight = (torch.rand(classes, generator=generator) + 0.5).to(DEVICE) if weighted else None
    return logits, target.to(DEVICE, target_dtype), weight


def reference_loss(logits, target, weight=None, *, ignore_index=-100, reduction="mean",
                   label_smoothing=0.0, z_loss=0.0, softcap=None):
    """float64 reference built on F.cross_entropy; differentiable w.r.t. ``logits``."""
    z = softcap * torch.tanh(logits / softcap) if softcap else logits
    weight64 = weight.double() if weight is not None else None
    if not z_loss:
        return F.cross_entropy(z, target.long(), weight64, ignore_index=ignore_index,
                               reduction=reduction, label_smoothing=label_smoothing)
    rows = F.cross_entropy(z, target.long(), weight64, ignore_index=ignore_index,
                           reduction="none", label_smoothing=label_smoothing)
    counted = target != ignore_index
    safe = torch.where(counted, target, 0).long()
    target_weight = weight64[safe] if weight64 is not None else torch.ones_like(rows)
    target_weight = torch.where(counted, target_weight, 0.0)
    lse = torch.logsumexp(z, dim=1)
    rows = rows + target_weight * z_loss * lse**2
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / target_weight.sum()


def check_against_reference(tier, logits, target, weight=None, *, dtype, factor=1.0,
                            **options):
    """Run the op on ``tier`` and compare loss and input gradient with float64 torch."""
    x = logits.detach().clone().requires_grad_()
    x64 = logits.detach().to(torch.float64).requires_grad_()
    with fusedops.use_backend(tier):
        loss = fusedops.cross_entropy(x, target, weight, **options)
    ref = reference_loss(x64, target, weight, **options)
    assert loss.dtype == logits.dtype
    assert loss.shape == ref.shape
    assert_close(loss, ref, dtype, "loss", factor)
    upstream = torch.randn(ref.shape, dtype=torch.float64, device=ref.device)
    ref.backward(upstream)
    loss.backward(upstream.to(loss.dtype))
    assert x.grad.dtype == logits.dtype
    assert_close(x.grad, x64.grad, dtype, "grad", factor)
    return loss, x.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_values_and_gradients(tier, dtype, shape, reduction):
    logits, target, _ = make_inputs(*shape, dtype)
    check_against_reference(tier, logits, target, dtype=dtype, reduction=reduction)


OPTION_SETS = {
    "weight": dict(weighted=True),
    "ignore": dict(ignore_fraction=0.4),
    "smoothing": dict(label_smoothing=0.1),
    "smoothing+weight": dict(weighted=True, label_smoothing=0.25),
    "z_loss": dict(z_loss=1e-2),
    "softcap": dict(softcap=5.0),
    "everything": dict(weighted=True, ignore_fraction=0.3, label_smoothing=0.1, z_loss=1e-3,
                       softcap=3.0),
    "ignore_index=2": dict(ignore_index=2),
    "int32 target": dict(target_dtype=torch.int32, ignore_fraction=0.3),
    "strided rows": dict(row_padding=11, weighted=True, label_smoothing=0.1),
    "smoothing=1": dict(label_smoothing=1.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("option_set", list(OPTION_SETS), ids=str)
def test_options(tier, option_set, reduction, dtype):
    options = dict(OPTION_SETS[option_set])
    make_keys = ("weighted", "ignore_fraction", "target_dtype", "row_padding")
    make = {key: options.pop(key) for key in make_keys if key in options}
    for rows, classes in [(6, 37), (3, 1100)]:
        logits, target, weight = make_inputs(rows, classes, dtype, **make)
        if "ignore_index" in options:
            target[0] = options["ignore_index"]
        check_against_reference(tier, logits, target, weight, dtype=dtype, reduction=reduction,
                                **options)


def test_large_and_infinite_logits_stay_finite(tier):
    logits, target, _ = make_inputs(4, 300, torch.float32)
    logits[0] *= 3000.0  # |logits| up to ~4e4: a naive exp overflows
    logits[1, ::2] = -math.inf  # masked-out classes
    target[1] = 1
    logits[2, :] = 1e4  # all equal and huge
    # At |logits| ~ 1e4 float32 holds lse to ~1e-3 absolute, so exp(z - lse) carries ~1e-3
    # relative error whatever the kernel does (torch's float32 log_softmax too).
    loss, grad = check_against_reference(tier, logits, target, dtype=torch.float32,
                                         reduction="none", factor=100)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_all_ignored_mean_is_nan_with_zero_gradient(tier):
    logits, target, _ = make_inputs(5, 37, torch.float32)
    target.fill_(-100)
    x = logits.clone().requires_grad_()
    with fusedops.use_backend(tier):
        loss = fusedops.cross_entropy(x, target, label_smoothing=0.1)
    assert torch.isnan(loss)
    assert torch.isnan(F.cross_entropy(logits, target))
    loss.backward()  # torch passes a zero gradient here too
    assert torch.equal(x.grad, torch.zeros_like(x))
    x.grad = None
    with fusedops.use_backend(tier):
        total = fusedops.cross_entropy(x, target, reduction="sum")
    total.backward()
    assert total.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_inplace_backward_writes_gradient_over_logits(tier, dtype):
    logits, target, weight = make_inputs(5, 1037, dtype, weighted=True, ignore_fraction=0.3)
    leaf = logits.detach().clone().requires_grad_()
    x = leaf * 1  # a non-leaf whose storage the backward may overwrite
    with fusedops.use_backend(tier):
        loss = fusedops.cross_entropy(x, target, weight, label_smoothing=0.1,
                                      inplace_backward=True)
    x64 = logits.detach().double().requires_grad_()
    reference_loss(x64, target, weight, label_smoothing=0.1).backward()
    loss.backward()
    assert_close(leaf.grad, x64.grad, dtype, "grad")
    # The gradient now lives in the logits' storage.
    assert_close(x.detach(), x64.grad, dtype, "logits storage")


def test_deterministic_algorithms_give_identical_results(tier):
    logits, target, weight = make_inputs(5, 1037, torch.float32, weighted=True,
                                         ignore_fraction=0.3)
    results = []
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            x = logits.detach().clone().requires_grad_()
            with fusedops.use_backend(tier):
                loss = fusedops.cross_entropy(x, target, weight, label_smoothing=0.1)
            loss.backward()
            results.append((loss.detach(), x.grad))
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_input_is_never_modified(tier):
    logits, target, weight = make_inputs(6, 515, torch.float16, weighted=True)
    before = logits.clone()
    x = logits.requires_grad_()
    with fusedops.use_backend(tier):
        fusedops.cross_entropy(x, target, weight, label_smoothing=0.2, z_loss=1e-3,
                               softcap=20.0).backward()
    assert torch.equal(logits.detach(), before)


def test_spatial_and_unbatched_inputs(tier):
    logits = torch.randn(3, 7, 4, 5, device=DEVICE)
    target = torch.randint(0, 7, (3, 4, 5), device=DEVICE)
    target[0, 1] = -100
    for reduction in ("mean", "none"):
        check_against_reference(tier, logits, target, dtype=torch.float32, reduction=reduction,
                                label_smoothing=0.1)
    vector = torch.randn(11, device=DEVICE)
    check_against_reference(tier, vector, torch.tensor(4, device=DEVICE), dtype=torch.float32)


def test_empty_batch(tier):
    logits = torch.randn(0, 9, device=DEVICE, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long, device=DEVICE)
    with fusedops.use_backend(tier):
        assert torch.isnan(fusedops.cross_entropy(logits, target))
        total = fusedops.cross_entropy(logits, target, reduction="sum")
        assert fusedops.cross_entropy(logits, target, reduction="none").shape == (0,)
    assert total.item() == 0.0
    total.backward()
    assert logits.grad.shape == (0, 9)


def test_no_grad_saves_nothing_and_matches(tier):
    logits, target, _ = make_inputs(4, 37, torch.float32)
    with torch.no_grad(), fusedops.use_backend(tier):
        loss = fusedops.cross_entropy(logits.requires_grad_(), target)
    assert loss.grad_fn is None
    assert_close(loss, F.cross_entropy(logits.double(), target), torch.float32, "loss")


def test_probability_targets_on_torch_tier():
    logits = torch.randn(6, 9, 3, device=DEVICE, requires_grad=True)
    probs = torch.softmax(torch.randn(6, 9, 3, device=DEVICE), dim=1).requires_grad_()
    weight = torch.rand(9, device=DEVICE) + 0.5
    x64 = logits.detach().double().requires_grad_()
    y64 = probs.detach().double().requires_grad_()
    for reduction in ("mean", "sum", "none"):
        for grad in (logits, probs, x64, y64):
            grad.grad = None
        loss = fusedops.cross_entropy(logits, probs, weight, reduction=reduction,
                                      label_smoothing=0.2)
        ref = F.cross_entropy(x64, y64, weight.double(), reduction=reduction,
                              label_smoothing=0.2)
        assert_close(loss, ref, torch.float32, f"loss {reduction}")
        upstream = torch.randn_like(ref)
        ref.backward(upstream)
        loss.backward(upstream.float())
        assert_close(logits.grad, x64.grad, torch.float32, "logits grad")
        assert_close(probs.grad, y64.grad, torch.float32, "target grad")


@pytest.mark.parametrize("tier_name", ["triton", "cuda"])
def test_probability_targets_forced_on_a_kernel_tier_raise(tier_name):
    logits = torch.randn(3, 5, device=DEVICE)
    probs = torch.softmax(torch.randn(3, 5, device=DEVICE), dim=1)
    with fusedops.use_backend(tier_name), pytest.raises(NotImplementedError, match=tier_name):
        fusedops.cross_entropy(logits, probs)


def test_out_of_range_target(tier, monkeypatch):
    logits, target, _ = make_inputs(4, 37, torch.float32)
    target[2] = 37
    x = logits.clone().requires_grad_()
    if tier == "torch" and DEVICE.type == "cpu":
        with fusedops.use_backend(tier), pytest.raises(ValueError, match="class 37"):
            fusedops.cross_entropy(x, target)
        return
    # Kernels never read out of bounds for it: that row is NaN, the others are right.
    with fusedops.use_backend(tier):
        loss = fusedops.cross_entropy(x, target, reduction="none")
    loss.sum().backward()
    assert torch.isnan(loss[2]) and torch.isnan(x.grad[2]).all()
    keep = [0, 1, 3]
    ref = F.cross_entropy(logits[keep].double(), target[keep], reduction="none")
    assert_close(loss[keep], ref, torch.float32, "other rows")
    if DEVICE.type == "cuda":
        monkeypatch.setenv("FUSEDOPS_DEBUG", "1")
        with fusedops.use_backend(tier), pytest.raises(ValueError, match="class 37"):
            fusedops.cross_entropy(x, target)


def test_module_is_a_drop_in(tier):
    logits, target, weight = make_inputs(7, 37, torch.float32, weighted=True,
                                         ignore_fraction=0.2)
    ours = fusedops.nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    with fusedops.use_backend(tier):
        value = ours(logits, target)
    assert_close(value, theirs.double()(logits.double(), target), torch.float32, "module")
    with pytest.warns(UserWarning, match="size_average"):  # as torch warns
        legacy = fusedops.nn.CrossEntropyLoss(size_average=False)
    assert legacy.reduction == "sum"
    capped = fusedops.nn.CrossEntropyLoss(z_loss=1e-3, softcap=10.0, reduction="none")
    with fusedops.use_backend(tier):
        value = capped(logits, target)
    ref = reference_loss(logits.double(), target, z_loss=1e-3, softcap=10.0, reduction="none")
    assert_close(value, ref, torch.float32, "z_loss/softcap module")


def test_autocast_gives_float32_like_torch():
    logits = torch.randn(5, 37, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, 37, (5,), device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        ours = fusedops.cross_entropy(logits, target)
        theirs = F.cross_entropy(logits, target)
    assert ours.dtype == theirs.dtype == torch.float32
    assert_close(ours, F.cross_entropy(logits.double(), target), torch.float32, "autocast")
    ours.backward()
    assert logits.grad.dtype == torch.bfloat16
