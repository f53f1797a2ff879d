"""Optimiser and learning-rate schedule for contrastive pretraining."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices and conv kernels only; none on biases, norm parameters,
    embeddings' position tables of dim < 2, or the logit scale/bias (decaying the temperature would pull it
    towards 1, and decaying norms fights normalisation) - the CLIP recipe."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]  # the same for a model and for a task holding it ("model.logit_scale")
        if p.dim() < 2 or leaf.startswith("logit_") or "pos_embed" in name or "cls_token" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float) -> torch.optim.AdamW:
    on_cuda = next(model.parameters()).is_cuda
    # The fused kernel is one launch for all parameters on GPU; on CPU the foreach path is the fast one.
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                             fused=True if on_cuda else None)


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Linear warmup to ``base_lr`` then cosine decay to ``min_lr_ratio * base_lr``. A pure function of the
    step, so resuming needs no scheduler state."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
