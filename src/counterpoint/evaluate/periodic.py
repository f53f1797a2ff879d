"""Zero-shot accuracy during training (``eval.every_steps``), as OpenCLIP's ``--zeroshot-frequency`` gives it:
a learning curve in accuracy, not only in loss, and the number of samples a recipe needs to reach a level.

The labelled images are read once, before training; each evaluation embeds them and the class prompts with the
current weights (eval mode, no gradients) and adds ``zeroshot/<subset>`` top-1 to that step's metrics row.
Nothing it does touches the training's random streams or weights, so a run gives the same losses with and
without it.
"""

from __future__ import annotations

from typing import Any

import torch

from counterpoint.config import RunConfig
from counterpoint.data.tokenizer import Tokenizer
from counterpoint.evaluate.embed import embed_images
from counterpoint.evaluate.inputs import resolve_eval_inputs
from counterpoint.evaluate.zeroshot import LabelledImages, class_embeddings, load_labelled, zeroshot_by_subset
from counterpoint.models.two_tower import TwoTower

SUBSETS = ("heldout", "seen", "all")


def curve_key(subset: str) -> str:
    """The metrics.jsonl key of a subset's zero-shot top-1."""
    return f"zeroshot/{subset}"


class PeriodicZeroShot:
    """Zero-shot top-1 of ``model`` on the run's labelled images, per subset."""

    def __init__(self, cfg: RunConfig, image_size: int, tokenizer: Tokenizer) -> None:
        # data.zeroshot is there: train() checked it before training
        self.labelled: LabelledImages = load_labelled(resolve_eval_inputs(cfg), image_size, cfg.data.caption_key)
        self.tokenizer = tokenizer
        self.batch_size = cfg.eval.batch_size

    @torch.no_grad()
    def __call__(self, model: TwoTower, device: torch.device) -> dict[str, float]:
        lab = self.labelled
        img = embed_images(model, lab.images, self.batch_size, device)
        weights = class_embeddings(model, self.tokenizer, lab.classes, lab.templates, device)
        scores = zeroshot_by_subset(img, weights, lab)
        return {curve_key(s): round(scores[s]["top1"], 4) for s in SUBSETS if s in scores}


def zeroshot_curve(rows: list[dict[str, Any]], threshold: float = 0.8) -> dict[str, Any] | None:
    """eval.json's ``zeroshot_during_training``: samples seen and top-1 per subset at every periodic evaluation,
    and the samples seen when held-out top-1 first reached ``threshold`` (``None`` if it never did)."""
    points = [r for r in rows if isinstance(r.get(curve_key("all")), (int, float))]
    if not points:
        return None
    curve: dict[str, Any] = {"samples_seen": [r["samples_seen"] for r in points],
                             "step": [r["step"] for r in points]}
    for subset in SUBSETS:
        if all(curve_key(subset) in r for r in points):
            curve[subset] = [r[curve_key(subset)] for r in points]
    track = curve.get("heldout", curve["all"])
    reached = next((n for n, v in zip(curve["samples_seen"], track) if v >= threshold), None)
    curve["threshold"] = threshold
    curve["samples_to_threshold"] = reached
    return curve
