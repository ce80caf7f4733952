"""A small GPT in plain torch: the model of ``examples/small_gpt.py`` and of the ``training``
benchmark family (GPT-2 small there: 12 layers, 768 wide, 12 heads, vocabulary 50257).

Written so that fusedops can reach every part of it without changing the model's code:

- the projections are ``nn.Linear`` and the MLP is ``nn.Sequential(Linear, GELU(tanh),
  Linear)``, so ``fusedops.patch(model)`` swaps in ``FusedLinear`` and fuses the GELU into the
  first projection's epilogue;
- attention calls ``F.scaled_dot_product_attention(..., is_causal=True)``, which
  ``with fusedops.fused_sdpa(): ...`` routes to fusedops' attention;
- the language-model head is tied to the token embedding and applied functionally, so
  ``forward(..., fused_loss=True)`` can hand the final hidden states and ``wte.weight`` to
  ``fusedops.linear_cross_entropy`` without ever materialising the (tokens, vocab) logits.

No dropout: two runs from the same weights on the same data are deterministic, which is what
the fused-versus-unfused comparisons rely on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of a GPT; the defaults are GPT-2 small (124M parameters with the tied head)."""

    vocab_size: int = 50257
    block_size: int = 1024  # the longest sequence (position embeddings)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} is not a multiple of "
                             f"n_head={self.n_head}")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x):
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        # (B, S, C) -> (B, H, S, D): the layout SDPA and fusedops.attention take
        q, k, v = (t.view(batch, seq, self.n_head, width // self.n_head).transpose(1, 2)
                   for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, width))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = nn.Sequential(nn.Linear(config.n_embd, 4 * config.n_embd),
                                 nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * config.n_embd, config.n_embd))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token and position embeddings, ``n_layer`` pre-norm blocks, a final LayerNorm and an
    lm head tied to the token embedding."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.apply(self._init_weights)
        # GPT-2's scaling of the projections that write into the residual stream
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """The final hidden states (B, S, C), after ``ln_f``: what the lm head multiplies."""
        seq = idx.shape[1]
        if seq > self.config.block_size:
            raise ValueError(f"GPT: sequence of {seq} tokens, longer than block_size="
                             f"{self.config.block_size}")
        positions = torch.arange(seq, device=idx.device)
        x = self.wte(idx) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                fused_loss: bool = False):
        """``(logits, loss)``.

        Without ``targets`` the loss is None. With them it is the mean cross-entropy over all
        tokens; ``fused_loss=True`` computes it with ``fusedops.linear_cross_entropy`` from the
        hidden states and the tied head's weight, and returns None for the logits (they are
        never formed)."""
        h = self.hidden(idx)
        if targets is not None and fused_loss:
            import fusedops

            width = h.shape[-1]
            loss = fusedops.linear_cross_entropy(h.reshape(-1, width), self.wte.weight,
                                                 targets.reshape(-1))
            return None, loss
        logits = F.linear(h, self.wte.weight)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    def num_parameters(self) -> int:
        """Distinct parameters (the tied head is counted once, as the embedding)."""
        return sum(p.numel() for p in self.parameters())


__all__ = ["GPT", "Block", "CausalSelfAttention", "GPTConfig"]
