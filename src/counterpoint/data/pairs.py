"""Image-text pairs held in memory as uint8 tensors, with a deterministic, resumable batch order.

For the data sizes a CPU run trains on (up to a few hundred thousand small images) decoding once and keeping
``uint8`` pixels in memory is far faster than decoding every epoch, and it makes the batch order a pure
function of ``(seed, epoch)``: a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from counterpoint.data.readers import SkipStats, iter_samples, to_square_array
from counterpoint.errors import DataError


@dataclass
class PairSet:
    """``images``: [N, 3, S, S] uint8; ``captions``/``labels``/``keys`` aligned lists; ``skips``: what was
    dropped."""

    images: torch.Tensor
    captions: list[str]
    labels: list[str | None]
    skips: SkipStats
    keys: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def load_pairs(path: str, image_size: int, caption_key: str = "txt", limit: int | None = None,
               progress: bool = False, desc: str = "reading") -> PairSet:
    """Read every decodable pair under ``path`` (any reader format) into memory."""
    skips = SkipStats()
    arrays: list[np.ndarray] = []
    captions: list[str] = []
    labels: list[str | None] = []
    keys: list[str] = []
    samples = iter_samples(path, skips, caption_key)
    for sample in tqdm(samples, desc=desc, unit=" pairs", disable=not progress, leave=False):
        arrays.append(to_square_array(sample.image, image_size))
        captions.append(sample.caption)
        labels.append(sample.label)
        keys.append(sample.key)
        if limit is not None and len(captions) >= limit:
            break
    if not captions:
        detail = f" ({skips.total} samples skipped: {dict(skips.counts)})" if skips.total else ""
        raise DataError(f"no usable image-text pairs found in '{path}'{detail}")
    # numpy's uint8 transpose-copy is about 10x faster than torch's permute().contiguous().
    images = torch.from_numpy(np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2)))  # [N, 3, S, S]
    return PairSet(images, captions, labels, skips, keys)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of ``epoch``: a fixed function of (seed, epoch), so resuming needs no RNG state."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


def batch_indices(n: int, batch_size: int, seed: int, start_step: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
    """Endless ``(step, indices)`` for full batches (the ragged tail of each epoch is dropped, as contrastive
    losses want a constant number of negatives), starting at global step ``start_step``."""
    steps_per_epoch = n // batch_size
    if steps_per_epoch == 0:
        raise DataError(f"the training set has {n} pairs, fewer than one batch of {batch_size}; "
                        f"lower train.batch_size")
    step = start_step
    while True:
        epoch, pos = divmod(step, steps_per_epoch)
        perm = epoch_permutation(n, seed, epoch)
        for p in range(pos, steps_per_epoch):
            yield step, perm[p * batch_size : (p + 1) * batch_size]
            step += 1
