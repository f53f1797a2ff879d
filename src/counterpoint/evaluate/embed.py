"""Batched, no-grad embedding of images and texts for evaluation, optionally spread over the ranks of a
process group (each rank embeds a contiguous shard, then all ranks gather the whole set in order)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from counterpoint.data.tokenizer import Tokenizer
from counterpoint.data.transforms import normalize
from counterpoint.models.two_tower import TwoTower
from counterpoint.objectives.distributed import world_info


def _embed_rows(n: int, embed: Callable[[int, int], torch.Tensor], batch_size: int, device: torch.device | str,
                across_ranks: bool) -> torch.Tensor:
    """``embed(start, stop)`` over ``0..n`` in batches -> ``[n, D]`` float32 on CPU.

    ``across_ranks``: rank r embeds rows ``bounds[r] .. bounds[r + 1]`` only and an all_gather (padded to the
    largest shard, as collectives need equal sizes) assembles the rows in their original order on every rank.
    Every rank of the group must call it.
    """
    rank, world = world_info() if across_ranks else (0, 1)
    bounds = [n * r // world for r in range(world + 1)]  # shard sizes differ by at most one
    lo, hi = bounds[rank], bounds[rank + 1]
    out = [embed(i, min(i + batch_size, hi)).float() for i in range(lo, hi, batch_size)]
    if world == 1:
        return torch.cat(out).cpu()
    width = max(bounds[r + 1] - bounds[r] for r in range(world))
    local = torch.cat(out) if out else None
    dim = torch.tensor([local.shape[1] if local is not None else 0], device=device)
    dist.all_reduce(dim, op=dist.ReduceOp.MAX)  # an empty shard still needs the feature width
    padded = torch.zeros(width, int(dim), device=device)  # [max shard, D]
    if local is not None:
        padded[: hi - lo] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: bounds[r + 1] - bounds[r]] for r, p in enumerate(parts)]).cpu()


@torch.no_grad()
def embed_images(model: TwoTower, images: torch.Tensor, batch_size: int = 512,
                 device: torch.device | str = "cpu", across_ranks: bool = False) -> torch.Tensor:
    """``[N, 3, S, S]`` uint8 -> ``[N, D]`` unit embeddings (float32, on CPU)."""
    was_training = model.training
    model.eval()
    out = _embed_rows(len(images), lambda a, b: model.encode_image(normalize(images[a:b].to(device))),
                      batch_size, device, across_ranks)
    model.train(was_training)
    return out


@torch.no_grad()
def embed_image_tokens(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 512,
                       device: torch.device | str = "cpu", across_ranks: bool = False) -> torch.Tensor:
    """``[N, 3, S, S]`` uint8 -> the image tower's tokens ``[N, T, C]`` (``encode_image_tokens``; float32, CPU)."""
    was_training = model.training
    model.eval()
    def tokens(a: int, b: int) -> torch.Tensor:
        return model.encode_image_tokens(normalize(images[a:b].to(device)))

    shape = tokens(0, 1).shape[1:]
    # rows of T * C: the gather across ranks assembles 2-d rows
    flat = _embed_rows(len(images), lambda a, b: tokens(a, b).flatten(1), batch_size, device, across_ranks)
    model.train(was_training)
    return flat.view(len(images), *shape)


@torch.no_grad()
def embed_texts(model: TwoTower, tokenizer: Tokenizer, texts: list[str], batch_size: int = 512,
                device: torch.device | str = "cpu", across_ranks: bool = False) -> torch.Tensor:
    """Texts -> ``[N, D]`` unit embeddings (float32, on CPU)."""
    was_training = model.training
    model.eval()
    out = _embed_rows(len(texts), lambda a, b: model.encode_text(tokenizer(texts[a:b]).to(device)),
                      batch_size, device, across_ranks)
    model.train(was_training)
    return out
