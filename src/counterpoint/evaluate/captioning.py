"""Captioning evaluation of a model with a decoder (BLIP): captions of test images scored two ways.

* **BLEU-4 and CIDEr** against reference captions, with the COCO caption evaluation's own scorers
  (``pycocoevalcap``, the ``captioning`` extra; skipped with a reason without it). Captions and references are
  lower-cased and stripped of punctuation first (what its PTB tokenizer does, without Java). On the built-in
  world every test scene gets 5 references: its stored caption and 4 more drawn from the world's grammar
  (a generated world can describe a scene as often as it likes; COCO has 5 per image).
* **Attributes** against the scene itself (``caption_attributes``): does the caption name the colours,
  shapes, sizes and places that were drawn?
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from counterpoint.data.readers import SkipStats, iter_tar_groups, metadata, tar_files
from counterpoint.data.world import Scene, WorldConfig, literal_caption, scene_from_meta
from counterpoint.evaluate.caption_attributes import attribute_scores

REFERENCES = 5


def world_scenes(test_path: str, keys: list[str]) -> list[Scene] | None:
    """The scene of each sample ``keys`` names, from the objects in its json member (the built-in world writes
    them); ``None`` if some sample has none (not a world split)."""
    found: dict[str, Scene] = {}
    for tar_path in tar_files(test_path):
        for key, members in iter_tar_groups(tar_path, SkipStats()):
            try:
                scene = scene_from_meta(metadata(members))
            except ValueError:
                continue
            if scene is not None:
                found[key] = scene
    scenes = [found.get(k) for k in keys]
    return None if any(s is None for s in scenes) else scenes


def world_config(test_path: str) -> WorldConfig | None:
    """The world's settings from the ``world.json`` beside its split, if there is one."""
    path = Path(test_path).parent / "world.json"
    try:
        return WorldConfig(**{k: tuple(v) if isinstance(v, list) else v
                              for k, v in json.loads(path.read_text())["world"].items()})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def world_references(scenes: list[Scene], stored: list[str], cfg: WorldConfig) -> list[list[str]]:
    """The stored caption and ``REFERENCES - 1`` more drawn from the world's grammar, per scene."""
    return [[caption] + [literal_caption(scene, np.random.default_rng([cfg.seed, 77, i, r]), cfg.position_prob)
                         for r in range(1, REFERENCES)] for i, (scene, caption) in enumerate(zip(scenes, stored))]


def _clean(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", text.lower()))


def bleu_cider(captions: list[str], references: list[list[str]]) -> dict[str, float] | str:
    """``{"bleu4", "cider"}`` by pycocoevalcap's scorers, or the reason they cannot run."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        return "BLEU/CIDEr need pycocoevalcap: pip install 'counterpoint[captioning]'"
    res = {i: [_clean(c) or "empty"] for i, c in enumerate(captions)}
    gts = {i: [_clean(r) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


def evaluate_captions(model: torch.nn.Module, tokenizer: Any, images: torch.Tensor, stored: list[str],
                      keys: list[str], test_path: str, beams: int = 3) -> dict[str, Any]:
    """Beam-search captions of ``images`` (uint8, the test pairs' first ``n``), without the prompt, scored
    against references and, on a world split, against the scenes."""
    import counterpoint

    captions = counterpoint.caption(model, tokenizer, images, beams=beams, with_prompt=False)  # BLIP's scoring
    result: dict[str, Any] = {"n": len(captions), "method": f"beam search, {beams} beams",
                              "examples": [{"key": k, "caption": c, "reference": r}
                                           for k, c, r in list(zip(keys, captions, stored))[:8]]}
    scenes, cfg = world_scenes(test_path, keys), world_config(test_path)
    world = scenes is not None and cfg is not None
    references = world_references(scenes, stored, cfg) if world else [[caption] for caption in stored]
    result["references_per_image"] = len(references[0])
    scores = bleu_cider(captions, references)
    if isinstance(scores, str):
        result["bleu_cider_skipped"] = scores
    else:
        result |= scores
    if scenes is not None:
        result["attributes"] = attribute_scores(captions, scenes)
    return result
