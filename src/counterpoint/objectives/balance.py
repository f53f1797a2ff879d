"""Supervised multimodal classification with any gradient combiner (METHODS.md section 2).

One forward gives the fused loss L_mm (cross-entropy of the fusion head) and one L_k per modality (its
unimodal head); the combiner (``counterpoint.optim.combiners``) turns them into encoder and head gradients.

Heads a method does not train are trained as *probes*: ``joint`` (and ``ogm_ge`` with ``base="fused"``) use
only L_mm, so the unimodal heads would never learn; ``unimodal`` never trains the fusion head. After the
combiner has run, every head parameter it left without a gradient gets the gradient of its own loss
computed on **detached** encoder features. A probe therefore measures what its encoder(s) learned without
changing any encoder: under ``joint`` the unimodal-head accuracy of a modality is the linear read-out of
that modality's under-trained encoder, the quantity modality imbalance is about.

OGM-GE's per-modality scores are computed from the unimodal heads' logits (probes under its default
``base="fused"``). The paper splits the concat fusion head's weights per modality instead; a unimodal head
measures the same thing (how well each encoder alone predicts the label) and works for every fusion type.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from counterpoint.models.fusion import ClassifierOutput, MultimodalClassifier
from counterpoint.optim.combiners import GradientCombiner

FUSED = "fused"


def classification_losses(out: ClassifierOutput, labels: Tensor) -> dict[str, Tensor]:
    """``{"fused": L_mm, modality: L_k}``, mean cross-entropy over the batch."""
    losses = {FUSED: F.cross_entropy(out.fused, labels)}
    losses.update({k: F.cross_entropy(logits, labels) for k, logits in out.unimodal.items()})
    return losses


class BalanceTask:
    """The model, its loss and the gradient combiner of one method. ``batch``: ``{modality: [B, ...],
    "label": [B]}``."""

    def __init__(self, model: MultimodalClassifier, combiner: GradientCombiner) -> None:
        self.model = model
        self.combiner = combiner
        self.groups = model.parameter_groups()
        self._heads = self.groups["heads"]

    def step(self, batch: Mapping[str, Tensor]) -> dict[str, float]:
        """Forward, combine, probes: sets ``p.grad`` of every parameter; returns losses, accuracies and the
        combiner's stats (cos/k, norm_m/k, ...) as floats for the log."""
        labels = batch["label"]
        out = self.model(batch)
        losses = classification_losses(out, labels)
        # The unimodal logits: what OGM-GE scores modalities by (the other combiners ignore the context).
        context = {"logits": {k: v.detach() for k, v in out.unimodal.items()}, "labels": labels}
        stats = self.combiner.combine(losses, self.groups, context)
        self._train_probes(out, labels)
        values = torch.stack([v.detach() for v in losses.values()]).tolist()
        row = {f"loss/{k}": v for k, v in zip(losses, values)}
        row.update(_accuracies(out, labels))
        row.update(stats)
        return row

    def _train_probes(self, out: ClassifierOutput, labels: Tensor) -> None:
        idle = [p for p in self._heads if p.grad is None]
        if not idle:
            return
        fused, unimodal = self.model.classify({k: f.detach() for k, f in out.features.items()})
        probe = F.cross_entropy(fused, labels) + sum(F.cross_entropy(v, labels) for v in unimodal.values())
        # Each head parameter is reached by its own loss only, so the gradient of the sum is its gradient.
        grads = torch.autograd.grad(probe, idle, allow_unused=True)
        for p, g in zip(idle, grads):
            p.grad = g


def _accuracies(out: ClassifierOutput, labels: Tensor) -> dict[str, float]:
    with torch.no_grad():
        hits = [(out.fused.argmax(-1) == labels).float().mean()]
        hits += [(v.argmax(-1) == labels).float().mean() for v in out.unimodal.values()]
        values = torch.stack(hits).tolist()
    return dict(zip([f"acc/{FUSED}", *(f"acc/{k}" for k in out.unimodal)], values))
