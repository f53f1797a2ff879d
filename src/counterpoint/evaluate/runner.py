"""Run every configured evaluation for a trained two-tower model and assemble ``eval.json``.

``eval.json`` keys (contract, also documented in the README):

* ``zeroshot``: ``num_classes``, and per subset (``heldout``: images of colour-shape combinations never seen
  in training; ``seen``; ``all``) ``top1``, ``top5`` and ``n``.
* ``retrieval``: ``n`` pairs, ``image_to_text`` and ``text_to_image`` each with ``R@1``, ``R@5``, ``R@10``.
* ``linear_probe``: ``top1`` (test), ``val_top1``, chosen ``l2``, ``n_train``, ``n_test``.
* ``data``: skipped samples per split: ``{"train": {"total", "by_reason", "examples"}, "test": ..., ...}``.
* ``step``: the training step evaluated; ``model``: the preset name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from counterpoint.config import RunConfig
from counterpoint.data.pairs import load_pairs
from counterpoint.data.tokenizer import Tokenizer
from counterpoint.errors import DataError
from counterpoint.evaluate.embed import embed_images, embed_texts
from counterpoint.evaluate.linear_probe import linear_probe
from counterpoint.evaluate.retrieval import retrieval_metrics
from counterpoint.evaluate.zeroshot import class_embeddings, topk_accuracy
from counterpoint.models.two_tower import TwoTower


def load_classes(path: str) -> tuple[list[str], list[str], set[str]]:
    """``(classes, templates, heldout)`` from a JSON file such as the world's ``world.json``."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"class file '{path}' not found; set data.classes to a JSON file with \"classes\" and "
                        f"\"templates\", or data.zeroshot='' to skip zero-shot evaluation")
    try:
        info = json.loads(p.read_text())
        classes, templates = list(info["classes"]), list(info.get("templates") or ["a photo of a {c}."])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"class file '{path}' must be JSON with a \"classes\" list ({exc})") from None
    return classes, templates, set(info.get("heldout", []))


def evaluate_model(model: TwoTower, tokenizer: Tokenizer, cfg: RunConfig, device: torch.device,
                   progress: bool = False, across_ranks: bool = False) -> dict[str, Any]:
    """Every configured evaluation of ``model``. ``across_ranks``: every rank of the process group calls this
    and the work is shared (embeddings by shard, linear-probe fits by grid point); all get the same result."""
    result: dict[str, Any] = {"data": {"skipped": {}}}
    size = model.image_size
    ecfg = cfg.eval
    if ecfg.retrieval and cfg.data.test:
        test = load_pairs(cfg.data.test, size, cfg.data.caption_key, ecfg.max_retrieval_samples, progress,
                          desc="reading test")
        result["data"]["skipped"]["test"] = test.skips.as_dict()
        img = embed_images(model, test.images, ecfg.batch_size, device, across_ranks)
        txt = embed_texts(model, tokenizer, test.captions, ecfg.batch_size, device, across_ranks)
        result["retrieval"] = {"n": len(test), **retrieval_metrics(img, txt, tuple(ecfg.recall_at))}
    if (ecfg.zeroshot or ecfg.linear_probe) and cfg.data.zeroshot:
        labelled = load_pairs(cfg.data.zeroshot, size, cfg.data.caption_key, None, progress,
                              desc="reading zeroshot")
        result["data"]["skipped"]["zeroshot"] = labelled.skips.as_dict()
        classes, templates, heldout = load_classes(cfg.data.classes)
        index = {c: i for i, c in enumerate(classes)}
        keep = [i for i, lab in enumerate(labelled.labels) if lab in index]
        if not keep:
            raise DataError(f"no image in '{cfg.data.zeroshot}' has a label from '{cfg.data.classes}'")
        targets = torch.tensor([index[labelled.labels[i]] for i in keep])
        img = embed_images(model, labelled.images[keep], ecfg.batch_size, device, across_ranks)
        if ecfg.zeroshot:
            weights = class_embeddings(model, tokenizer, classes, templates, device, across_ranks)
            is_heldout = torch.tensor([labelled.labels[i] in heldout for i in keep])
            zs: dict[str, Any] = {"num_classes": len(classes), "num_templates": len(templates)}
            for name, mask in (("all", torch.ones_like(is_heldout)), ("heldout", is_heldout),
                               ("seen", ~is_heldout)):
                if mask.any():
                    zs[name] = {**topk_accuracy(img[mask], weights, targets[mask]), "n": int(mask.sum())}
            result["zeroshot"] = zs
        if ecfg.linear_probe:
            result["linear_probe"] = linear_probe(img, targets, seed=cfg.seed, across_ranks=across_ranks)
    return result
