"""fusedops.nn.FusedConv2d: a drop-in nn.Conv2d followed by an activation, and
FusedConv2d.from_conv, which shares a conv's parameters or folds an eval-mode BatchNorm2d.

The reference is always torch's own modules (nn.Conv2d, nn.BatchNorm2d) run in float64 on
copies of the same parameters and inputs.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from reference import assert_close

import fusedops
from fusedops.nn import FusedConv2d

# torch's own note on an even kernel with "same" padding (its padded copy), not ours.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


def tier_float(tier):
    """float16 on the CUDA tier (its implicit-GEMM kernels multiply float32 only in tf32,
    which these full-precision tests switch off; compared at float16's tolerance), float32
    elsewhere."""
    return torch.float16 if tier == "cuda" else torch.float32


@pytest.fixture(autouse=True)
def _full_precision(cudnn_full_precision_float32):
    """Every test here compares float32 at 1e-5 (see conftest)."""


def activate(z, activation):
    if activation is None:
        return z
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    return {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[activation](z)


def randomise(module):
    """Non-trivial parameters (and BatchNorm statistics), so that each one matters."""
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
            elif name.endswith("num_batches_tracked"):
                continue
            else:
                tensor.normal_()
        if isinstance(module, torch.nn.Conv2d):
            fan_in = module.weight[0].numel()
            module.weight.mul_(fan_in ** -0.5)
    return module


def as_float64(module):
    return copy.deepcopy(module).double()


# --- a drop-in nn.Conv2d ----------------------------------------------------------------

CONSTRUCTOR_ARGS = {
    "3x3": dict(in_channels=5, out_channels=7, kernel_size=3),
    "pairs": dict(in_channels=4, out_channels=6, kernel_size=(3, 1), stride=(2, 1),
                  padding=(1, 0), dilation=(1, 2)),
    "same-no-bias": dict(in_channels=3, out_channels=5, kernel_size=4, padding="same",
                         bias=False),
    "valid-groups": dict(in_channels=6, out_channels=4, kernel_size=3, padding="valid",
                         groups=2),
    "depthwise-reflect": dict(in_channels=5, out_channels=10, kernel_size=3, padding=1,
                              groups=5, padding_mode="reflect"),
    "circular-float64": dict(in_channels=3, out_channels=3, kernel_size=3, padding=2,
                             dilation=2, padding_mode="circular", dtype=torch.float64),
}


@pytest.mark.parametrize("name", list(CONSTRUCTOR_ARGS), ids=str)
def test_constructor_and_state_dict_match_nn_conv2d(name):
    kwargs = dict(CONSTRUCTOR_ARGS[name], device=DEVICE)
    plain = randomise(torch.nn.Conv2d(**kwargs))
    fused = FusedConv2d(**kwargs, activation="silu")
    assert isinstance(fused, torch.nn.Conv2d)
    assert fused.activation == "silu" and "activation='silu'" in repr(fused)
    for attribute in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                      "dilation", "groups", "padding_mode", "transposed", "output_padding",
                      "_reversed_padding_repeated_twice"):
        assert getattr(fused, attribute) == getattr(plain, attribute), attribute
    assert fused.state_dict().keys() == plain.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert fused.state_dict()[key].shape == value.shape, key
        assert fused.state_dict()[key].dtype == value.dtype, key
    assert (fused.bias is None) == (plain.bias is None)

    # A state_dict loads both ways (strictly), and the two then compute the same thing.
    fused.load_state_dict(plain.state_dict())
    other = torch.nn.Conv2d(**kwargs)
    other.load_state_dict(fused.state_dict())
    x = torch.randn(2, kwargs["in_channels"], 7, 9, device=DEVICE, dtype=plain.weight.dtype)
    ref = F.silu(as_float64(plain)(x.double()))
    assert_close(fused(x), ref, plain.weight.dtype, "fused after loading nn.Conv2d's state")
    assert_close(F.silu(other(x)), ref, plain.weight.dtype, "nn.Conv2d after loading fused's")


def test_bad_activation_is_rejected():
    with pytest.raises(ValueError, match="activation"):
        FusedConv2d(3, 4, 3, activation="tanh")
    with pytest.raises(TypeError, match="activation"):
        FusedConv2d(3, 4, 3, activation=F.relu)


# (padding_mode, padding, stride, dilation, activation, unbatched): every padding mode, each
# with a different padding form and activation.
PADDING_MODES = [
    ("zeros", (1, 2), 1, 1, "gelu", False),
    ("reflect", 1, 2, 1, "relu", False),
    ("replicate", (2, 1), 1, (2, 1), "silu", False),
    ("circular", 2, (1, 2), 1, None, False),
    ("reflect", "same", 1, 1, "gelu_tanh", False),
    ("circular", 1, 1, 1, "relu", True),
]


@pytest.mark.parametrize("padding_mode,padding,stride,dilation,activation,unbatched",
                         PADDING_MODES,
                         ids=[f"{p[0]}-{p[1]}" + ("-unbatched" if p[5] else "")
                              for p in PADDING_MODES])
def test_padding_modes_match_nn_conv2d(conv_tier, padding_mode, padding, stride, dilation,
                                       activation, unbatched):
    kwargs = dict(in_channels=3, out_channels=5, kernel_size=3, stride=stride,
                  padding=padding, dilation=dilation, padding_mode=padding_mode, device=DEVICE)
    dtype = tier_float(conv_tier)
    plain = randomise(torch.nn.Conv2d(**kwargs)).to(dtype)
    fused = FusedConv2d(**kwargs, activation=activation).to(dtype)
    fused.load_state_dict(plain.state_dict())
    shape = (3, 5, 7) if unbatched else (1, 3, 5, 7)
    x = torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True)
    with fusedops.use_backend(conv_tier):
        out = fused(x)
    x64 = x.detach().double().requires_grad_()
    reference = as_float64(plain)
    ref = activate(reference(x64), activation)
    assert_close(out, ref, dtype, f"{padding_mode} output")
    upstream = torch.randn(ref.shape, device=DEVICE, dtype=dtype)
    out.backward(upstream)
    ref.backward(upstream.double())
    assert_close(x.grad, x64.grad, dtype, "grad of input")
    assert_close(fused.weight.grad, reference.weight.grad, dtype, "grad of weight")
    assert_close(fused.bias.grad, reference.bias.grad, dtype, "grad of bias")


def test_forward_with_residual(conv_tier):
    dtype = tier_float(conv_tier)
    fused = randomise(FusedConv2d(4, 6, 3, stride=2, padding=1, device=DEVICE,
                                  activation="gelu")).to(dtype)
    x = torch.randn(2, 4, 5, 7, device=DEVICE, dtype=dtype, requires_grad=True)
    residual = torch.randn(2, 6, 3, 4, device=DEVICE, dtype=dtype)
    residual = residual.to(memory_format=torch.channels_last).requires_grad_()
    with fusedops.use_backend(conv_tier):
        out = fused(x, residual=residual)
    leaves = [t.detach().double().requires_grad_() for t in (x, residual)]
    reference = as_float64(fused)
    ref = F.gelu(F.conv2d(leaves[0], reference.weight, reference.bias, 2, 1) + leaves[1])
    assert_close(out, ref, dtype, "output")
    upstream = torch.randn(ref.shape, device=DEVICE, dtype=dtype)
    out.backward(upstream)
    ref.backward(upstream.double())
    assert_close(x.grad, leaves[0].grad, dtype, "grad of input")
    assert_close(residual.grad, leaves[1].grad, dtype, "grad of residual")
    assert_close(fused.weight.grad, reference.weight.grad, dtype, "grad of weight")


# --- from_conv without BatchNorm: the same Parameter objects ---------------------------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_from_conv_shares_parameters(bias):
    conv = randomise(torch.nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", bias=bias,
                                     device=DEVICE))
    conv.eval()
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.1)
    fused = FusedConv2d.from_conv(conv, activation="relu")
    assert isinstance(fused, FusedConv2d) and fused.activation == "relu"
    assert fused.weight is conv.weight
    assert fused.bias is conv.bias if bias else fused.bias is None
    shared = list(zip(fused.parameters(), conv.parameters(), strict=True))
    assert all(mine is theirs for mine, theirs in shared)
    assert fused.state_dict().keys() == conv.state_dict().keys()
    assert not fused.training
    for attribute in ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(fused, attribute) == getattr(conv, attribute), attribute

    x = torch.randn(2, 4, 5, 7, device=DEVICE)
    ref = F.relu(as_float64(conv)(x.double()))
    assert_close(fused(x), ref, torch.float32, "output")
    before = conv.weight.detach().clone()
    fused(x).square().sum().backward()
    optimizer.step()  # the optimizer built on the conv moves the parameter fused used
    assert not torch.equal(conv.weight, before)


def test_from_conv_rejects_what_is_not_a_conv2d():
    with pytest.raises(TypeError, match="nn.Conv2d"):
        FusedConv2d.from_conv(torch.nn.Linear(3, 4))
    with pytest.raises(TypeError, match="nn.Conv2d"):
        FusedConv2d.from_conv(torch.nn.Conv1d(3, 4, 3))
    with pytest.raises(ValueError, match="activation"):
        FusedConv2d.from_conv(torch.nn.Conv2d(3, 4, 3), activation="swish")


# --- from_conv with BatchNorm: folding ---------------------------------------------------


def conv_and_bn(conv_bias=True, affine=True, channels=6, eps=1e-3):
    conv = randomise(torch.nn.Conv2d(4, channels, 3, stride=2, padding=1, bias=conv_bias,
                                     device=DEVICE))
    bn = randomise(torch.nn.BatchNorm2d(channels, eps=eps, affine=affine, device=DEVICE))
    return conv, bn.eval()


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("conv_bias", [True, False], ids=["conv_bias", "no_conv_bias"])
@pytest.mark.parametrize("activation", [None, "relu", "silu"], ids=str)
def test_from_conv_folds_eval_batchnorm(conv_bias, affine, activation):
    conv, bn = conv_and_bn(conv_bias, affine)
    conv_before, bn_before = copy.deepcopy(conv.state_dict()), copy.deepcopy(bn.state_dict())
    fused = FusedConv2d.from_conv(conv, bn, activation=activation)
    assert isinstance(fused, FusedConv2d) and fused.activation == activation
    assert fused.weight is not conv.weight and fused.bias is not None
    assert isinstance(fused.weight, torch.nn.Parameter)
    assert isinstance(fused.bias, torch.nn.Parameter)
    assert fused.weight.dtype == conv.weight.dtype and fused.bias.shape == (6,)
    # Folding reads conv and bn, never writes them.
    for before, module in ((conv_before, conv), (bn_before, bn)):
        for key, value in before.items():
            assert torch.equal(module.state_dict()[key], value), key

    x = torch.randn(2, 4, 7, 9, device=DEVICE)
    ref = activate(as_float64(bn)(as_float64(conv)(x.double())), activation)
    assert_close(fused(x), ref, torch.float32, "act(bn(conv(x)))")

    # The folded module is an ordinary conv: its state_dict loads into an nn.Conv2d.
    plain = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, device=DEVICE)
    plain.load_state_dict(fused.state_dict())
    assert_close(activate(plain(x), activation), ref, torch.float32, "nn.Conv2d with the fold")


def test_folded_parameters_receive_gradients(conv_tier):
    conv, bn = conv_and_bn()
    dtype = tier_float(conv_tier)
    fused = FusedConv2d.from_conv(conv, bn, activation="gelu").to(dtype)
    assert fused.weight.requires_grad and fused.bias.requires_grad
    x = torch.randn(1, 4, 5, 7, device=DEVICE, dtype=dtype)
    with fusedops.use_backend(conv_tier):
        out = fused(x)
    upstream = torch.randn(out.shape, device=DEVICE, dtype=dtype)
    out.backward(upstream)
    weight, bias = (p.detach().double().requires_grad_() for p in (fused.weight, fused.bias))
    ref = F.gelu(F.conv2d(x.double(), weight, bias, 2, 1))
    ref.backward(upstream.double())
    assert_close(fused.weight.grad, weight.grad, dtype, "grad of folded weight")
    assert_close(fused.bias.grad, bias.grad, dtype, "grad of folded bias")
    assert conv.weight.grad is None  # the fold made new parameters; the conv's get nothing


def test_from_conv_with_training_batchnorm_raises():
    conv, bn = conv_and_bn()
    bn.train()
    with pytest.raises(ValueError, match=r"training mode.*\.eval\(\)"):
        FusedConv2d.from_conv(conv, bn)


def test_from_conv_with_batchnorm_without_running_stats_raises():
    conv = torch.nn.Conv2d(4, 6, 3, device=DEVICE)
    bn = torch.nn.BatchNorm2d(6, track_running_stats=False, device=DEVICE).eval()
    with pytest.raises(ValueError, match="running statistics"):
        FusedConv2d.from_conv(conv, bn)


def test_from_conv_with_mismatched_batchnorm_raises():
    conv, _ = conv_and_bn(channels=6)
    _, bn = conv_and_bn(channels=5)
    with pytest.raises(ValueError, match=r"5 features.*6 output channels"):
        FusedConv2d.from_conv(conv, bn)
    with pytest.raises(TypeError, match="BatchNorm2d"):
        FusedConv2d.from_conv(conv, torch.nn.BatchNorm1d(6).eval())
