"""What every example shares: train one model twice from the same weights, on the same
batches, once as plain torch and once after ``fusedops.patch``, then print and plot both.

An example supplies the model, its optimizer, a deterministic ``batch(step)`` and a
``loss(model, batch, fused)`` function; ``compare`` does the rest:

- the unfused run trains ``copy.deepcopy(model)``; the fused run trains
  ``fusedops.patch(copy.deepcopy(model))`` under ``fusedops.use_backend(--backend)`` (plus any
  context the example adds, such as ``fusedops.fused_sdpa()``), so both start from the same
  weights;
- under ``--dtype bfloat16`` (the default on CUDA) both run under bf16 autocast;
- the loss of every ``--log-every``-th step is kept on the device and read once at the end
  (no host sync inside the loop), and the steps after the first are timed (the first one
  absorbs one-off costs: lazy initialisation, cuDNN's algorithm search, Triton's JIT);
- peak memory is ``torch.cuda.max_memory_allocated()`` over the run on CUDA (weights,
  optimizer state, data and activations); on CPU there is no such counter and the report
  says "n/a (CPU)".

Run from the command line, an example imports this module from its own folder; the tests
put that folder on ``sys.path`` first.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import fusedops


@dataclass
class Run:
    """One training run: the logged (step, loss) pairs, the timed wall clock and the memory."""

    name: str
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the timed steps (all but the first)
    items: int = 0  # samples or tokens those steps processed
    peak_memory_bytes: int | None = None  # None on CPU

    @property
    def throughput(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class Comparison:
    unfused: Run
    fused: Run
    patch_summary: str


class Classifier(nn.Module):
    """A network and its ``nn.CrossEntropyLoss`` in one module, so ``fusedops.patch`` swaps
    the loss (for ``fusedops.nn.CrossEntropyLoss``) along with the layers."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.loss = nn.CrossEntropyLoss()

    def forward(self, x, y):
        return self.loss(self.net(x), y)


def add_arguments(parser: argparse.ArgumentParser, *, small_steps: int, full_steps: int,
                  log_every: int = 1) -> None:
    """The options every example takes."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to train (default: cuda when there is a CUDA device)")
    parser.add_argument("--small", action="store_true",
                        help="the small sizes (always used on CPU: they finish in seconds)")
    parser.add_argument("--steps", type=int,
                        help=f"training steps (default: {small_steps} small, {full_steps} "
                             f"otherwise)")
    parser.add_argument("--log-every", type=int, default=log_every, metavar="N",
                        help=f"log the loss every N steps (default: {log_every})")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="bfloat16 trains under bf16 autocast (default: bfloat16 on CUDA, "
                             "float32 on CPU)")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "cuda"),
                        help="fusedops' backend for the fused run (default: auto)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, metavar="PNG",
                        help="where to save the loss curves (default: <example>_loss.png)")
    parser.add_argument("--no-plot", action="store_true", help="do not save a PNG")
    parser.set_defaults(small_steps=small_steps, full_steps=full_steps)


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in what depends on the device: small sizes, steps and dtype."""
    args.device = torch.device(args.device)
    args.small = args.small or args.device.type != "cuda"
    if args.steps is None:
        args.steps = args.small_steps if args.small else args.full_steps
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.type == "cuda" else "float32"
    if args.steps < 2:
        raise SystemExit("--steps must be at least 2 (the first step is not timed)")
    return args


def batch_indices(n: int, batch: int, steps: int, seed: int) -> list[torch.Tensor]:
    """The sample indices of each step: shuffled epochs over ``n`` samples, reproducibly."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    out = []
    for _ in range(steps):
        if order.numel() < batch:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        out.append(order[:batch])
        order = order[batch:]
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(name: str, model: nn.Module, optimizer: torch.optim.Optimizer,
          batch: Callable[[int], tuple], loss_fn: Callable[[nn.Module, tuple], torch.Tensor],
          *, steps: int, log_every: int, items_per_step: int, device: torch.device,
          dtype: str, context: Callable[[], contextlib.AbstractContextManager]) -> Run:
    """``steps`` optimizer steps; see the module docstring for what is logged and timed."""
    run = Run(name)
    logged = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = None
    for step in range(steps):
        if step == 1:
            _sync(device)
            start = time.perf_counter()
        with context(), autocast:
            loss = loss_fn(model, batch(step))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps - 1:
            run.steps.append(step)
            logged.append(loss.detach())
    _sync(device)
    run.seconds = time.perf_counter() - start
    run.items = items_per_step * (steps - 1)
    run.losses = [float(x) for x in torch.stack(logged).float().cpu()]
    if device.type == "cuda":
        run.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
    return run


def summarize_patch(model: nn.Module) -> str:
    """One line: what ``fusedops.patch`` replaced, by kind."""
    report = model.fusedops_report
    kinds = Counter(f"{old} -> {new}" for _, old, new in report.replaced)
    text = f"fusedops.patch replaced {len(report.replaced)} module(s): " + ", ".join(
        f"{count} x {kind}" for kind, count in kinds.items())
    if report.left_alone:
        text += f"; left alone {len(report.left_alone)}"
    return text


def compare(model: nn.Module, make_optimizer: Callable, batch: Callable[[int], tuple],
            loss_fn: Callable[[nn.Module, tuple, bool], torch.Tensor], args, *,
            items_per_step: int,
            fused_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
            ) -> Comparison:
    """Train a copy of ``model`` unfused, then a patched copy, from the same weights."""
    unfused_model = copy.deepcopy(model).to(args.device)
    fused_model = fusedops.patch(copy.deepcopy(model).to(args.device))
    common = dict(steps=args.steps, log_every=args.log_every, items_per_step=items_per_step,
                  device=args.device, dtype=args.dtype)

    def fused_context_all():
        stack = contextlib.ExitStack()
        stack.enter_context(fusedops.use_backend(args.backend))
        stack.enter_context(fused_context())
        return stack

    unfused = train("unfused", unfused_model, make_optimizer(unfused_model.parameters()), batch,
                    lambda m, b: loss_fn(m, b, False), context=contextlib.nullcontext, **common)
    fused = train("fused", fused_model, make_optimizer(fused_model.parameters()), batch,
                  lambda m, b: loss_fn(m, b, True), context=fused_context_all, **common)
    return Comparison(unfused, fused, summarize_patch(fused_model))


def _memory(run: Run) -> str:
    if run.peak_memory_bytes is None:
        return "n/a (CPU)"
    return f"{run.peak_memory_bytes / 2**20:,.1f} MiB"


def report(result: Comparison, args, *, title: str, unit: str, default_plot: str) -> None:
    """Print the two loss curves, the throughputs and peak memory; save the PNG."""
    unfused, fused = result.unfused, result.fused
    print(title)
    print(f"device {args.device}, {args.dtype}, {args.steps} steps, fused backend "
          f"{args.backend!r}")
    print(result.patch_summary)
    print(f"{'step':>6}  {'unfused loss':>12}  {'fused loss':>12}  {'|difference|':>12}")
    for step, a, b in zip(unfused.steps, unfused.losses, fused.losses):
        print(f"{step:>6}  {a:>12.6f}  {b:>12.6f}  {abs(a - b):>12.2e}")
    ratio = fused.throughput / unfused.throughput
    print(f"throughput (steps 1..{args.steps - 1}): unfused {unfused.throughput:,.0f} {unit}/s, "
          f"fused {fused.throughput:,.0f} {unit}/s ({ratio:.2f}x)")
    print(f"peak memory (torch.cuda.max_memory_allocated): unfused {_memory(unfused)}, "
          f"fused {_memory(fused)}")
    if args.device.type != "cuda":
        print("note: on CPU fusedops runs its torch tier (plain torch ops): the throughputs "
              "say nothing about the GPU kernels")
    if not args.no_plot:
        save_plot(args.plot or Path(default_plot), result, title)


def save_plot(path: Path, result: Comparison, title: str) -> None:
    """Both loss curves in one PNG (matplotlib, Agg); a message instead if it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot saved (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for run, style in ((result.unfused, "-"), (result.fused, "--")):
        ax.plot(run.steps, run.losses, style, label=run.name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(textwrap.fill(title, 80), fontsize=8)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"plot: {path}")
