"""Gradient combiners for balanced multimodal learning (METHODS.md section 2).

A combiner turns the losses of one forward pass into parameter gradients; the training loop never knows
which method runs:

    losses = {"fused": L_mm, "audio": L_a, "visual": L_v}        # L_mm: fusion head, L_k: unimodal head k
    groups = {"audio": [...], "visual": [...], "heads": [...]}   # one group per encoder, plus all heads
    stats = combiner.combine(losses, groups, context=None)       # SETS p.grad, returns floats to log
    optimizer.step()

Conventions
- ``groups`` has one key per modality encoder and ``"heads"`` (fusion head and every unimodal head); any
  number of modalities. A parameter belongs to exactly one group; parameters with requires_grad=False are
  skipped. Parameters outside ``groups`` are never touched.
- ``losses`` has ``"fused"`` and one key per modality group (the names must match). L_k may only reach
  encoder k and its own head: one backward of sum_k L_k then yields every g_u at once.
- ``combine`` sets ``p.grad`` (it does not accumulate into an existing .grad). A parameter that no used
  loss reaches gets ``p.grad = None``, as after ``zero_grad(set_to_none=True)``. Gradients are computed with
  ``torch.autograd.grad`` on the explicit parameter lists, never by matching parameter names.
- Per encoder k, g_m = dL_mm/dphi_k and g_u = dL_k/dphi_k. Stats (floats): ``cos/k``, ``norm_m/k``,
  ``norm_u/k``, ``conflict/k`` (1.0 if cos < 0) whenever both are computed; ``alpha/k`` for mgda and
  mmpareto (weight on g_m); ``coef/k`` and ``ratio/k`` for ogm_ge. All stats are gathered with one
  ``torch.stack(...).tolist()`` at the end (a single device synchronisation).

Cost: single-backward combiners (joint, uniform, unimodal, ogm_ge without diagnostics) run one
``autograd.grad``; the pairwise ones (mgda, mmpareto, pcgrad, and any combiner with diagnostics=True) run
exactly two: L_mm with retain_graph, then sum_k L_k.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from counterpoint.optim.min_norm import min_norm_simplex, min_norm_two_gram

__all__ = [
    "COMBINERS",
    "GradientCombiner",
    "Joint",
    "MGDA",
    "MMPareto",
    "OGMGE",
    "PCGrad",
    "Uniform",
    "Unimodal",
    "build_combiner",
]

FUSED = "fused"
HEADS = "heads"
_TINY = 1e-30  # floor for norm products in cosines (cos of a zero vector is 0, like F.cosine_similarity)

Grads = list[Tensor | None]  # aligned with _Layout.params; None: the loss does not reach it


# --------------------------------------------------------------------------------------------- plumbing


@dataclass(frozen=True)
class _Layout:
    """Trainable parameters of all groups in one list: encoders in modality order, then heads."""

    modalities: tuple[str, ...]
    params: tuple[Tensor, ...]
    bounds: dict[str, tuple[int, int]]  # group -> [start, stop) into params

    def slice(self, key: str) -> slice:
        return slice(*self.bounds[key])


def _layout(groups: Mapping[str, Iterable[Tensor]], who: str) -> _Layout:
    if HEADS not in groups:
        raise ValueError(f"{who}: groups needs a {HEADS!r} key (fusion + unimodal heads), got {list(groups)}")
    modalities = tuple(k for k in groups if k != HEADS)
    if not modalities:
        raise ValueError(f"{who}: groups has no encoder group besides {HEADS!r}")
    if FUSED in modalities:
        raise ValueError(f"{who}: {FUSED!r} is the multimodal loss, not a parameter group name")
    seen: dict[int, str] = {}
    params: list[Tensor] = []
    bounds: dict[str, tuple[int, int]] = {}
    for key in (*modalities, HEADS):
        start = len(params)
        for p in groups[key]:
            if not isinstance(p, Tensor):
                raise ValueError(f"{who}: group {key!r} holds a {type(p).__name__}, expected parameters")
            if not p.requires_grad:
                continue
            if id(p) in seen:
                raise ValueError(
                    f"{who}: a parameter of shape {tuple(p.shape)} is in group {seen[id(p)]!r} and again "
                    f"in {key!r}; every parameter must belong to exactly one group"
                )
            seen[id(p)] = key
            params.append(p)
        bounds[key] = (start, len(params))
    return _Layout(modalities, tuple(params), bounds)


def _check_losses(losses: Mapping[str, Tensor], layout: _Layout, need: Sequence[str], who: str) -> None:
    unknown = [k for k in losses if k != FUSED and k not in layout.modalities]
    if unknown:
        raise ValueError(
            f"{who}: losses {unknown} match no parameter group; expected {FUSED!r} and one per modality "
            f"group {list(layout.modalities)}"
        )
    missing = [k for k in need if k not in losses]
    if missing:
        raise ValueError(f"{who}: losses is missing {missing} (got {list(losses)})")


def _unimodal_sum(losses: Mapping[str, Tensor], layout: _Layout) -> Tensor:
    total = losses[layout.modalities[0]]
    for k in layout.modalities[1:]:
        total = total + losses[k]
    return total


def _grad(loss: Tensor, params: Sequence[Tensor], retain_graph: bool) -> Grads:
    """One backward pass over explicit parameters; unreached ones get None. (Looked up at call time so
    tests can count calls.)"""
    if not params:
        return []
    return list(torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True))


def _add(a: Grads, b: Grads, b_weight: float = 1.0) -> Grads:
    """a + b_weight * b over aligned gradient lists, None meaning zero."""
    out = list(a)
    if b_weight == 0.0:
        return out
    both = []
    for i, (x, y) in enumerate(zip(a, b)):
        if y is None:
            continue
        if x is None:
            out[i] = y if b_weight == 1.0 else y * b_weight
        else:
            both.append(i)
    if both:
        summed = torch._foreach_add([a[i] for i in both], [b[i] for i in both], alpha=b_weight)
        for i, s in zip(both, summed):
            out[i] = s
    return out


def _set_grads(params: Sequence[Tensor], grads: Grads) -> None:
    """p.grad = g. Raw autograd outputs can be expanded views or share storage between parameters
    (e.g. through an add); such tensors are copied so that later in-place ops on .grad are safe."""
    storages: set[int] = set()
    for p, g in zip(params, grads):
        if g is None:
            p.grad = None
            continue
        if g.dtype != p.dtype:
            g = g.to(p.dtype)
        if not (g.is_contiguous() or g.stride() == p.stride()):  # channels-last grads of such params stay
            g = g.contiguous()
        p.grad = _owned(g, storages)


def _acc(t: Tensor) -> Tensor:
    """Inner products accumulate in at least float32."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _flat_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """1-D views of ``a`` and ``b`` in one common element order, without copying when both are contiguous
    or both channels-last (conv kernels of channels-last models): their inner product is then free of
    copies. Mixed layouts fall back to ``reshape`` (a copy)."""
    if a.is_contiguous() and b.is_contiguous():
        return a.view(-1), b.view(-1)
    if a.dim() == 4 and all(t.is_contiguous(memory_format=torch.channels_last) for t in (a, b)):
        return a.permute(0, 2, 3, 1).reshape(-1), b.permute(0, 2, 3, 1).reshape(-1)  # views: NHWC order
    return a.reshape(-1), b.reshape(-1)


def _dots(m: Tensor | None, u: Tensor | None, like: Tensor) -> Tensor:
    """``[3]``: <m,m>, <u,u>, <m,u> of one parameter tensor's gradients (None -> zero)."""
    if m is None and u is None:
        return like.new_zeros(3, dtype=torch.promote_types(like.dtype, torch.float32))
    fm, fu = (_acc(t) for t in _flat_pair(m if m is not None else torch.zeros_like(u),
                                         u if u is not None else torch.zeros_like(m)))
    return torch.stack([fm.dot(fm), fu.dot(fu), fm.dot(fu)])


def _owned(g: Tensor, storages: set[int]) -> Tensor:
    """``g`` itself when it may be written in place: autograd outputs can be expanded views or share
    storage (e.g. through an add), and those are cloned first."""
    if g.numel() and (0 in g.stride() or g.untyped_storage().data_ptr() in storages):
        g = g.clone()
    if g.numel():
        storages.add(g.untyped_storage().data_ptr())
    return g


def _floats(stats: dict[str, Tensor]) -> dict[str, float]:
    """Every stat to a Python float with one synchronisation."""
    if not stats:
        return {}
    keys = list(stats)
    dev = stats[keys[0]].device
    values = torch.stack([stats[k].detach().to(dev, torch.float64).reshape(()) for k in keys]).tolist()
    return dict(zip(keys, values))


@dataclass
class _Pair:
    """g_m and g_u of one encoder, per parameter tensor, and their inner products."""

    params: Sequence[Tensor]
    m: Grads
    u: Grads
    tensor_dots: Tensor  # [T, 3]: per tensor <m,m>, <u,u>, <m,u>
    dots: Tensor  # [3]: the same over the whole encoder


def _pairs(g_m: Grads, g_u: Grads, layout: _Layout, stats: dict[str, Tensor]) -> dict[str, _Pair]:
    """Per encoder: the inner products of g_m and g_u (per tensor and in all) and the diagnostic stats.
    Nothing is copied: each tensor's dot products run on views of the gradients as autograd made them."""
    out: dict[str, _Pair] = {}
    for k in layout.modalities:
        sl = layout.slice(k)
        params = layout.params[sl]
        if not params:
            continue
        gm, gu = g_m[sl], g_u[sl]
        tensor_dots = torch.stack([_dots(m, u, p) for m, u, p in zip(gm, gu, params)])  # [T, 3]
        dots = tensor_dots.sum(0)
        nm, nu = dots[:2].sqrt().unbind()
        cos = dots[2] / (nm * nu).clamp_min(_TINY)
        stats[f"cos/{k}"] = cos
        stats[f"norm_m/{k}"] = nm
        stats[f"norm_u/{k}"] = nu
        stats[f"conflict/{k}"] = (cos < 0).to(cos.dtype)
        out[k] = _Pair(params, gm, gu, tensor_dots, dots)
    return out


def _combine_in_place(pair: _Pair, w_m: Tensor, w_u: Tensor) -> Grads:
    """h = w_m g_m + w_u g_u per tensor, written into g_m's memory (made writable by ``_owned`` first): no
    new buffers in the common case; ``w_m``/``w_u`` are 0-dim tensors, so nothing synchronises with the
    device."""
    out: Grads = []
    for h, u in zip(pair.m, pair.u):
        if h is None:
            out.append(None if u is None else u * w_u.to(u.dtype))  # rare: never write into g_u
            continue
        h.mul_(w_m.to(h.dtype))
        if u is not None:
            h.addcmul_(u, w_u.to(u.dtype))
        out.append(h)
    return out


def _two_pass(losses: Mapping[str, Tensor], layout: _Layout) -> tuple[Grads, Grads]:
    """The two backward passes: g_m for every parameter, then g_u from sum_k L_k."""
    g_m = _grad(losses[FUSED], layout.params, retain_graph=True)
    g_u = _grad(_unimodal_sum(losses, layout), layout.params, retain_graph=False)
    return g_m, g_u


# --------------------------------------------------------------------------------------------- interface


class GradientCombiner(ABC):
    """Turns the losses of one forward pass into parameter gradients (see the module docstring)."""

    name: ClassVar[str]

    @abstractmethod
    def combine(
        self,
        losses: Mapping[str, Tensor],
        groups: Mapping[str, Iterable[Tensor]],
        context: Mapping[str, Any] | None = None,
    ) -> dict[str, float]:
        """Compute gradients, SET p.grad for every trainable parameter in ``groups``, return stats."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class _PairwiseCombiner(GradientCombiner):
    """Two-backward template: per encoder, h = w_m g_m + w_u g_u with weights from the encoder's Gram
    entries, optionally rescaled; heads get g_m + head_u_weight * g_u."""

    head_u_weight: ClassVar[float] = 1.0

    def _weights(self, dots: Tensor, stats: dict[str, Tensor], names: Sequence[str]) -> tuple[Tensor, Tensor]:
        """dots [K, 3] (<m,m>, <u,u>, <m,u>) -> (w_m [K], w_u [K]); vectorised, no synchronisation."""
        raise NotImplementedError

    def _rescale(self, h: Grads, pair: _Pair) -> None:
        """Optionally rescale the combined encoder gradient ``h`` in place."""

    def combine(self, losses, groups, context=None):
        layout = _layout(groups, self.name)
        _check_losses(losses, layout, (FUSED, *layout.modalities), self.name)
        g_m, g_u = _two_pass(losses, layout)
        stats: dict[str, Tensor] = {}
        pairs = _pairs(g_m, g_u, layout, stats)
        heads = layout.slice(HEADS)
        # The heads' gradients are read after the encoders' are written in place: never write into them.
        storages = {g.untyped_storage().data_ptr() for g in (*g_m[heads], *g_u[heads]) if g is not None and g.numel()}
        for pair in pairs.values():  # before any write: autograd may share one buffer across encoders
            pair.m = [_owned(m, storages) if m is not None else None for m in pair.m]
        if pairs:
            names = list(pairs)
            w_m, w_u = self._weights(torch.stack([pairs[k].dots for k in names]), stats, names)
            for i, k in enumerate(names):
                pair = pairs.pop(k)
                h = _combine_in_place(pair, w_m[i], w_u[i])
                self._rescale(h, pair)
                _set_grads(pair.params, h)
        _set_grads(layout.params[heads], _add(g_m[heads], g_u[heads], self.head_u_weight))
        return _floats(stats)


# --------------------------------------------------------------------------------------------- methods


class Joint(_PairwiseCombiner):
    """Joint training: the gradient of L_mm only. Unimodal heads get grad None.

    With ``diagnostics=True`` it also back-propagates sum_k L_k (two passes) only to log cos/norms of
    g_m and g_u; the gradients written are still those of L_mm.
    """

    name = "joint"
    head_u_weight = 0.0

    def __init__(self, diagnostics: bool = False):
        self.diagnostics = bool(diagnostics)

    def _weights(self, dots, stats, names):
        return dots.new_ones(len(names)), dots.new_zeros(len(names))

    def combine(self, losses, groups, context=None):
        if self.diagnostics:
            return super().combine(losses, groups, context)
        layout = _layout(groups, self.name)
        _check_losses(losses, layout, (FUSED,), self.name)
        _set_grads(layout.params, _grad(losses[FUSED], layout.params, retain_graph=False))
        return {}


class Uniform(_PairwiseCombiner):
    """Uniform weighting: one backward of L_mm + sum_k L_k (a strong, often underrated baseline).

    With ``diagnostics=True`` it runs the two-pass path (L_mm, then sum_k L_k), writes g_m + g_u, and
    logs cos(g_m, g_u), the norms and the conflicts under uniform training (as in MMPareto's Figure 1).
    """

    name = "uniform"

    def __init__(self, diagnostics: bool = False):
        self.diagnostics = bool(diagnostics)

    def _weights(self, dots, stats, names):
        return dots.new_ones(len(names)), dots.new_ones(len(names))

    def combine(self, losses, groups, context=None):
        if self.diagnostics:
            return super().combine(losses, groups, context)
        layout = _layout(groups, self.name)
        _check_losses(losses, layout, (FUSED, *layout.modalities), self.name)
        total = losses[FUSED] + _unimodal_sum(losses, layout)
        _set_grads(layout.params, _grad(total, layout.params, retain_graph=False))
        return {}


class Unimodal(GradientCombiner):
    """Unimodal-alone training: the gradient of sum_k L_k only (each encoder trained by its own head;
    the reference for per-modality accuracy). The fusion head gets grad None; "fused" is not needed."""

    name = "unimodal"

    def combine(self, losses, groups, context=None):
        layout = _layout(groups, self.name)
        _check_losses(losses, layout, layout.modalities, self.name)
        _set_grads(layout.params, _grad(_unimodal_sum(losses, layout), layout.params, retain_graph=False))
        return {}


class MGDA(_PairwiseCombiner):
    """Multiple-gradient descent: the minimum-norm point of the convex hull of the loss gradients
    (Desideri 2012; Sener & Koltun, NeurIPS 2018, "Multi-Task Learning as Multi-Objective Optimization").

    ``blocks="per_encoder"`` (default): for each encoder independently, w on the 2-simplex minimising
    ||w_m g_m + w_u g_u||^2 (closed form); ``alpha/k`` = w_m.
    ``blocks="all"``: one block made of all encoders, with M + 1 loss gradients (L_mm, L_1..L_M; L_k is
    zero outside encoder k); weights (w_0, w_1..w_M) from the Frank-Wolfe simplex solver on their Gram
    matrix, encoder k gets w_0 g_m + w_k g_u; ``alpha/k`` = w_0 / (w_0 + w_k), plus ``weight/fused`` and
    ``weight/k``. Costs one host synchronisation for the solver.
    The encoder direction is multiplied by ``scale`` (weights sum to 1; ``scale=2`` matches the (1, 1)
    magnitude of the uniform sum). Heads get the plain gradient of L_mm + sum_k L_k.
    """

    name = "mgda"

    def __init__(self, blocks: str = "per_encoder", scale: float = 1.0, eps: float = 1e-12):
        if blocks not in ("per_encoder", "all"):
            raise ValueError(f"mgda: blocks must be 'per_encoder' or 'all', got {blocks!r}")
        if not scale > 0:
            raise ValueError(f"mgda: scale must be > 0, got {scale}")
        self.blocks, self.scale, self.eps = blocks, float(scale), float(eps)

    def _weights(self, dots, stats, names):
        mm, uu, mu = dots.unbind(1)
        if self.blocks == "per_encoder":
            alpha = min_norm_two_gram(mm, mu, uu, self.eps)
            w_m, w_u = alpha, 1 - alpha
        else:
            K = len(names)
            gram = dots.new_zeros(K + 1, K + 1)
            gram[0, 0] = mm.sum()
            gram[0, 1:] = mu
            gram[1:, 0] = mu
            gram[1:, 1:] = torch.diag(uu)
            w = min_norm_simplex(gram, is_gram=True, eps=self.eps)
            w_m, w_u = w[0].expand(K), w[1:]
            alpha = w_m / (w_m + w_u).clamp_min(_TINY)
            stats["weight/fused"] = w[0]
            for i, k in enumerate(names):
                stats[f"weight/{k}"] = w[1 + i]
        for i, k in enumerate(names):
            stats[f"alpha/{k}"] = alpha[i]
        return self.scale * w_m, self.scale * w_u


class MMPareto(_PairwiseCombiner):
    """MMPareto (Wei & Hu, ICML 2024, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal
    Assistance"), exactly as METHODS.md section 2.

    Per encoder k, with c = cos(g_m, g_u) over the whole (flattened) encoder:
      c > 0: h = g_m + g_u;  else: alpha = clip((||g_u||^2 - <g_m,g_u>) / ||g_m - g_u||^2, 0, 1) and
      h = 2 (alpha g_m + (1 - alpha) g_u), for which <h, g_m> = <h, g_u> >= 0 (common descent direction).
    Magnitude, with s = g_m + g_u:
      ``rescale="per_encoder"``: h <- gamma * ||s|| * h / ||h|| over the whole encoder (the paper);
      ``rescale="per_tensor"`` (default, the official code): per parameter tensor i,
      h_i <- gamma * max(||s_i||, ||h_i||) * h_i / ||h_i||.
    A zero h stays zero. ``gamma=1`` is the ablation that separates the direction from the 1.5x step.
    Heads keep the plain gradient of L_mm + sum_k L_k. Two backward passes instead of the official four.
    ``alpha/k`` is 0.5 when there is no conflict (h = 2 (g_m + g_u) / 2).
    """

    name = "mmpareto"

    def __init__(self, gamma: float = 1.5, rescale: str = "per_tensor", eps: float = 1e-12):
        if rescale not in ("per_tensor", "per_encoder"):
            raise ValueError(f"mmpareto: rescale must be 'per_tensor' or 'per_encoder', got {rescale!r}")
        if not gamma > 0:
            raise ValueError(f"mmpareto: gamma must be > 0, got {gamma}")
        self.gamma, self.rescale, self.eps = float(gamma), rescale, float(eps)

    def _weights(self, dots, stats, names):
        mm, uu, mu = dots.unbind(1)
        cos = mu / (mm.sqrt() * uu.sqrt()).clamp_min(_TINY)
        agree = cos > 0
        alpha = torch.where(agree, torch.full_like(mm, 0.5), min_norm_two_gram(mm, mu, uu, self.eps))
        for i, k in enumerate(names):
            stats[f"alpha/{k}"] = alpha[i]
        return 2 * alpha, 2 * (1 - alpha)

    def _rescale(self, h, pair):
        """``|s_i|^2 = <m,m> + <u,u> + 2<m,u>`` per tensor from the inner products already taken (no pass
        over s = g_m + g_u); ``|h_i|`` is measured on h itself (one read), since h may nearly cancel."""
        present = [i for i, t in enumerate(h) if t is not None]
        if not present:
            return
        mm, uu, mu = pair.tensor_dots[present].unbind(1)
        ns2 = (mm + uu + 2 * mu).clamp_min(0)  # [T]
        nh = torch.stack(torch._foreach_norm([h[i] for i in present])).to(ns2.dtype)  # [T]
        if self.rescale == "per_encoder":
            ns, nh_all = ns2.sum().sqrt(), nh.square().sum().sqrt()
            factor = torch.where(nh_all > 0, self.gamma * ns / nh_all, torch.zeros_like(nh_all))
            factor = factor.expand(len(present))
        else:
            ns = ns2.sqrt()
            factor = torch.where(nh > 0, self.gamma * torch.maximum(ns, nh) / nh, torch.zeros_like(nh))
        hs = [h[i] for i in present]
        torch._foreach_mul_(hs, [f.to(t.dtype) for f, t in zip(factor.unbind(), hs)])


class PCGrad(_PairwiseCombiner):
    """PCGrad (Yu et al., NeurIPS 2020, "Gradient Surgery for Multi-Task Learning") per encoder: if
    <g_m, g_u> < 0, project each onto the normal plane of the other and sum:
    h = (1 - <g_m,g_u>/||g_m||^2) g_m + (1 - <g_m,g_u>/||g_u||^2) g_u; otherwise h = g_m + g_u.
    With two gradients the random task order of the paper does not matter. Heads get the plain sum."""

    name = "pcgrad"

    def _weights(self, dots, stats, names):
        mm, uu, mu = dots.unbind(1)
        conflict = mu < 0
        zero = torch.zeros_like(mu)
        w_m = 1 - torch.where(conflict & (mm > 0), mu / mm.clamp_min(_TINY), zero)
        w_u = 1 - torch.where(conflict & (uu > 0), mu / uu.clamp_min(_TINY), zero)
        return w_m, w_u


class OGMGE(GradientCombiner):
    """OGM-GE: on-the-fly gradient modulation with generalisation enhancement (Peng et al., CVPR 2022,
    "Balanced Multimodal Learning via On-the-fly Gradient Modulation").

    Needs ``context={"logits": {modality: Tensor[B, C]}, "labels": Tensor[B]}`` (the unimodal logits, e.g.
    from the fusion head split per modality as in the paper, or from the unimodal heads).
    score_k = sum_b softmax(logits_k)[b, y_b]; ratio_k = score_k / mean_{j != k} score_j (for two
    modalities the paper's s_a / s_v). coef_k = 1 - tanh(alpha * ratio_k) if ratio_k > 1, else 1.
    This is the paper's Eq. (10) and the published code (``1 - tanh(alpha * relu(ratio))`` inside
    ``if ratio > 1``), i.e. the same as METHODS.md; note it jumps from 1 to 1 - tanh(alpha) at ratio = 1.
    tanh >= 0 here so coef is in (0, 1].
    Encoder k's gradient becomes coef_k * g (+ GE noise N(0, (std(g) + 1e-8)^2) per tensor, with the std
    of that tensor's unmodulated gradient, on every encoder, when ``noise=True``). The published code
    modulates only 4-D conv weights; here the encoder group is the explicit parameter set.
    ``base="fused"`` (default, the paper) modulates the gradient of L_mm only; ``base="uniform"`` that of
    L_mm + sum_k L_k. Heads get the unmodulated base gradient. ``alpha`` has no default in the published
    code (a required flag); 0.8 is common. ``diagnostics=True`` adds cos/norm stats (two passes).
    ``generator`` makes the noise reproducible (on the gradients' device).
    """

    name = "ogm_ge"

    def __init__(
        self,
        alpha: float = 0.8,
        noise: bool = True,
        base: str = "fused",
        diagnostics: bool = False,
        generator: torch.Generator | None = None,
    ):
        if base not in ("fused", "uniform"):
            raise ValueError(f"ogm_ge: base must be 'fused' or 'uniform', got {base!r}")
        if not alpha >= 0:
            raise ValueError(f"ogm_ge: alpha must be >= 0, got {alpha}")
        self.alpha, self.noise, self.base = float(alpha), bool(noise), base
        self.diagnostics = bool(diagnostics)
        self._generator = generator

    def coefficients(
        self, logits: Mapping[str, Tensor], labels: Tensor, names: Sequence[str]
    ) -> dict[str, Tensor]:
        """Scores, ratios and coefficients as [M] tensors in ``names`` order (no synchronisation)."""
        with torch.no_grad():
            y = labels.reshape(-1, 1).long()
            probs = [torch.softmax(logits[k].detach().float(), dim=-1) for k in names]  # [B, C] each
            scores = torch.stack([p.gather(-1, y.to(p.device)).sum().to(y.device) for p in probs])  # [M]
            others = (scores.sum() - scores) / (len(names) - 1)  # mean score of the other modalities
            ratio = scores / others.clamp_min(_TINY)
            coef = torch.where(ratio > 1, 1 - torch.tanh(self.alpha * ratio), torch.ones_like(ratio))
        return {"score": scores, "ratio": ratio, "coef": coef}

    def combine(self, losses, groups, context=None):
        layout = _layout(groups, self.name)
        if len(layout.modalities) < 2:
            raise ValueError(f"ogm_ge: needs at least 2 modality groups, got {list(layout.modalities)}")
        logits, labels = self._context(context, layout.modalities)
        need = (FUSED, *layout.modalities) if (self.base == "uniform" or self.diagnostics) else (FUSED,)
        _check_losses(losses, layout, need, self.name)
        b_weight = 1.0 if self.base == "uniform" else 0.0
        stats: dict[str, Tensor] = {}
        if self.diagnostics:
            g_m, g_u = _two_pass(losses, layout)
            _pairs(g_m, g_u, layout, stats)  # stats only; the flats are dropped
            grads = _add(g_m, g_u, b_weight)
        else:
            loss = losses[FUSED] + _unimodal_sum(losses, layout) if self.base == "uniform" else losses[FUSED]
            grads = _grad(loss, layout.params, retain_graph=False)

        c = self.coefficients(logits, labels, layout.modalities)
        for i, k in enumerate(layout.modalities):
            stats[f"coef/{k}"] = c["coef"][i]
            stats[f"ratio/{k}"] = c["ratio"][i]
            sl = layout.slice(k)
            for j in range(sl.start, sl.stop):
                g = grads[j]
                if g is None:
                    continue
                new = g * c["coef"][i].to(g.device, g.dtype)
                if self.noise:
                    std = g.std() if g.numel() > 1 else g.new_zeros(())
                    noise = torch.randn(g.shape, generator=self._generator, device=g.device, dtype=g.dtype)
                    new.add_(noise * (std + 1e-8))
                grads[j] = new
        _set_grads(layout.params, grads)
        return _floats(stats)

    @staticmethod
    def _context(context, modalities) -> tuple[Mapping[str, Tensor], Tensor]:
        if not context or "logits" not in context or "labels" not in context:
            raise ValueError(
                "ogm_ge: needs context={'logits': {modality: Tensor[B, C]}, 'labels': Tensor[B]} "
                "with the unimodal logits of this batch"
            )
        logits = context["logits"]
        missing = [k for k in modalities if k not in logits]
        if missing:
            raise ValueError(
                f"ogm_ge: context['logits'] is missing modalities {missing} (got {list(logits)})"
            )
        return logits, context["labels"]


# --------------------------------------------------------------------------------------------- registry

COMBINERS: dict[str, type[GradientCombiner]] = {
    cls.name: cls for cls in (Joint, Uniform, Unimodal, MGDA, MMPareto, PCGrad, OGMGE)
}


def build_combiner(name: str, where: str = "", **kwargs: Any) -> GradientCombiner:
    """Build a registered combiner by name; a bad name or option is a ValueError naming the choices.
    ``where`` (a config path such as ``"method"``) prefixes the messages."""
    dot = f"{where}." if where else ""
    if name not in COMBINERS:
        raise ValueError(f"{dot}name: unknown method {name!r}; valid choices: {', '.join(sorted(COMBINERS))}")
    cls = COMBINERS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise ValueError(f"{dot}{unknown[0]} is not an option of method {name!r} "
                         f"(valid options: {', '.join(accepted) or 'none'})")
    try:
        return cls(**kwargs)
    except ValueError as exc:
        if not where:
            raise
        raise ValueError(f"{where}: {exc}") from None
