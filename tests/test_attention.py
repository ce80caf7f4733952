"""fusedops.attention and attention_varlen on every tier that has them, against float64 math.

The reference below is written from DESIGN.md's semantics, not from any tier: bottom-right
aligned positions, ``(left, right)`` windows, a query that sees no key gives output 0, lse
-inf and no gradient. Values, lse and the gradients of q, k and v are compared.
"""

import math

import pytest
import torch
from conftest import DEVICE, HAS_CUDA
from reference import assert_close

import fusedops
from fusedops.dispatch import attention_contract

DTYPES = [torch.float32, torch.float16]
if HAS_CUDA:
    DTYPES.append(torch.bfloat16)

# (B, Hq, Hkv, Sq, Sk, D), causal, window: every supported D, size 1, lengths that are not
# multiples of any block, Sq != Sk both ways (with queries that see no key), GQA and MQA,
# (left, right) windows with and without causal.
CASES = [
    ((1, 1, 1, 1, 1, 16), False, None),
    ((2, 3, 3, 17, 17, 32), True, None),
    ((1, 4, 2, 45, 70, 64), True, None),
    ((1, 4, 1, 70, 45, 16), True, None),          # the first 25 queries see no key
    ((1, 2, 2, 33, 33, 96), False, (3, 5)),
    ((1, 2, 1, 20, 24, 128), True, 7),
    ((1, 1, 1, 9, 13, 256), False, None),
    ((2, 2, 1, 50, 50, 32), False, (1, 1)),       # each query sees three keys
    ((1, 2, 2, 40, 100, 16), False, (3, 0)),      # a narrow band crossing block edges
    ((1, 2, 1, 65, 31, 64), False, (2, 1)),       # Sq > Sk: many queries see no key
]
LONG_CASES = [((1, 1, 1, 1000, 1000, 16), True, None)]
if HAS_CUDA:
    LONG_CASES += [((2, 8, 2, 4096, 4096, 128), True, None),
                   ((1, 4, 4, 2049, 3001, 64), False, (256, 17)),
                   ((1, 2, 1, 1537, 1537, 256), False, None)]


def case_id(case):
    (b, hq, hkv, sq, sk, d), causal, window = case
    return f"B{b}-H{hq}/{hkv}-S{sq}x{sk}-D{d}-{'causal' if causal else 'full'}-w{window}"


@pytest.fixture
def attention_tier(tier):
    """Tiers that implement attention (the others skip, saying so)."""
    if not hasattr(fusedops.dispatch.TIERS[tier], "attention_fwd"):
        pytest.skip(f"the {tier} tier has no attention yet")
    return tier


def skip_unsupported(tier, dtype):
    if tier == "triton" and dtype == torch.bfloat16 and DEVICE.type == "cpu":
        pytest.skip("bfloat16 tl.dot is wrong in Triton's interpreter")
    if tier == "cuda" and dtype == torch.float32:
        pytest.skip("the CUDA attention kernels take float16 and bfloat16 only")


def tier_float(tier):
    """The dtype of the tests below that use float32: float16 on the CUDA tier, which takes
    16-bit inputs only (compared at float16's tolerance there)."""
    return torch.float16 if tier == "cuda" else torch.float32


def window_sides(causal, window):
    if window is None:
        left, right = math.inf, math.inf
    elif isinstance(window, int):
        left, right = window, window
    else:
        left, right = window
    return left, 0 if causal else right


def visible_keys(seqlen_q, seqlen_k, causal, window, device):
    """(Sq, Sk) bool, straight from DESIGN.md: query i sits at key position i + Sk - Sq."""
    left, right = window_sides(causal, window)
    position = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    key = torch.arange(seqlen_k, device=device)[None, :]
    return (key >= position - left) & (key <= position + right)


def reference(q, k, v, causal, window, scale=None):
    """float64 math attention with autograd: (out, lse); rows that see no key give 0, -inf."""
    group = q.shape[-3] // k.shape[-3]
    k = k.repeat_interleave(group, dim=-3)
    v = v.repeat_interleave(group, dim=-3)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    visible = visible_keys(q.shape[-2], k.shape[-2], causal, window, q.device)
    sees_any = visible.any(-1, keepdim=True)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(torch.where(sees_any, scores, 0.0), dim=-1) * sees_any
    return probs @ v, lse


def make(shape, dtype, *, requires_grad=True):
    t = torch.randn(shape, device=DEVICE, dtype=torch.float32).to(dtype)
    return t.requires_grad_(requires_grad)


def run_and_compare(tier, shape, causal, window, dtype, *, bshd=False, scale=None):
    batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim = shape
    if bshd:  # stored (B, S, H, D), viewed (B, H, S, D)
        q = make((batch, seqlen_q, heads_q, head_dim), dtype).transpose(1, 2)
        k = make((batch, seqlen_k, heads_kv, head_dim), dtype).transpose(1, 2)
        v = make((batch, seqlen_k, heads_kv, head_dim), dtype).transpose(1, 2)
    else:
        q = make((batch, heads_q, seqlen_q, head_dim), dtype)
        k = make((batch, heads_kv, seqlen_k, head_dim), dtype)
        v = make((batch, heads_kv, seqlen_k, head_dim), dtype)
    grad_out = torch.randn(batch, heads_q, seqlen_q, head_dim, device=DEVICE).to(dtype)
    with fusedops.use_backend(tier):
        out, lse = fusedops.attention(q, k, v, causal=causal, window=window, scale=scale,
                                      return_lse=True)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference(*ref_inputs, causal, window, scale)
    ref_grads = torch.autograd.grad(ref_out, ref_inputs, grad_out.double())

    assert out.shape == q.shape and out.dtype == dtype
    if bshd:
        assert out.stride() == q.stride(), "the output is laid out like q"
    assert lse.shape == (batch, heads_q, seqlen_q) and lse.dtype == torch.float32
    assert_close(out, ref_out, dtype, "out")
    sees_none = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), sees_none), "lse is -inf exactly where no key is seen"
    assert_close(torch.where(sees_none, 0.0, lse.double()),
                 torch.where(sees_none, 0.0, ref_lse), torch.float32 if dtype ==
                 torch.float32 else dtype, "lse")
    for name, grad, ref_grad in zip(("grad_q", "grad_k", "grad_v"), grads, ref_grads):
        assert torch.isfinite(grad).all(), f"{name} is finite"
        assert_close(grad, ref_grad, dtype, name)
    return out, lse, grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_float64_math(attention_tier, case, dtype):
    skip_unsupported(attention_tier, dtype)
    run_and_compare(attention_tier, *case, dtype)


@pytest.mark.parametrize("case", LONG_CASES, ids=case_id)
def test_long_sequences(attention_tier, case):
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    run_and_compare(attention_tier, *case, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bshd_storage(attention_tier, dtype):
    skip_unsupported(attention_tier, dtype)
    run_and_compare(attention_tier, (2, 4, 2, 19, 37, 64), True, None, dtype, bshd=True)


def test_custom_scale(attention_tier):
    dtype = tier_float(attention_tier)
    run_and_compare(attention_tier, (1, 2, 2, 21, 21, 32), False, (4, 4), dtype,
                    scale=0.37)


def test_queries_that_see_no_key(attention_tier):
    """Sq > Sk, causal: the first Sq - Sk queries precede every key; output 0, lse -inf."""
    dtype = tier_float(attention_tier)
    q, k, v = make((1, 2, 40, 32), dtype), make((1, 2, 9, 32), dtype), \
        make((1, 2, 9, 32), dtype)
    with fusedops.use_backend(attention_tier):
        out, lse = fusedops.attention(q, k, v, causal=True, return_lse=True)
    grad_q, grad_k, grad_v = torch.autograd.grad(out.square().sum(), (q, k, v))
    blind = 40 - 9
    assert torch.equal(out[:, :, :blind], torch.zeros_like(out[:, :, :blind]))
    assert torch.isneginf(lse[:, :, :blind]).all() and torch.isfinite(lse[:, :, blind:]).all()
    assert torch.equal(grad_q[:, :, :blind], torch.zeros_like(grad_q[:, :, :blind]))
    assert all(torch.isfinite(g).all() for g in (grad_q, grad_k, grad_v))


def test_empty_key_sequence(attention_tier):
    dtype = tier_float(attention_tier)
    q, k, v = make((2, 2, 5, 16), dtype), make((2, 2, 0, 16), dtype), \
        make((2, 2, 0, 16), dtype)
    with fusedops.use_backend(attention_tier):
        out, lse = fusedops.attention(q, k, v, return_lse=True)
    grad_q, grad_k, _ = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    assert torch.equal(grad_q, torch.zeros_like(grad_q)) and grad_k.shape == k.shape


def test_empty_batch(attention_tier):
    dtype = tier_float(attention_tier)
    q = make((0, 2, 5, 16), dtype)
    k = make((0, 1, 7, 16), dtype)
    with fusedops.use_backend(attention_tier):
        out = fusedops.attention(q, k, k, causal=True)
    assert out.shape == q.shape
    (grad_q,) = torch.autograd.grad(out.sum(), (q,))
    assert grad_q.shape == q.shape


def test_deterministic_backward_is_bitwise_reproducible(attention_tier):
    dtype = tier_float(attention_tier)
    q, k, v = (make(s, dtype) for s in ((1, 4, 50, 32), (1, 2, 50, 32), (1, 2, 50, 32)))
    grad_out = torch.randn(1, 4, 50, 32, device=DEVICE).to(dtype)

    def grads():
        with fusedops.use_backend(attention_tier):
            out = fusedops.attention(q, k, v, causal=True, window=(20, 0), deterministic=True)
        return torch.autograd.grad(out, (q, k, v), grad_out)

    first, second = grads(), grads()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, _ = reference(*ref_inputs, True, (20, 0))
    for name, got, want in zip(("grad_q", "grad_k", "grad_v"), first,
                               torch.autograd.grad(ref_out, ref_inputs, grad_out.double())):
        assert_close(got, want, dtype, f"deterministic {name}")


@pytest.mark.parametrize("how", ["argument", "use_deterministic_algorithms", "default"])
def test_deterministic_reaches_the_kernels(attention_tier, how, monkeypatch):
    """deterministic=True and torch.use_deterministic_algorithms(True) both reach the tier's
    attention_bwd (the Triton tier then computes dQ in its own kernel, without atomics)."""
    dtype = tier_float(attention_tier)
    seen = []
    tier_module = fusedops.dispatch.TIERS[attention_tier]
    original = tier_module.attention_bwd

    def spy(*args):
        seen.append(args[-1])
        return original(*args)

    monkeypatch.setattr(tier_module, "attention_bwd", spy)
    q = make((1, 2, 9, 16), dtype)
    with fusedops.use_backend(attention_tier):
        if how == "use_deterministic_algorithms":
            previous = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(True)
            try:
                out = fusedops.attention(q, q, q)
            finally:
                torch.use_deterministic_algorithms(previous)
        else:
            out = fusedops.attention(q, q, q, deterministic=how == "argument")
    torch.autograd.grad(out.sum(), (q,))
    assert seen == [how != "default"]


def test_no_grad_saves_nothing(attention_tier):
    dtype = tier_float(attention_tier)
    q = make((1, 2, 17, 16), dtype, requires_grad=False)
    with fusedops.use_backend(attention_tier), torch.no_grad():
        out = fusedops.attention(q, q, q)
    assert out.grad_fn is None and not out.requires_grad


def test_autocast_casts_like_sdpa():
    q = make((1, 2, 9, 16), torch.float32)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = fusedops.attention(q, q, q)
        expected = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert out.dtype == expected.dtype == torch.bfloat16


# --- varlen -----------------------------------------------------------------------------

VARLEN_CASES = [
    # lengths of q and k per sequence, Hq, Hkv, D, causal, window
    ([5, 0, 40, 1, 33], [7, 3, 40, 0, 20], 4, 2, 32, False, None),
    ([5, 0, 40, 1, 33], [7, 3, 40, 0, 20], 4, 2, 32, True, None),
    ([17, 1, 64], [17, 1, 64], 2, 1, 64, False, (5, 2)),
    ([1], [1], 1, 1, 16, True, None),
    ([0, 0], [3, 0], 2, 2, 16, False, None),
]


def cumulative(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                        device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[5]}-{c[6]}")
def test_varlen_matches_per_sequence_math(attention_tier, case, dtype):
    skip_unsupported(attention_tier, dtype)
    lengths_q, lengths_k, heads_q, heads_kv, head_dim, causal, window = case
    cu_q, cu_k = cumulative(lengths_q), cumulative(lengths_k)
    q = make((sum(lengths_q), heads_q, head_dim), dtype)
    k = make((sum(lengths_k), heads_kv, head_dim), dtype)
    v = make((sum(lengths_k), heads_kv, head_dim), dtype)
    grad_out = torch.randn(q.shape, device=DEVICE).to(dtype)
    with fusedops.use_backend(attention_tier):
        out, lse = fusedops.attention_varlen(q, k, v, cu_q, cu_k, max(lengths_q),
                                             max(lengths_k), causal=causal, window=window,
                                             return_lse=True)
    assert out.shape == q.shape and lse.shape == (heads_q, q.shape[0])
    grads = torch.autograd.grad(out, (q, k, v), grad_out) if out.numel() else None

    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = [], []
    for b in range(len(lengths_q)):
        rows_q = slice(int(cu_q[b]), int(cu_q[b + 1]))
        rows_k = slice(int(cu_k[b]), int(cu_k[b + 1]))
        o, lse_b = reference(*(t[rows].transpose(0, 1) for t, rows in
                               zip(ref_inputs, (rows_q, rows_k, rows_k))), causal, window)
        ref_out.append(o.transpose(0, 1))
        ref_lse.append(lse_b)
    ref_out, ref_lse = torch.cat(ref_out), torch.cat(ref_lse, dim=1)
    assert_close(out, ref_out, dtype, "out")
    sees_none = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), sees_none)
    assert_close(torch.where(sees_none, 0.0, lse.double()), torch.where(sees_none, 0.0, ref_lse),
                 torch.float32 if dtype == torch.float32 else dtype, "lse")
    if grads is None:
        return
    ref_grads = torch.autograd.grad(ref_out, ref_inputs, grad_out.double(), allow_unused=True)
    for name, grad, ref_grad, like in zip(("grad_q", "grad_k", "grad_v"), grads, ref_grads,
                                          ref_inputs):
        ref_grad = torch.zeros_like(like) if ref_grad is None else ref_grad
        assert torch.isfinite(grad).all(), name
        assert_close(grad, ref_grad, dtype, name)


# --- custom ops and torch.compile -------------------------------------------------------


def _ops(tier):
    module = fusedops.dispatch.TIERS[tier]
    if tier == "cuda":
        module.load()
    return (getattr(torch.ops.fusedops, f"attention_fwd_{tier}").default,
            getattr(torch.ops.fusedops, f"attention_bwd_{tier}").default)


@pytest.mark.parametrize("packed", [False, True], ids=["batched", "packed"])
def test_opcheck(attention_tier, packed):
    fwd_op, bwd_op = _ops(attention_tier)
    unbounded = attention_contract.UNBOUNDED
    dtype = tier_float(attention_tier)
    if packed:
        cu = cumulative([3, 0, 14])
        q, k, v = (torch.randn(17, h, 32, device=DEVICE, dtype=dtype) for h in (4, 2, 2))
        sizes = (cu, cu, 14, 14)
    else:
        q = torch.randn(2, 4, 13, 32, device=DEVICE, dtype=dtype)
        k, v = (torch.randn(2, 2, 21, 32, device=DEVICE, dtype=dtype) for _ in range(2))
        sizes = (None, None, 13, 21)
    fwd_args = (q, k, v, *sizes, 0.2, unbounded, 0, False)
    torch.library.opcheck(fwd_op, fwd_args)
    out, lse = fwd_op(*fwd_args)
    torch.library.opcheck(bwd_op, (torch.randn_like(out), q, k, v, out, lse, *sizes, 0.2,
                                   unbounded, 0, False, True))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiles_without_graph_breaks(attention_tier, backend):
    dtype = tier_float(attention_tier)
    torch._dynamo.reset()
    q, k, v = (make(s, dtype) for s in ((1, 4, 19, 32), (1, 2, 23, 32), (1, 2, 23, 32)))

    def step(q, k, v):
        with fusedops.use_backend(attention_tier):
            out = fusedops.attention(q, k, v, causal=True, window=(6, 0))
        return out.square().sum()

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    grads = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    expected = torch.autograd.grad(step(q, k, v), (q, k, v))
    for got, want in zip(grads, expected):
        assert_close(got, want, dtype, "compiled grad")


def test_varlen_compiles_without_graph_breaks(attention_tier):
    dtype = tier_float(attention_tier)
    torch._dynamo.reset()
    cu = cumulative([4, 9])
    q, k, v = (make((13, h, 16), dtype) for h in (2, 1, 1))

    def step(q, k, v, cu):
        with fusedops.use_backend(attention_tier):
            return fusedops.attention_varlen(q, k, v, cu, cu, 9, 9, causal=True).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert_close(compiled(q, k, v, cu), step(q, k, v, cu), dtype, "compiled out")


# --- GPU only ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.large
def test_more_than_2_to_the_31_elements(attention_tier):
    """q, k, v, out and their gradients each hold more than 2**31 elements (64-bit offsets);
    a float64 reference checks the first and the last batch entries."""
    batch, seqlen, head_dim = 32769, 512, 128  # 32769 * 512 * 128 > 2**31
    q, k, v = (torch.randn(batch, 1, seqlen, head_dim, device=DEVICE, dtype=torch.bfloat16)
               for _ in range(3))
    assert q.numel() > 2 ** 31
    with fusedops.use_backend(attention_tier):
        out = fusedops.attention(q, k, v, causal=True)
    for index in (0, batch - 1):
        ref, _ = reference(q[index:index + 1].double(), k[index:index + 1].double(),
                           v[index:index + 1].double(), True, None)
        assert_close(out[index:index + 1], ref, torch.bfloat16, f"out[{index}]")


@pytest.mark.gpu
def test_cuda_graph_capture(attention_tier):
    q, k, v = (make(s, torch.bfloat16) for s in ((2, 8, 300, 64), (2, 2, 300, 64),
                                                 (2, 2, 300, 64)))
    grad_out = torch.randn(2, 8, 300, 64, device=DEVICE, dtype=torch.bfloat16)

    def step():
        with fusedops.use_backend(attention_tier):
            out = fusedops.attention(q, k, v, causal=True)
        return (out, *torch.autograd.grad(out, (q, k, v), grad_out))

    expected = step()  # warm-up: autotuning happens outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, expected):
        assert torch.equal(got, want)


def test_one_tensor_as_q_k_and_v(attention_tier):
    """Self-attention on one tensor: its gradient sums the q, k and v gradients."""
    dtype = tier_float(attention_tier)
    x = make((1, 2, 21, 16), dtype)
    with fusedops.use_backend(attention_tier):
        out = fusedops.attention(x, x, x, causal=True)
    (grad,) = torch.autograd.grad(out.square().sum(), (x,))
    ref_x = x.detach().double().requires_grad_()
    ref_out, _ = reference(ref_x, ref_x, ref_x, True, None)
    (ref_grad,) = torch.autograd.grad(ref_out.square().sum(), (ref_x,))
    assert_close(grad, ref_grad, dtype, "grad of x")

    torch._dynamo.reset()
    compiled = torch.compile(lambda t: fusedops.attention(t, t, t, causal=True).sum(),
                             fullgraph=True, backend="aot_eager")
    with fusedops.use_backend(attention_tier):
        assert_close(compiled(x), out.sum(), dtype, "compiled")


def test_malformed_cu_seqlens_stay_in_bounds(attention_tier):
    """The kernel level never checks cu_seqlens (that needs a host sync): decreasing offsets
    and offsets past either end are clamped to [0, T), and a sequence longer than max_seqlen
    is cut short. The call must not fault (on a GPU the sanitizer stage runs this under
    compute-sanitizer), and the well-formed first sequence, which no other overlaps, keeps
    its exact result."""
    tier = fusedops.dispatch.TIERS[attention_tier]
    tokens, heads, head_dim = 30, 2, 16
    q, k, v = (torch.randn(tokens, heads, head_dim, device=DEVICE) for _ in range(3))
    unbounded = attention_contract.UNBOUNDED
    malformed = torch.tensor([0, 7, 20, 15, 1000, -5], dtype=torch.int32, device=DEVICE)
    out, lse = tier.attention_fwd(q, k, v, malformed, malformed, 8, 8, 0.25, unbounded, 0,
                                  False)
    grads = tier.attention_bwd(torch.randn_like(out), q, k, v, out, lse, malformed, malformed,
                               8, 8, 0.25, unbounded, 0, False, False)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    assert out.shape == q.shape and all(g.shape == q.shape for g in grads)
    ref_out, ref_lse = reference(*(t[:7].transpose(0, 1).double() for t in (q, k, v)), True,
                                 None, 0.25)
    assert_close(out[:7], ref_out.transpose(0, 1), torch.float32, "out of the first sequence")
    assert_close(lse[:, :7], ref_lse, torch.float32, "lse of the first sequence")


@pytest.mark.gpu
def test_varlen_long_packed_batch(attention_tier):
    lengths = [4097, 1, 0, 2500, 333]
    cu = cumulative(lengths)
    q, k, v = (make((sum(lengths), h, 128), torch.bfloat16) for h in (8, 2, 2))
    with fusedops.use_backend(attention_tier):
        out = fusedops.attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths),
                                        causal=True, window=(1024, 0))
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    for b in (0, 3):
        rows = slice(int(cu[b]), int(cu[b + 1]))
        ref, _ = reference(*(t[rows].transpose(0, 1) for t in ref_inputs), True, (1024, 0))
        assert_close(out[rows], ref.transpose(0, 1), torch.bfloat16, f"out of sequence {b}")
    assert all(torch.isfinite(g).all() for g in grads)
