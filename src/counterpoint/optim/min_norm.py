"""Minimum-norm points of convex hulls of gradients: the sub-problem of MGDA and MMPareto.

Given loss gradients g_1..g_k, find weights w on the simplex minimising ||sum_i w_i g_i||^2. The minimiser
is the minimum-norm element of the convex hull of the gradients; when it is nonzero, its negative is a
descent direction for every loss at once, and when it is zero the point is Pareto-stationary
(Desideri 2012, "Multiple-gradient descent algorithm (MGDA) for multiobjective optimization";
Sener & Koltun, NeurIPS 2018, "Multi-Task Learning as Multi-Objective Optimization").

- ``min_norm_two``: the closed form for two gradients (Sener & Koltun 2018, Algorithm 1).
- ``min_norm_two_gram``: the same from the three inner products, vectorised over a batch of pairs.
- ``min_norm_simplex``: k >= 2 gradients (or their Gram matrix) by Frank-Wolfe with exact line search
  (Sener & Koltun 2018, Algorithm 2), in its pairwise variant by default (Lacoste-Julien & Jaggi,
  NeurIPS 2015, "On the Global Linear Convergence of Frank-Wolfe Optimization Variants"), which
  converges linearly where the plain step zig-zags when the solution lies inside a face.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["min_norm_simplex", "min_norm_two", "min_norm_two_gram"]


def _acc_dtype(t: Tensor) -> torch.dtype:
    """Accumulate dot products in at least float32 (half-precision gradients lose the sign of cos)."""
    return torch.promote_types(t.dtype, torch.float32)


def min_norm_two_gram(g11: Tensor, g12: Tensor, g22: Tensor, eps: float = 1e-12) -> Tensor:
    """Weight on g1 of the minimum-norm point of [g1, g2], from inner products (any batch shape).

    alpha = argmin_{a in [0,1]} a^2 g11 + 2 a (1-a) g12 + (1-a)^2 g22
          = clip(<g2 - g1, g2> / ||g1 - g2||^2, 0, 1) = clip((g22 - g12) / (g11 - 2 g12 + g22), 0, 1).

    Guard (``eps`` is relative): when ||g1 - g2||^2 <= eps * max(||g1||^2, ||g2||^2), the two gradients
    are equal to working precision (or both zero) and every alpha gives the same point; alpha = 0.5.
    No host synchronisation: everything stays a tensor.
    """
    denom = g11 - 2 * g12 + g22
    degenerate = denom <= eps * torch.maximum(g11, g22)
    safe = torch.where(degenerate, torch.ones_like(denom), denom)
    alpha = ((g22 - g12) / safe).clamp(0.0, 1.0)
    return torch.where(degenerate, torch.full_like(alpha, 0.5), alpha)


def min_norm_two(g1: Tensor, g2: Tensor, eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """Closed-form minimum-norm point of the segment [g1, g2] (Sener & Koltun 2018, Algorithm 1).

    Returns ``(alpha, direction)`` with alpha a 0-dim tensor in [0, 1] minimising
    ||alpha g1 + (1 - alpha) g2||^2 and ``direction = alpha g1 + (1 - alpha) g2`` (shape of g1).
    KKT: alpha = <g2 - g1, g2> / ||g1 - g2||^2 clipped to [0, 1]. ||g1 - g2||^2 is computed from the
    difference itself (no cancellation); ``eps`` is the relative guard of ``min_norm_two_gram``
    (parallel-equal or zero gradients give alpha = 0.5). g1 and g2 may have any shape, the same one.
    """
    if g1.shape != g2.shape:
        raise ValueError(f"min_norm_two: shapes differ, {tuple(g1.shape)} vs {tuple(g2.shape)}")
    dtype = _acc_dtype(g1)
    a, b = g1.reshape(-1).to(dtype), g2.reshape(-1).to(dtype)
    diff = a - b
    denom = diff.dot(diff)
    num = -diff.dot(b)  # <g2 - g1, g2>
    degenerate = denom <= eps * torch.maximum(a.dot(a), b.dot(b))
    safe = torch.where(degenerate, torch.ones_like(denom), denom)
    alpha = torch.where(degenerate, torch.full_like(denom, 0.5), (num / safe).clamp(0.0, 1.0))
    direction = (alpha * a + (1 - alpha) * b).to(g1.dtype).view_as(g1)
    return alpha, direction


def min_norm_simplex(
    grads: Tensor | Sequence[Tensor],
    *,
    is_gram: bool = False,
    iters: int = 1000,
    tol: float = 1e-10,
    eps: float = 1e-12,
    variant: str = "pairwise",
) -> Tensor:
    """Weights w[k] on the simplex minimising ||sum_i w_i g_i||^2, for k >= 2 gradients.

    ``grads``: a [k, n] tensor (one flattened gradient per row), a sequence of k same-sized tensors, or,
    with ``is_gram=True``, the k x k Gram matrix G_ij = <g_i, g_j>. The objective is w^T G w, so only G is
    needed; it is formed once in float64 and the solver runs on host floats (k is the number of losses,
    small), which costs one device synchronisation per call.

    Frank-Wolfe with exact line search as in MGDA-UB (Sener & Koltun, NeurIPS 2018, Algorithm 2): start
    from the best vertex pair (closed form), then repeat: t = argmin_i (G w)_i is the vertex the linear
    model prefers; the FW gap w^T G w - (G w)_t bounds the suboptimality and stops the loop when it falls
    below ``tol * max_i G_ii``.
    ``variant="pairwise"`` (default) moves weight from the active vertex s = argmax_{w_i > 0} (G w)_i to t,
    with the exact step (v_s - v_t) / (G_tt - 2 G_ts + G_ss) clipped to [0, w_s] (Lacoste-Julien & Jaggi
    2015, linear convergence). ``variant="vanilla"`` is the paper's step w <- (1-gamma) w + gamma e_t with
    gamma from the two-point closed form (sublinear, kept for reference).
    Guards: an all-zero Gram gives uniform weights; a zero gradient gets weight 1 (the minimum norm is 0);
    steps with curvature <= eps * scale are taken to the boundary.
    """
    if variant not in ("pairwise", "vanilla"):
        raise ValueError(f"min_norm_simplex: variant must be 'pairwise' or 'vanilla', got {variant!r}")
    if is_gram:
        gram = torch.as_tensor(grads)
        if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
            raise ValueError(f"min_norm_simplex: a Gram matrix must be k x k, got {tuple(gram.shape)}")
        ref = gram
        gram = gram.to(torch.float64)
    else:
        if isinstance(grads, Tensor):
            mat = grads.reshape(grads.shape[0], -1)
        else:
            mat = torch.stack([g.reshape(-1) for g in grads])
        ref = mat
        mat = mat.to(torch.float64)
        gram = mat @ mat.T  # [k, k]
    k = gram.shape[0]
    if k < 2:
        raise ValueError(f"min_norm_simplex: needs at least 2 gradients, got {k}")
    G = gram.cpu().tolist()  # the single synchronisation
    out_dtype = ref.dtype if ref.dtype.is_floating_point else torch.float32
    w = _solve(G, k, iters, tol, eps, variant)
    return torch.tensor(w, dtype=out_dtype, device=ref.device)


def _two(g11: float, g12: float, g22: float, eps: float) -> float:
    """Host-float version of ``min_norm_two_gram``."""
    denom = g11 - 2 * g12 + g22
    if denom <= eps * max(g11, g22):
        return 0.5
    return min(1.0, max(0.0, (g22 - g12) / denom))


def _solve(G: list[list[float]], k: int, iters: int, tol: float, eps: float, variant: str) -> list[float]:
    scale = max(G[i][i] for i in range(k))
    if not scale > 0.0:  # all gradients zero (or a NaN Gram): every weighting is as good
        return [1.0 / k] * k

    # Initialise with the best vertex or vertex pair (exact for k = 2).
    i0 = min(range(k), key=lambda i: G[i][i])
    w = [0.0] * k
    w[i0], best = 1.0, G[i0][i0]
    for i in range(k):
        for j in range(i + 1, k):
            a = _two(G[i][i], G[i][j], G[j][j], eps)
            f = a * a * G[i][i] + 2 * a * (1 - a) * G[i][j] + (1 - a) * (1 - a) * G[j][j]
            if f < best:
                best, w = f, [0.0] * k
                w[i], w[j] = a, 1.0 - a
    v = [sum(G[i][j] * w[j] for j in range(k)) for i in range(k)]  # v = G w

    for _ in range(iters):
        f = sum(wi * vi for wi, vi in zip(w, v))
        t = min(range(k), key=v.__getitem__)
        if f - v[t] <= tol * scale:  # Frank-Wolfe gap: f(w) - f* <= 2 * gap
            break
        if variant == "vanilla":
            gamma = _two(G[t][t], v[t], f, eps)  # weight on e_t of the min-norm point of [g_t, G^.5 w]
            w = [(1 - gamma) * wi for wi in w]
            w[t] += gamma
            v = [(1 - gamma) * vi + gamma * G[i][t] for i, vi in enumerate(v)]
            continue
        s = max((i for i in range(k) if w[i] > 0.0), key=v.__getitem__)
        curv = G[t][t] - 2 * G[t][s] + G[s][s]
        gmax = w[s]
        gamma = gmax if curv <= eps * scale else min(gmax, (v[s] - v[t]) / curv)
        if gamma <= 0.0:
            break
        w[t] += gamma
        w[s] = 0.0 if gamma == gmax else w[s] - gamma
        v = [vi + gamma * (G[i][t] - G[i][s]) for i, vi in enumerate(v)]
    total = sum(w)
    return [wi / total for wi in w]
