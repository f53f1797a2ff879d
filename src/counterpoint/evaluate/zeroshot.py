"""Zero-shot classification (CLIP, Radford et al. 2021): every class name is written into prompt templates,
the text embeddings of a class are averaged into one classifier row, and an image takes the class of highest
cosine similarity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from counterpoint.data.pairs import load_pairs
from counterpoint.data.readers import SkipStats
from counterpoint.data.tokenizer import Tokenizer
from counterpoint.errors import DataError
from counterpoint.evaluate.embed import embed_texts
from counterpoint.evaluate.inputs import DEFAULT_TEMPLATE, EvalInputs, load_classes
from counterpoint.models.two_tower import TwoTower


@dataclass
class LabelledImages:
    """The zero-shot set: images whose label is one of ``classes``, their class indices, which are of held-out
    combinations, the prompt templates, and what was left out (``skips``)."""

    images: torch.Tensor  # [N, 3, S, S] uint8
    targets: torch.Tensor  # [N] class indices
    is_heldout: torch.Tensor  # [N] bool
    classes: list[str]
    templates: list[str]
    skips: SkipStats


def load_labelled(inputs: EvalInputs, image_size: int, caption_key: str = "txt",
                  progress: bool = False) -> LabelledImages:
    """Read ``inputs.zeroshot`` with the classes of ``inputs.classes`` (or, with no class file, the labels
    themselves and one generic prompt). Images without a label or with an unknown one are counted in
    ``skips``, never dropped without a word."""
    labelled = load_pairs(inputs.zeroshot, image_size, caption_key, None, progress, desc="reading zeroshot")
    if inputs.classes:
        classes, templates, heldout = load_classes(inputs.classes)
    else:
        classes, templates, heldout = sorted({x for x in labelled.labels if x}), [DEFAULT_TEMPLATE], set()
    index = {c: i for i, c in enumerate(classes)}
    keep = []
    for i, (label, key) in enumerate(zip(labelled.labels, labelled.keys)):
        if label in index:
            keep.append(i)
        else:
            labelled.skips.skip("no_label" if label is None else "unknown_label", key)
    if not keep:
        raise DataError(f"no image in '{inputs.zeroshot}' has a label from '{inputs.classes}'")
    return LabelledImages(images=labelled.images[keep],
                          targets=torch.tensor([index[labelled.labels[i]] for i in keep]),
                          is_heldout=torch.tensor([labelled.labels[i] in heldout for i in keep]),
                          classes=classes, templates=templates, skips=labelled.skips)


def class_embeddings(model: TwoTower, tokenizer: Tokenizer, classnames: list[str], templates: list[str],
                     device: torch.device | str = "cpu", across_ranks: bool = False) -> torch.Tensor:
    """``[C, D]`` unit classifier weights: the normalised mean of each class's template embeddings."""
    texts = [t.format(c=name) for name in classnames for t in templates]
    emb = embed_texts(model, tokenizer, texts, device=device, across_ranks=across_ranks)
    emb = emb.view(len(classnames), len(templates), -1)  # [C, T, D]
    return F.normalize(emb.mean(dim=1), dim=-1)


def topk_accuracy(image_emb: torch.Tensor, class_emb: torch.Tensor, targets: torch.Tensor,
                  ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy for each k that the number of classes allows (top-5 of 3 classes is not reported)."""
    ks = tuple(k for k in ks if k <= class_emb.shape[0])
    logits = image_emb @ class_emb.T  # [N, C]
    top = logits.topk(max(ks), dim=1).indices  # [N, kmax]
    hit = top == targets.unsqueeze(1)
    return {f"top{k}": float(hit[:, :k].any(dim=1).float().mean()) for k in ks}


def zeroshot_by_subset(image_emb: torch.Tensor, class_emb: torch.Tensor,
                       labelled: LabelledImages) -> dict[str, Any]:
    """Top-1 / top-5 and image count for ``all`` images, the ``heldout`` combinations and the ``seen`` ones
    (a subset with no image is left out)."""
    out: dict[str, Any] = {}
    for name, mask in (("all", torch.ones_like(labelled.is_heldout)), ("heldout", labelled.is_heldout),
                       ("seen", ~labelled.is_heldout)):
        if mask.any():
            out[name] = {**topk_accuracy(image_emb[mask], class_emb, labelled.targets[mask]), "n": int(mask.sum())}
    return out
