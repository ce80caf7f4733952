"""Bad input to fusedops.conv2d: a clear error that names the argument, raised before any
tier is selected or launched."""

import pytest
import torch
from conftest import DEVICE

import fusedops

N, C, H, W, K = 2, 5, 9, 13, 7
OUT_H, OUT_W = H - 2, W - 2  # a 3x3 kernel, stride 1, no padding


def randn(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(*shape, dtype=dtype, device=device)


@pytest.fixture
def no_launch(monkeypatch):
    """Any tier's convolution kernel-level function fails the test if it is reached."""
    def launched(*args, **kwargs):
        raise AssertionError("a tier was launched before the arguments were checked")

    for tier in fusedops.dispatch.TIERS.values():
        for name in ("conv2d_fwd", "conv2d_bwd"):
            monkeypatch.setattr(tier, name, launched, raising=False)


# The checks come before backend selection, so forcing a tier (available here or not, with
# a convolution or not) must not change which error a bad call gets.
ERROR_BACKENDS = ["auto", "triton", "cuda"]


def conv_call():
    return dict(input=randn(N, C, H, W), weight=randn(K, C, 3, 3), bias=randn(K),
                residual=randn(N, K, OUT_H, OUT_W))


def bad(name, overrides, error, message, xfail=None):
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(overrides, error, message, id=name, marks=marks)


BAD_CALLS = [
    # Non-tensor arguments.
    bad("input not a tensor", dict(input=[[1.0]]), TypeError, "input must be a Tensor"),
    bad("weight not a tensor", dict(weight=[[[[1.0]]]]), TypeError, "weight must be a Tensor"),
    bad("bias not a tensor", dict(bias=[1.0] * K), TypeError, "bias must be a Tensor or None"),
    bad("bias a number", dict(bias=1.0), TypeError, "bias must be a Tensor or None"),
    bad("residual not a tensor", dict(residual=0.5), TypeError,
        "residual must be a Tensor or None"),
    # Ranks.
    bad("2-D input", dict(input=randn(C, H)), ValueError, r"input must be 4-D .* or 3-D"),
    bad("5-D input", dict(input=randn(1, N, C, H, W)), ValueError, "input must be 4-D"),
    bad("3-D weight", dict(weight=randn(K, C, 3)), ValueError, "weight must be 4-D"),
    bad("5-D weight", dict(weight=randn(K, C, 3, 3, 1)), ValueError, "weight must be 4-D"),
    # Channels and groups.
    bad("channel mismatch", dict(weight=randn(K, C - 1, 3, 3)), ValueError,
        r"input has 5 channels but weight expects 4"),
    bad("channel mismatch with groups",
        dict(input=randn(N, 6, H, W), weight=randn(6, 2, 3, 3), groups=2,
             residual=randn(N, 6, OUT_H, OUT_W)),
        ValueError, r"input has 6 channels but weight expects 4 .*groups = 2"),
    bad("groups not dividing in_channels", dict(weight=randn(8, 2, 3, 3), groups=2),
        ValueError, r"in_channels \(5\) .* divisible by groups \(2\)"),
    bad("groups not dividing out_channels",
        dict(input=randn(N, 6, H, W), weight=randn(K, 3, 3, 3), groups=2), ValueError,
        r"out_channels \(7\) must be divisible by groups \(2\)"),
    bad("groups 0", dict(groups=0), ValueError, "groups must be a positive int"),
    bad("groups -1", dict(groups=-1), ValueError, "groups must be a positive int"),
    bad("groups a float", dict(groups=1.0), TypeError, "groups must be"),
    bad("groups a string", dict(groups="1"), (TypeError, ValueError), "groups must be"),
    bad("no output channels", dict(weight=randn(0, C, 3, 3), bias=None, residual=None),
        ValueError, "weight of shape .* has an empty dimension"),
    bad("empty kernel", dict(weight=randn(K, C, 0, 3)), ValueError,
        "weight of shape .* has an empty dimension"),
    bad("no input channels",
        dict(input=randn(N, 0, H, W), weight=randn(K, 0, 3, 3)), ValueError,
        "(input|weight|channels)"),
    # stride, padding, dilation.
    bad("stride 0", dict(stride=0), ValueError, r"stride must be >= 1, got \(0, 0\)"),
    bad("stride negative", dict(stride=(1, -2)), ValueError, "stride must be >= 1"),
    bad("stride 3-tuple", dict(stride=(1, 1, 1)), TypeError,
        "stride must be an int or a pair of ints"),
    bad("stride empty tuple", dict(stride=()), TypeError, "stride must be an int or a pair"),
    bad("stride a float", dict(stride=1.5), TypeError, "stride must be an int or a pair"),
    bad("stride pair of floats", dict(stride=(1.0, 1.0)), TypeError, "stride must be an int"),
    bad("stride a bool", dict(stride=True), TypeError, "stride must be an int or a pair"),
    bad("stride a string", dict(stride="2"), TypeError, "stride must be an int or a pair"),
    bad("padding negative", dict(padding=-1), ValueError, "padding must be >= 0"),
    bad("padding pair negative", dict(padding=(1, -1)), ValueError, "padding must be >= 0"),
    bad("padding a float", dict(padding=1.0), TypeError, "padding must be an int or a pair"),
    bad("padding 3-tuple", dict(padding=(1, 1, 1)), TypeError,
        "padding must be an int or a pair"),
    bad("padding 4-tuple", dict(padding=(0, 0, 1, 1)), TypeError,
        "padding must be an int or a pair"),
    bad("padding unknown string", dict(padding="full"), ValueError,
        "padding must be an int, a pair, 'same' or 'valid', got 'full'"),
    bad("padding same, stride 2", dict(padding="same", stride=2, residual=None), ValueError,
        "padding='same' is not supported for strided convolutions"),
    bad("padding same, stride (1, 2)", dict(padding="same", stride=(1, 2), residual=None),
        ValueError, "padding='same'"),
    bad("dilation 0", dict(dilation=0), ValueError, "dilation must be >= 1"),
    bad("dilation negative", dict(dilation=(2, -1)), ValueError, "dilation must be >= 1"),
    bad("dilation a float", dict(dilation=2.0), TypeError, "dilation must be an int or a pair"),
    bad("dilation 3-tuple", dict(dilation=(1, 1, 1)), TypeError,
        "dilation must be an int or a pair"),
    # The output size.
    bad("output below 1", dict(input=randn(N, C, 2, 2), residual=None), ValueError,
        r"the output would be 0 x 0"),
    bad("output below 1 by dilation", dict(dilation=(5, 1), residual=None), ValueError,
        r"the output would be -1 x 11"),
    bad("output below 1 by stride and width", dict(input=randn(N, C, H, 2), stride=3,
                                                   residual=None),
        ValueError, r"the output would be 3 x 0"),
    # residual.
    bad("residual shape", dict(residual=randn(N, K, H, W)), ValueError,
        r"residual must have the output's shape \(2, 7, 7, 11\), got \(2, 7, 9, 13\)"),
    bad("residual unbatched for a batch", dict(residual=randn(K, OUT_H, OUT_W)), ValueError,
        "residual must have the output's shape"),
    bad("residual broadcastable", dict(residual=randn(K, 1, 1)), ValueError,
        "residual must have the output's shape"),
    bad("residual dtype", dict(residual=randn(N, K, OUT_H, OUT_W, dtype=torch.float16)),
        TypeError, "residual has dtype torch.float16 but input has torch.float32"),
    bad("residual device", dict(residual=randn(N, K, OUT_H, OUT_W, device="meta")),
        ValueError, "residual is on meta"),
    # bias.
    bad("bias shape", dict(bias=randn(K - 1)), ValueError, r"bias must have shape \(7,\)"),
    bad("bias 2-D", dict(bias=randn(K, 1)), ValueError, r"bias must have shape \(7,\)"),
    bad("bias scalar", dict(bias=torch.tensor(1.0, device=DEVICE)), ValueError,
        r"bias must have shape \(7,\)"),
    bad("bias dtype", dict(bias=randn(K, dtype=torch.float64)), TypeError,
        "bias has dtype torch.float64 but input has torch.float32"),
    bad("bias device", dict(bias=randn(K, device="meta")), ValueError, "bias is on meta"),
    # dtypes and devices of input and weight.
    bad("weight dtype", dict(weight=randn(K, C, 3, 3, dtype=torch.float16)), TypeError,
        "weight has dtype torch.float16 but input has torch.float32"),
    bad("weight device", dict(weight=randn(K, C, 3, 3, device="meta")), ValueError,
        "weight is on meta"),
    bad("integer input", dict(input=torch.ones(N, C, H, W, dtype=torch.int32, device=DEVICE),
                              weight=torch.ones(K, C, 3, 3, dtype=torch.int32, device=DEVICE),
                              bias=None, residual=None),
        TypeError, "input must be float16, bfloat16, float32 or float64, got torch.int32"),
    bad("integer weight", dict(weight=torch.ones(K, C, 3, 3, dtype=torch.int64,
                                                 device=DEVICE)),
        TypeError, "weight has dtype torch.int64"),
    bad("bool input", dict(input=torch.ones(N, C, H, W, dtype=torch.bool, device=DEVICE)),
        TypeError, "input must be float16"),
    bad("complex input", dict(input=randn(N, C, H, W, dtype=torch.complex64),
                              weight=randn(K, C, 3, 3, dtype=torch.complex64), bias=None,
                              residual=None),
        TypeError, "input must be float16"),
    # activation.
    bad("unknown activation", dict(activation="tanh"), ValueError,
        r"activation must be one of \(None, 'relu', 'gelu', 'gelu_tanh', 'silu'\), "
        r"got 'tanh'"),
    bad("activation wrong case", dict(activation="ReLU"), ValueError,
        "activation must be one of"),
    bad("activation a function", dict(activation=torch.relu), TypeError,
        "activation must be None or a string"),
]


@pytest.mark.parametrize("backend_name", ERROR_BACKENDS)
@pytest.mark.parametrize("overrides,error,message", BAD_CALLS)
def test_bad_input_is_a_clear_error(no_launch, overrides, error, message, backend_name):
    kwargs = conv_call()
    kwargs.update(overrides)
    args = (kwargs.pop("input"), kwargs.pop("weight"))
    with fusedops.use_backend(backend_name), pytest.raises(error, match=message) as raised:
        fusedops.conv2d(*args, **kwargs)
    assert str(raised.value).startswith("fusedops.conv2d: ")


def test_unbatched_input_with_a_batched_residual(no_launch):
    x, weight = randn(C, H, W), randn(K, C, 3, 3)
    with pytest.raises(ValueError, match=r"residual must have the output's shape \(7, 7, 11\)"):
        fusedops.conv2d(x, weight, residual=randn(1, K, OUT_H, OUT_W))


GOOD_CALLS = {
    "the baseline": {},
    "unbatched": dict(input=randn(C, H, W), residual=randn(K, OUT_H, OUT_W)),
    "no bias, no residual": dict(bias=None, residual=None),
    "padding same": dict(padding="same", residual=randn(N, K, H, W)),
    "padding valid, stride pair": dict(padding="valid", stride=[2, 1],
                                       residual=randn(N, K, 4, OUT_W)),
    "depthwise": dict(weight=randn(2 * C, 1, 3, 3), bias=None, groups=C,
                      residual=randn(N, 2 * C, OUT_H, OUT_W)),
    "float64": dict(input=randn(N, C, H, W, dtype=torch.float64),
                    weight=randn(K, C, 3, 3, dtype=torch.float64), bias=None, residual=None),
    "one output pixel": dict(input=randn(N, C, 3, 3), residual=randn(N, K, 1, 1),
                             activation="silu"),
}


@pytest.mark.parametrize("name", list(GOOD_CALLS), ids=str)
def test_good_calls_pass_the_checks(no_launch, name):
    """The calls the bad ones are made from, and their neighbours, are accepted: they reach
    the launch, which no_launch turns into an AssertionError."""
    kwargs = conv_call()
    kwargs.update(GOOD_CALLS[name])
    args = (kwargs.pop("input"), kwargs.pop("weight"))
    with pytest.raises(AssertionError, match="a tier was launched"):
        fusedops.conv2d(*args, **kwargs)
