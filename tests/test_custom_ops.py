"""Every kernel-level function is a torch custom op that passes torch.library.opcheck."""

import importlib

import pytest
import torch
from conftest import DEVICE

import fusedops  # noqa: F401  (registers the ops)

# The module, not the function fusedops.dispatch.select that shadows it as an attribute.
select = importlib.import_module("fusedops.dispatch.select")


def _ops(tier):
    module = select.TIERS[tier]
    if tier == "cuda":
        module.load()
    return [getattr(torch.ops.fusedops, f"{op}_{tier}").default
            for op in ("ce_fwd", "ce_bwd", "ce_bwd_inplace")]


def _sample_args(dtype, weighted):
    rows, classes = 5, 37
    logits = torch.randn(rows, classes, device=DEVICE, dtype=dtype)
    target = torch.randint(0, classes, (rows,), device=DEVICE)
    target[1] = -100
    weight = torch.rand(classes, device=DEVICE) + 0.5 if weighted else None
    lse = torch.logsumexp(logits.float(), dim=1)
    grad_loss = torch.rand(rows, device=DEVICE)
    options = (-100, 0.1, 1e-3, 4.0)
    fwd = (logits, target, weight, *options)
    bwd = (logits, target, weight, lse, grad_loss, *options)
    return fwd, bwd


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_opcheck(tier, dtype, weighted):
    fwd_op, bwd_op, bwd_inplace_op = _ops(tier)
    fwd_args, bwd_args = _sample_args(dtype, weighted)
    torch.library.opcheck(fwd_op, fwd_args)
    torch.library.opcheck(bwd_op, bwd_args)
    torch.library.opcheck(bwd_inplace_op, (bwd_args[0].clone(), *bwd_args[1:]))


def test_fake_shapes_follow_the_contract(tier):
    from torch._subclasses.fake_tensor import FakeTensorMode

    fwd_op, bwd_op, _ = _ops(tier)
    with FakeTensorMode():
        logits = torch.empty(1000, 50257, dtype=torch.bfloat16, device=DEVICE)
        target = torch.empty(1000, dtype=torch.int64, device=DEVICE)
        loss, lse = fwd_op(logits, target, None, -100, 0.0, 0.0, 0.0)
        assert loss.shape == lse.shape == (1000,)
        assert loss.dtype == lse.dtype == torch.float32
        grad = bwd_op(logits, target, None, lse, loss, -100, 0.0, 0.0, 0.0)
        assert grad.shape == logits.shape and grad.dtype == torch.bfloat16
