"""Linear probe: multinomial logistic regression on frozen features, with the L2 strength chosen on a
validation split (never on test), then refit on train+validation and scored once on test."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from counterpoint.objectives.distributed import world_info


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, iters: int = 100) -> torch.Tensor:
    """Full-batch L-BFGS on mean cross-entropy + ``l2/2 ||W||^2``; returns ``[D + 1, C]`` (bias last row)."""
    xb = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1).double()
    w = torch.zeros(xb.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xb @ w, y) + 0.5 * l2 * w[:-1].pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def predict(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (torch.cat([x, torch.ones(x.shape[0], 1)], dim=1).double() @ w).argmax(dim=1)


def linear_probe(features: torch.Tensor, labels: torch.Tensor, seed: int = 0,
                 l2_grid: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
                 fractions: tuple[float, float] = (0.6, 0.2), across_ranks: bool = False) -> dict[str, float]:
    """Split ``features`` 60/20/20 (train/val/test) by a seeded permutation, pick the L2 strength with the
    best validation accuracy, refit on train+val, report test accuracy.

    ``across_ranks``: the grid's fits are dealt out over the ranks of the process group (every rank holds all
    ``features`` and must call this) and the validation accuracies gathered; each fit is the same
    deterministic computation wherever it runs, so the result equals one process's."""
    n = features.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train, n_val = int(fractions[0] * n), int(fractions[1] * n)
    tr, va, te = perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]
    # Standardise with training statistics only.
    mean, std = features[tr].mean(0), features[tr].std(0).clamp_min(1e-6)
    x = (features - mean) / std
    num_classes = int(labels.max()) + 1
    rank, world = world_info() if across_ranks else (0, 1)
    val_acc = {}
    for l2 in l2_grid[rank::world]:
        w = fit_logistic(x[tr], labels[tr], num_classes, l2)
        val_acc[l2] = float((predict(w, x[va]) == labels[va]).float().mean())
    if world > 1:
        shares: list[dict[float, float]] = [{} for _ in range(world)]
        dist.all_gather_object(shares, val_acc)
        val_acc = {l2: acc for share in shares for l2, acc in share.items()}
    best = max(l2_grid, key=lambda l2: (val_acc[l2], l2))  # ties: the stronger regulariser
    trva = torch.cat([tr, va])
    w = fit_logistic(x[trva], labels[trva], num_classes, best)
    test_acc = float((predict(w, x[te]) == labels[te]).float().mean())
    return {"top1": test_acc, "l2": best, "val_top1": val_acc[best], "n_train": len(trva), "n_test": len(te)}
