"""fusedops.patch / unpatch / fx_fuse / fused_sdpa on plain torch (and torchvision) models.

Every model is compared with an unpatched deep copy made before patching: the forward, the
loss and every parameter's gradient (float32 within 1e-5 relative, as everywhere in the
suite), plus what patching promises besides the numbers — the same Parameter objects, the
same state_dict keys, a readable report, and an unpatch that gives the original modules back.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from reference import assert_close
from torch import nn

import fusedops
import fusedops.ops.sdpa as sdpa_module
from fusedops.nn import CrossEntropyLoss as FusedCrossEntropyLoss
from fusedops.nn import FusedConv2d, FusedLinear


class Classifier(nn.Module):
    """A network and its nn.CrossEntropyLoss module, so patch sees (and swaps) both."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.loss = nn.CrossEntropyLoss()

    def forward(self, x, target):
        logits = self.net(x)
        return logits, self.loss(logits, target)


def small_mlp():
    return Classifier(nn.Sequential(nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 2)))


def mnist_classifier():
    return Classifier(nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(),
                                    nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 10)))


def cifar_cnn():
    """3 -> 64 -> 64 -> 128 -> 256 -> 256 3x3 convs with ReLU, the last three with stride 2."""
    channels = [3, 64, 64, 128, 256, 256]
    layers = []
    for index, (cin, cout) in enumerate(zip(channels, channels[1:])):
        layers += [nn.Conv2d(cin, cout, 3, stride=2 if index >= 2 else 1, padding=1), nn.ReLU()]
    return Classifier(nn.Sequential(*layers, nn.Flatten(), nn.Linear(256, 10)))


# name: (constructor, input shape, number of classes); CIFAR images kept 8x8 to stay fast.
MODELS = {
    "mlp": (small_mlp, (7, 5), 2),
    "mnist": (mnist_classifier, (4, 1, 28, 28), 10),
    "cifar_cnn": (cifar_cnn, (2, 3, 8, 8), 10),
}


def make_batch(name, dtype=torch.float32):
    _, shape, classes = MODELS[name]
    return torch.randn(*shape, dtype=dtype), torch.randint(0, classes, (shape[0],))


def patched_and_reference(name, **options):
    model = MODELS[name][0]()
    reference = copy.deepcopy(model)
    fusedops.patch(model, **options)
    return model, reference


def assert_same_gradients(model, reference, dtype=torch.float32):
    names = [name for name, _ in model.named_parameters()]
    assert names == [name for name, _ in reference.named_parameters()]
    for (name, mine), (_, theirs) in zip(model.named_parameters(), reference.named_parameters()):
        assert mine.grad is not None, f"{name} got no gradient"
        assert_close(mine.grad, theirs.grad, dtype, f"grad of {name}")


def assert_same_training_step(model, reference, x, target, dtype=torch.float32):
    """Forward, loss and every parameter gradient of a Classifier, against the reference."""
    logits, loss = model(x, target)
    ref_logits, ref_loss = reference(x, target)
    assert logits.dtype == ref_logits.dtype and loss.dtype == ref_loss.dtype
    assert_close(logits, ref_logits, dtype, "logits")
    assert_close(loss, ref_loss, dtype, "loss")
    loss.backward()
    ref_loss.backward()
    assert_same_gradients(model, reference, dtype)


# --- parity ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_patched_model_matches_unpatched(name):
    model, reference = patched_and_reference(name)
    assert isinstance(model.loss, FusedCrossEntropyLoss)
    assert not any(type(m) in (nn.Linear, nn.Conv2d) for m in model.modules())
    x, target = make_batch(name)
    assert_same_training_step(model, reference, x, target)


def test_cifar_cnn_fuses_every_conv_with_its_relu():
    model, _ = patched_and_reference("cifar_cnn")
    convs = [m for m in model.net if isinstance(m, FusedConv2d)]
    assert len(convs) == 5 and all(conv.activation == "relu" for conv in convs)
    assert [type(m) for m in model.net].count(nn.Identity) == 5
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())


def test_mnist_classifier_fuses_relu_and_gelu():
    model, _ = patched_and_reference("mnist")
    net = model.net
    assert isinstance(net[1], FusedLinear) and net[1].activation == "relu"
    assert isinstance(net[3], FusedLinear) and net[3].activation == "gelu"
    assert isinstance(net[5], FusedLinear) and net[5].activation is None
    assert type(net[2]) is nn.Identity and type(net[4]) is nn.Identity


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_resnet18_matches_unpatched(mode):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    model.train(mode == "train")
    reference = copy.deepcopy(model)
    fusedops.patch(model)
    assert not any(type(m) in (nn.Linear, nn.Conv2d) for m in model.modules())
    assert len(model.fusedops_report.replaced) == 21  # 20 convolutions and the head
    x = torch.randn(2, 3, 32, 32)
    target = torch.randint(0, 10, (2,))
    out, ref = model(x), reference(x)
    assert_close(out, ref, torch.float32, "logits")
    F.cross_entropy(out, target).backward()
    F.cross_entropy(ref, target).backward()
    assert_same_gradients(model, reference)
    for (name, mine), (_, theirs) in zip(model.named_buffers(), reference.named_buffers()):
        assert_close(mine, theirs, torch.float32, f"buffer {name}")


def test_options_turn_each_replacement_off():
    model, reference = patched_and_reference("cifar_cnn", linear=False, conv=False,
                                             cross_entropy=False)
    assert model.fusedops_report.replaced == []
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]

    model, _ = patched_and_reference("cifar_cnn", conv=False)
    assert type(model.net[0]) is nn.Conv2d and type(model.net[1]) is nn.ReLU
    assert isinstance(model.net[-1], FusedLinear)
    model, _ = patched_and_reference("mlp", linear=False)
    assert type(model.net[0]) is nn.Linear and isinstance(model.loss, FusedCrossEntropyLoss)
    model, _ = patched_and_reference("mlp", cross_entropy=False)
    assert type(model.loss) is nn.CrossEntropyLoss and isinstance(model.net[0], FusedLinear)


# --- the report --------------------------------------------------------------------------


class ScaledLinear(nn.Linear):
    """A subclass with a forward of its own: patch must leave it alone."""

    def forward(self, x):
        return 2.0 * super().forward(x)


def test_report_lists_fusions_replacements_and_what_was_left_alone():
    model = nn.Sequential(nn.Linear(5, 5), nn.ReLU(), ScaledLinear(5, 4), nn.ReLU(),
                          nn.Linear(4, 3), nn.Tanh())
    reference = copy.deepcopy(model)
    fusedops.patch(model)
    report = model.fusedops_report
    assert isinstance(report, fusedops.PatchReport)
    assert ("0", "Linear + relu", "FusedLinear") in report.replaced
    assert ("4", "Linear", "FusedLinear") in report.replaced  # Tanh is not fusable
    assert len(report.replaced) == 2
    assert isinstance(model[0], FusedLinear) and model[0].activation == "relu"
    assert type(model[1]) is nn.Identity
    assert type(model[2]) is ScaledLinear and type(model[3]) is nn.ReLU
    assert isinstance(model[4], FusedLinear) and model[4].activation is None
    assert type(model[5]) is nn.Tanh
    [(name, kind, why)] = report.left_alone
    assert (name, kind) == ("2", "ScaledLinear") and "forward of its own" in why

    text = str(report)
    assert text.splitlines()[0] == "fusedops.patch: replaced 2, left alone 1"
    assert "0: Linear + relu -> FusedLinear" in text
    assert "4: Linear -> FusedLinear" in text
    assert "left alone  2: ScaledLinear" in text and "forward of its own" in text

    x = torch.randn(3, 5)
    assert_close(model(x), reference(x), torch.float32, "output")


def test_report_names_nested_modules_by_their_path():
    model, _ = patched_and_reference("mlp")
    replaced = {name: (old, new) for name, old, new in model.fusedops_report.replaced}
    assert replaced == {"net.0": ("Linear + relu", "FusedLinear"),
                        "net.2": ("Linear", "FusedLinear"),
                        "loss": ("CrossEntropyLoss", "CrossEntropyLoss")}
    assert "net.0: Linear + relu -> FusedLinear" in str(model.fusedops_report)


def test_report_mentions_a_root_module_it_cannot_swap():
    model = fusedops.patch(nn.Linear(3, 3))
    report = model.fusedops_report
    assert report.replaced or report.left_alone, str(report)


# --- parameters, optimizer, state_dict, devices and dtypes -------------------------------


def test_same_parameter_objects_and_a_prebuilt_optimizer_still_trains():
    model = small_mlp()
    reference = copy.deepcopy(model)
    parameters = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    fusedops.patch(model)
    assert all(a is b for a, b in zip(model.parameters(), parameters))
    assert len(list(model.parameters())) == len(parameters)
    before = [p.detach().clone() for p in parameters]
    for _ in range(2):
        x, target = make_batch("mlp")
        for net, opt in ((model, optimizer), (reference, ref_optimizer)):
            opt.zero_grad()
            net(x, target)[1].backward()
            opt.step()
    assert any(not torch.equal(p, b) for p, b in zip(parameters, before)), "nothing trained"
    for (name, mine), (_, theirs) in zip(model.named_parameters(), reference.named_parameters()):
        assert_close(mine, theirs, torch.float32, f"parameter {name} after two SGD steps")


def test_state_dict_keys_unchanged_and_checkpoints_load_both_ways():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    unpatched = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    keys = list(model.state_dict())
    fusedops.patch(model)
    assert list(model.state_dict()) == keys
    x = torch.randn(2, 3, 32, 32)

    unpatched.load_state_dict(model.state_dict(), strict=True)  # patched -> unpatched
    assert_close(unpatched(x), model(x), torch.float32, "unpatched with the patched weights")

    other = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    model.load_state_dict(other.state_dict(), strict=True)  # unpatched -> patched
    assert_close(model(x), other(x), torch.float32, "patched with the unpatched weights")


def test_fused_loss_keeps_class_weight_buffer_and_options():
    weight = torch.rand(4) + 0.5
    model = Classifier(nn.Sequential(nn.Linear(6, 4)))
    model.loss = nn.CrossEntropyLoss(weight=weight, ignore_index=1, label_smoothing=0.1)
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    buffer = model.loss.weight
    fusedops.patch(model)
    assert isinstance(model.loss, FusedCrossEntropyLoss)
    assert model.loss.weight is buffer
    assert (model.loss.ignore_index, model.loss.label_smoothing) == (1, 0.1)
    assert list(model.state_dict()) == keys
    x, target = torch.randn(9, 6), torch.randint(0, 4, (9,))
    assert_same_training_step(model, reference, x, target)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_device_and_dtype_are_kept(dtype):
    model = cifar_cnn().to(dtype)
    reference = copy.deepcopy(model)
    fusedops.patch(model)
    for (name, mine), (_, theirs) in zip(model.named_parameters(), reference.named_parameters()):
        assert mine.dtype == dtype and mine.device == theirs.device, name
    x, target = make_batch("cifar_cnn", dtype)
    # bfloat16: ours accumulates in float32, torch's CPU kernels may not; a few roundings apart
    factor = 1.0 if dtype == torch.float64 else 4.0
    logits, loss = model(x, target)
    ref_logits, ref_loss = reference(x, target)
    assert logits.dtype == ref_logits.dtype == dtype and loss.dtype == ref_loss.dtype
    assert_close(logits, ref_logits, dtype, "logits", factor)
    loss.backward()
    ref_loss.backward()
    for (name, mine), (_, theirs) in zip(model.named_parameters(), reference.named_parameters()):
        assert mine.grad.dtype == dtype
        assert_close(mine.grad, theirs.grad, dtype, f"grad of {name}", factor)


def test_weight_norm_linear_keeps_its_parameters():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # weight_norm is deprecated
        model = nn.Sequential(torch.nn.utils.weight_norm(nn.Linear(4, 3)))
    keys = list(model.state_dict())
    names = [name for name, _ in model.named_parameters()]
    fusedops.patch(model)
    assert list(model.state_dict()) == keys
    assert [name for name, _ in model.named_parameters()] == names


def test_forward_hooks_still_run_after_patching():
    model = nn.Sequential(nn.Linear(4, 3))
    seen = []
    model[0].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    fusedops.patch(model)
    model(torch.randn(2, 4))
    assert seen == [torch.Size([2, 3])]


# --- unpatch and patching twice ----------------------------------------------------------


def test_unpatch_restores_the_original_modules_and_behaviour():
    model = cifar_cnn()
    reference = copy.deepcopy(model)
    modules = dict(model.named_modules())
    parameters = list(model.parameters())
    fusedops.patch(model)
    assert isinstance(model.net[0], FusedConv2d)
    assert fusedops.unpatch(model) is model
    assert not hasattr(model, "fusedops_report")
    restored = dict(model.named_modules())
    assert list(restored) == list(modules)
    assert all(restored[name] is module for name, module in modules.items())
    assert all(a is b for a, b in zip(model.parameters(), parameters))
    x, target = make_batch("cifar_cnn")
    assert_same_training_step(model, reference, x, target)
    assert fusedops.unpatch(model) is model  # unpatching an unpatched model does nothing
    assert all(dict(model.named_modules())[name] is m for name, m in modules.items())


def test_patching_twice_is_the_same_as_once_and_one_unpatch_undoes_it():
    model = small_mlp()
    reference = copy.deepcopy(model)
    modules = dict(model.named_modules())
    fusedops.patch(model)
    first = str(model.fusedops_report)
    fusedops.patch(model)
    assert str(model.fusedops_report) == first
    assert isinstance(model.net[0], FusedLinear) and model.net[0].activation == "relu"
    assert type(model.net[1]) is nn.Identity
    x, target = make_batch("mlp")
    assert_same_training_step(model, reference, x, target)
    fusedops.unpatch(model)
    assert all(dict(model.named_modules())[name] is m for name, m in modules.items())


# --- fold_bn -----------------------------------------------------------------------------


def conv_bn_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 5, 3, bias=False), nn.BatchNorm2d(5))
    with torch.no_grad():  # statistics and affine parameters far from the identity
        for bn in (model[1], model[4]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()
            bn.bias.normal_()
    return model


def test_fold_bn_fuses_conv_batchnorm_relu_for_inference():
    model = conv_bn_model().eval()
    reference = copy.deepcopy(model)
    fusedops.patch(model, fold_bn=True)
    assert isinstance(model[0], FusedConv2d) and model[0].activation == "relu"
    assert isinstance(model[3], FusedConv2d) and model[3].activation is None
    assert model[3].bias is not None  # the folded BatchNorm's shift
    assert [type(model[i]) for i in (1, 2, 4)] == [nn.Identity] * 3
    replaced = [(name, what) for name, what, _ in model.fusedops_report.replaced]
    assert ("0", "Conv2d + BatchNorm2d (folded) + relu") in replaced
    assert ("3", "Conv2d + BatchNorm2d (folded)") in replaced
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        assert_close(model(x), reference(x), torch.float32, "folded conv + bn + relu")
    fusedops.unpatch(model)
    assert type(model[1]) is nn.BatchNorm2d and type(model[0]) is nn.Conv2d


def test_fold_bn_leaves_a_training_batchnorm_alone_and_says_why():
    model = conv_bn_model().train()
    reference = copy.deepcopy(model)
    fusedops.patch(model, fold_bn=True)
    assert type(model[1]) is nn.BatchNorm2d and type(model[2]) is nn.ReLU
    assert isinstance(model[0], FusedConv2d) and model[0].activation is None
    reasons = {name: why for name, _, why in model.fusedops_report.left_alone}
    assert "training mode" in reasons["0"] and "training mode" in reasons["3"]
    assert "training mode" in str(model.fusedops_report)
    x = torch.randn(2, 3, 7, 7)
    out, ref = model(x), reference(x)
    assert_close(out, ref, torch.float32, "output")
    out.square().mean().backward()
    ref.square().mean().backward()
    # a training BatchNorm removes the mean: the conv bias before it gets a zero gradient
    assert model[0].bias.grad.abs().max() < 1e-5
    for name in ("0.weight", "1.weight", "1.bias", "3.weight", "4.weight", "4.bias"):
        assert_close(model.get_parameter(name).grad, reference.get_parameter(name).grad,
                     torch.float32, f"grad of {name}")


def test_without_fold_bn_the_batchnorm_is_kept():
    model = conv_bn_model().eval()
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    fusedops.patch(model)
    assert type(model[1]) is nn.BatchNorm2d and type(model[4]) is nn.BatchNorm2d
    assert isinstance(model[0], FusedConv2d) and model[0].activation is None
    assert list(model.state_dict()) == keys
    x = torch.randn(2, 3, 7, 7)
    assert_close(model(x), reference(x), torch.float32, "output")


def test_fold_bn_leaves_a_batchnorm_without_running_stats_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3),
                          nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU()).eval()
    reference = copy.deepcopy(model)
    fusedops.patch(model, fold_bn=True)
    assert type(model[3]) is nn.BatchNorm2d
    assert any(name == "2" for name, _, _ in model.fusedops_report.left_alone)
    x = torch.randn(2, 3, 7, 7)
    assert_close(model(x), reference(x), torch.float32, "output")


# --- padding modes -----------------------------------------------------------------------


@pytest.mark.parametrize("padding_mode", ["reflect", "circular", "replicate"])
@pytest.mark.parametrize("padding, stride", [(1, 1), ((1, 2), 2)])
def test_conv_padding_mode_is_honoured(padding_mode, padding, stride):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=stride, padding=padding,
                                    padding_mode=padding_mode), nn.ReLU(),
                          nn.Conv2d(4, 2, 3, padding="same", padding_mode=padding_mode))
    reference = copy.deepcopy(model)
    fusedops.patch(model)
    assert isinstance(model[0], FusedConv2d) and model[0].padding_mode == padding_mode
    assert isinstance(model[2], FusedConv2d)
    x = torch.randn(2, 3, 7, 6)
    out, ref = model(x), reference(x)
    assert_close(out, ref, torch.float32, "output")
    out.square().sum().backward()
    ref.square().sum().backward()
    assert_same_gradients(model, reference)


# --- fx_fuse -----------------------------------------------------------------------------


class FunctionalActivations(nn.Module):
    """Activations called as functions (or a module held elsewhere), not Sequential neighbours."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc1 = nn.Linear(16, 12)
        self.fc2 = nn.Linear(12, 12)
        self.fc3 = nn.Linear(12, 12)
        self.fc4 = nn.Linear(12, 10)
        self.act = nn.SiLU()
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        x = F.relu(self.conv(x)).flatten(1)
        x = F.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        x = F.gelu(self.fc3(x), approximate="tanh")
        x = self.act(self.fc4(x))
        return self.head(x)


def test_fx_fuse_fuses_functional_activations():
    model = FunctionalActivations()
    original_types = {name: type(m) for name, m in model.named_modules()}
    x = torch.randn(2, 3, 4, 4)
    expected = model(x)
    expected.square().sum().backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    fused = fusedops.fx_fuse(model)
    assert isinstance(fused, torch.fx.GraphModule)
    activations = {name: getattr(fused, name).activation
                   for name in ("conv", "fc1", "fc2", "fc3", "fc4")}
    assert activations == {"conv": "relu", "fc1": "relu", "fc2": "relu", "fc3": "gelu_tanh",
                           "fc4": "silu"}
    assert isinstance(fused.conv, FusedConv2d) and isinstance(fused.fc1, FusedLinear)
    assert type(fused.head) is nn.Linear  # nothing to fuse it with
    targets = [node.target for node in fused.graph.nodes]
    assert not {F.relu, torch.relu, F.gelu, "act"} & set(targets)
    assert {name: type(m) for name, m in model.named_modules()} == original_types
    assert fused.fc1.weight is model.fc1.weight  # shares the parameters

    out = fused(x)
    assert_close(out, expected, torch.float32, "output")
    assert_close(model(x), expected, torch.float32, "the original model after fx_fuse")
    out.square().sum().backward()
    for name, p in model.named_parameters():
        assert_close(p.grad, expected_grads[name], torch.float32, f"grad of {name}")


def test_fx_fuse_leaves_a_linear_with_two_uses_alone():
    class TwoUses(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x):
            y = self.fc(x)
            return F.relu(y) + y

    model = TwoUses()
    fused = fusedops.fx_fuse(model)
    assert type(fused.fc) is nn.Linear
    x = torch.randn(3, 6)
    assert_close(fused(x), model(x), torch.float32, "output")


def test_fx_fuse_with_a_linear_called_twice():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(F.relu(self.fc(x)))

    model = Shared()
    x = torch.randn(3, 4)
    assert_close(fusedops.fx_fuse(model)(x), model(x), torch.float32, "output")


# --- fused_sdpa --------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """A module that calls F.scaled_dot_product_attention itself."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None, is_causal=False):
        batch, seqlen, dim = x.shape
        q, k, v = (t.reshape(batch, seqlen, self.heads, -1).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.out(out.transpose(1, 2).reshape(batch, seqlen, dim))


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Counts the calls that reach fusedops.scaled_dot_product_attention."""
    calls = []
    real = sdpa_module.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(sdpa_module, "scaled_dot_product_attention", spy)
    return calls


def sdpa_output_and_grads(model, x, **kwargs):
    model.zero_grad()
    out = model(x, **kwargs)
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("mask", [None, "causal", "bool", "float"])
def test_fused_sdpa_routes_calls_only_inside_the_block(sdpa_calls, mask):
    model = SelfAttention()
    x = torch.randn(2, 7, 32)
    kwargs = {}
    if mask == "causal":
        kwargs["is_causal"] = True
    elif mask == "bool":
        allowed = torch.rand(7, 7) > 0.4
        allowed.fill_diagonal_(True)
        kwargs["attn_mask"] = allowed
    elif mask == "float":
        kwargs["attn_mask"] = torch.randn(2, 1, 7, 7)
    expected, expected_grads = sdpa_output_and_grads(model, x, **kwargs)
    assert sdpa_calls == []  # outside the block: torch's own SDPA, not routed

    with fusedops.fused_sdpa():
        out, grads = sdpa_output_and_grads(model, x, **kwargs)
    assert len(sdpa_calls) == 1
    assert_close(out, expected, torch.float32, "output")
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close(grad, expected_grad, torch.float32, "parameter gradient")

    sdpa_output_and_grads(model, x, **kwargs)
    assert len(sdpa_calls) == 1  # after the block: not routed any more


def test_fused_sdpa_ends_with_its_block_even_on_an_exception(sdpa_calls):
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ZeroDivisionError), fusedops.fused_sdpa():
        F.scaled_dot_product_attention(q, q, q)
        raise ZeroDivisionError
    assert len(sdpa_calls) == 1
    F.scaled_dot_product_attention(q, q, q)
    assert len(sdpa_calls) == 1


def test_fused_sdpa_with_grouped_query_heads(sdpa_calls):
    q = torch.randn(2, 4, 6, 8)
    k, v = torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    with fusedops.fused_sdpa():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert len(sdpa_calls) == 1
    assert_close(out, expected, torch.float32, "output (top-left causal alignment, as torch)")


def test_fused_sdpa_leaves_multihead_attention_to_torch(sdpa_calls):
    """Documented limitation: F.multi_head_attention_forward is itself dispatched through
    __torch_function__, and a torch-function mode is off while it handles a call, so the SDPA
    call inside nn.MultiheadAttention is not routed; the result is torch's, unchanged."""
    attention = nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 5, 16)
    expected, _ = attention(x, x, x, need_weights=False)
    with fusedops.fused_sdpa():
        out, _ = attention(x, x, x, need_weights=False)
    assert len(sdpa_calls) == 0
    assert torch.equal(out, expected)


# --- torch.compile, autocast, double backward --------------------------------------------


@pytest.mark.parametrize("name, backend", [("mlp", "aot_eager"), ("mlp", "inductor"),
                                           ("cifar_cnn", "aot_eager")])
def test_compiled_patched_model_matches_unpatched(name, backend):
    torch._dynamo.reset()
    model, reference = patched_and_reference(name)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x, target = make_batch(name)
    logits, loss = compiled(x, target)
    ref_logits, ref_loss = reference(x, target)
    assert_close(logits, ref_logits, torch.float32, "logits")
    assert_close(loss, ref_loss, torch.float32, "loss")
    loss.backward()
    ref_loss.backward()
    assert_same_gradients(model, reference)


def autocast_run(model, x, target):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(x, target)
    loss.backward()
    return logits, loss


def test_autocast_single_layer_gives_the_unpatched_dtypes():
    model = Classifier(nn.Sequential(nn.Linear(6, 4)))
    reference = copy.deepcopy(model)
    fusedops.patch(model)
    x, target = torch.randn(5, 6), torch.randint(0, 4, (5,))
    logits, loss = autocast_run(model, x, target)
    ref_logits, ref_loss = autocast_run(reference, x, target)
    assert logits.dtype == ref_logits.dtype == torch.bfloat16
    assert loss.dtype == ref_loss.dtype == torch.float32
    # two bfloat16 computations (ours accumulates in float32), each about 1e-2 from exact
    assert_close(logits, ref_logits, torch.bfloat16, "logits", factor=4.0)
    assert_close(loss, ref_loss, torch.bfloat16, "loss", factor=4.0)
    for mine, theirs in zip(model.parameters(), reference.parameters()):
        assert mine.grad.dtype == theirs.grad.dtype == torch.float32
        assert_close(mine.grad, theirs.grad, torch.bfloat16, "gradient", factor=4.0)


@pytest.mark.parametrize("name", ["mlp", "cifar_cnn"])
def test_autocast_gives_the_unpatched_dtypes(name):
    """The second layer meets the first one's bfloat16 output with float32 weights: autocast's
    cast must come before the dtype checks, as it does for F.linear and F.conv2d."""
    model, reference = patched_and_reference(name)
    x, target = make_batch(name)
    ref_logits, ref_loss = autocast_run(reference, x, target)
    logits, loss = autocast_run(model, x, target)
    assert logits.dtype == ref_logits.dtype == torch.bfloat16
    assert loss.dtype == ref_loss.dtype == torch.float32
    assert_close(logits, ref_logits, torch.bfloat16, "logits", factor=4.0)
    assert_close(loss, ref_loss, torch.bfloat16, "loss", factor=4.0)
    for (param, mine), (_, theirs) in zip(model.named_parameters(), reference.named_parameters()):
        assert mine.grad.dtype == theirs.grad.dtype == torch.float32, param


@pytest.mark.parametrize("layer", ["linear", "conv2d", "cross_entropy"])
def test_double_backward_through_a_patched_model_raises(layer):
    if layer == "linear":
        model, x = nn.Sequential(nn.Linear(4, 3), nn.Tanh()), torch.randn(2, 4)
    elif layer == "conv2d":
        model, x = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh()), torch.randn(1, 2, 5, 5)
    else:
        model, x = Classifier(nn.Sequential(nn.Tanh())), torch.randn(3, 4)
    fusedops.patch(model)
    x.requires_grad_()
    if layer == "cross_entropy":
        loss = model(x, torch.randint(0, 4, (3,)))[1]
    else:
        loss = model(x).square().sum()
    with pytest.raises(RuntimeError, match="double backward") as error:
        torch.autograd.grad(loss, x, create_graph=True)
    assert f"fusedops.{layer}" in str(error.value)
    # first-order gradients are fine
    (grad,) = torch.autograd.grad(model(x).square().sum() if layer != "cross_entropy"
                                  else model(x, torch.randint(0, 4, (3,)))[1], x)
    assert grad.shape == x.shape and torch.isfinite(grad).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_a_patched_training_step_captures_in_a_cuda_graph(backend):
    """Forward, backward and the optimizer step of a patched model in one CUDA graph (after
    a warm-up that autotunes outside the capture); a replay equals the same step run eagerly
    from the same parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 10)).cuda()
    reference = copy.deepcopy(model)
    fusedops.patch(model)
    loss_fn = FusedCrossEntropyLoss()
    inputs = torch.randn(32, 64, device="cuda")
    target = torch.randint(0, 10, (32,), device="cuda")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step():
        loss = loss_fn(model(inputs), target)
        loss.backward()
        optimizer.step()
        return loss

    with fusedops.use_backend(backend):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                optimizer.zero_grad(set_to_none=False)
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        optimizer.zero_grad(set_to_none=False)
        with torch.cuda.graph(graph):
            step()
    reference.load_state_dict(model.state_dict())
    optimizer.zero_grad(set_to_none=False)
    graph.replay()
    torch.cuda.synchronize()

    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    nn.functional.cross_entropy(reference(inputs), target).backward()
    ref_optimizer.step()
    for (name, got), want in zip(model.named_parameters(), reference.parameters()):
        assert_close(got, want.double(), torch.float32, name)
