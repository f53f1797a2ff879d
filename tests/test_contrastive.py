"""The contrastive losses against brute-force loops and finite differences."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from counterpoint.objectives.contrastive import (
    in_batch_margin_loss,
    infonce_loss,
    margin_contrastive_loss,
)


def brute_force_infonce(u: torch.Tensor, v: torch.Tensor, scale: float) -> float:
    """Sum over every row of -log softmax, written with Python loops."""
    n = u.shape[0]
    total = 0.0
    for a, b in ((u, v), (v, u)):
        for i in range(n):
            logits = [scale * float(a[i] @ b[j]) for j in range(n)]
            m = max(logits)
            lse = m + math.log(sum(math.exp(x - m) for x in logits))
            total += lse - logits[i]
    return total / (2 * n)


def unit(n: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype), dim=-1)


@pytest.mark.parametrize(("n", "d", "t"), [(2, 3, 0.07), (7, 5, 0.5), (16, 8, 0.01)])
def test_infonce_matches_brute_force(n: int, d: int, t: float) -> None:
    u, v = unit(n, d, 0), unit(n, d, 1)
    logit_scale = torch.tensor(math.log(1 / t), dtype=torch.float64)
    got = infonce_loss(u, v, u, v, logit_scale)
    assert got.item() == pytest.approx(brute_force_infonce(u, v, 1 / t), rel=1e-6)


def test_infonce_perfect_alignment_is_near_zero_and_random_is_near_log_n() -> None:
    u = unit(32, 64, 0)
    assert infonce_loss(u, u, u, u, torch.tensor(math.log(100.0), dtype=torch.float64)) < 1e-3
    v = unit(32, 64, 1)
    # With scale 1 the logits are nearly flat, so the loss is close to log(32).
    flat = infonce_loss(u, v, u, v, torch.tensor(0.0, dtype=torch.float64))
    assert flat.item() == pytest.approx(math.log(32), rel=0.05)


def test_infonce_gradients_match_finite_differences() -> None:
    u = unit(5, 4, 2).requires_grad_()
    v = unit(5, 4, 3).requires_grad_()
    s = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: infonce_loss(a, b, a, b, c), (u, v, s))


def test_local_loss_blocks_average_to_the_global_loss() -> None:
    """The multi-process form: each 'rank' scores its rows against the global columns; the mean over ranks of
    the local losses is the single-process loss, and so are the gradients."""
    u = unit(12, 6, 4).requires_grad_()
    v = unit(12, 6, 5).requires_grad_()
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    full = infonce_loss(u, v, u, v, s)
    g_full = torch.autograd.grad(full, (u, v, s))
    world, b = 3, 4
    local = sum(infonce_loss(u[r * b : (r + 1) * b], v[r * b : (r + 1) * b], u, v, s, offset=r * b)
                for r in range(world)) / world
    g_local = torch.autograd.grad(local, (u, v, s))
    assert local.item() == pytest.approx(full.item(), rel=1e-12)
    for a, c in zip(g_full, g_local):
        torch.testing.assert_close(a, c)


def test_margin_loss_hand_computed() -> None:
    d = torch.tensor([0.5, 0.2, 1.5, 0.0])
    y = torch.tensor([1, 0, 0, 1])
    margin = 1.0
    # pairs: 0.25 ; (1-0.2)^2 = 0.64 ; max(1-1.5,0)^2 = 0 ; 0  -> sum 0.89 / (2*4)
    assert margin_contrastive_loss(d, y, margin).item() == pytest.approx(0.89 / 8)


def test_in_batch_margin_loss_balances_positives_and_negatives() -> None:
    u, v = unit(6, 4, 6), unit(6, 4, 7)
    dist = torch.cdist(u, v)
    eye = torch.eye(6, dtype=torch.bool)
    pos = dist[eye].pow(2).mean() / 2
    neg = F.relu(0.8 - dist[~eye]).pow(2).mean() / 2
    got = in_batch_margin_loss(u, v, 0.8)
    assert got.item() == pytest.approx((pos + neg).item(), rel=1e-9)
    # Matching pairs at distance 0 and non-matching pairs beyond the margin cost nothing.
    basis = torch.eye(4, dtype=torch.float64)
    assert in_batch_margin_loss(basis, basis, 1.0).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("loss", ["clip", "siglip", "margin"])
def test_contrastive_task_trains_a_tiny_model(loss: str) -> None:
    """Each objective, through the task interface, drives its loss down on a fixed batch."""
    from counterpoint.models import create_model
    from counterpoint.objectives.contrastive import ContrastiveTask

    torch.manual_seed(0)
    model = create_model("tiny-cnn", embed_dim=16, vocab_size=64, context_length=8)
    if loss == "siglip":
        model.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))
        with torch.no_grad():
            model.logit_scale.fill_(math.log(10.0))
    task = ContrastiveTask(model, loss)
    text = torch.randint(4, 64, (8, 8))
    text[:, 0], text[:, 6], text[:, 7] = 1, 2, 0  # <sot> ... <eot> <pad>
    batch = {"image": torch.randn(8, 3, 32, 32), "text": text}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        losses, metrics = task(batch)
        total = sum(losses.values())
        first = first if first is not None else total.item()
        opt.zero_grad()
        total.backward()
        opt.step()
    assert total.item() < 0.5 * first
    assert 0.0 <= metrics["batch_acc_i2t"] <= 1.0


def test_siglip_task_matches_the_pairwise_formula() -> None:
    from counterpoint.objectives.chunked import chunked_siglip_loss

    u, v = unit(6, 4, 8), unit(6, 4, 9)
    s, b = torch.tensor(math.log(10.0), dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    z = 2 * torch.eye(6, dtype=torch.float64) - 1
    expected = -F.logsigmoid(z * (s.exp() * u @ v.T + b)).sum() / 6
    assert chunked_siglip_loss(u, v, s, b).item() == pytest.approx(expected.item(), rel=1e-9)
