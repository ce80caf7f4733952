"""Bad input to fusedops.attention and attention_varlen: a clear error naming the argument,
raised before any tier is launched; and the accepted window forms, with their meaning."""

import pytest
import torch
from conftest import DEVICE
from reference import assert_close

import fusedops

B, HQ, HKV, SQ, SK, D = 2, 4, 2, 5, 9, 16


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def int32(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


@pytest.fixture
def no_launch(monkeypatch):
    """Any tier's attention kernel-level function fails the test if it is reached."""
    def launched(*args, **kwargs):
        raise AssertionError("a tier was launched before the arguments were checked")

    for tier in fusedops.dispatch.TIERS.values():
        for name in ("attention_fwd", "attention_bwd"):
            monkeypatch.setattr(tier, name, launched, raising=False)


# The checks come before backend selection, so a forced tier (available or not) must not
# change which error a bad call gets.
ERROR_BACKENDS = ["auto", "triton"]


# --- fusedops.attention ----------------------------------------------------------------

def attention_call():
    return dict(q=randn(B, HQ, SQ, D), k=randn(B, HKV, SK, D), v=randn(B, HKV, SK, D))


BAD_ATTENTION = {
    "q not a tensor": (dict(q=[[1.0]]), TypeError, "q must be a Tensor"),
    "k not a tensor": (dict(k=None), TypeError, "k must be a Tensor"),
    "v not a tensor": (dict(v=1.0), TypeError, "v must be a Tensor"),
    "3-D q": (dict(q=randn(HQ, SQ, D)), ValueError, "q must be 4-D"),
    "3-D k and v": (dict(k=randn(HKV, SK, D), v=randn(HKV, SK, D)), ValueError,
                    "k must be 4-D"),
    "5-D v": (dict(v=randn(1, B, HKV, SK, D)), ValueError, "v must be 4-D"),
    "head dim q != k": (dict(k=randn(B, HKV, SK, 32), v=randn(B, HKV, SK, 32)), ValueError,
                        "same head dim"),
    "k, v shapes differ": (dict(v=randn(B, HKV, SK + 1, D)), ValueError,
                           "k and v must have the same shape"),
    "v head dim differs": (dict(v=randn(B, HKV, SK, 32)), ValueError,
                           "k and v must have the same shape"),
    "Hq % Hkv != 0": (dict(k=randn(B, 3, SK, D), v=randn(B, 3, SK, D)), ValueError,
                      r"heads \(4\) must be a multiple of .* \(3\)"),
    "Hkv = 0": (dict(k=randn(B, 0, SK, D), v=randn(B, 0, SK, D)), ValueError,
                "must be a multiple"),
    "k dtype differs": (dict(k=randn(B, HKV, SK, D, dtype=torch.float16)), TypeError,
                        "k has dtype torch.float16 but q has torch.float32"),
    "v dtype differs": (dict(v=randn(B, HKV, SK, D, dtype=torch.float64)), TypeError,
                        "v has dtype"),
    "int dtype": (dict(q=torch.ones(B, HQ, SQ, D, dtype=torch.int32, device=DEVICE),
                       k=torch.ones(B, HKV, SK, D, dtype=torch.int32, device=DEVICE),
                       v=torch.ones(B, HKV, SK, D, dtype=torch.int32, device=DEVICE)),
                  TypeError, "q must be float16, bfloat16, float32 or float64"),
    "k on another device": (dict(k=torch.empty(B, HKV, SK, D, device="meta")), ValueError,
                            "k is on meta"),
    "q last dim strided": (dict(q=randn(B, HQ, SQ, 2 * D)[..., ::2]), ValueError,
                           "q's last dimension must be contiguous"),
    "v last dim strided": (dict(v=randn(B, HKV, SK, 2 * D)[..., ::2]), ValueError,
                           "v's last dimension must be contiguous"),
    "batch sizes differ": (dict(k=randn(1, HKV, SK, D), v=randn(1, HKV, SK, D)), ValueError,
                           "same batch size, got 2 and 1"),
    "head dim 0": (dict(q=randn(B, HQ, SQ, 0), k=randn(B, HKV, SK, 0), v=randn(B, HKV, SK, 0)),
                   ValueError, "head dim"),
    "window a string": (dict(window="4"), TypeError, "window must be None, an int or"),
    "window a 3-tuple": (dict(window=(1, 2, 3)), TypeError, "window must be None, an int or"),
    "window a 1-tuple": (dict(window=(1,)), TypeError, "window must be None, an int or"),
    "window a float": (dict(window=2.0), TypeError, "window must be None, an int or"),
    "window a bool": (dict(window=True), TypeError, "window must be None, an int or"),
    "window left a float": (dict(window=(1.5, 0)), TypeError, "window's left side"),
    "window right a string": (dict(window=(0, "2")), TypeError, "window's right side"),
    "window right a bool": (dict(window=(2, False)), TypeError, "window's right side"),
    "window left -2": (dict(window=(-2, 0)), ValueError, "window's left side must be >= 0"),
    "window right -5": (dict(window=(3, -5)), ValueError, "window's right side must be >= 0"),
    "window int -3": (dict(window=-3), ValueError, "window's left side must be >= 0"),
    "causal an int": (dict(causal=1), TypeError, "causal must be a bool"),
    "causal a string": (dict(causal="yes"), TypeError, "causal must be a bool"),
    "causal None": (dict(causal=None), TypeError, "causal must be a bool"),
    "return_lse an int": (dict(return_lse=1), TypeError, "return_lse must be a bool"),
    "return_lse None": (dict(return_lse=None), TypeError, "return_lse must be a bool"),
    "deterministic a string": (dict(deterministic="no"), TypeError,
                               "deterministic must be a bool"),
    "scale a string": (dict(scale="0.5"), TypeError, "scale must be a float"),
    "scale a bool": (dict(scale=True), TypeError, "scale must be a float"),
    "scale a list": (dict(scale=[0.5]), TypeError, "scale must be a float"),
    "scale complex": (dict(scale=0.5j), TypeError, "scale must be a float"),
}


@pytest.mark.parametrize("backend_name", ERROR_BACKENDS)
@pytest.mark.parametrize("case", list(BAD_ATTENTION), ids=str)
def test_attention_bad_input(no_launch, case, backend_name):
    overrides, error, message = BAD_ATTENTION[case]
    kwargs = attention_call()
    kwargs.update(overrides)
    args = (kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"))
    with fusedops.use_backend(backend_name), pytest.raises(error, match=message) as raised:
        fusedops.attention(*args, **kwargs)
    assert str(raised.value).startswith("fusedops.attention: ")


# --- fusedops.attention_varlen ---------------------------------------------------------

TQ, TK = 7, 9  # two sequences: 3 + 4 queries, 4 + 5 keys


def varlen_call():
    return dict(q=randn(TQ, HQ, D), k=randn(TK, HKV, D), v=randn(TK, HKV, D),
                cu_seqlens_q=int32([0, 3, 7]), cu_seqlens_k=int32([0, 4, 9]),
                max_seqlen_q=4, max_seqlen_k=5)


BAD_VARLEN = {
    "q not a tensor": (dict(q=[[[1.0]]]), TypeError, "q must be a Tensor"),
    "4-D q": (dict(q=randn(1, TQ, HQ, D)), ValueError, "q must be 3-D"),
    "4-D k and v": (dict(k=randn(1, TK, HKV, D), v=randn(1, TK, HKV, D)), ValueError,
                    "k must be 3-D"),
    "2-D v": (dict(v=randn(TK, D)), ValueError, "v must be 3-D"),
    "head dim q != k": (dict(k=randn(TK, HKV, 32), v=randn(TK, HKV, 32)), ValueError,
                        "same head dim"),
    "k, v shapes differ": (dict(v=randn(TK - 1, HKV, D)), ValueError,
                           "k and v must have the same shape"),
    "Hq % Hkv != 0": (dict(k=randn(TK, 3, D), v=randn(TK, 3, D)), ValueError,
                      "must be a multiple"),
    "dtype differs": (dict(v=randn(TK, HKV, D, dtype=torch.float16)), TypeError,
                      "v has dtype"),
    "int dtype": (dict(q=torch.ones(TQ, HQ, D, dtype=torch.int64, device=DEVICE)), TypeError,
                  "q must be float16"),
    "q last dim strided": (dict(q=randn(TQ, HQ, 2 * D)[..., ::2]), ValueError,
                           "q's last dimension must be contiguous"),
    "head dim 0": (dict(q=randn(TQ, HQ, 0), k=randn(TK, HKV, 0), v=randn(TK, HKV, 0)),
                   ValueError, "head dim"),
    "cu_seqlens_q a list": (dict(cu_seqlens_q=[0, 3, 7]), TypeError,
                            "cu_seqlens_q must be a Tensor"),
    "cu_seqlens_q int64": (dict(cu_seqlens_q=int32([0, 3, 7]).long()), TypeError,
                           "cu_seqlens_q must be int32, got torch.int64"),
    "cu_seqlens_k int64": (dict(cu_seqlens_k=int32([0, 4, 9]).long()), TypeError,
                           "cu_seqlens_k must be int32"),
    "cu_seqlens_k float": (dict(cu_seqlens_k=int32([0, 4, 9]).float()), TypeError,
                           "cu_seqlens_k must be int32"),
    "cu_seqlens_q 2-D": (dict(cu_seqlens_q=int32([[0, 3, 7]])), ValueError,
                         "cu_seqlens_q must be 1-D"),
    "cu_seqlens_k 0-D": (dict(cu_seqlens_k=int32(9)), ValueError, "cu_seqlens_k must be 1-D"),
    "cu_seqlens_q empty": (dict(cu_seqlens_q=int32([])), ValueError,
                           "cu_seqlens_q must be 1-D"),
    "cu_seqlens_q strided": (dict(cu_seqlens_q=int32([0, 0, 3, 3, 7, 7])[::2]), ValueError,
                             "cu_seqlens_q must be contiguous"),
    "cu_seqlens_k on another device": (dict(cu_seqlens_k=torch.empty(3, dtype=torch.int32,
                                                                     device="meta")),
                                       ValueError, "cu_seqlens_k is on meta"),
    "cu_seqlens lengths differ": (dict(cu_seqlens_k=int32([0, 9]), max_seqlen_k=9), ValueError,
                                  "cu_seqlens_q and cu_seqlens_k must describe the same"),
    "max_seqlen_q negative": (dict(max_seqlen_q=-1), ValueError,
                              "max_seqlen for cu_seqlens_q must be >= 0"),
    "max_seqlen_k negative": (dict(max_seqlen_k=-5), ValueError,
                              "max_seqlen for cu_seqlens_k must be >= 0"),
    "max_seqlen_k a float": (dict(max_seqlen_k=5.0), TypeError,
                             "max_seqlen for cu_seqlens_k must be an int"),
    "max_seqlen_q a bool": (dict(max_seqlen_q=True), TypeError,
                            "max_seqlen for cu_seqlens_q must be an int"),
    "max_seqlen_q a tensor": (dict(max_seqlen_q=torch.tensor(4)), TypeError,
                              "max_seqlen for cu_seqlens_q must be an int"),
    "cu_seqlens_q not from 0": (dict(cu_seqlens_q=int32([1, 3, 7])), ValueError,
                                r"cu_seqlens_q must start at 0.*got \[1, 3, 7\]"),
    "cu_seqlens_q decreasing": (dict(cu_seqlens_q=int32([0, 5, 3, 7]),
                                     cu_seqlens_k=int32([0, 4, 6, 9])), ValueError,
                                r"cu_seqlens_q must .*never decrease.*got \[0, 5, 3, 7\]"),
    "cu_seqlens_k decreasing": (dict(cu_seqlens_k=int32([0, 6, 2])), ValueError,
                                r"cu_seqlens_k must .*never decrease"),
    "cu_seqlens_q short of the tokens": (dict(cu_seqlens_q=int32([0, 3, 6])), ValueError,
                                         r"cu_seqlens_q must .*end at the number of tokens \(7\)"),
    "cu_seqlens_k past the tokens": (dict(cu_seqlens_k=int32([0, 4, 10])), ValueError,
                                     r"cu_seqlens_k must .*end at the number of tokens \(9\)"),
    "sequence longer than max_seqlen_q": (dict(max_seqlen_q=3), ValueError,
                                          "cu_seqlens_q has a sequence of 4 tokens, longer "
                                          "than max_seqlen 3"),
    "sequence longer than max_seqlen_k": (dict(max_seqlen_k=4), ValueError,
                                          "cu_seqlens_k has a sequence of 5 tokens"),
    "window a string": (dict(window="full"), TypeError, "window must be None, an int or"),
    "window a 3-tuple": (dict(window=(1, 0, 1)), TypeError, "window must be None, an int or"),
    "window a float": (dict(window=3.5), TypeError, "window must be None, an int or"),
    "window right -2": (dict(window=(1, -2)), ValueError, "window's right side must be >= 0"),
    "causal an int": (dict(causal=0), TypeError, "causal must be a bool"),
    "return_lse a string": (dict(return_lse="yes"), TypeError, "return_lse must be a bool"),
    "scale a string": (dict(scale="1"), TypeError, "scale must be a float"),
}


@pytest.mark.parametrize("backend_name", ERROR_BACKENDS)
@pytest.mark.parametrize("case", list(BAD_VARLEN), ids=str)
def test_attention_varlen_bad_input(no_launch, monkeypatch, case, backend_name):
    if DEVICE.type != "cpu":  # on a GPU the contents of cu_seqlens are checked when asked
        monkeypatch.setenv("FUSEDOPS_DEBUG", "1")
    overrides, error, message = BAD_VARLEN[case]
    kwargs = varlen_call()
    kwargs.update(overrides)
    args = [kwargs.pop(name) for name in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k",
                                          "max_seqlen_q", "max_seqlen_k")]
    with fusedops.use_backend(backend_name), pytest.raises(error, match=message) as raised:
        fusedops.attention_varlen(*args, **kwargs)
    assert str(raised.value).startswith("fusedops.attention_varlen: ")


def test_good_calls_pass_the_checks(no_launch):
    """The baselines the bad calls are made from are themselves accepted (they reach the
    launch, which no_launch turns into an AssertionError)."""
    with pytest.raises(AssertionError, match="a tier was launched"):
        fusedops.attention(**attention_call())
    call = varlen_call()
    with pytest.raises(AssertionError, match="a tier was launched"):
        fusedops.attention_varlen(*call.values())


# --- the accepted window forms, and what they mean -------------------------------------

def reference(q, k, v, scale, left, right):
    """float64 attention with DESIGN's semantics: bottom-right aligned, query i sees keys
    i + Sk - Sq - left <= j <= i + Sk - Sq + right (None: no limit); a query that sees no
    key gets 0 and lse -inf. Returns (out, lse)."""
    seqlen_q, seqlen_k = q.shape[-2], k.shape[-2]
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, -3), v.repeat_interleave(group, -3)
    position = torch.arange(seqlen_q, device=q.device)[:, None] + seqlen_k - seqlen_q
    key = torch.arange(seqlen_k, device=q.device)[None, :]
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
    if left is not None:
        visible &= key >= position - left
    if right is not None:
        visible &= key <= position + right
    sees_a_key = visible.any(-1, keepdim=True)
    # A row that sees nothing is computed as if it saw everything, then zeroed: no NaN.
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~(visible | ~sees_a_key),
                                                           float("-inf"))
    out = torch.softmax(scores, -1) @ v * sees_a_key
    lse = torch.logsumexp(scores, -1).masked_fill(~sees_a_key[:, 0], float("-inf"))
    return out, lse


# (window, causal) -> the (left, right) it means; None is no limit.
WINDOWS = {
    "None": (None, False, (None, None)),
    "-1": (-1, False, (None, None)),
    "int 2": (2, False, (2, 2)),
    "int 0": (0, False, (0, 0)),
    "(3, 0)": ((3, 0), False, (3, 0)),
    "(-1, 3)": ((-1, 3), False, (None, 3)),
    "(None, 2)": ((None, 2), False, (None, 2)),
    "[1, None]": ([1, None], False, (1, None)),
    "(2, -1)": ((2, -1), False, (2, None)),
    "causal": (None, True, (None, 0)),
    "causal (3, 5)": ((3, 5), True, (3, 0)),
    "causal int 2": (2, True, (2, 0)),
    "causal (None, 4)": ((None, 4), True, (None, 0)),
}


@pytest.fixture
def attention_tier(tier):
    if not hasattr(fusedops.dispatch.TIERS[tier], "attention_fwd"):
        pytest.skip(f"the {tier} tier has no attention yet")
    return tier


@pytest.mark.parametrize("lengths", [(5, 9), (9, 5)], ids=["Sq5_Sk9", "Sq9_Sk5"])
@pytest.mark.parametrize("case", list(WINDOWS), ids=str)
def test_accepted_windows_mean_what_design_says(attention_tier, case, lengths):
    window, causal, (left, right) = WINDOWS[case]
    seqlen_q, seqlen_k = lengths
    scale = 0.4
    inputs = (randn(B, HQ, seqlen_q, D), randn(B, HKV, seqlen_k, D), randn(B, HKV, seqlen_k, D))
    ours = [t.clone().requires_grad_() for t in inputs]
    exact = [t.double().requires_grad_() for t in inputs]
    with fusedops.use_backend(attention_tier):
        out, lse = fusedops.attention(*ours, causal=causal, scale=scale, window=window,
                                      return_lse=True)
    ref_out, ref_lse = reference(*exact, scale, left, right)
    assert lse.dtype == torch.float32 and lse.shape == (B, HQ, seqlen_q)
    assert_close(out, ref_out, torch.float32, "output")
    assert_close(lse, ref_lse, torch.float32, "lse")
    upstream = randn(*out.shape)
    out.backward(upstream)
    ref_out.backward(upstream.double())
    for name, mine, expected in zip("qkv", ours, exact):
        assert_close(mine.grad, expected.grad, torch.float32, f"grad of {name}")


def test_window_semantics_varlen(attention_tier):
    """attention_varlen means the same per sequence, empty sequences included."""
    cu_q, cu_k = [0, 3, 3, 8, 10], [0, 4, 6, 6, 11]
    q, k, v = randn(10, HQ, D), randn(11, HKV, D), randn(11, HKV, D)
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    with fusedops.use_backend(attention_tier):
        out, lse = fusedops.attention_varlen(*ours, int32(cu_q), int32(cu_k), 5, 5,
                                             causal=True, window=(2, 7), return_lse=True)
    parts, lse_parts = [], []
    for b in range(len(cu_q) - 1):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        part, part_lse = reference(*(t[s].transpose(0, 1) for t, s in
                                     zip(exact, (rows, keys, keys))), D ** -0.5, 2, 0)
        parts.append(part.transpose(0, 1))
        lse_parts.append(part_lse)
    ref_out, ref_lse = torch.cat(parts), torch.cat(lse_parts, dim=-1)
    assert lse.shape == (HQ, 10)
    assert_close(out, ref_out, torch.float32, "output")
    assert_close(lse, ref_lse, torch.float32, "lse")
    upstream = randn(*out.shape)
    out.backward(upstream)
    ref_out.backward(upstream.double())
    for name, mine, expected in zip("qkv", ours, exact):
        assert_close(mine.grad, expected.grad, torch.float32, f"grad of {name}")


@pytest.mark.parametrize("packed", [False, True], ids=["batched", "varlen"])
def test_zero_heads_gives_an_empty_output(attention_tier, packed):
    """Hq = Hkv = 0 passes the checks (0 is a multiple of 0 heads, as torch's SDPA accepts),
    so it must give the empty output, the empty lse and empty gradients."""
    if packed:
        q, k, v = (randn(7, 0, D, dtype=torch.float32).requires_grad_() for _ in range(3))
        with fusedops.use_backend(attention_tier):
            out, lse = fusedops.attention_varlen(q, k, v, int32([0, 3, 7]), int32([0, 3, 7]),
                                                 4, 4, return_lse=True)
        assert out.shape == (7, 0, D) and lse.shape == (0, 7)
    else:
        q, k, v = (randn(B, 0, SQ, D).requires_grad_() for _ in range(3))
        with fusedops.use_backend(attention_tier):
            out, lse = fusedops.attention(q, k, v, causal=True, return_lse=True)
        assert out.shape == (B, 0, SQ, D) and lse.shape == (B, 0, SQ)
    out.sum().backward()
    assert all(t.grad is not None and t.grad.shape == t.shape for t in (q, k, v))
