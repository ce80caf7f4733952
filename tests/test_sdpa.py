"""fusedops.scaled_dot_product_attention, the drop-in for F.scaled_dot_product_attention.

The cases the attention kernels cover — (B, H, S, D) without a mask or dropout — are checked
on every backend against a float64 reference (values and the gradients of query, key and
value), and wherever the call ends up in torch's own SDPA (auto on CPU, a forced "torch"),
bit for bit against it. The cases no kernel covers must give torch's result unchanged under
auto and "torch", and a NotImplementedError saying why under a forced kernel tier.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, HAS_CUDA
from reference import TOLERANCE, assert_close

import fusedops

BACKENDS = ("auto", "torch", "triton")


@pytest.fixture(params=BACKENDS)
def backend(request):
    """auto, and each forced tier with attention available here (the others skip)."""
    name = request.param
    if name != "auto":
        reason = fusedops.backends()[name]
        if reason is not None:
            pytest.skip(f"tier {name!r} unavailable: {reason}")
    return name


def runs_torch_sdpa(backend):
    """Whether the call must end up in torch's own SDPA, giving its result bit for bit."""
    return backend == "torch" or (backend == "auto" and DEVICE.type == "cpu")


def skip_unsupported_dtype(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and not HAS_CUDA:
        pytest.skip("bf16 tl.dot is wrong in Triton's interpreter; covered on the GPU")


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def close(out, ref, dtype, what):
    """DESIGN's relative error; a gradient that is zero in exact arithmetic (the query and key
    gradients when every query sees a single key) must be zero up to the dtype's tolerance."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if ref.detach().abs().max() < 1e-12:
        error = out.detach().double().abs().max().item()
        assert error <= TOLERANCE[dtype], f"{what}: {error:.3e} where the reference is 0"
    else:
        assert_close(out, ref, dtype, what)


def exactly(out, ref, what):
    torch.testing.assert_close(out, ref, rtol=0, atol=0, msg=lambda m: f"{what}: {m}")


# --- the cases the kernels cover -------------------------------------------------------

# name -> (query shape, key/value shape, options). Sequence lengths are never multiples of the
# interpreter's 32-row blocks; sizes stay small for the interpreter.
COVERED = {
    "S17": ((2, 3, 17, 32), (2, 3, 17, 32), {}),
    "S1": ((2, 2, 1, 32), (2, 2, 1, 32), {}),
    "S1_causal": ((1, 2, 1, 16), (1, 2, 1, 16), dict(is_causal=True)),
    "S45_causal": ((1, 2, 45, 16), (1, 2, 45, 16), dict(is_causal=True)),
    "Sq1_Sk45": ((1, 2, 1, 16), (1, 2, 45, 16), {}),
    # Top-left alignment: the single query sees key 0 only (bottom-right would see all 45).
    "Sq1_Sk45_causal": ((1, 2, 1, 16), (1, 2, 45, 16), dict(is_causal=True)),
    "Sq17_Sk45_causal": ((1, 2, 17, 16), (1, 2, 45, 16), dict(is_causal=True)),
    # Queries past Sk see every key.
    "Sq45_Sk17_causal": ((1, 2, 45, 16), (1, 2, 17, 16), dict(is_causal=True)),
    "Sq45_Sk17": ((1, 1, 45, 16), (1, 1, 17, 16), {}),
    "gqa_4_2": ((1, 4, 17, 16), (1, 2, 17, 16), dict(enable_gqa=True)),
    "gqa_4_1": ((2, 4, 17, 16), (2, 1, 17, 16), dict(enable_gqa=True)),
    "gqa_4_2_causal_Sq45_Sk17": ((1, 4, 45, 16), (1, 2, 17, 16),
                                 dict(enable_gqa=True, is_causal=True)),
    "gqa_4_1_causal_Sq17_Sk33": ((1, 4, 17, 16), (1, 1, 33, 16),
                                 dict(enable_gqa=True, is_causal=True)),
    "gqa_flag_equal_heads": ((1, 2, 17, 16), (1, 2, 17, 16), dict(enable_gqa=True)),
    "scale": ((1, 2, 17, 32), (1, 2, 17, 32), dict(scale=0.3)),
    "scale_causal_Sq17_Sk33": ((1, 2, 17, 32), (1, 2, 33, 32), dict(scale=1.7, is_causal=True)),
}
COVERED.update({f"D{d}": ((1, 1, 17, d), (1, 1, 17, d), {}) for d in (16, 32, 64, 96, 128, 256)})
HALF_CASES = ["S17", "S45_causal", "Sq17_Sk45_causal", "gqa_4_2_causal_Sq45_Sk17", "D96"]


def check_covered(backend, q_shape, kv_shape, options, dtype, *, stored_bshd=False):
    def make(shape):
        if stored_bshd:  # stored (B, S, H, D), viewed (B, H, S, D)
            batch, heads, seqlen, dim = shape
            return torch.randn(batch, seqlen, heads, dim, device=DEVICE).to(dtype)
        return torch.randn(*shape, device=DEVICE).to(dtype)

    view = (lambda t: t.transpose(1, 2)) if stored_bshd else (lambda t: t)
    inputs = (make(q_shape), make(kv_shape), make(kv_shape))
    ours = leaves(*inputs)
    with fusedops.use_backend(backend):
        out = fusedops.scaled_dot_product_attention(*map(view, ours), **options)
    assert out.dtype == dtype
    upstream = torch.randn(out.shape, device=DEVICE).to(dtype)
    out.backward(upstream)

    exact = leaves(*(t.double() for t in inputs))
    ref = F.scaled_dot_product_attention(*map(view, exact), **options)
    ref.backward(upstream.double())
    close(out, ref, dtype, "output")
    for name, mine, expected in zip("qkv", ours, exact):
        assert mine.grad is not None and mine.grad.dtype == dtype, name
        close(mine.grad, expected.grad, dtype, f"grad of {name}")

    if runs_torch_sdpa(backend):
        theirs = leaves(*inputs)
        torch_out = F.scaled_dot_product_attention(*map(view, theirs), **options)
        torch_out.backward(upstream)
        exactly(out, torch_out, "output vs torch's SDPA")
        for name, mine, expected in zip("qkv", ours, theirs):
            exactly(mine.grad, expected.grad, f"grad of {name} vs torch's SDPA")


@pytest.mark.parametrize("case", list(COVERED), ids=str)
def test_covered_float32(backend, case):
    q_shape, kv_shape, options = COVERED[case]
    check_covered(backend, q_shape, kv_shape, options, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", HALF_CASES, ids=str)
def test_covered_half_precision(backend, case, dtype):
    skip_unsupported_dtype(backend, dtype)
    q_shape, kv_shape, options = COVERED[case]
    check_covered(backend, q_shape, kv_shape, options, dtype)


@pytest.mark.parametrize("options", [{}, dict(is_causal=True), dict(enable_gqa=True)],
                         ids=["plain", "causal", "gqa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_inputs_stored_bshd(backend, options, dtype):
    heads_kv = 1 if options.get("enable_gqa") else 4
    check_covered(backend, (2, 4, 17, 32), (2, heads_kv, 23, 32), options, dtype,
                  stored_bshd=True)


def test_key_value_expanded_over_batch_and_heads(backend):
    """Stride-0 batch and head dimensions (k and v broadcast with .expand) are still 4-D with
    one batch size, so the kernels take them; gradients flow back to the unexpanded tensors."""
    q, k, v = (torch.randn(*shape, device=DEVICE) for shape in
               ((2, 3, 17, 16), (1, 1, 21, 16), (1, 1, 21, 16)))
    ours, exact = leaves(q, k, v), leaves(q.double(), k.double(), v.double())

    def expand(tensors):
        q_, k_, v_ = tensors
        return q_, k_.expand(2, 3, 21, 16), v_.expand(2, 3, 21, 16)

    with fusedops.use_backend(backend):
        out = fusedops.scaled_dot_product_attention(*expand(ours), is_causal=True)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    ref = F.scaled_dot_product_attention(*expand(exact), is_causal=True)
    ref.backward(upstream.double())
    close(out, ref, torch.float32, "output")
    for name, mine, expected in zip("qkv", ours, exact):
        close(mine.grad, expected.grad, torch.float32, f"grad of {name}")


def test_forced_cuda_refuses_float32():
    """The CUDA attention kernels take 16-bit inputs only: float32 under a forced "cuda" says
    so (on a machine without the CUDA tier it is unavailable altogether: the same error)."""
    q, k, v = (torch.randn(1, 2, 17, 16, device=DEVICE) for _ in range(3))
    with fusedops.use_backend("cuda"), pytest.raises(NotImplementedError, match="'cuda'"):
        fusedops.scaled_dot_product_attention(q, k, v)


# --- the cases no kernel covers: torch's SDPA under auto, NotImplementedError when forced -

def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def _bool_mask():
    mask = torch.rand(17, 23, device=DEVICE) > 0.5
    mask[:, 0] = True  # every query sees a key: no NaN row
    return mask


# name -> (make the inputs, options, a fragment of the reason a forced kernel tier gives)
UNCOVERED = {
    "3-D": (lambda: (randn(3, 17, 16), randn(3, 23, 16), randn(3, 23, 16)), {}, "shapes"),
    "3-D causal": (lambda: (randn(3, 17, 16), randn(3, 23, 16), randn(3, 23, 16)),
                   dict(is_causal=True), "shapes"),
    "5-D broadcast batch": (lambda: (randn(2, 3, 4, 17, 16), randn(1, 1, 4, 23, 16),
                                     randn(1, 1, 4, 23, 16)), {}, "shapes"),
    "4-D broadcast batch": (lambda: (randn(2, 2, 17, 16), randn(1, 2, 23, 16),
                                     randn(1, 2, 23, 16)), {}, "batch size"),
    "value head dim differs": (lambda: (randn(1, 2, 17, 16), randn(1, 2, 23, 16),
                                        randn(1, 2, 23, 32)), {}, "shapes"),
    "bool mask": (lambda: (randn(1, 2, 17, 16), randn(1, 2, 23, 16), randn(1, 2, 23, 16)),
                  dict(attn_mask=_bool_mask), "attn_mask"),
    "float mask": (lambda: (randn(1, 2, 17, 16), randn(1, 2, 23, 16), randn(1, 2, 23, 16)),
                   dict(attn_mask=lambda: randn(1, 2, 17, 23)), "attn_mask"),
    "dropout": (lambda: (randn(1, 2, 17, 16), randn(1, 2, 23, 16), randn(1, 2, 23, 16)),
                dict(dropout_p=0.3), "dropout"),
    "dropout causal": (lambda: (randn(1, 2, 17, 16), randn(1, 2, 23, 16), randn(1, 2, 23, 16)),
                       dict(dropout_p=0.5, is_causal=True), "dropout"),
    "float64": (lambda: tuple(randn(1, 2, 17, 16, dtype=torch.float64) for _ in range(3)),
                dict(is_causal=True), "float64"),
    "head dim 48": (lambda: (randn(1, 2, 17, 48), randn(1, 2, 23, 48), randn(1, 2, 23, 48)),
                    {}, "head dim 48"),
    "Sk = 0": (lambda: (randn(1, 2, 17, 16), randn(1, 2, 0, 16), randn(1, 2, 0, 16)), {},
               "empty"),
    "Sq = 0": (lambda: (randn(1, 2, 0, 16), randn(1, 2, 23, 16), randn(1, 2, 23, 16)), {},
               "empty"),
    "last dim not contiguous": (lambda: (randn(1, 2, 17, 32)[..., ::2], randn(1, 2, 23, 16),
                                         randn(1, 2, 23, 16)), {}, "contiguous"),
}


def _inputs_and_options(case):
    make, options, _ = UNCOVERED[case]
    inputs = make()
    options = {name: value() if callable(value) else value for name, value in options.items()}
    return inputs, options


@pytest.mark.parametrize("backend_name", ["auto", "torch"])
@pytest.mark.parametrize("case", list(UNCOVERED), ids=str)
def test_uncovered_runs_torch_sdpa(case, backend_name):
    inputs, options = _inputs_and_options(case)
    mask = options.pop("attn_mask", None)
    if mask is not None and mask.is_floating_point():
        inputs = (*inputs, mask)  # an additive mask has a gradient too
    elif mask is not None:
        options["attn_mask"] = mask
    ours, theirs = leaves(*inputs), leaves(*inputs)
    mask_of = (lambda tensors: dict(attn_mask=tensors[3])) if len(inputs) == 4 else (
        lambda tensors: {})
    torch.manual_seed(1234)  # dropout draws the same mask in both calls
    with fusedops.use_backend(backend_name):
        out = fusedops.scaled_dot_product_attention(*ours[:3], **mask_of(ours), **options)
    torch.manual_seed(1234)
    expected = F.scaled_dot_product_attention(*theirs[:3], **mask_of(theirs), **options)
    exactly(out, expected, "output vs torch's SDPA")
    assert out.numel() == 0 or torch.isfinite(out).all()
    upstream = torch.randn_like(expected)
    out.backward(upstream)
    expected.backward(upstream)
    for name, mine, want in zip(("q", "k", "v", "attn_mask"), ours, theirs):
        exactly(mine.grad, want.grad, f"grad of {name} vs torch's SDPA")


def test_dropout_is_applied_under_auto():
    """The identity above must not hold vacuously: dropout changes the output."""
    q, k, v = randn(1, 2, 17, 16), randn(1, 2, 23, 16), randn(1, 2, 23, 16)
    dropped = fusedops.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    plain = fusedops.scaled_dot_product_attention(q, k, v)
    assert not torch.allclose(dropped, plain)


@pytest.mark.parametrize("case", list(UNCOVERED), ids=str)
def test_uncovered_forced_triton_says_why(case):
    if fusedops.backends()["triton"] is not None:
        pytest.skip(f"tier 'triton' unavailable: {fusedops.backends()['triton']}")
    inputs, options = _inputs_and_options(case)
    reason = UNCOVERED[case][2]
    with fusedops.use_backend("triton"), pytest.raises(NotImplementedError,
                                                       match=f"'triton'.*{reason}"):
        fusedops.scaled_dot_product_attention(*inputs, **options)


@pytest.mark.parametrize("case", list(UNCOVERED), ids=str)
def test_uncovered_forced_cuda_raises(case):
    inputs, options = _inputs_and_options(case)
    with fusedops.use_backend("cuda"), pytest.raises(NotImplementedError, match="'cuda'"):
        fusedops.scaled_dot_product_attention(*inputs, **options)


def test_heads_differ_without_enable_gqa_is_torchs_error():
    """Hq != Hkv needs enable_gqa=True, as in torch: auto raises torch's own error, a forced
    kernel tier says why it cannot run the call."""
    q, k, v = randn(1, 4, 17, 16), randn(1, 2, 17, 16), randn(1, 2, 17, 16)
    with pytest.raises(RuntimeError) as theirs:
        F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(type(theirs.value)):
        fusedops.scaled_dot_product_attention(q, k, v)
    if fusedops.backends()["triton"] is None:
        with fusedops.use_backend("triton"), pytest.raises(NotImplementedError, match="heads"):
            fusedops.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("through", ["drop-in", "fused_sdpa"])
def test_compiles_without_graph_breaks(backend, compiler, through):
    """The drop-in, called directly or routed by fused_sdpa(), under
    torch.compile(fullgraph=True): the same output and gradients as eager."""
    torch._dynamo.reset()
    q, k, v = (randn(1, 4, 19, 32).requires_grad_(),
               randn(1, 2, 23, 32).requires_grad_(), randn(1, 2, 23, 32).requires_grad_())

    def step(q, k, v):
        with fusedops.use_backend(backend):
            if through == "drop-in":
                out = fusedops.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                            enable_gqa=True)
            else:
                with fusedops.fused_sdpa():
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                         enable_gqa=True)
        return out.square().sum()

    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    grads = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    expected = torch.autograd.grad(step(q, k, v), (q, k, v))
    for got, want in zip(grads, expected):
        assert_close(got, want.double(), torch.float32, "compiled grad")
