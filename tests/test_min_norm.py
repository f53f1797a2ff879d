"""Min-norm solvers against brute force: a fine grid on the segment, a grid / exact face enumeration on
the simplex, and adversarial pairs (parallel, anti-parallel, zero vectors)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from counterpoint.optim.min_norm import min_norm_simplex, min_norm_two, min_norm_two_gram

F64 = torch.float64


def seg_objective(alpha, g1, g2):
    """||a g1 + (1-a) g2||^2 for a vector of alphas (float64)."""
    d11, d12, d22 = g1 @ g1, g1 @ g2, g2 @ g2
    return alpha**2 * d11 + 2 * alpha * (1 - alpha) * d12 + (1 - alpha) ** 2 * d22


def grid_two(g1, g2, points=100_001):
    grid = torch.linspace(0, 1, points, dtype=F64)
    f = seg_objective(grid, g1, g2)
    i = int(f.argmin())
    return float(grid[i]), float(f[i])


def random_pairs():
    gen = torch.Generator().manual_seed(0)
    pairs = []
    for n in (2, 7, 50):
        for _ in range(4):
            g1 = torch.randn(n, generator=gen, dtype=F64)
            g2 = torch.randn(n, generator=gen, dtype=F64) * float(torch.rand(1, generator=gen) * 3 + 0.1)
            pairs.append((g1, g2))
    # a conflicting pair with very different norms, and one with a shared component
    base = torch.randn(30, generator=gen, dtype=F64)
    pairs.append((base, -0.05 * base + 0.01 * torch.randn(30, generator=gen, dtype=F64)))
    pairs.append((base + torch.randn(30, generator=gen, dtype=F64), base))
    return pairs


@pytest.mark.parametrize("g1,g2", random_pairs())
def test_min_norm_two_matches_fine_grid(g1, g2):
    alpha, direction = min_norm_two(g1, g2)
    a_grid, f_grid = grid_two(g1, g2)
    f = float(seg_objective(alpha, g1, g2))
    scale = max(float(g1 @ g1), float(g2 @ g2))
    # never worse than the best grid point, and the grid (step 1e-5) is within h^2 * curvature of it
    assert f <= f_grid + 1e-12 * scale
    assert f >= f_grid - 1e-9 * scale
    assert abs(float(alpha) - a_grid) <= 2e-5
    torch.testing.assert_close(direction, alpha * g1 + (1 - alpha) * g2)


def test_min_norm_two_matches_grid_in_general_shapes():
    gen = torch.Generator().manual_seed(1)
    g1 = torch.randn(3, 4, 5, generator=gen, dtype=F64)
    g2 = -0.3 * g1 + torch.randn(3, 4, 5, generator=gen, dtype=F64)
    alpha, direction = min_norm_two(g1, g2)
    assert direction.shape == g1.shape
    a_grid, _ = grid_two(g1.flatten(), g2.flatten())
    assert abs(float(alpha) - a_grid) <= 2e-5


@pytest.mark.parametrize(
    "name,g1,g2,alpha,direction",
    [
        # same direction: the shorter one is the min-norm point
        ("parallel", torch.tensor([1.0, 2.0, -1.0]), torch.tensor([2.0, 4.0, -2.0]), 1.0, [1.0, 2.0, -1.0]),
        ("parallel_rev", torch.tensor([3.0, 0.0]), torch.tensor([1.0, 0.0]), 0.0, [1.0, 0.0]),
        # opposite directions: the origin is on the segment, at alpha = 3 / (1 + 3)
        ("antiparallel", torch.tensor([1.0, -2.0]), torch.tensor([-3.0, 6.0]), 0.75, [0.0, 0.0]),
        ("g1_zero", torch.zeros(3), torch.tensor([1.0, 2.0, 3.0]), 1.0, [0.0, 0.0, 0.0]),
        ("g2_zero", torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3), 0.0, [0.0, 0.0, 0.0]),
        ("both_zero", torch.zeros(4), torch.zeros(4), 0.5, [0.0] * 4),
        ("identical", torch.tensor([1.0, -1.0]), torch.tensor([1.0, -1.0]), 0.5, [1.0, -1.0]),
        # orthogonal, equal norms: the midpoint
        ("orthogonal", torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0]), 0.5, [1.0, 1.0]),
    ],
)
def test_min_norm_two_adversarial(name, g1, g2, alpha, direction):
    a, d = min_norm_two(g1.to(F64), g2.to(F64))
    assert torch.isfinite(a) and torch.isfinite(d).all(), name
    assert float(a) == pytest.approx(alpha, abs=1e-12), name
    torch.testing.assert_close(d, torch.tensor(direction, dtype=F64), atol=1e-12, rtol=0)
    if name not in ("both_zero", "identical"):  # there every alpha is optimal; the grid picks alpha = 0
        assert float(a) == pytest.approx(grid_two(g1.to(F64), g2.to(F64))[0], abs=1e-5)


def test_min_norm_two_nearly_identical_and_float32():
    g1 = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    g2 = g1 + 1e-9  # equal to float32 precision
    a, d = min_norm_two(g1, g2)
    assert d.dtype == torch.float32 and torch.isfinite(d).all() and 0.0 <= float(a) <= 1.0
    torch.testing.assert_close(d, g1)
    g2 = -0.5 * g1 + 0.1 * torch.randn(1000, generator=torch.Generator().manual_seed(3))
    a32, _ = min_norm_two(g1, g2)
    a64, _ = min_norm_two(g1.double(), g2.double())
    assert float(a32) == pytest.approx(float(a64), abs=1e-5)


def test_min_norm_two_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        min_norm_two(torch.zeros(3), torch.zeros(4))


def test_min_norm_two_gram_is_batched_closed_form():
    gen = torch.Generator().manual_seed(4)
    g1 = torch.randn(16, 9, generator=gen, dtype=F64)
    g2 = torch.randn(16, 9, generator=gen, dtype=F64) * torch.linspace(-2, 2, 16, dtype=F64)[:, None]
    g2[3] = g1[3]  # degenerate row
    g2[5] = 0.0
    alphas = min_norm_two_gram((g1 * g1).sum(1), (g1 * g2).sum(1), (g2 * g2).sum(1))
    expected = torch.stack([min_norm_two(a, b)[0] for a, b in zip(g1, g2)])
    torch.testing.assert_close(alphas, expected)
    assert float(alphas[3]) == 0.5 and float(alphas[5]) == 0.0


# --------------------------------------------------------------------------------------------- simplex


def quad(w, G):
    return float(w @ G @ w)


def simplex_grid_3(G, n=400):
    """Brute force on the 3-simplex with step 1/n: min over ~80k points of w^T G w."""
    i, j = torch.meshgrid(torch.arange(n + 1), torch.arange(n + 1), indexing="ij")
    keep = (i + j) <= n
    W = torch.stack([i[keep], j[keep], n - i[keep] - j[keep]], dim=1).to(F64) / n  # [P, 3]
    f = torch.einsum("pi,ij,pj->p", W, G, W)
    return float(f.min())


def exact_by_faces(G):
    """Exact minimum of w^T G w on the simplex: for every face S solve the KKT system
    [G_SS 1; 1^T 0] [w; -lam] = [0; 1] and keep feasible solutions (Caratheodory: the optimum lies in a
    face with affinely independent vertices, whose system is nonsingular)."""
    k = G.shape[0]
    Gn = G.numpy()
    best = np.inf
    for r in range(1, k + 1):
        for S in itertools.combinations(range(k), r):
            A = np.zeros((r + 1, r + 1))
            A[:r, :r] = Gn[np.ix_(S, S)]
            A[:r, r] = A[r, :r] = 1.0
            if np.linalg.cond(A) > 1e12:
                continue
            sol = np.linalg.solve(A, np.r_[np.zeros(r), 1.0])
            wS = sol[:r]
            if (wS >= -1e-12).all():
                w = np.zeros(k)
                w[list(S)] = wS
                best = min(best, float(w @ Gn @ w))
    return best


def dirichlet_min(G, samples=100_000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = -torch.log(torch.rand(samples, G.shape[0], generator=gen, dtype=F64))
    W = W / W.sum(1, keepdim=True)
    return float(torch.einsum("pi,ij,pj->p", W, G, W).min())


def simplex_cases(k):
    gen = torch.Generator().manual_seed(10 + k)
    shared = torch.randn(12, generator=gen, dtype=F64)
    return {
        "random_highdim": torch.randn(k, 40, generator=gen, dtype=F64),
        "origin_in_hull_2d": torch.randn(k, 2, generator=gen, dtype=F64),
        "shared_component": shared + 0.7 * torch.randn(k, 12, generator=gen, dtype=F64),
        "scaled": torch.randn(k, 6, generator=gen, dtype=F64) * torch.logspace(-2, 2, k, dtype=F64)[:, None],
    }


@pytest.mark.parametrize("case", ["random_highdim", "origin_in_hull_2d", "shared_component", "scaled"])
def test_min_norm_simplex_three_matches_grid(case):
    grads = simplex_cases(3)[case]
    G = grads @ grads.T
    scale = float(G.diagonal().max())
    w = min_norm_simplex(grads)
    assert w.shape == (3,) and float(w.min()) >= 0 and float(w.sum()) == pytest.approx(1.0, abs=1e-12)
    f = quad(w, G)
    f_grid = simplex_grid_3(G)
    assert f <= f_grid + 1e-12 * scale
    assert f == pytest.approx(f_grid, abs=1e-4 * scale)
    assert f == pytest.approx(exact_by_faces(G), abs=1e-9 * scale)


@pytest.mark.parametrize("case", ["random_highdim", "origin_in_hull_2d", "shared_component", "scaled"])
@pytest.mark.parametrize("variant", ["pairwise", "vanilla"])
def test_min_norm_simplex_five_matches_exact_and_sampling(case, variant):
    grads = simplex_cases(5)[case]
    G = grads @ grads.T
    scale = float(G.diagonal().max())
    w = min_norm_simplex(grads, variant=variant, iters=20_000 if variant == "vanilla" else 1000)
    assert float(w.min()) >= 0 and float(w.sum()) == pytest.approx(1.0, abs=1e-12)
    f = quad(w, G)
    assert f <= dirichlet_min(G) + 1e-12 * scale
    tol = 1e-9 if variant == "pairwise" else 1e-4  # plain Frank-Wolfe converges sublinearly
    assert f == pytest.approx(exact_by_faces(G), abs=tol * scale)


def test_min_norm_simplex_gram_and_list_inputs_agree():
    grads = simplex_cases(4)["random_highdim"]
    w_rows = min_norm_simplex(grads)
    w_gram = min_norm_simplex(grads @ grads.T, is_gram=True)
    w_list = min_norm_simplex([g.reshape(5, 8) for g in grads])
    torch.testing.assert_close(w_rows, w_gram)
    torch.testing.assert_close(w_rows, w_list)
    # float32 in -> float32 out
    assert min_norm_simplex(grads.float()).dtype == torch.float32


def test_min_norm_simplex_two_equals_closed_form():
    g1, g2 = random_pairs()[5]
    w = min_norm_simplex(torch.stack([g1, g2]))
    alpha, _ = min_norm_two(g1, g2)
    assert float(w[0]) == pytest.approx(float(alpha), abs=1e-12)


def test_min_norm_simplex_zero_guards():
    grads = torch.tensor([[1.0, 2.0], [0.0, 0.0], [-1.0, 3.0]], dtype=F64)
    w = min_norm_simplex(grads)
    torch.testing.assert_close(w, torch.tensor([0.0, 1.0, 0.0], dtype=F64))  # the zero gradient wins
    w0 = min_norm_simplex(torch.zeros(4, 10))
    torch.testing.assert_close(w0, torch.full((4,), 0.25))
    with pytest.raises(ValueError, match="at least 2"):
        min_norm_simplex(torch.ones(1, 3))
    with pytest.raises(ValueError, match="k x k"):
        min_norm_simplex(torch.ones(2, 3), is_gram=True)


def test_min_norm_simplex_optimality_conditions():
    """KKT of the min-norm point d = sum w_i g_i: <d, g_i> >= ||d||^2 for all i, equality on the support."""
    grads = simplex_cases(5)["shared_component"]
    w = min_norm_simplex(grads)
    d = w @ grads
    inner = grads @ d
    nd = float(d @ d)
    tol = 1e-8 * float((grads * grads).sum(1).max())  # the solver stops at a gap of 1e-10 * max ||g_i||^2
    assert (inner >= nd - tol).all()
    support = w > 1e-6
    assert int(support.sum()) >= 2
    torch.testing.assert_close(inner[support], torch.full_like(inner[support], nd), atol=tol, rtol=0)
