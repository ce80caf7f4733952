"""The CUDA tier's attention kernels (csrc/attention/) on a GPU: the sm_90a kernels (TMA +
wgmma, head dims 64/128/256) and the sm_80 ones (mma.sync, forced anywhere with
FUSEDOPS_ATTENTION_PATH=sm80) against float64 math, against each other and against the Triton
tier; long sequences; a packed batch whose q holds more than 2**31 elements.

test_attention.py and test_sdpa.py run the whole attention suite on the CUDA tier through the
`tier` fixture; this file covers what is particular to its kernels.
"""

import pytest
import torch
from reference import assert_close
from test_attention import reference

import fusedops

pytestmark = pytest.mark.gpu

PATHS = ["sm90", "sm80"]


@pytest.fixture(params=PATHS)
def attention_path(request, monkeypatch):
    if fusedops.backends()["cuda"] is not None:
        pytest.skip(f"the CUDA tier is unavailable: {fusedops.backends()['cuda']}")
    if request.param == "sm90" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm_90a kernels need a compute capability 9.0 GPU")
    monkeypatch.setenv("FUSEDOPS_ATTENTION_PATH", request.param)
    return request.param


def run(q, k, v, grad_out, **options):
    with fusedops.use_backend("cuda"):
        out, lse = fusedops.attention(q, k, v, return_lse=True, **options)
    return (out, lse, *torch.autograd.grad(out, (q, k, v), grad_out))


def compare(shape, dtype, causal, window, deterministic=False):
    batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim = shape
    q = torch.randn(batch, heads_q, seqlen_q, head_dim, device="cuda", dtype=dtype,
                    requires_grad=True)
    k, v = (torch.randn(batch, heads_kv, seqlen_k, head_dim, device="cuda", dtype=dtype,
                        requires_grad=True) for _ in range(2))
    grad_out = torch.randn_like(q)
    out, lse, *grads = run(q, k, v, grad_out, causal=causal, window=window,
                           deterministic=deterministic)
    inputs64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference(*inputs64, causal, window)
    ref_grads = torch.autograd.grad(ref_out, inputs64, grad_out.double())
    assert_close(out, ref_out, dtype, "out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert_close(lse[finite], ref_lse[finite], dtype, "lse")
    for name, got, want in zip(("grad_q", "grad_k", "grad_v"), grads, ref_grads):
        assert_close(got, want, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [16, 32, 64, 96, 128, 256])
@pytest.mark.parametrize("causal, window", [(False, None), (True, None), (False, (33, 7))],
                         ids=["full", "causal", "window"])
def test_every_head_dim(attention_path, head_dim, dtype, causal, window):
    compare((2, 4, 2, 257, 300, head_dim), dtype, causal, window)


@pytest.mark.parametrize("shape", [(1, 2, 2, 1, 1000, 128), (1, 2, 1, 1000, 1, 64),
                                   (3, 6, 1, 129, 65, 128), (1, 1, 1, 4097, 4097, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_ragged_and_grouped(attention_path, shape):
    compare(shape, torch.bfloat16, True, None)


def test_deterministic_backward(attention_path):
    compare((1, 4, 2, 300, 300, 128), torch.bfloat16, True, (64, 0), deterministic=True)


def test_sm90_sm80_and_triton_agree(monkeypatch):
    if fusedops.backends()["cuda"] is not None or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs the CUDA tier on a compute capability 9.0 GPU")
    q, k, v = (torch.randn(2, 8, 1024, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    outs = {}
    for path in PATHS:
        monkeypatch.setenv("FUSEDOPS_ATTENTION_PATH", path)
        with fusedops.use_backend("cuda"):
            outs[path] = fusedops.attention(q, k, v, causal=True).float()
    if fusedops.backends()["triton"] is None:
        with fusedops.use_backend("triton"):
            outs["triton"] = fusedops.attention(q, k, v, causal=True).float()
    ref, _ = reference(q.double(), k.double(), v.double(), True, None)
    for path, out in outs.items():
        assert_close(out, ref, torch.bfloat16, path)


@pytest.mark.parametrize("seqlen", [16384])
def test_long_sequence(attention_path, seqlen):
    """16k tokens, causal: compares sampled rows of the output with float64 math."""
    q, k, v = (torch.randn(1, 2, seqlen, 128, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    with fusedops.use_backend("cuda"):
        out = fusedops.attention(q, k, v, causal=True)
    rows = torch.tensor([0, 1, 4095, seqlen // 2, seqlen - 1], device="cuda")
    scores = (q[:, :, rows].double() @ k.double().transpose(-1, -2)) / 128**0.5
    position = rows[:, None]
    keys = torch.arange(seqlen, device="cuda")[None, :]
    scores = scores.masked_fill(keys > position, float("-inf"))
    ref = torch.softmax(scores, -1) @ v.double()
    assert_close(out[:, :, rows], ref, torch.bfloat16, "sampled rows")


@pytest.mark.large
def test_packed_q_past_2_to_the_31_elements(attention_path):
    """A packed batch whose q holds more than 2**31 elements (64-bit row offsets)."""
    heads, head_dim, lengths = 16, 128, [2**20 + 3] + [1024] * 8
    total = sum(lengths)
    assert total * heads * head_dim > 2**31
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                      device="cuda")
    q = torch.randn(total, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(total, 1, head_dim, device="cuda", dtype=torch.bfloat16)
    with fusedops.use_backend("cuda"):
        out = fusedops.attention_varlen(q, k, k, cu, cu, max(lengths), max(lengths),
                                        causal=True, window=(255, 0))
    last = slice(int(cu[-2]), int(cu[-1]))  # the last sequence lies past 2**31 elements
    ref, _ = reference(q[last].transpose(0, 1).double()[None],
                       k[last].transpose(0, 1).double()[None],
                       k[last].transpose(0, 1).double()[None], True, (255, 0))
    assert_close(out[last].transpose(0, 1)[None], ref, torch.bfloat16, "last sequence")
