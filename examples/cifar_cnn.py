"""A CIFAR-10-shaped CNN on synthetic 32x32 colour images.

Convolutions 3 -> 64 -> 64 -> 128 -> 256 -> 256 (3x3, padding 1, each followed by ReLU; the
last three with stride 2, so 32x32 -> 4x4), global average pooling and a linear head over ten
classes, trained with Adam. No download: each class is a sinusoidal grating at its own
orientation and in its own colour, with random frequency, phase, brightness and pixel noise,
drawn here from the seed.

    python examples/cifar_cnn.py              # CPU: 512 16x16 images, batch 16, 25 steps
    python examples/cifar_cnn.py --steps 300  # on CUDA: 50,000 32x32 images, batch 256,
                                              # bf16 autocast, channels_last

``fusedops.patch`` turns each Conv2d + ReLU into one ``FusedConv2d(activation="relu")``, the
head into a ``FusedLinear`` and ``nn.CrossEntropyLoss`` into fusedops' loss.
"""

from __future__ import annotations

import argparse
import math

import torch
from fused_vs_unfused import Classifier, add_arguments, batch_indices, compare, report, resolve
from torch import nn

SIZE = 32
CLASSES = 10
WIDTHS = (3, 64, 64, 128, 256, 256)
STRIDES = (1, 1, 2, 2, 2)


def make_data(n: int, seed: int = 0, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, size, size) float32 images and their (N,) labels, balanced over the classes."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % CLASSES
    labels = labels[torch.randperm(n, generator=generator)]

    def uniform(low, high):
        return low + (high - low) * torch.rand(n, 1, 1, generator=generator)

    angle = labels[:, None, None] * (math.pi / CLASSES) + uniform(-0.08, 0.08)
    cycles = uniform(2.0, 4.0)  # stripes per image width
    phase = uniform(0.0, 2 * math.pi)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    along = x * torch.cos(angle) + y * torch.sin(angle)
    grating = torch.sin(2 * math.pi * cycles * along + phase)  # (N, size, size)
    hue = labels * (2 * math.pi / CLASSES)
    colour = torch.stack([torch.cos(hue + k * 2 * math.pi / 3) for k in range(3)], dim=1)
    colour = 0.5 + 0.4 * colour + 0.1 * torch.randn(n, 3, generator=generator)  # (N, 3)
    images = colour[:, :, None, None] * (0.5 + 0.5 * grating[:, None]) * uniform(0.6, 1.0)[
        :, None]
    images += 0.1 * torch.randn(n, 3, size, size, generator=generator)
    return images, labels


def make_model() -> nn.Module:
    layers = []
    for c_in, c_out, stride in zip(WIDTHS, WIDTHS[1:], STRIDES):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(WIDTHS[-1], CLASSES)]
    return Classifier(nn.Sequential(*layers))


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, small_steps=25, full_steps=300, log_every=2)
    parser.add_argument("--images", type=int,
                        help="training images (default: 512 small, 50,000 otherwise)")
    parser.add_argument("--batch", type=int, help="batch size (default: 16 small, 256)")
    parser.add_argument("--size", type=int,
                        help="image side (default: 32; 16 small, so that CPU runs take seconds)")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = resolve(parser.parse_args(argv))
    n = args.images or (512 if args.small else 50000)
    batch = args.batch or (16 if args.small else 256)
    args.size = args.size or (16 if args.small else SIZE)
    memory_format = (torch.channels_last if args.device.type == "cuda"
                     else torch.contiguous_format)

    images, labels = make_data(n, args.seed, args.size)
    images = images.to(args.device, memory_format=memory_format)
    labels = labels.to(args.device)
    order = [i.to(args.device) for i in batch_indices(n, batch, args.steps, args.seed)]
    torch.manual_seed(args.seed)
    model = make_model().to(memory_format=memory_format)
    result = compare(model,
                     lambda params: torch.optim.Adam(params, lr=args.lr),
                     batch=lambda step: (images[order[step]], labels[order[step]]),
                     loss_fn=lambda m, b, fused: m(*b), args=args, items_per_step=batch)
    report(result, args, title=f"CNN 3-64-64-128-256-256 on {n:,} synthetic "
                               f"{args.size}x{args.size} images, batch {batch}",
           unit="images", default_plot="cifar_cnn_loss.png")
    return result


if __name__ == "__main__":
    main()
