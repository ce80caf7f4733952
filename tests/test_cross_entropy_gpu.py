"""GPU-only cross-entropy tests: 64-bit indexing, CUDA-graph capture, streams.

Skipped without a CUDA device. The `large` ones allocate up to ~20 GB.
"""

import pytest
import torch
import torch.nn.functional as F
from reference import assert_close

import fusedops

pytestmark = pytest.mark.gpu


def _sampled_reference(logits, target, rows):
    """float64 per-row losses and gradients (sum reduction) of a sample of rows."""
    x64 = logits[rows].double().requires_grad_()
    loss = F.cross_entropy(x64, target[rows], reduction="none")
    loss.sum().backward()
    return loss.detach(), x64.grad


@pytest.mark.large
@pytest.mark.parametrize("rows, classes", [(16384, 262144), (3, 2**30 + 3)],
                         ids=["16384x262144", "3x(2**30+3)"])
def test_more_than_2_31_elements(tier, rows, classes):
    if tier == "torch":
        pytest.skip("the torch tier upcasts to float32: too much memory at this size")
    torch.cuda.empty_cache()
    logits = torch.randn(rows, classes, device="cuda", dtype=torch.bfloat16)
    target = torch.randint(0, classes, (rows,), device="cuda")
    x = logits.requires_grad_()
    with fusedops.use_backend(tier):
        loss = fusedops.cross_entropy(x, target, reduction="none")
    loss.float().sum().backward()
    sample = torch.tensor(sorted({0, 1, rows // 2, rows - 1}), device="cuda")
    ref_loss, ref_grad = _sampled_reference(logits.detach(), target, sample)
    assert_close(loss[sample], ref_loss, torch.bfloat16, "loss of sampled rows")
    assert_close(x.grad[sample], ref_grad, torch.bfloat16, "grad of sampled rows")


def test_cuda_graph_capture_of_forward_and_backward(tier):
    rows, classes = 257, 50257
    static_logits = torch.randn(rows, classes, device="cuda", dtype=torch.bfloat16)
    static_target = torch.randint(0, classes, (rows,), device="cuda")
    weight = torch.rand(classes, device="cuda") + 0.5

    def step():
        x = static_logits.detach().requires_grad_()
        with fusedops.use_backend(tier):
            loss = fusedops.cross_entropy(x, static_target, weight, label_smoothing=0.1)
        (grad,) = torch.autograd.grad(loss, x)
        return loss, grad

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm up: JIT compilation and autotuning happen here
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_grad = step()

    static_logits.copy_(torch.randn_like(static_logits))
    static_target.copy_(torch.randint(0, classes, (rows,), device="cuda"))
    graph.replay()
    x64 = static_logits.double().requires_grad_()
    ref = F.cross_entropy(x64, static_target, weight.double(), label_smoothing=0.1)
    ref.backward()
    assert_close(static_loss, ref, torch.bfloat16, "replayed loss")
    assert_close(static_grad, x64.grad, torch.bfloat16, "replayed grad")


def test_runs_on_the_current_stream_and_the_tensors_device(tier):
    logits = torch.randn(33, 1037, device="cuda", dtype=torch.float16)
    target = torch.randint(0, 1037, (33,), device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), fusedops.use_backend(tier):
        x = logits.detach().requires_grad_()
        loss = fusedops.cross_entropy(x, target)
        loss.backward()
    stream.synchronize()
    x64 = logits.double().requires_grad_()
    ref = F.cross_entropy(x64, target)
    ref.backward()
    assert_close(loss, ref, torch.float16, "loss on a side stream")
    assert_close(x.grad, x64.grad, torch.float16, "grad on a side stream")
    if torch.cuda.device_count() > 1:
        with torch.cuda.device(0), fusedops.use_backend(tier):
            other = fusedops.cross_entropy(logits.to("cuda:1"), target.to("cuda:1"))
        assert other.device == torch.device("cuda:1")
        assert_close(other, ref, torch.float16, "loss on cuda:1")
