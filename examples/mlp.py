"""The smallest model of the brief: Linear 5->5, ReLU, Linear 5->2, cross-entropy, SGD.

The data set is synthetic: 100 samples with 5 features in two classes, two Gaussian clouds
whose means differ along a fixed direction (they overlap a little, so the loss does not reach
zero). Full-batch SGD; the same weights and data for the unfused and the fused run.

    python examples/mlp.py                 # 200 steps, prints both loss curves
    python examples/mlp.py --steps 50 --log-every 10

``fusedops.patch`` turns Linear + ReLU into one ``FusedLinear(activation="relu")``, the
second Linear into a ``FusedLinear`` and ``nn.CrossEntropyLoss`` into fusedops' loss.
"""

from __future__ import annotations

import argparse

import torch
from fused_vs_unfused import Classifier, add_arguments, compare, report, resolve
from torch import nn

SAMPLES = 100
FEATURES = 5
DIRECTION = (1.0, -0.6, 0.8, 0.0, 0.4)  # class 1's mean minus class 0's mean, halved


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(100, 5) float32 features and (100,) int64 labels, 50 of each class."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(SAMPLES) % 2
    y = y[torch.randperm(SAMPLES, generator=generator)]
    x = torch.randn(SAMPLES, FEATURES, generator=generator)
    x += (2 * y[:, None] - 1) * torch.tensor(DIRECTION)
    return x, y


def make_model() -> nn.Module:
    return Classifier(nn.Sequential(nn.Linear(FEATURES, 5), nn.ReLU(), nn.Linear(5, 2)))


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, small_steps=200, full_steps=200, log_every=20)
    parser.add_argument("--lr", type=float, default=0.2)
    args = resolve(parser.parse_args(argv))

    x, y = (t.to(args.device) for t in make_data(args.seed))
    torch.manual_seed(args.seed)
    model = make_model()
    result = compare(model, lambda params: torch.optim.SGD(params, lr=args.lr),
                     batch=lambda step: (x, y),
                     loss_fn=lambda m, batch, fused: m(*batch), args=args,
                     items_per_step=SAMPLES)
    report(result, args, title="MLP 5-5-2 on 100 synthetic samples (full-batch SGD)",
           unit="samples", default_plot="mlp_loss.png")
    return result


if __name__ == "__main__":
    main()
