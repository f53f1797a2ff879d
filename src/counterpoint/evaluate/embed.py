"""Batched, no-grad embedding of images and texts for evaluation."""

from __future__ import annotations

import torch

from counterpoint.data.tokenizer import Tokenizer
from counterpoint.data.transforms import normalize
from counterpoint.models.two_tower import TwoTower


@torch.no_grad()
def embed_images(model: TwoTower, images: torch.Tensor, batch_size: int = 512,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """``[N, 3, S, S]`` uint8 -> ``[N, D]`` unit embeddings (float32, on CPU)."""
    was_training = model.training
    model.eval()
    out = [model.encode_image(normalize(images[i : i + batch_size].to(device))).float().cpu()
           for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def embed_texts(model: TwoTower, tokenizer: Tokenizer, texts: list[str], batch_size: int = 512,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Texts -> ``[N, D]`` unit embeddings (float32, on CPU)."""
    was_training = model.training
    model.eval()
    out = [model.encode_text(tokenizer(texts[i : i + batch_size]).to(device)).float().cpu()
           for i in range(0, len(texts), batch_size)]
    model.train(was_training)
    return torch.cat(out)
