"""Bad input to fusedops.cross_entropy: a clear Python error naming the argument, before launch."""

import pytest
import torch
from conftest import DEVICE

import fusedops

LOGITS = torch.randn(4, 5, device=DEVICE)
TARGET = torch.tensor([0, 1, 4, 2], device=DEVICE)

BAD_CALLS = {
    "input not a tensor": (dict(input=[[1.0, 2.0]]), TypeError, "input must be a Tensor"),
    "target not a tensor": (dict(target=[0, 1, 2, 3]), TypeError, "target must be a Tensor"),
    "integer input": (dict(input=torch.ones(4, 5, dtype=torch.int64, device=DEVICE)),
                      TypeError, "input must be float16"),
    "0-d input": (dict(input=torch.tensor(1.0, device=DEVICE)), ValueError, "at least 1"),
    "no classes": (dict(input=torch.randn(4, 0, device=DEVICE)), ValueError, "0 classes"),
    "target shape": (dict(target=TARGET[:3]), ValueError, "target must have shape"),
    "target dtype": (dict(target=TARGET.to(torch.int16)), TypeError, "int64, int32"),
    "bool target": (dict(target=TARGET.bool()), TypeError, "int64, int32"),
    "probability shape": (dict(target=torch.rand(4, 6, device=DEVICE)), ValueError,
                          "probability target"),
    "target device": (dict(target=TARGET.to("meta")), ValueError, "target is on"),
    "weight shape": (dict(weight=torch.ones(6, device=DEVICE)), ValueError, r"shape \(5,\)"),
    "weight dtype": (dict(weight=torch.ones(5, dtype=torch.int64, device=DEVICE)), TypeError,
                     "weight must be floating"),
    "weight type": (dict(weight=[1.0] * 5), TypeError, "weight must be a Tensor"),
    "weight device": (dict(weight=torch.ones(5, device="meta")), ValueError, "weight is on"),
    "reduction": (dict(reduction="avg"), ValueError, "reduction must be one of"),
    "smoothing < 0": (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    "smoothing > 1": (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    "z_loss < 0": (dict(z_loss=-1.0), ValueError, "z_loss"),
    "z_loss inf": (dict(z_loss=float("inf")), ValueError, "z_loss"),
    "softcap 0": (dict(softcap=0.0), ValueError, "softcap"),
    "softcap nan": (dict(softcap=float("nan")), ValueError, "softcap"),
    "ignore_index float": (dict(ignore_index=1.5), TypeError, "ignore_index"),
    "inplace_backward": (dict(inplace_backward=1), TypeError, "inplace_backward"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS), ids=str)
def test_bad_input_is_a_clear_error(case):
    overrides, error, message = BAD_CALLS[case]
    kwargs = dict(input=LOGITS, target=TARGET)
    kwargs.update(overrides)
    args = (kwargs.pop("input"), kwargs.pop("target"))
    with pytest.raises(error, match=message):
        fusedops.cross_entropy(*args, **kwargs)
