"""Every public op runs under torch.compile(fullgraph=True), Inductor and aot_eager."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from reference import assert_close

import fusedops


def fused_loss(x, target, weight):
    return fusedops.cross_entropy(x, target, weight, label_smoothing=0.1, z_loss=1e-3,
                                  softcap=20.0)


def loss_and_grad(loss_fn, logits, target, weight):
    """The forward through ``loss_fn``; the backward (compiled with it by AOTAutograd)."""
    x = logits.detach().requires_grad_()
    loss = loss_fn(x, target, weight)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_cross_entropy_compiles_without_graph_breaks(backend):
    torch._dynamo.reset()
    logits = torch.randn(6, 37, device=DEVICE)
    target = torch.randint(0, 37, (6,), device=DEVICE)
    target[0] = -100
    weight = torch.rand(37, device=DEVICE) + 0.5

    compiled = torch.compile(fused_loss, fullgraph=True, backend=backend)
    loss, grad = loss_and_grad(compiled, logits, target, weight)
    eager_loss, eager_grad = loss_and_grad(fused_loss, logits, target, weight)
    assert_close(loss, eager_loss, torch.float32, "compiled loss")
    assert_close(grad, eager_grad, torch.float32, "compiled grad")


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_module_in_a_compiled_model(backend):
    torch._dynamo.reset()
    model = torch.nn.Linear(8, 11).to(DEVICE)
    criterion = fusedops.nn.CrossEntropyLoss(label_smoothing=0.05)
    inputs = torch.randn(5, 8, device=DEVICE)
    target = torch.randint(0, 11, (5,), device=DEVICE)

    def step(inputs, target):
        return criterion(model(inputs), target)

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    loss = compiled(inputs, target)
    loss.backward()
    grad = model.weight.grad.clone()
    model.zero_grad()
    ref = F.cross_entropy(model(inputs), target, label_smoothing=0.05)
    ref.backward()
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(grad, model.weight.grad, torch.float32, "weight grad")


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_inplace_backward_compiles(backend):
    torch._dynamo.reset()
    inputs = torch.randn(6, 37, device=DEVICE, requires_grad=True)
    target = torch.randint(0, 37, (6,), device=DEVICE)

    def loss_fn(inputs, target):
        return fusedops.cross_entropy(inputs * 2.0, target, inplace_backward=True)

    torch.compile(loss_fn, fullgraph=True, backend=backend)(inputs, target).backward()
    x64 = inputs.detach().double().requires_grad_()
    F.cross_entropy(x64 * 2.0, target).backward()
    assert_close(inputs.grad, x64.grad, torch.float32, "grad through the in-place backward")
