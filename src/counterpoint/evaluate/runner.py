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

from typing import Any

import torch

from counterpoint.config import RunConfig
from counterpoint.data.pairs import load_pairs
from counterpoint.data.tokenizer import Tokenizer
from counterpoint.errors import DataError
from counterpoint.evaluate.embed import embed_images, embed_texts
from counterpoint.evaluate.inputs import DEFAULT_TEMPLATE, load_classes, resolve_eval_inputs
from counterpoint.evaluate.linear_probe import linear_probe
from counterpoint.evaluate.retrieval import retrieval_metrics
from counterpoint.evaluate.zeroshot import class_embeddings, topk_accuracy
from counterpoint.models.two_tower import TwoTower


def evaluate_model(model: TwoTower, tokenizer: Tokenizer, cfg: RunConfig, device: torch.device,
                   progress: bool = False, across_ranks: bool = False) -> dict[str, Any]:
    """Every configured evaluation of ``model``. ``across_ranks``: every rank of the process group calls this
    and the work is shared (embeddings by shard, linear-probe fits by grid point); all get the same result."""
    result: dict[str, Any] = {"data": {"skipped": {}}}
    inputs = resolve_eval_inputs(cfg)
    if inputs.skipped:
        result["skipped_evaluations"] = dict(inputs.skipped)
    size = model.image_size
    ecfg = cfg.eval
    if ecfg.retrieval and inputs.test:
        test = load_pairs(inputs.test, size, cfg.data.caption_key, ecfg.max_retrieval_samples, progress,
                          desc="reading test")
        result["data"]["skipped"]["test"] = test.skips.as_dict()
        img = embed_images(model, test.images, ecfg.batch_size, device, across_ranks)
        txt = embed_texts(model, tokenizer, test.captions, ecfg.batch_size, device, across_ranks)
        result["retrieval"] = {"n": len(test), **retrieval_metrics(img, txt, tuple(ecfg.recall_at))}
    if (ecfg.zeroshot or ecfg.linear_probe) and inputs.zeroshot:
        labelled = load_pairs(inputs.zeroshot, size, cfg.data.caption_key, None, progress,
                              desc="reading zeroshot")
        if inputs.classes:
            classes, templates, heldout = load_classes(inputs.classes)
        else:  # no class file: the labels themselves, one generic prompt
            classes, templates, heldout = sorted({x for x in labelled.labels if x}), [DEFAULT_TEMPLATE], set()
        index = {c: i for i, c in enumerate(classes)}
        keep = []
        for i, (label, key) in enumerate(zip(labelled.labels, labelled.keys)):
            if label in index:
                keep.append(i)
            else:  # counted, never dropped without a word
                labelled.skips.skip("no_label" if label is None else "unknown_label", key)
        result["data"]["skipped"]["zeroshot"] = labelled.skips.as_dict()
        if not keep:
            raise DataError(f"no image in '{inputs.zeroshot}' has a label from '{inputs.classes}'")
        result["zeroshot_data"] = {"path": inputs.zeroshot, "classes": inputs.classes or "labels of the images"}
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
