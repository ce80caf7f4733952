"""A small GPT (nanoGPT-sized) trained character by character on examples/data/tiny_corpus.txt.

The model is ``fusedops.benchmarks.models.GPT``: token and position embeddings, pre-norm
blocks of causal self-attention (``F.scaled_dot_product_attention``) and a GELU MLP, an lm
head tied to the token embedding. The unfused run computes the logits and
``F.cross_entropy``; the fused run trains ``fusedops.patch(copy)`` inside
``fusedops.fused_sdpa()`` (attention through fusedops) and computes the loss with
``fusedops.linear_cross_entropy(hidden, wte.weight, targets)``, never forming the logits.
Batches are random windows of the text, the same for both runs. AdamW.

    python examples/small_gpt.py     # CPU: 2 layers, 64 wide, 64-character windows, 40 steps
    python examples/small_gpt.py     # CUDA: 6 layers, 6 heads, 384 wide, 256-character
                                     # windows, batch 64, 300 steps, bf16 autocast
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from fused_vs_unfused import add_arguments, compare, report, resolve

import fusedops
from fusedops.benchmarks.models import GPT, GPTConfig

CORPUS = Path(__file__).resolve().parent / "data" / "tiny_corpus.txt"
SMALL = dict(n_layer=2, n_head=2, n_embd=64, block_size=64, batch=8)
FULL = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch=64)


def load_corpus(path: Path = CORPUS) -> tuple[torch.Tensor, list[str]]:
    """The text as (characters,) int64 token ids, and the vocabulary (its sorted characters)."""
    text = path.read_text(encoding="utf-8")
    vocab = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocab)}
    return torch.tensor([index[ch] for ch in text], dtype=torch.long), vocab


def window_starts(n_tokens: int, block: int, batch: int, steps: int, seed: int):
    """The start of every window of every step, reproducibly."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, n_tokens - block - 1, (batch,), generator=generator)
            for _ in range(steps)]


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, small_steps=40, full_steps=300, log_every=4)
    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, dest=name,
                            help=f"default: {SMALL[name]} small, {FULL[name]} otherwise")
    parser.add_argument("--lr", type=float, help="AdamW's (default: 3e-3 small, 1e-3)")
    args = resolve(parser.parse_args(argv))
    sizes = SMALL if args.small else FULL
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    lr = args.lr or (3e-3 if args.small else 1e-3)

    tokens, vocab = load_corpus()
    if tokens.numel() <= args.block_size + 1:
        raise SystemExit(f"{CORPUS} has {tokens.numel()} characters: too short for "
                         f"--block-size {args.block_size}")
    tokens = tokens.to(args.device)
    offsets = torch.arange(args.block_size + 1, device=args.device)
    windows = [tokens[s.to(args.device)[:, None] + offsets]
               for s in window_starts(tokens.numel(), args.block_size, args.batch, args.steps,
                                      args.seed)]
    config = GPTConfig(vocab_size=len(vocab), block_size=args.block_size, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd)
    torch.manual_seed(args.seed)
    model = GPT(config)

    def loss_fn(m, window, fused):
        _, loss = m(window[:, :-1], window[:, 1:], fused_loss=fused)
        return loss

    result = compare(model,
                     lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.01),
                     batch=lambda step: windows[step], loss_fn=loss_fn, args=args,
                     items_per_step=args.batch * args.block_size,
                     fused_context=fusedops.fused_sdpa)
    report(result, args,
           title=f"GPT {config.n_layer} layers x {config.n_embd} wide, {config.n_head} heads, "
                 f"{model.num_parameters():,} parameters, {len(vocab)}-character vocabulary, "
                 f"batch {args.batch} x {args.block_size}",
           unit="tokens", default_plot="small_gpt_loss.png")
    return result


if __name__ == "__main__":
    main()
