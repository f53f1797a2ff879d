"""Run every configured evaluation for a trained two-tower model and assemble ``eval.json``.

``eval.json`` keys (contract, also documented in the README):

* ``zeroshot``: ``num_classes``, and per subset (``heldout``: images of colour-shape combinations never seen
  in training; ``seen``; ``all``) ``top1``, ``top5`` and ``n``.
* ``retrieval``: ``n`` pairs, ``image_to_text`` and ``text_to_image`` each with ``R@1``, ``R@5``, ``R@10``.
* ``retrieval_itm`` (models with a matching head, BLIP): ``retrieval`` with each query's top ``k`` re-ranked
  by the matching head (``eval.rerank_k``).
* ``captioning`` (models with a decoder, BLIP; ``eval.captions`` test images): ``n``, ``method``, ``bleu4``,
  ``cider`` (5 references per world scene), ``attributes`` (per attribute precision / recall against the
  scenes, for all and one-object scenes), ``examples`` and the picture ``grid``.
* ``linear_probe``: ``top1`` (test), ``val_top1``, chosen ``l2``, ``n_train``, ``n_test``.
* ``attentive_probe`` (``eval.attentive_probe``): ``top1`` (test), ``val_top1``, the chosen ``epoch``,
  ``n_train``, ``n_test``.
* ``skipped_evaluations``: each configured evaluation that did not run, with the reason.
* ``data``: skipped samples per split: ``{"train": {"total", "by_reason", "examples"}, "test": ..., ...}``.
* ``step``: the training step evaluated; ``model``: the preset name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from counterpoint.config import RunConfig
from counterpoint.data.pairs import load_pairs
from counterpoint.data.tokenizer import Tokenizer
from counterpoint.evaluate.attentive_probe import attentive_probe
from counterpoint.evaluate.captioning import evaluate_captions
from counterpoint.evaluate.embed import embed_image_tokens, embed_images, embed_texts
from counterpoint.evaluate.inputs import resolve_eval_inputs
from counterpoint.evaluate.itm_rerank import itm_reranked_retrieval
from counterpoint.evaluate.linear_probe import linear_probe
from counterpoint.evaluate.retrieval import retrieval_metrics
from counterpoint.evaluate.zeroshot import class_embeddings, load_labelled, zeroshot_by_subset
from counterpoint.models.two_tower import TwoTower
from counterpoint.visualize.grid import save_pictures


def evaluate_model(model: TwoTower, tokenizer: Tokenizer, cfg: RunConfig, device: torch.device,
                   progress: bool = False, across_ranks: bool = False,
                   picture_dir: Path | None = None) -> dict[str, Any]:
    """Every configured evaluation of ``model``. ``across_ranks``: every rank of the process group calls this
    and the work is shared (embeddings by shard, linear-probe fits by grid point); all get the same result.
    ``picture_dir``: where evaluations with pictures (captioned test images) put them."""
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
        if ecfg.rerank_k > 0 and hasattr(model, "match_logits"):
            result["retrieval_itm"] = {"n": len(test), **itm_reranked_retrieval(
                model, test.images, tokenizer(test.captions), img, txt, ecfg.rerank_k, tuple(ecfg.recall_at),
                ecfg.batch_size, device)}
        if ecfg.captions > 0 and hasattr(model, "caption_logits"):
            n = min(ecfg.captions, len(test))
            result["captioning"] = evaluate_captions(model, tokenizer, test.images[:n], test.captions[:n],
                                                     test.keys[:n], inputs.test)
            if picture_dir is not None:
                shown = result["captioning"]["examples"]
                save_pictures(test.images[: len(shown)], [e["caption"] for e in shown], picture_dir / "captions",
                              title="captions of test images")
                result["captioning"]["grid"] = "captions/grid.png"
    attentive = ecfg.attentive_probe and hasattr(model, "encode_image_tokens")
    if ecfg.attentive_probe and not attentive:
        result.setdefault("skipped_evaluations", {})["attentive_probe"] = "the model has no image tokens"
    if (ecfg.zeroshot or ecfg.linear_probe or attentive) and inputs.zeroshot:
        labelled = load_labelled(inputs, size, cfg.data.caption_key, progress)
        result["data"]["skipped"]["zeroshot"] = labelled.skips.as_dict()
        result["zeroshot_data"] = {"path": inputs.zeroshot, "classes": inputs.classes or "labels of the images"}
        img = embed_images(model, labelled.images, ecfg.batch_size, device, across_ranks)
        if ecfg.zeroshot:
            weights = class_embeddings(model, tokenizer, labelled.classes, labelled.templates, device, across_ranks)
            result["zeroshot"] = {"num_classes": len(labelled.classes), "num_templates": len(labelled.templates),
                                  **zeroshot_by_subset(img, weights, labelled)}
        if ecfg.linear_probe:
            result["linear_probe"] = linear_probe(img, labelled.targets, seed=cfg.seed, across_ranks=across_ranks)
        if attentive:
            tokens = embed_image_tokens(model, labelled.images, ecfg.batch_size, device, across_ranks)
            result["attentive_probe"] = attentive_probe(tokens, labelled.targets, seed=cfg.seed)
    return result
