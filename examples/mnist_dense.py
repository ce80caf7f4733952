"""An MNIST-style dense classifier (784 -> 512 -> 256 -> 10, ReLU) on synthetic digits.

No download: the 28x28 digits are drawn here, deterministically from the seed. Each digit is
the seven-segment glyph of its class, drawn with soft-edged strokes of random thickness,
size, position and slant, each stroke's ends jittered, plus pixel noise: ten classes that a
dense network must learn from pixels, the way it learns MNIST.

    python examples/mnist_dense.py            # CPU: 2,048 images, batch 128, 60 steps
    python examples/mnist_dense.py --steps 500 --log-every 50   # on CUDA: 60,000 images

``fusedops.patch`` turns each Linear + ReLU into one ``FusedLinear(activation="relu")``, the
last Linear into a ``FusedLinear`` and ``nn.CrossEntropyLoss`` into fusedops' loss.
"""

from __future__ import annotations

import argparse

import torch
from fused_vs_unfused import Classifier, add_arguments, batch_indices, compare, report, resolve
from torch import nn

SIZE = 28
# The seven segments in glyph coordinates (u to the right, v down, both in [0, 1]):
# (u0, v0, u1, v1) of each stroke, in the order a b c d e f g (top, top right, bottom right,
# bottom, bottom left, top left, middle).
SEGMENTS = torch.tensor([
    [0.0, 0.0, 1.0, 0.0],
    [1.0, 0.0, 1.0, 0.5],
    [1.0, 0.5, 1.0, 1.0],
    [0.0, 1.0, 1.0, 1.0],
    [0.0, 0.5, 0.0, 1.0],
    [0.0, 0.0, 0.0, 0.5],
    [0.0, 0.5, 1.0, 0.5],
])
# Which segments each digit lights, as the strings a..g.
LIT = ("abcdef", "bc", "abdeg", "abcdg", "bcfg", "acdfg", "acdefg", "abc", "abcdefg", "abcdfg")
MASK = torch.tensor([[float(s in lit) for s in "abcdefg"] for lit in LIT])  # (10, 7)


def render(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(N, 28, 28) float32 images in [0, 1] of the given digit labels."""
    n = labels.numel()

    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(n, *shape, generator=generator)

    height = uniform(14.0, 20.0)  # glyph height in pixels; the width is about half
    width = height * uniform(0.45, 0.6)
    center_x, center_y = uniform(11.0, 17.0), uniform(11.0, 17.0)
    slant = uniform(-0.25, 0.25)  # horizontal shift per pixel of height
    thickness = uniform(1.0, 2.2)
    ends = SEGMENTS + 0.08 * torch.randn(n, 7, 4, generator=generator)  # jittered strokes
    # pixel centres -> glyph coordinates (undo position, slant and size)
    py, px = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    dy = py - center_y[:, None, None]
    dx = px - center_x[:, None, None] - slant[:, None, None] * dy
    u = (dx / width[:, None, None] + 0.5)[:, None]  # (N, 1, 28, 28)
    v = (dy / height[:, None, None] + 0.5)[:, None]
    u0, v0, u1, v1 = (ends[..., i, None, None] for i in range(4))  # (N, 7, 1, 1) each
    # distance to each stroke (a segment from (u0, v0) to (u1, v1)), back in pixels
    du, dv = u1 - u0, v1 - v0
    t = (((u - u0) * du + (v - v0) * dv) / (du * du + dv * dv).clamp_min(1e-6)).clamp(0, 1)
    gap_x = (u - (u0 + t * du)) * width[:, None, None, None]
    gap_y = (v - (v0 + t * dv)) * height[:, None, None, None]
    distance = torch.sqrt(gap_x ** 2 + gap_y ** 2)
    ink = torch.sigmoid(3.0 * (thickness[:, None, None, None] - distance))  # soft edges
    ink = ink * MASK[labels][:, :, None, None]
    image = ink.amax(dim=1) + 0.15 * torch.randn(n, SIZE, SIZE, generator=generator)
    return image.clamp(0.0, 1.0)


def make_data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (N, 1, 28, 28) and their labels, balanced over the ten digits."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=generator)]
    images = torch.cat([render(chunk, generator) for chunk in labels.split(4096)])
    return images[:, None], labels


def make_model() -> nn.Module:
    return Classifier(nn.Sequential(
        nn.Flatten(),
        nn.Linear(SIZE * SIZE, 512), nn.ReLU(),
        nn.Linear(512, 256), nn.ReLU(),
        nn.Linear(256, 10),
    ))


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, small_steps=60, full_steps=500, log_every=5)
    parser.add_argument("--images", type=int, help="training images (default: 2,048 small, "
                                                    "60,000 otherwise)")
    parser.add_argument("--batch", type=int, help="batch size (default: 128 small, 512)")
    parser.add_argument("--lr", type=float, default=0.05)
    args = resolve(parser.parse_args(argv))
    n = args.images or (2048 if args.small else 60000)
    batch = args.batch or (128 if args.small else 512)

    images, labels = make_data(n, args.seed)
    images, labels = images.to(args.device), labels.to(args.device)
    order = [i.to(args.device) for i in batch_indices(n, batch, args.steps, args.seed)]
    torch.manual_seed(args.seed)
    model = make_model()
    result = compare(model,
                     lambda params: torch.optim.SGD(params, lr=args.lr, momentum=0.9),
                     batch=lambda step: (images[order[step]], labels[order[step]]),
                     loss_fn=lambda m, b, fused: m(*b), args=args, items_per_step=batch)
    report(result, args, title=f"dense 784-512-256-10 on {n:,} synthetic 28x28 digits, "
                               f"batch {batch}", unit="images", default_plot="mnist_dense_loss.png")
    return result


if __name__ == "__main__":
    main()
