"""Gradient combiners: exact formulas on linear losses (where g_m and g_u are known by construction), and
the plumbing on a tiny real model with 2 and 3 modalities (grads written, sums, pass counts)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from counterpoint.optim import (
    COMBINERS,
    GradientCombiner,
    MMPareto,
    build_combiner,
    min_norm_two,
)

F64 = torch.float64


# ----------------------------------------------------------------------------------- linear problems


class Linear:
    """Losses linear in the parameters, so every gradient is a known constant.

    Encoder k has tensors theta_k,i; L_mm = sum <A_k,i, theta_k,i> + <C, phi_fused>,
    L_k = sum_i <B_k,i, theta_k,i> + <D_k, phi_k>. Hence g_m = A_k, g_u = B_k; the fusion head gets C
    from L_mm only, unimodal head k gets D_k from L_k only.
    """

    def __init__(self, A: dict[str, list[torch.Tensor]], B: dict[str, list[torch.Tensor]], seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.A, self.B = A, B
        self.mods = list(A)
        self.theta = {
            k: [torch.randn(a.shape, generator=gen, dtype=F64, requires_grad=True) for a in A[k]]
            for k in self.mods
        }
        self.phi_f = torch.randn(4, generator=gen, dtype=F64, requires_grad=True)
        self.phi = {k: torch.randn(3, generator=gen, dtype=F64, requires_grad=True) for k in self.mods}
        self.C = torch.randn(4, generator=gen, dtype=F64)
        self.D = {k: torch.randn(3, generator=gen, dtype=F64) for k in self.mods}

    def groups(self):
        g = {k: list(self.theta[k]) for k in self.mods}
        g["heads"] = [self.phi_f, *self.phi.values()]
        return g

    def losses(self):
        fused = (self.C * self.phi_f).sum()
        out = {}
        for k in self.mods:
            fused = fused + sum((a * t).sum() for a, t in zip(self.A[k], self.theta[k]))
            out[k] = (
                sum((b * t).sum() for b, t in zip(self.B[k], self.theta[k])) + (self.D[k] * self.phi[k]).sum()
            )
        return {"fused": fused, **out}

    def run(self, combiner: GradientCombiner, context=None):
        return combiner.combine(self.losses(), self.groups(), context)

    def enc_grad(self, k):
        return torch.cat([t.grad.reshape(-1) for t in self.theta[k]])


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def make_pair(seed, shapes, relation):
    """A (g_m tensors) and B (g_u tensors) for one encoder; relation 'conflict' / 'agree'."""
    gen = torch.Generator().manual_seed(seed)
    A = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
    noise = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
    if relation == "conflict":  # a large opposing component plus some noise: cos < 0, alpha inside (0, 1)
        B = [-1.5 * a + 0.5 * n for a, n in zip(A, noise)]
    else:
        B = [0.8 * a + 0.5 * n for a, n in zip(A, noise)]
    return A, B


SHAPES = [(6, 5), (5,), (3, 6), (3,)]


def mmpareto_expected(A, B, gamma, rescale):
    """Independent implementation of METHODS.md section 2 for one encoder, per tensor."""
    m, u = flat(A), flat(B)
    mm, uu, mu = m @ m, u @ u, m @ u
    cos = mu / (mm.sqrt() * uu.sqrt())
    if cos > 0:
        alpha = 0.5
        hs = [a + b for a, b in zip(A, B)]
    else:
        alpha = float(((uu - mu) / (m - u).pow(2).sum()).clamp(0, 1))
        hs = [2 * (alpha * a + (1 - alpha) * b) for a, b in zip(A, B)]
    ss = [a + b for a, b in zip(A, B)]
    if rescale == "per_encoder":
        factor = gamma * flat(ss).norm() / flat(hs).norm()
        return [h * factor for h in hs], alpha, float(cos)
    return [gamma * max(s.norm(), h.norm()) * h / h.norm() for s, h in zip(ss, hs)], alpha, float(cos)


# --------------------------------------------------------------------------------------------- MMPareto


@pytest.mark.parametrize("rescale", ["per_tensor", "per_encoder"])
@pytest.mark.parametrize("gamma", [1.0, 1.5])
def test_mmpareto_matches_specification(rescale, gamma):
    A_a, B_a = make_pair(0, SHAPES, "conflict")
    A_v, B_v = make_pair(1, SHAPES[:2], "agree")
    prob = Linear({"audio": A_a, "visual": A_v}, {"audio": B_a, "visual": B_v})
    stats = prob.run(MMPareto(gamma=gamma, rescale=rescale))
    for k, A, B, conflict in (("audio", A_a, B_a, 1.0), ("visual", A_v, B_v, 0.0)):
        expected, alpha, cos = mmpareto_expected(A, B, gamma, rescale)
        for t, e in zip(prob.theta[k], expected):
            torch.testing.assert_close(t.grad, e, rtol=1e-10, atol=1e-12)
        assert stats[f"alpha/{k}"] == pytest.approx(alpha, abs=1e-12)
        assert stats[f"cos/{k}"] == pytest.approx(cos, abs=1e-12)
        assert stats[f"conflict/{k}"] == conflict
        assert stats[f"norm_m/{k}"] == pytest.approx(float(flat(A).norm()))
        assert stats[f"norm_u/{k}"] == pytest.approx(float(flat(B).norm()))
    # heads: exactly the plain gradient of L_mm + sum_k L_k
    torch.testing.assert_close(prob.phi_f.grad, prob.C, rtol=0, atol=0)
    for k in prob.mods:
        torch.testing.assert_close(prob.phi[k].grad, prob.D[k], rtol=0, atol=0)


def test_mmpareto_conflict_gives_common_descent_direction():
    A, B = make_pair(3, SHAPES, "conflict")
    m, u = flat(A), flat(B)
    assert m @ u < 0
    prob = Linear({"a": A, "b": A}, {"a": B, "b": B})
    stats = prob.run(MMPareto(gamma=1.0, rescale="per_encoder"))
    h = prob.enc_grad("a")
    assert h @ m > 0 and h @ u > 0
    torch.testing.assert_close(h @ m, h @ u, rtol=1e-9, atol=0)  # alpha is interior: equal inner products
    torch.testing.assert_close(h.norm(), (m + u).norm(), rtol=1e-12, atol=0)
    # the direction is the min-norm point of [g_m, g_u]
    alpha, d = min_norm_two(m, u)
    torch.testing.assert_close(h / h.norm(), d / d.norm())
    assert 0.0 < stats["alpha/a"] < 1.0 and stats["alpha/a"] == pytest.approx(float(alpha))


def test_mmpareto_per_encoder_norm_and_per_tensor_rule_branches():
    A, B = make_pair(4, SHAPES, "conflict")
    # make tensor 0 strongly conflicting (||h_0|| << ||s_0||) and tensor 1 weakly (||h_1|| > ||s_1||)
    B[0] = -A[0] * 0.9
    B[1] = A[1] * 0.1 - 3.0
    prob = Linear({"a": A, "b": A}, {"a": B, "b": B})
    prob.run(MMPareto(gamma=1.5, rescale="per_encoder"))
    torch.testing.assert_close(prob.enc_grad("a").norm(), 1.5 * (flat(A) + flat(B)).norm())

    prob.run(MMPareto(gamma=1.5, rescale="per_tensor"))
    m, u = flat(A), flat(B)
    alpha, _ = min_norm_two(m, u)
    branches = set()
    for t, a, b in zip(prob.theta["a"], A, B):
        h, s = 2 * (alpha * a + (1 - alpha) * b), a + b
        branches.add(bool(s.norm() > h.norm()))
        expected = 1.5 * torch.maximum(s.norm(), h.norm()) * h / h.norm()
        torch.testing.assert_close(t.grad, expected)
    assert branches == {True, False}  # both sides of the max are exercised


@pytest.mark.parametrize("rescale", ["per_tensor", "per_encoder"])
def test_mmpareto_no_conflict_is_gamma_times_sum(rescale):
    A, B = make_pair(5, SHAPES, "agree")
    prob = Linear({"a": A, "b": A}, {"a": B, "b": B})
    stats = prob.run(MMPareto(gamma=1.5, rescale=rescale))
    for t, a, b in zip(prob.theta["a"], A, B):
        torch.testing.assert_close(t.grad, 1.5 * (a + b), rtol=1e-12, atol=0)
    assert stats["conflict/a"] == 0.0 and stats["alpha/a"] == 0.5


def test_mmpareto_exact_opposition_gives_zero_not_nan():
    A = [torch.ones(3, 2, dtype=F64), torch.ones(2, dtype=F64)]
    B = [-a for a in A]
    prob = Linear({"a": A, "b": A}, {"a": B, "b": B})
    stats = prob.run(MMPareto())
    for t in prob.theta["a"]:
        torch.testing.assert_close(t.grad, torch.zeros_like(t))
    assert stats["cos/a"] == pytest.approx(-1.0) and stats["conflict/a"] == 1.0


# --------------------------------------------------------------------------------------- MGDA / PCGrad


def test_mgda_per_encoder_is_min_norm_point():
    A_a, B_a = make_pair(6, SHAPES, "conflict")
    A_v, B_v = make_pair(7, SHAPES, "agree")
    prob = Linear({"a": A_a, "v": A_v}, {"a": B_a, "v": B_v})
    stats = prob.run(build_combiner("mgda", scale=2.0))
    for k, A, B in (("a", A_a, B_a), ("v", A_v, B_v)):
        alpha, d = min_norm_two(flat(A), flat(B))
        torch.testing.assert_close(prob.enc_grad(k), 2.0 * d)
        assert stats[f"alpha/{k}"] == pytest.approx(float(alpha))
    torch.testing.assert_close(prob.phi_f.grad, prob.C)


def test_mgda_all_blocks_satisfies_kkt_over_all_losses():
    mods = ["a", "v", "t"]
    pairs = [make_pair(10 + i, SHAPES[:2], "conflict" if i != 1 else "agree") for i in range(3)]
    prob = Linear({k: p[0] for k, p in zip(mods, pairs)}, {k: p[1] for k, p in zip(mods, pairs)})
    stats = prob.run(build_combiner("mgda", blocks="all"))
    d = torch.cat([prob.enc_grad(k) for k in mods])
    zeros = {k: torch.zeros_like(flat(p[0])) for k, p in zip(mods, pairs)}
    g_mm = torch.cat([flat(p[0]) for p in pairs])
    g_k = [torch.cat([flat(p[1]) if k == j else zeros[k] for k, p in zip(mods, pairs)]) for j in mods]
    losses = [g_mm, *g_k]
    weights = [stats["weight/fused"]] + [stats[f"weight/{k}"] for k in mods]
    assert sum(weights) == pytest.approx(1.0) and min(weights) >= 0
    torch.testing.assert_close(d, sum(w * g for w, g in zip(weights, losses)))
    nd = d @ d
    for w, g in zip(weights, losses):  # min-norm optimality: <d, g_i> >= ||d||^2, equality where w_i > 0
        assert g @ d >= nd * (1 - 1e-6)
        if w > 1e-6:
            assert float(g @ d) == pytest.approx(float(nd), rel=1e-6)


def test_pcgrad_projects_conflicting_pairs():
    A, B = make_pair(8, SHAPES, "conflict")
    A2, B2 = make_pair(9, SHAPES, "agree")
    prob = Linear({"a": A, "b": A2}, {"a": B, "b": B2})
    prob.run(build_combiner("pcgrad"))
    m, u = flat(A), flat(B)
    expected = (m - (m @ u) / (u @ u) * u) + (u - (m @ u) / (m @ m) * m)
    torch.testing.assert_close(prob.enc_grad("a"), expected)
    torch.testing.assert_close(prob.enc_grad("b"), flat(A2) + flat(B2))


# --------------------------------------------------------------------------------------------- OGM-GE


def two_class_logits(p_true, labels):
    """Logits whose softmax gives probability p_true to the label (2 classes)."""
    rows = []
    for p, y in zip(p_true, labels):
        z = math.log(p / (1 - p))
        rows.append([z, 0.0] if y == 0 else [0.0, z])
    return torch.tensor(rows, dtype=torch.float32)


def test_ogm_ge_coefficients_two_modalities_by_hand():
    labels = torch.tensor([0, 1])
    # score_audio = 0.8 + 0.6 = 1.4, score_visual = 0.5 + 0.2 = 0.7 -> ratio_audio = 2, ratio_visual = 0.5
    ctx = {
        "logits": {
            "audio": two_class_logits([0.8, 0.6], labels),
            "visual": two_class_logits([0.5, 0.2], labels),
        },
        "labels": labels,
    }
    A_a, B_a = make_pair(20, SHAPES, "agree")
    A_v, B_v = make_pair(21, SHAPES[:2], "agree")
    prob = Linear({"audio": A_a, "visual": A_v}, {"audio": B_a, "visual": B_v})
    stats = prob.run(build_combiner("ogm_ge", alpha=0.5, noise=False), ctx)
    coef_audio = 0.2384058440442351  # 1 - tanh(0.5 * 2) = 1 - 0.7615941559557649
    assert stats["ratio/audio"] == pytest.approx(2.0, rel=1e-6)
    assert stats["ratio/visual"] == pytest.approx(0.5, rel=1e-6)
    assert stats["coef/audio"] == pytest.approx(coef_audio, rel=1e-6)
    assert stats["coef/visual"] == 1.0
    # base="fused": the gradient of L_mm, audio encoder scaled, visual untouched, unimodal heads None
    torch.testing.assert_close(prob.enc_grad("audio"), coef_audio * flat(A_a), rtol=1e-6, atol=0)
    torch.testing.assert_close(prob.enc_grad("visual"), flat(A_v), rtol=0, atol=0)
    torch.testing.assert_close(prob.phi_f.grad, prob.C, rtol=0, atol=0)
    assert all(prob.phi[k].grad is None for k in prob.mods)
    # the two-pass diagnostics path writes the same gradients and adds the cosine stats
    stats = prob.run(build_combiner("ogm_ge", alpha=0.5, noise=False, diagnostics=True), ctx)
    torch.testing.assert_close(prob.enc_grad("audio"), coef_audio * flat(A_a), rtol=1e-6, atol=0)
    torch.testing.assert_close(prob.enc_grad("visual"), flat(A_v), rtol=0, atol=0)
    assert all(prob.phi[k].grad is None for k in prob.mods)
    assert stats["cos/audio"] == pytest.approx(float(F.cosine_similarity(flat(A_a), flat(B_a), dim=0)))

    prob.run(build_combiner("ogm_ge", alpha=0.5, noise=False, base="uniform"), ctx)
    torch.testing.assert_close(
        prob.enc_grad("audio"), coef_audio * (flat(A_a) + flat(B_a)), rtol=1e-6, atol=0
    )
    torch.testing.assert_close(prob.enc_grad("visual"), flat(A_v) + flat(B_v))
    torch.testing.assert_close(prob.phi["audio"].grad, prob.D["audio"], rtol=0, atol=0)


def test_ogm_ge_three_modalities_ratio_to_mean_of_others():
    labels = torch.tensor([0, 0])
    # scores 1.6, 1.2, 0.4: ratios 1.6/0.8 = 2, 1.2/1.0 = 1.2, 0.4/1.4 < 1
    ctx = {
        "logits": {
            "a": two_class_logits([0.8, 0.8], labels),
            "v": two_class_logits([0.6, 0.6], labels),
            "t": two_class_logits([0.2, 0.2], labels),
        },
        "labels": labels,
    }
    pairs = {k: make_pair(30 + i, SHAPES[:2], "agree") for i, k in enumerate("avt")}
    prob = Linear({k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()})
    stats = prob.run(build_combiner("ogm_ge", alpha=0.5, noise=False), ctx)
    assert stats["coef/a"] == pytest.approx(0.2384058440442351, rel=1e-6)  # 1 - tanh(1.0)
    assert stats["coef/v"] == pytest.approx(0.4629504330019647, rel=1e-6)  # 1 - tanh(0.6)
    assert stats["coef/t"] == 1.0
    assert stats["ratio/v"] == pytest.approx(1.2, rel=1e-6)
    torch.testing.assert_close(
        prob.enc_grad("v"), 0.4629504330019647 * flat(pairs["v"][0]), rtol=1e-6, atol=0
    )


def test_ogm_ge_noise_has_gradient_std_and_is_seeded():
    labels = torch.tensor([0, 0])
    ctx = {
        "logits": {"a": two_class_logits([0.9, 0.9], labels), "v": two_class_logits([0.3, 0.3], labels)},
        "labels": labels,
    }
    gen = torch.Generator().manual_seed(0)
    A = {
        "a": [torch.randn(200, 100, generator=gen, dtype=F64) * 3 + 1, torch.ones(1, dtype=F64)],
        "v": [torch.randn(50, generator=gen, dtype=F64)],
    }
    B = {k: [torch.zeros_like(t) for t in v] for k, v in A.items()}
    prob = Linear(A, B)
    stats = prob.run(build_combiner("ogm_ge", alpha=0.3, generator=torch.Generator().manual_seed(1)), ctx)
    big = prob.theta["a"][0].grad
    residual = big - stats["coef/a"] * A["a"][0]
    assert float(residual.mean()) == pytest.approx(0.0, abs=0.05)
    assert float(residual.std()) == pytest.approx(float(A["a"][0].std()), rel=0.03)  # std of the raw grad
    assert torch.isfinite(prob.theta["a"][1].grad).all()  # 1-element tensor: std 0 + 1e-8, no NaN
    first = big.clone()
    prob.run(build_combiner("ogm_ge", alpha=0.3, generator=torch.Generator().manual_seed(1)), ctx)
    torch.testing.assert_close(prob.theta["a"][0].grad, first, rtol=0, atol=0)


def test_ogm_ge_needs_context():
    prob = Linear(*[{k: [torch.ones(2, dtype=F64)] for k in "ab"}] * 2)
    with pytest.raises(ValueError, match="context"):
        prob.run(build_combiner("ogm_ge"))
    with pytest.raises(ValueError, match="missing modalities"):
        prob.run(build_combiner("ogm_ge"), {"logits": {"a": torch.zeros(1, 2)}, "labels": torch.zeros(1)})


# --------------------------------------------------------------------------------------------- real model


class Tiny(nn.Module):
    """Encoders per modality, a fusion head on the concatenated features, one unimodal head each."""

    def __init__(self, dims: dict[str, int], hidden: int = 8, classes: int = 3):
        super().__init__()
        self.encoders = nn.ModuleDict(
            {
                k: nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, hidden))
                for k, d in dims.items()
            }
        )
        self.fusion = nn.Linear(hidden * len(dims), classes)
        self.uni = nn.ModuleDict({k: nn.Linear(hidden, classes) for k in dims})
        self.feature_hooks: list = []

    def groups(self):
        g = {k: list(e.parameters()) for k, e in self.encoders.items()}
        g["heads"] = [*self.fusion.parameters(), *self.uni.parameters()]
        return g

    def forward(self, batch):
        feats = {k: e(batch[k]) for k, e in self.encoders.items()}
        for hook in self.feature_hooks:
            for z in feats.values():
                z.register_hook(hook)
        fused = self.fusion(torch.cat(list(feats.values()), dim=1))
        logits = {k: self.uni[k](z) for k, z in feats.items()}
        y = batch["label"]
        losses = {"fused": F.cross_entropy(fused, y), **{k: F.cross_entropy(v, y) for k, v in logits.items()}}
        return losses, {"logits": {k: v.detach() for k, v in logits.items()}, "labels": y}


def make_model(n_mod: int, seed: int = 0):
    torch.manual_seed(seed)
    dims = dict(list({"audio": 5, "visual": 7, "text": 4}.items())[:n_mod])
    model = Tiny(dims)
    gen = torch.Generator().manual_seed(seed + 100)
    batch = {k: torch.randn(16, d, generator=gen) for k, d in dims.items()}
    batch["label"] = torch.randint(0, 3, (16,), generator=gen)
    return model, batch


ALL = [
    ("joint", {}),
    ("joint", {"diagnostics": True}),
    ("uniform", {}),
    ("uniform", {"diagnostics": True}),
    ("unimodal", {}),
    ("mgda", {}),
    ("mgda", {"blocks": "all"}),
    ("mmpareto", {}),
    ("mmpareto", {"rescale": "per_encoder"}),
    ("pcgrad", {}),
    ("ogm_ge", {}),
    ("ogm_ge", {"base": "uniform", "diagnostics": True}),
]


def expected_none(name, kwargs, model):
    """Parameters that no used loss reaches."""
    fusion, uni = list(model.fusion.parameters()), list(model.uni.parameters())
    if name == "joint" or (name == "ogm_ge" and kwargs.get("base", "fused") == "fused"):
        return {id(p) for p in uni}
    if name == "unimodal":
        return {id(p) for p in fusion}
    return set()


@pytest.mark.parametrize("n_mod", [2, 3])
@pytest.mark.parametrize("name,kwargs", ALL)
def test_every_combiner_sets_grads_on_real_model(name, kwargs, n_mod):
    model, batch = make_model(n_mod)
    for p in model.parameters():  # garbage that must be replaced, not accumulated into
        p.grad = torch.full_like(p, 1e6)
    losses, ctx = model(batch)
    stats = build_combiner(name, **kwargs).combine(losses, model.groups(), ctx)
    none = expected_none(name, kwargs, model)
    for p in model.parameters():
        if id(p) in none:
            assert p.grad is None
        else:
            assert p.grad is not None and p.grad.shape == p.shape and torch.isfinite(p.grad).all()
            assert p.grad.abs().max() < 1e3
    assert all(isinstance(v, float) for v in stats.values())
    two_pass = name in ("mgda", "mmpareto", "pcgrad") or kwargs.get("diagnostics", False)
    for k in model.encoders:
        keys = {f"cos/{k}", f"norm_m/{k}", f"norm_u/{k}", f"conflict/{k}"}
        assert keys <= set(stats) if two_pass else not keys & set(stats)
        assert (f"alpha/{k}" in stats) == (name in ("mgda", "mmpareto"))
        assert (f"coef/{k}" in stats) == (name == "ogm_ge")


def manual_grads(model, batch, which):
    m = copy.deepcopy(model)
    losses, _ = m(batch)
    loss = {
        "sum": sum(losses.values()),
        "fused": losses["fused"],
        "uni": sum(v for k, v in losses.items() if k != "fused"),
    }[which]
    loss.backward()
    return [p.grad for p in m.parameters()]


@pytest.mark.parametrize("n_mod", [2, 3])
def test_uniform_joint_unimodal_equal_manual_backward(n_mod):
    model, batch = make_model(n_mod, seed=1)
    for name, which, kwargs in (
        ("uniform", "sum", {}),
        ("uniform", "sum", {"diagnostics": True}),
        ("joint", "fused", {}),
        ("joint", "fused", {"diagnostics": True}),
        ("unimodal", "uni", {}),
    ):
        ref = manual_grads(model, batch, which)
        losses, _ = model(batch)
        stats = build_combiner(name, **kwargs).combine(losses, model.groups())
        for p, r in zip(model.parameters(), ref):
            if r is None:
                assert p.grad is None
            elif kwargs:  # the two-pass sum adds g_m + g_u in another order
                torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-7)
            else:
                torch.testing.assert_close(p.grad, r, rtol=0, atol=0)
        if kwargs:
            assert f"cos/{next(iter(model.encoders))}" in stats


def test_diagnostics_match_manual_cosine():
    model, batch = make_model(2, seed=2)
    ref_m = manual_grads(model, batch, "fused")
    ref_u = manual_grads(model, batch, "uni")
    losses, _ = model(batch)
    stats = build_combiner("uniform", diagnostics=True).combine(losses, model.groups())
    ids = [id(p) for p in model.parameters()]
    for k, enc in model.encoders.items():
        idx = [ids.index(id(p)) for p in enc.parameters()]
        gm, gu = flat([ref_m[i] for i in idx]), flat([ref_u[i] for i in idx])
        assert stats[f"cos/{k}"] == pytest.approx(float(F.cosine_similarity(gm, gu, dim=0)), abs=1e-5)
        assert stats[f"norm_m/{k}"] == pytest.approx(float(gm.norm()), rel=1e-5)
        assert stats[f"norm_u/{k}"] == pytest.approx(float(gu.norm()), rel=1e-5)
        assert stats[f"conflict/{k}"] == float(stats[f"cos/{k}"] < 0)


@pytest.mark.parametrize(
    "name,kwargs,passes",
    [
        ("mmpareto", {}, 2),
        ("mgda", {}, 2),
        ("uniform", {}, 1),
        ("uniform", {"diagnostics": True}, 2),
        ("joint", {}, 1),
        ("ogm_ge", {}, 1),
    ],
)
@pytest.mark.parametrize("n_mod", [2, 3])
def test_number_of_backward_passes(monkeypatch, name, kwargs, passes, n_mod):
    calls = {"grad": 0, "backward": 0, "through_features": 0}
    real_grad, real_backward = torch.autograd.grad, torch.autograd.backward

    def counting_grad(*a, **k):
        calls["grad"] += 1
        return real_grad(*a, **k)

    def counting_backward(*a, **k):
        calls["backward"] += 1
        return real_backward(*a, **k)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    monkeypatch.setattr(torch.autograd, "backward", counting_backward)
    model, batch = make_model(n_mod, seed=3)

    def hook(g):  # fires once per backward pass that flows through an encoder output
        calls["through_features"] += 1

    model.feature_hooks.append(hook)
    losses, ctx = model(batch)
    build_combiner(name, **kwargs).combine(losses, model.groups(), ctx)
    assert calls["grad"] == passes and calls["backward"] == 0
    # one pass reaches every encoder output once; L_mm and sum_k L_k both reach all of them
    assert calls["through_features"] == passes * n_mod


def test_mmpareto_on_real_model_matches_spec_from_manual_grads():
    model, batch = make_model(3, seed=4)
    ref_m = manual_grads(model, batch, "fused")
    ref_u = manual_grads(model, batch, "uni")
    ref_sum = manual_grads(model, batch, "sum")
    losses, _ = model(batch)
    stats = MMPareto(gamma=1.5, rescale="per_tensor").combine(losses, model.groups())
    ids = [id(p) for p in model.parameters()]
    for k, enc in model.encoders.items():
        idx = [ids.index(id(p)) for p in enc.parameters()]
        expected, alpha, cos = mmpareto_expected(
            [ref_m[i].double() for i in idx], [ref_u[i].double() for i in idx], 1.5, "per_tensor"
        )
        for p, e in zip(enc.parameters(), expected):
            torch.testing.assert_close(p.grad.double(), e, rtol=1e-4, atol=1e-6)
        assert stats[f"alpha/{k}"] == pytest.approx(alpha, abs=1e-4)
    for p in [*model.fusion.parameters(), *model.uni.parameters()]:
        torch.testing.assert_close(p.grad, ref_sum[ids.index(id(p))], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------- plumbing


def test_registry_and_build_errors():
    assert set(COMBINERS) == {"joint", "uniform", "unimodal", "mgda", "mmpareto", "pcgrad", "ogm_ge"}
    assert isinstance(build_combiner("mmpareto", gamma=1.0), MMPareto)
    with pytest.raises(ValueError, match="valid choices: .*mmpareto"):
        build_combiner("mm_pareto")
    with pytest.raises(ValueError, match="gama.*valid options"):
        build_combiner("mmpareto", gama=1.0)
    with pytest.raises(ValueError, match="rescale"):
        build_combiner("mmpareto", rescale="global")
    with pytest.raises(ValueError, match="base"):
        build_combiner("ogm_ge", base="sum")
    with pytest.raises(ValueError, match="blocks"):
        build_combiner("mgda", blocks="layer")


def test_bad_losses_and_groups_are_value_errors():
    model, batch = make_model(2)
    losses, _ = model(batch)
    comb = build_combiner("uniform")
    with pytest.raises(ValueError, match="missing"):
        comb.combine({k: v for k, v in losses.items() if k != "fused"}, model.groups())
    with pytest.raises(ValueError, match="match no parameter group"):
        comb.combine({**losses, "image": losses["audio"]}, model.groups())
    groups = model.groups()
    with pytest.raises(ValueError, match="heads"):
        comb.combine(losses, {k: v for k, v in groups.items() if k != "heads"})
    groups["visual"] = groups["visual"] + [groups["audio"][0]]
    with pytest.raises(ValueError, match="exactly one group"):
        comb.combine(losses, groups)


def test_frozen_and_ungrouped_parameters_are_untouched():
    model, batch = make_model(2, seed=5)
    frozen = model.encoders["audio"][0].weight
    frozen.requires_grad_(False)
    extra = nn.Parameter(torch.ones(()))
    losses, _ = model(batch)
    losses["fused"] = losses["fused"] * extra  # reaches a parameter that is in no group
    MMPareto().combine(losses, model.groups())
    assert frozen.grad is None and extra.grad is None
    assert model.encoders["audio"][0].bias.grad is not None


def test_written_grads_support_in_place_ops():
    """.grad tensors must be dense and unaliased: clip_grad_norm_ and optimizers modify them in place."""
    a = nn.Parameter(torch.randn(3))
    b = nn.Parameter(torch.randn(3))
    h = nn.Parameter(torch.randn(3))
    z = a + b  # autograd hands a and b the very same gradient tensor
    ga, gb = torch.autograd.grad((z * h).sum(), [a, b], retain_graph=True)
    assert ga.data_ptr() == gb.data_ptr()  # the precondition that makes this test meaningful
    build_combiner("joint").combine({"fused": (z * h).sum()}, {"x": [a], "y": [b], "heads": [h]})
    a.grad.mul_(0.0)
    torch.testing.assert_close(b.grad, h.detach())
    x = nn.Parameter(torch.randn(2, 3))
    build_combiner("joint").combine({"fused": x.sum()}, {"x": [x], "heads": []})  # grad of sum: expanded
    x.grad.add_(1.0)
    torch.testing.assert_close(x.grad, torch.full((2, 3), 2.0))
    for name in ("mmpareto", "mgda", "uniform"):
        model, batch = make_model(2)
        losses, ctx = model(batch)
        build_combiner(name).combine(losses, model.groups(), ctx)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4).step()


@pytest.mark.parametrize("split_groups", [False, True])
@pytest.mark.parametrize("rescale", ["per_tensor", "per_encoder"])
def test_pairwise_combiners_write_in_place_safely_over_aliased_gradients(rescale, split_groups):
    """The pairwise path combines g_m and g_u inside autograd's own buffers. Autograd may hand two
    parameters the very same gradient tensor (through an add) or an expanded view (through a sum):
    writing in place must then not corrupt a neighbour's gradient."""
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(3, dtype=torch.float64)), nn.Parameter(torch.randn(3, dtype=torch.float64))
    c = nn.Parameter(torch.randn(2, 3, dtype=torch.float64))
    h, w = nn.Parameter(torch.randn(3, dtype=torch.float64)), nn.Parameter(torch.randn(3, dtype=torch.float64))

    def losses():
        z = a + b  # a and b receive one shared gradient tensor
        return {"fused": (z * h).sum() + 0.5 * c.sum(),  # c: an expanded gradient of ones
                "x": (z * w).sum() - 2.0 * (c * c).sum()}

    # split: a and b in different encoders, so the shared buffer crosses groups
    groups = {"x": [a, c], "y": [b]} if split_groups else {"x": [a, b, c]}

    def all_losses():
        out = losses()
        if split_groups:  # each unimodal loss reaches its own encoder only
            out["x"] = (a * w).sum() - 2.0 * (c * c).sum()
            out["y"] = (b * b).sum()
        return out

    expected = {}
    for k, enc in groups.items():
        g_m = [g.clone() for g in torch.autograd.grad(all_losses()["fused"], enc)]
        g_u = [g.clone() for g in torch.autograd.grad(all_losses()[k], enc)]
        expected[k] = mmpareto_expected(g_m, g_u, 1.5, rescale)[0]
    MMPareto(gamma=1.5, rescale=rescale).combine(all_losses(), {**groups, "heads": [h, w]})
    for k, enc in groups.items():
        for p, e in zip(enc, expected[k]):
            torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)
