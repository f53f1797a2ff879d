"""Attentive probe: a classifier that learns its own attention pooling over a frozen encoder's tokens.

A linear probe reads one pooled vector, so it measures what the encoder's own pooling kept; the attentive
probe (V-JEPA, Bardes et al. 2024; AIM, El-Nouby et al. 2024; the LCL paper evaluates both) learns which
tokens to read, so it measures what the whole token map holds. Here: one learnable query cross-attending over
the standardised tokens (multi-head), then a linear layer, trained with AdamW on the same 60/20/20 split as
the linear probe; the epoch with the best validation accuracy is the one tested.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from counterpoint.models.lcl import AttentivePool


class AttentiveClassifier(nn.Module):
    def __init__(self, width: int, num_classes: int, heads: int) -> None:
        super().__init__()
        self.pool = AttentivePool(width, width, heads)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.pool(tokens)
        return self.head(self.norm(pooled))


def attentive_probe(tokens: torch.Tensor, labels: torch.Tensor, seed: int = 0, epochs: int = 60,
                    lr: float = 3e-3, weight_decay: float = 0.05, batch_size: int = 128,
                    fractions: tuple[float, float] = (0.6, 0.2)) -> dict[str, float]:
    """``tokens`` ``[N, T, C]`` (frozen), ``labels`` ``[N]``: test top-1 at the best validation epoch, with the
    split the linear probe uses for the same ``seed``. Deterministic for a seed."""
    n, _, width = tokens.shape
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    n_train, n_val = int(fractions[0] * n), int(fractions[1] * n)
    tr, va, te = perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]
    mean, std = tokens[tr].mean(dim=(0, 1)), tokens[tr].std(dim=(0, 1)).clamp_min(1e-6)
    x = (tokens - mean) / std
    heads = next(h for h in (4, 2, 1) if width % h == 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = AttentiveClassifier(width, int(labels.max()) + 1, heads)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)

    def accuracy(rows: torch.Tensor) -> float:
        with torch.no_grad():
            return float((probe(x[rows]).argmax(dim=1) == labels[rows]).float().mean())

    best = (-1.0, 0.0, 0)  # (val, test, epoch)
    for epoch in range(epochs):
        probe.train()
        order = tr[torch.randperm(len(tr), generator=gen)]
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            loss = F.cross_entropy(probe(x[rows]), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
        probe.eval()
        val = accuracy(va)
        if val > best[0]:
            best = (val, accuracy(te), epoch + 1)
    return {"top1": best[1], "val_top1": best[0], "epoch": best[2], "n_train": len(tr), "n_test": len(te)}
