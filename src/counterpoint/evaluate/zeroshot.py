"""Zero-shot classification (CLIP, Radford et al. 2021): every class name is written into prompt templates,
the text embeddings of a class are averaged into one classifier row, and an image takes the class of highest
cosine similarity."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from counterpoint.data.tokenizer import Tokenizer
from counterpoint.evaluate.embed import embed_texts
from counterpoint.models.two_tower import TwoTower


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
