"""counterpoint: multimodal representation learning.

Public API::

    model = counterpoint.create_model("tiny-vit")             # a fresh TwoTower
    model, tokenizer = counterpoint.load_checkpoint("runs/clip-world")
    tokenizer = counterpoint.get_tokenizer("runs/clip-world")
    u = counterpoint.encode_image(model, images_uint8)        # [N, D] unit vectors
    v = counterpoint.encode_text(model, tokenizer, ["a red circle."])
    pictures, cosine = counterpoint.imagine(model, tokenizer, ["a red star"])   # [1, 3, S, S] uint8
"""

from __future__ import annotations

from pathlib import Path

import torch

from counterpoint.data.tokenizer import Tokenizer
from counterpoint.data.transforms import normalize
from counterpoint.models import MODEL_PRESETS, TwoTower, create_model

__version__ = "0.1.0"
__all__ = ["MODEL_PRESETS", "Tokenizer", "TwoTower", "create_model", "encode_image", "encode_text",
           "get_tokenizer", "imagine", "load_checkpoint"]


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[TwoTower, Tokenizer]:
    """The model (in eval mode) and tokenizer saved in a run directory or checkpoint folder."""
    from counterpoint.train.loop import load_run_model

    model, tokenizer, _ = load_run_model(path, device)
    return model, tokenizer


def get_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer saved with a run or checkpoint (``tokenizer.json`` beside the weights)."""
    from counterpoint.train.checkpoint import read_state, resolve_checkpoint
    from counterpoint.train.loop import load_tokenizer, spec_from_state

    folder = resolve_checkpoint(path)
    return load_tokenizer(folder, spec_from_state(read_state(folder), folder))


@torch.no_grad()
def encode_image(model: TwoTower, images: torch.Tensor) -> torch.Tensor:
    """``[N, 3, S, S]`` uint8 pixels (or already normalised floats) -> ``[N, D]`` unit embeddings."""
    device = next(model.parameters()).device
    x = normalize(images.to(device)) if images.dtype == torch.uint8 else images.to(device)
    return model.encode_image(x)


@torch.no_grad()
def encode_text(model: TwoTower, tokenizer: Tokenizer, texts: str | list[str]) -> torch.Tensor:
    """Texts -> ``[N, D]`` unit embeddings."""
    device = next(model.parameters()).device
    return model.encode_text(tokenizer(texts).to(device))


def imagine(model: TwoTower, tokenizer: Tokenizer, texts: str | list[str], steps: int = 500, seed: int = 0,
            **options: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Pictures of what ``texts`` mean to ``model`` (BriVL's imagination; ``counterpoint.visualize.imagine``):
    ``([N, 3, S, S]`` uint8 images, the final cosine of each with its text). Deterministic from ``seed``."""
    from counterpoint.visualize.imagine import imagine as run
    from counterpoint.visualize.imagine import text_targets

    texts = [texts] if isinstance(texts, str) else list(texts)
    return run(model, text_targets(model, tokenizer, texts), steps=steps, seed=seed, **options)


@torch.no_grad()
def caption(model: torch.nn.Module, tokenizer: Tokenizer, images: torch.Tensor, beams: int | None = None,
            top_p: float | None = None, max_tokens: int = 30, seed: int = 0, with_prompt: bool = True) -> list[str]:
    """Captions of ``[N, 3, S, S]`` uint8 images by a model with a captioning decoder (BLIP): greedy, beam
    search with ``beams``, or nucleus sampling with ``top_p`` (deterministic from ``seed``); each starts with
    the model's prompt ("a picture of ...") unless ``with_prompt`` is false (as BLIP scores captions)."""
    from counterpoint.models.decoding import beam_search, greedy, nucleus

    if not hasattr(model, "caption_logits"):
        raise ValueError("this model has no captioning decoder (train it with objective.name=blip)")
    if beams is not None and top_p is not None:
        raise ValueError("give beams or top_p, not both")
    device = next(model.parameters()).device
    x = normalize(images.to(device)) if images.dtype == torch.uint8 else images.to(device)
    prompt = model.prompt_ids
    if beams is not None:
        ids = beam_search(model, x, prompt, beams=beams, max_tokens=max_tokens)
    elif top_p is not None:
        ids = nucleus(model, x, prompt, top_p, max_tokens, torch.Generator().manual_seed(seed))
    else:
        ids = greedy(model, x, prompt, max_tokens)
    return [tokenizer.decode(torch.tensor((prompt if with_prompt else []) + row)) for row in ids]

