"""The attentive probe (``evaluate/attentive_probe.py``) finds information a mean pool dilutes."""

from __future__ import annotations

import torch

from counterpoint.evaluate.attentive_probe import attentive_probe
from counterpoint.evaluate.linear_probe import linear_probe


def _tokens(n: int = 600, t: int = 16, c: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The class sits in one token at a random place, marked by channel 0; every other token is noise."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, c, generator=gen)
    labels = torch.randint(0, 4, (n,), generator=gen)
    where = torch.randint(0, t, (n,), generator=gen)
    rows = torch.arange(n)
    x[rows, where, 0] = 6.0
    x[rows, where, 1:5] = 0.0
    x[rows, where, 1 + labels] = 4.0
    return x, labels


def test_attentive_probe_reads_the_one_informative_token() -> None:
    x, labels = _tokens()
    attentive = attentive_probe(x, labels, seed=0)
    mean_pooled = linear_probe(x.mean(dim=1), labels, seed=0)
    assert attentive["top1"] >= 0.9, attentive
    assert mean_pooled["top1"] < attentive["top1"] - 0.2, (mean_pooled, attentive)
    assert attentive["n_train"] == 360 and attentive["n_test"] == 120 and 1 <= attentive["epoch"] <= 60


def test_attentive_probe_is_deterministic_for_a_seed() -> None:
    x, labels = _tokens(n=200)
    assert attentive_probe(x, labels, seed=3, epochs=3) == attentive_probe(x, labels, seed=3, epochs=3)
