"""A patched model under DistributedDataParallel: two CPU processes, the gloo backend.

Each rank trains the same patched CNN on its own half of a batch; DDP averages the gradients,
so after a few SGD steps both ranks hold identical parameters, equal to one process training
on the whole batch (the mean loss over equal halves is the mean of the two halves' means).
"""

import copy
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from reference import assert_close
from torch import nn

import fusedops
from fusedops.nn import CrossEntropyLoss as FusedCrossEntropyLoss
from fusedops.nn import FusedConv2d, FusedLinear

WORLD_SIZE = 2
STEPS = 3
BATCH_PER_RANK = 4
TIMEOUT_S = 60


def make_model():
    torch.manual_seed(1234)  # the same initial weights in every process
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 8), nn.GELU(),
                         nn.Linear(8, 5))


def make_data():
    """STEPS batches of WORLD_SIZE * BATCH_PER_RANK samples, the same in every process."""
    generator = torch.Generator().manual_seed(99)
    total = WORLD_SIZE * BATCH_PER_RANK
    return [(torch.randn(total, 2, 7, 7, generator=generator),
             torch.randint(0, 5, (total,), generator=generator)) for _ in range(STEPS)]


def train(model, criterion, batches):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for inputs, target in batches:
        optimizer.zero_grad()
        criterion(model(inputs), target).backward()
        optimizer.step()


def check_patched(model):
    assert isinstance(model[0], FusedConv2d) and model[0].activation == "relu"
    assert isinstance(model[5], FusedLinear) and model[5].activation == "gelu"


def worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        model = fusedops.patch(make_model())
        check_patched(model)
        criterion = FusedCrossEntropyLoss()
        ddp = nn.parallel.DistributedDataParallel(model)
        rows = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
        train(ddp, criterion, [(x[rows], t[rows]) for x, t in make_data()])
        torch.save({name: p.detach() for name, p in model.named_parameters()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_on_a_patched_model_matches_single_process_training(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build of torch")
    if not dist.is_gloo_available():
        pytest.skip("the gloo backend is not available in this build of torch")

    context = mp.start_processes(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=0.2):
            if time.monotonic() > deadline:
                pytest.fail(f"the DDP workers did not finish in {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()

    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    initial = make_model()
    single = fusedops.patch(copy.deepcopy(initial))
    train(single, FusedCrossEntropyLoss(), make_data())
    expected = dict(single.named_parameters())
    assert list(ranks[0]) == list(expected)
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), f"{name} differs between the ranks"
        assert not torch.equal(value, initial.get_parameter(name)), f"{name} did not train"
        assert_close(value, expected[name], torch.float32, f"{name} against one process")
