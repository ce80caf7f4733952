"""The CUDA tier's GEMM (csrc/matmul/) on a GPU: both kernels (sm_90a wgmma + TMA, and the
sm_80 mma.sync one forced on any GPU with FUSEDOPS_GEMM_PATH=sm80) against float64 torch and
against each other, with ragged, unaligned and transposed operands, M = 1, the float32
weight-gradient accumulation, and more than 2**31 elements.

The whole fused-linear suite (test_linear.py, test_linear_cross_entropy.py) also runs on the
CUDA tier through the `tier` fixture; this file covers what is particular to the kernels.
"""

import pytest
import torch
import torch.nn.functional as F
from reference import assert_close

import fusedops

pytestmark = pytest.mark.gpu

PATHS = ["sm90", "sm80"]
DTYPES = [torch.float16, torch.bfloat16]
# (M, K, N): M = 1, ragged tiles in every dimension, K not a multiple of 8 (the aligned-copy
# path), K shorter than one 64-wide K block, and more than one wave of 128 x 128 tiles.
SHAPES = [(1, 8, 1), (1, 4097, 17), (127, 65, 129), (300, 1000, 257), (4097, 1031, 257),
          (2048, 2048, 2048), (129, 24, 8)]


@pytest.fixture(params=PATHS)
def gemm_path(request, monkeypatch):
    if fusedops.backends()["cuda"] is not None:
        pytest.skip(f"the CUDA tier is unavailable: {fusedops.backends()['cuda']}")
    if request.param == "sm90" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm_90a kernel needs a compute capability 9.0 GPU")
    monkeypatch.setenv("FUSEDOPS_GEMM_PATH", request.param)
    return request.param


def reference(x, w, b, r, activation):
    z = F.linear(x.double(), w.double(), None if b is None else b.double())
    if r is not None:
        z = z + r.double()
    return {"none": z, "relu": F.relu(z), "gelu": F.gelu(z), "silu": F.silu(z),
            "gelu_tanh": F.gelu(z, approximate="tanh")}[activation]


def run(x, w, b, r, activation):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, r) if t is not None]
    it = iter(leaves)
    xo, wo = next(it), next(it)
    bo = next(it) if b is not None else None
    ro = next(it) if r is not None else None
    with fusedops.use_backend("cuda"):
        out = fusedops.linear(xo, wo, bo, activation=None if activation == "none" else activation,
                              residual=ro)
    return out, (xo, wo, bo, ro)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("activation", ["none", "gelu", "relu"])
def test_values_and_gradients(gemm_path, shape, dtype, activation):
    m, k, n = shape
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)
    b = torch.randn(n, device="cuda", dtype=dtype)
    r = torch.randn(m, n, device="cuda", dtype=dtype)
    out, leaves = run(x, w, b, r, activation)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, b, r)]
    ref = reference(*leaves64, activation)
    assert_close(out, ref, dtype, "output")
    upstream = torch.randn_like(ref)
    out.backward(upstream.to(dtype))
    ref.backward(upstream)
    for name, ours, theirs in zip(("input", "weight", "bias", "residual"), leaves, leaves64):
        assert_close(ours.grad, theirs.grad, dtype, f"grad of {name}")


@pytest.mark.parametrize("transpose", ["input", "weight", "both"])
def test_transposed_operands_are_read_in_place(gemm_path, transpose):
    m, k, n = 257, 136, 192
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)
    if transpose in ("input", "both"):
        x = x.t().contiguous().t()  # column-major: read MN-major
    if transpose in ("weight", "both"):
        w = w.t().contiguous().t()
    out, leaves = run(x, w, None, None, "silu")
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w)]
    ref = reference(*leaves64, None, None, "silu")
    assert_close(out, ref, torch.bfloat16, "output")
    ref.sum().backward()
    out.sum().backward()
    assert_close(leaves[0].grad, leaves64[0].grad, torch.bfloat16, "grad of input")
    assert_close(leaves[1].grad, leaves64[1].grad, torch.bfloat16, "grad of weight")


def test_the_two_kernels_agree(monkeypatch):
    if fusedops.backends()["cuda"] is not None or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs the CUDA tier on a compute capability 9.0 GPU")
    x = torch.randn(1000, 777, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(300, 777, device="cuda", dtype=torch.bfloat16) / 28
    outs = {}
    for path in PATHS:
        monkeypatch.setenv("FUSEDOPS_GEMM_PATH", path)
        with fusedops.use_backend("cuda"):
            outs[path] = fusedops.linear(x, w, activation="gelu_tanh").float()
    if fusedops.backends()["triton"] is None:
        with fusedops.use_backend("triton"):
            outs["triton"] = fusedops.linear(x, w, activation="gelu_tanh").float()
    ref = reference(x, w, None, None, "gelu_tanh")
    for path, out in outs.items():
        assert_close(out, ref, torch.bfloat16, path)
    # Same products, same float32 accumulation order within a K block of 16: close, not equal.
    assert (outs["sm90"] - outs["sm80"]).abs().max() <= 2e-2 * ref.abs().max()


@pytest.mark.parametrize("with_bias", [False, True])
def test_weight_grad_accumulate(gemm_path, with_bias):
    m, k, n = 333, 200, 130
    grad_out = torch.randn(m, n, device="cuda", dtype=torch.float16)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    grad_weight = torch.randn(n, k, device="cuda")
    grad_bias = torch.randn(n, device="cuda") if with_bias else None
    expected_w = grad_weight.double() + grad_out.double().t() @ x.double()
    expected_b = grad_bias.double() + grad_out.double().sum(0) if with_bias else None
    fusedops.dispatch.TIERS["cuda"].linear_weight_grad_accumulate(grad_out, x, grad_weight,
                                                                  grad_bias, False)
    assert_close(grad_weight, expected_w, torch.float32, "grad_weight", factor=100)
    if with_bias:
        assert_close(grad_bias, expected_b, torch.float32, "grad_bias", factor=10)


def test_bias_gradient_is_deterministic(gemm_path):
    x = torch.randn(5000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(96, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(96, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grads = []
    for _ in range(2):
        with fusedops.use_backend("cuda"):
            fusedops.linear(x, w, b, activation="silu").sum().backward()
        grads.append(b.grad.clone())
        b.grad = None
    assert torch.equal(grads[0], grads[1])


@pytest.mark.large
def test_more_than_2_31_elements(gemm_path):
    # x has 2**31 + 4096 elements: row offsets past 2**31 must be 64-bit.
    m, k, n = 2**31 // 4096 + 1, 4096, 24
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / 64
    with fusedops.use_backend("cuda"):
        out = fusedops.linear(x, w)
    rows = torch.tensor([0, 1, m // 2, m - 2, m - 1], device="cuda")
    ref = F.linear(x[rows].double(), w.double())
    assert_close(out[rows], ref, torch.bfloat16, "sampled rows")


@pytest.fixture
def tf32():
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(previous)


@pytest.mark.parametrize("shape", [(1, 8, 1), (127, 65, 129), (1000, 1031, 300)],
                         ids=lambda s: "x".join(map(str, s)))
def test_float32_in_tf32(gemm_path, tf32, shape):
    # tf32 keeps 10 mantissa bits of each product's factors: compare at float16's tolerance.
    m, k, n = shape
    x = torch.randn(m, k, device="cuda")
    w = torch.randn(n, k, device="cuda") / k**0.5
    b = torch.randn(n, device="cuda")
    out, leaves = run(x, w, b, None, "gelu")
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = reference(*leaves64, None, "gelu")
    assert out.dtype == torch.float32
    assert_close(out, ref, torch.float16, "output")
    upstream = torch.randn_like(ref)
    out.backward(upstream.float())
    ref.backward(upstream)
    for name, ours, theirs in zip(("input", "weight", "bias"), leaves, leaves64):
        assert_close(ours.grad, theirs.grad, torch.float16, f"grad of {name}")


def test_float32_at_full_precision_is_refused():
    if fusedops.backends()["cuda"] is not None:
        pytest.skip(f"the CUDA tier is unavailable: {fusedops.backends()['cuda']}")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        x, w = torch.randn(4, 8, device="cuda"), torch.randn(3, 8, device="cuda")
        with fusedops.use_backend("cuda"), pytest.raises(NotImplementedError, match="tf32"):
            fusedops.linear(x, w)
    finally:
        torch.set_float32_matmul_precision(previous)


def test_ops_pass_opcheck(gemm_path):
    """The C++ ops with their Python fakes: schema, fake tensor and autograd registration."""
    from fusedops.dispatch import cuda

    cuda.load()
    ops = torch.ops.fusedops
    x = torch.randn(37, 24, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(16, 24, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(16, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(37, 16, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(ops.linear_fwd_cuda.default, (x, w, b, r, "silu", False))
    out, saved = ops.linear_fwd_cuda.default(x, w, b, r, "silu", False)
    torch.library.opcheck(ops.linear_bwd_cuda.default,
                          (torch.randn_like(out), x, w, saved, "silu", False, True, True, True,
                           True))
    torch.library.opcheck(ops.linear_weight_grad_accumulate_cuda.default,
                          (torch.randn_like(out), x, torch.zeros(16, 24, device="cuda"),
                           torch.zeros(16, device="cuda"), False))
