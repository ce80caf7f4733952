"""Test configuration shared by the suite.

Without a CUDA device the Triton tier runs in Triton's interpreter on CPU tensors, which must
be switched on before anything imports triton. Every output a tier allocates is poisoned with
NaN, so an element a kernel does not write fails its comparison.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["FUSEDOPS_POISON_OUTPUTS"] = "1"

import pytest  # noqa: E402

import fusedops  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda") if HAS_CUDA else torch.device("cpu")
TIER_NAMES = ("torch", "triton", "cuda")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(params=TIER_NAMES)
def tier(request):
    """Each tier available on this machine, by name; the others skip with the reason."""
    reason = fusedops.backends()[request.param]
    if reason is not None:
        pytest.skip(f"tier {request.param!r} unavailable: {reason}")
    return request.param


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def conv_tier(tier):
    """Tiers that implement the fused convolution (the others skip, saying so)."""
    if not hasattr(fusedops.dispatch.TIERS[tier], "conv2d_fwd"):
        pytest.skip(f"the {tier} tier has no fused convolution yet")
    return tier


@pytest.fixture
def cudnn_full_precision_float32():
    """float32 compared at 1e-5 must not be rounded to tf32: torch's cuDNN default
    (allow_tf32=True, which fusedops.conv2d follows on a GPU) is switched off for the test
    and restored after it."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = previous
