"""Memory-efficient contrastive losses: CLIP's InfoNCE and SigLIP's sigmoid loss, streamed in tiles.

The plain losses build the whole ``[B, G]`` logit matrix (``G`` = global batch) and autograd keeps it, plus
its softmax / sigmoid, for the backward pass: peak memory grows with ``B * G`` (``B^2`` in one process), which
at ``B = 65536`` is 16 GiB per float32 matrix. Here the matrix is never held: forward and backward walk over
``chunk_size x chunk_size`` tiles, recomputing each tile from the features when it is needed, so the extra
memory is ``O(chunk_size^2)`` for the tile in flight plus ``O((B + G) d)`` for the feature gradients -- linear
in the batch. The price is one extra matmul per tile (the backward recomputes the logits).

**Streaming log-sum-exp.** A row's softmax normaliser ``lse_i = log sum_j exp(z_ij)`` over all columns is
built one column tile ``C`` at a time: ``lse_i <- logaddexp(lse_i, logsumexp_{j in C} z_ij)``, where both
``logsumexp`` (subtracts the tile's row maximum before ``exp``) and ``logaddexp(a, b) = max(a, b) +
log1p(exp(-|a - b|))`` are overflow-free, so the running value is the exact ``lse`` whatever the logit range.
Forward keeps only ``lse_i`` and the positive logit per row (``O(B)``); backward recomputes each tile's
logits, turns them into ``softmax - one_hot = exp(z - lse) - Y`` with the saved ``lse``, and accumulates the
feature gradients (``dq += G k``, ``dk += G^T q``, times the scale) and the scale gradient
(``sum G * q.k``) tile by tile. The same scheme without a normaliser gives SigLIP (per-pair terms are
independent: ``d/dx softplus(+-x)`` is ``sigmoid(x) - Y``).

All arithmetic is done in at least float32: bf16/fp16 features are upcast one tile at a time (float64 stays
float64), and the gradients are returned in the features' own dtype.

References: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (CLIP,
ICML 2021); Zhai et al., "Sigmoid Loss for Language Image Pre-Training" (SigLIP, ICCV 2023). The tiling is
the classic online-softmax idea (Milakov & Gimelshein 2018) applied to a contrastive loss.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["chunked_cross_entropy_rows", "chunked_infonce_loss", "chunked_siglip_loss"]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The promoted dtype of ``tensors``, at least float32 (bf16/fp16 upcast, float64 kept)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _spans(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, chunk):
        yield start, min(start + chunk, n)


def _targets_in(t: torch.Tensor, c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For row targets ``t``, the in-tile column index ``[rows, 1]`` (clamped, valid where ``hit``) and the
    mask ``hit`` of rows whose target column lies in ``[c0, c1)``. No host sync (no ``nonzero``)."""
    hit = (t >= c0) & (t < c1)
    idx = (t - c0).clamp_(0, c1 - c0 - 1).unsqueeze(1)
    return idx, hit


def _check(q: torch.Tensor, k: torch.Tensor, chunk_size: int) -> None:
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"expected features [Bq, d] and [Bk, d], got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[0] == 0 or k.shape[0] == 0:
        raise ValueError("empty batch")
    if int(chunk_size) <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")


def _as_scalar_tensor(x: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.tensor(float(x), dtype=torch.float32, device=like.device)
    if x.numel() != 1:
        raise ValueError(f"expected a scalar, got shape {tuple(x.shape)}")
    return x.reshape(())


def _row_targets(bq: int, bk: int, offset: int, device: torch.device) -> torch.Tensor:
    if offset < 0 or offset + bq > bk:
        raise ValueError(f"targets {offset}..{offset + bq - 1} fall outside the {bk} columns")
    return torch.arange(bq, device=device) + offset


# ----------------------------------------------------------------------------------------------------
# One direction of InfoNCE: mean_i CE(scale * q_i k^T, target_i)
# ----------------------------------------------------------------------------------------------------


class _ChunkedCrossEntropyRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, scale, targets, chunk_size):  # noqa: ANN001, ANN205
        cdt = _compute_dtype(q, k, scale)
        s = scale.to(cdt)
        bq, bk = q.shape[0], k.shape[0]
        lse = torch.full((bq,), float("-inf"), dtype=cdt, device=q.device)
        pos = torch.zeros(bq, dtype=cdt, device=q.device)
        for r0, r1 in _spans(bq, chunk_size):
            qr, tr = q[r0:r1].to(cdt), targets[r0:r1]
            for c0, c1 in _spans(bk, chunk_size):
                z = torch.mm(qr, k[c0:c1].to(cdt).T).mul_(s)  # [rows, cols] logits of this tile
                lse[r0:r1] = torch.logaddexp(lse[r0:r1], torch.logsumexp(z, dim=1))
                idx, hit = _targets_in(tr, c0, c1)
                pos[r0:r1] += torch.where(hit, z.gather(1, idx).squeeze(1), 0.0)
        ctx.save_for_backward(q, k, scale, targets, lse)
        ctx.chunk_size = chunk_size
        return (lse - pos).mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        q, k, scale, targets, lse = ctx.saved_tensors
        need_q, need_k, need_s = ctx.needs_input_grad[:3]
        cdt = lse.dtype
        s = scale.to(cdt)
        bq, bk = q.shape[0], k.shape[0]
        dq = torch.zeros(q.shape, dtype=cdt, device=q.device) if need_q else None
        dk = torch.zeros(k.shape, dtype=cdt, device=k.device) if need_k else None
        ds = torch.zeros((), dtype=cdt, device=q.device)
        for r0, r1 in _spans(bq, ctx.chunk_size):
            qr, tr, lr = q[r0:r1].to(cdt), targets[r0:r1], lse[r0:r1, None]
            for c0, c1 in _spans(bk, ctx.chunk_size):
                kc = k[c0:c1].to(cdt)
                a = torch.mm(qr, kc.T)  # raw dot products q.k
                g = torch.mul(a, s).sub_(lr).exp_()  # softmax
                idx, hit = _targets_in(tr, c0, c1)
                g.scatter_add_(1, idx, -hit.to(cdt).unsqueeze(1))  # softmax - one_hot = dloss/dz * Bq
                if need_s:
                    ds += torch.dot(g.view(-1), a.view(-1))
                if need_q:
                    dq[r0:r1].addmm_(g, kc)
                if need_k:
                    dk[c0:c1].addmm_(g.T, qr)
                del a, g
        coef = grad.to(cdt) / bq
        if need_q:
            dq = dq.mul_(coef * s).to(q.dtype)
        if need_k:
            dk = dk.mul_(coef * s).to(k.dtype)
        ds = (ds * coef).to(scale.dtype) if need_s else None
        return dq, dk, ds, None, None


def chunked_cross_entropy_rows(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor,
                               targets: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """``mean_i CE(scale * q_i . k^T, targets_i)``: one direction of the CLIP loss, in tiles.

    ``q``: ``[Bq, d]`` query rows; ``k``: ``[Bk, d]`` candidate columns; ``scale``: the multiplicative logit
    scale itself (already ``exp``-ed, a 0-dim tensor; its gradient flows back through whatever produced it);
    ``targets``: ``[Bq]`` column index of each row's positive. Equals ``F.cross_entropy(scale * q @ k.T,
    targets)`` in value and in the gradients to ``q``, ``k`` and ``scale``, but never holds more than a
    ``chunk_size x chunk_size`` tile of logits: forward streams the log-sum-exp over column tiles and keeps
    ``O(Bq)`` numbers; backward recomputes each tile (see the module docstring). First derivatives only.
    """
    _check(q, k, chunk_size)
    scale = _as_scalar_tensor(scale, q)
    targets = targets.to(device=q.device, dtype=torch.long).reshape(-1)
    if targets.shape[0] != q.shape[0]:
        raise ValueError(f"{targets.shape[0]} targets for {q.shape[0]} rows")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= k.shape[0]):
        raise ValueError(f"targets must lie in [0, {k.shape[0]})")
    return _ChunkedCrossEntropyRows.apply(q, k, scale, targets, int(chunk_size))


# ----------------------------------------------------------------------------------------------------
# Symmetric InfoNCE over one square batch: both directions share every tile of U V^T
# ----------------------------------------------------------------------------------------------------


class _ChunkedSymmetricInfoNCE(torch.autograd.Function):
    """(CE(s U V^T, arange) + CE(s V U^T, arange)) / 2 for one process' batch. ``V U^T`` is the transpose of
    ``U V^T``, so each tile serves both directions at once: rows stream the image->text normaliser, columns
    the text->image one. Half the matmuls of two separate :func:`chunked_cross_entropy_rows` calls."""

    @staticmethod
    def forward(ctx, u, v, scale, chunk_size):  # noqa: ANN001, ANN205
        cdt = _compute_dtype(u, v, scale)
        s = scale.to(cdt)
        b = u.shape[0]
        row_lse = torch.full((b,), float("-inf"), dtype=cdt, device=u.device)
        col_lse = torch.full((b,), float("-inf"), dtype=cdt, device=u.device)
        diag = torch.zeros(b, dtype=cdt, device=u.device)
        for r0, r1 in _spans(b, chunk_size):
            ur = u[r0:r1].to(cdt)
            for c0, c1 in _spans(b, chunk_size):
                z = torch.mm(ur, v[c0:c1].to(cdt).T).mul_(s)
                row_lse[r0:r1] = torch.logaddexp(row_lse[r0:r1], torch.logsumexp(z, dim=1))
                col_lse[c0:c1] = torch.logaddexp(col_lse[c0:c1], torch.logsumexp(z, dim=0))
                if r0 == c0:  # same spans on both axes: the diagonal lives in the diagonal tiles
                    diag[r0:r1] = z.diagonal()
        ctx.save_for_backward(u, v, scale, row_lse, col_lse)
        ctx.chunk_size = chunk_size
        return ((row_lse - diag).mean() + (col_lse - diag).mean()) / 2

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        u, v, scale, row_lse, col_lse = ctx.saved_tensors
        need_u, need_v, need_s = ctx.needs_input_grad[:3]
        cdt = row_lse.dtype
        s = scale.to(cdt)
        b = u.shape[0]
        du = torch.zeros(u.shape, dtype=cdt, device=u.device) if need_u else None
        dv = torch.zeros(v.shape, dtype=cdt, device=v.device) if need_v else None
        ds = torch.zeros((), dtype=cdt, device=u.device)
        for r0, r1 in _spans(b, ctx.chunk_size):
            ur, lr = u[r0:r1].to(cdt), row_lse[r0:r1, None]
            for c0, c1 in _spans(b, ctx.chunk_size):
                vc = v[c0:c1].to(cdt)
                a = torch.mm(ur, vc.T)
                g = torch.mul(a, s).sub_(lr).exp_()  # row softmax (image -> text)
                g += torch.mul(a, s).sub_(col_lse[None, c0:c1]).exp_()  # column softmax (text -> image)
                if r0 == c0:
                    g.diagonal().sub_(2.0)  # minus both one-hots
                if need_s:
                    ds += torch.dot(g.view(-1), a.view(-1))
                if need_u:
                    du[r0:r1].addmm_(g, vc)
                if need_v:
                    dv[c0:c1].addmm_(g.T, ur)
                del a, g
        coef = grad.to(cdt) / (2 * b)
        if need_u:
            du = du.mul_(coef * s).to(u.dtype)
        if need_v:
            dv = dv.mul_(coef * s).to(v.dtype)
        ds = (ds * coef).to(scale.dtype) if need_s else None
        return du, dv, ds, None


def chunked_infonce_loss(u: torch.Tensor, v: torch.Tensor, u_all: torch.Tensor | None = None,
                         v_all: torch.Tensor | None = None, logit_scale: torch.Tensor | None = None,
                         offset: int = 0, chunk_size: int = 4096) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP, Radford et al. 2021) in the local-loss form, with memory linear in the batch.

    ``u``/``v``: this rank's image/text embeddings ``[B, d]``; ``u_all``/``v_all``: the global batch
    ``[G, d]`` whose rows ``offset .. offset + B`` are ``u``/``v`` (``None`` or ``u``/``v`` themselves in one
    process); ``logit_scale``: the *log* of the scale, ``s = exp(logit_scale)`` (required). Returns

        (CE(s u v_all^T, i) + CE(s v u_all^T, i)) / 2,   i = arange(B) + offset,

    exactly the value and gradients of :func:`counterpoint.objectives.contrastive.infonce_loss`; the mean over
    ranks of this is the single-process loss of the global batch. Gradients flow into ``u``, ``v``, ``u_all``,
    ``v_all`` (so callers can all-gather with gradients) and ``logit_scale``. Peak extra memory is
    ``O(chunk_size^2 + G d)`` rather than ``O(B G)``; see :func:`chunked_cross_entropy_rows`.

    When ``u_all is u`` and ``v_all is v`` (one process) both directions are computed from the same tiles of
    ``U V^T``, which halves the matmuls; otherwise two :func:`chunked_cross_entropy_rows` calls.
    """
    if logit_scale is None:
        raise TypeError("chunked_infonce_loss needs logit_scale (the log of the logit scale)")
    u_all = u if u_all is None else u_all
    v_all = v if v_all is None else v_all
    if u.shape != v.shape or u_all.shape != v_all.shape:
        raise ValueError(f"shape mismatch: u {tuple(u.shape)}, v {tuple(v.shape)}, "
                         f"u_all {tuple(u_all.shape)}, v_all {tuple(v_all.shape)}")
    _check(u, v_all, chunk_size)
    scale = _as_scalar_tensor(logit_scale, u).exp()
    if u_all is u and v_all is v and offset == 0:
        return _ChunkedSymmetricInfoNCE.apply(u, v, scale, int(chunk_size))
    targets = _row_targets(u.shape[0], u_all.shape[0], offset, u.device)
    return (_ChunkedCrossEntropyRows.apply(u, v_all, scale, targets, int(chunk_size))
            + _ChunkedCrossEntropyRows.apply(v, u_all, scale, targets, int(chunk_size))) / 2


# ----------------------------------------------------------------------------------------------------
# SigLIP
# ----------------------------------------------------------------------------------------------------


class _ChunkedSigLIP(torch.autograd.Function):
    """``(1/Bq) sum_ij softplus(-z_ij x_ij)``, ``x = s q.k + b``: each tile is recomputed in backward.

    Why a custom Function rather than autograd + ``torch.utils.checkpoint`` per chunk: both keep only one
    tile alive at a time, but the Function controls every temporary (two tiles: the dot products and the
    in-place ``sigmoid(x) - Y``), saves nothing but the features, accumulates ``dq``/``dk`` in place with
    ``addmm_`` instead of autograd allocating a full-size slice gradient per chunk, and gets the scale and
    bias gradients as plain reductions of the same tile. Positive pairs use ``softplus(-x)`` and
    ``-sigmoid(-x)`` directly (no ``softplus(x) - x`` cancellation), so the loss stays accurate when tiny.
    """

    @staticmethod
    def forward(ctx, q, k, scale, bias, targets, chunk_size):  # noqa: ANN001, ANN205
        cdt = _compute_dtype(q, k, scale, bias)
        s, b0 = scale.to(cdt), bias.to(cdt)
        bq, bk = q.shape[0], k.shape[0]
        total = torch.zeros((), dtype=cdt, device=q.device)
        for r0, r1 in _spans(bq, chunk_size):
            qr, tr = q[r0:r1].to(cdt), targets[r0:r1]
            for c0, c1 in _spans(bk, chunk_size):
                x = torch.mm(qr, k[c0:c1].to(cdt).T).mul_(s).add_(b0)
                idx, hit = _targets_in(tr, c0, c1)
                xp = x.gather(1, idx)
                sp = F.softplus(x)  # -log sigmoid(-x): every pair as a negative ...
                sp.scatter_(1, idx, torch.where(hit.unsqueeze(1), F.softplus(-xp), sp.gather(1, idx)))
                total += sp.sum()  # ... except the positives, -log sigmoid(x)
                del x, sp
        ctx.save_for_backward(q, k, scale, bias, targets)
        ctx.chunk_size = chunk_size
        return total / bq

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        q, k, scale, bias, targets = ctx.saved_tensors
        need_q, need_k, need_s, need_b = ctx.needs_input_grad[:4]
        cdt = _compute_dtype(q, k, scale, bias)
        s, b0 = scale.to(cdt), bias.to(cdt)
        bq, bk = q.shape[0], k.shape[0]
        dq = torch.zeros(q.shape, dtype=cdt, device=q.device) if need_q else None
        dk = torch.zeros(k.shape, dtype=cdt, device=k.device) if need_k else None
        ds = torch.zeros((), dtype=cdt, device=q.device)
        db = torch.zeros((), dtype=cdt, device=q.device)
        for r0, r1 in _spans(bq, ctx.chunk_size):
            qr, tr = q[r0:r1].to(cdt), targets[r0:r1]
            for c0, c1 in _spans(bk, ctx.chunk_size):
                kc = k[c0:c1].to(cdt)
                a = torch.mm(qr, kc.T)
                g = torch.mul(a, s).add_(b0)  # x
                idx, hit = _targets_in(tr, c0, c1)
                xp = g.gather(1, idx)
                g.sigmoid_()  # d softplus(x)/dx for negatives
                g.scatter_(1, idx, torch.where(hit.unsqueeze(1), -torch.sigmoid(-xp), g.gather(1, idx)))
                if need_s:
                    ds += torch.dot(g.view(-1), a.view(-1))
                if need_b:
                    db += g.sum()
                if need_q:
                    dq[r0:r1].addmm_(g, kc)
                if need_k:
                    dk[c0:c1].addmm_(g.T, qr)
                del a, g
        coef = grad.to(cdt) / bq
        if need_q:
            dq = dq.mul_(coef * s).to(q.dtype)
        if need_k:
            dk = dk.mul_(coef * s).to(k.dtype)
        ds = (ds * coef).to(scale.dtype) if need_s else None
        db = (db * coef).to(bias.dtype) if need_b else None
        return dq, dk, ds, db, None, None


def chunked_siglip_loss(u: torch.Tensor, v_all: torch.Tensor, logit_scale: torch.Tensor,
                        logit_bias: torch.Tensor, offset: int = 0, chunk_size: int = 4096) -> torch.Tensor:
    """Pairwise sigmoid loss (SigLIP, Zhai et al. 2023) of local rows against global columns, in tiles.

    ``-(1/B) sum_{i<B} sum_{j<G} log sigmoid(z_ij (s u_i.v_j + b))`` with ``s = exp(logit_scale)`` (the
    log-parameter), ``b = logit_bias``, ``z_ij = +1`` for ``j == i + offset`` and ``-1`` otherwise. ``u``:
    ``[B, d]`` this rank's image rows; ``v_all``: ``[G, d]`` all text columns (``v_all = v``, ``offset = 0``
    in one process). The mean over ranks equals the single-process loss of the global batch. Gradients go to
    ``u``, ``v_all``, ``logit_scale`` and ``logit_bias``. Peak extra memory is ``O(chunk_size^2 + G d)``: the
    pair terms are independent, so forward sums tile by tile and backward recomputes each tile
    (``dloss/dx = sigmoid(x) - Y``); see :class:`_ChunkedSigLIP` for why a custom Function.
    """
    _check(u, v_all, chunk_size)
    scale = _as_scalar_tensor(logit_scale, u).exp()
    bias = _as_scalar_tensor(logit_bias, u)
    targets = _row_targets(u.shape[0], v_all.shape[0], offset, u.device)
    return _ChunkedSigLIP.apply(u, v_all, scale, bias, targets, int(chunk_size))
