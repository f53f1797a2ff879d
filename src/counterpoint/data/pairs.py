"""Image-text pairs held in memory as uint8 tensors, with a deterministic, resumable batch order.

For the data sizes a CPU run trains on (up to a few hundred thousand small images) decoding once and keeping
``uint8`` pixels in memory is far faster than decoding every epoch, and it makes the batch order a pure
function of ``(seed, epoch)``: a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from counterpoint.data.parallel import process_pool
from counterpoint.data.readers import (
    RawSample,
    SkipStats,
    detect_format,
    iter_samples,
    iter_webdataset,
    tar_files,
    to_square_array,
)
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


@dataclass
class _Chunk:
    """What one shard held: pixels ``[n, S, S, 3]`` and the aligned texts (a reader process's answer)."""

    arrays: list[np.ndarray]
    captions: list[str]
    labels: list[str | None]
    keys: list[str]
    skips: SkipStats

    def add(self, sample: RawSample, image_size: int) -> None:
        self.arrays.append(to_square_array(sample.image, image_size))
        self.captions.append(sample.caption)
        self.labels.append(sample.label)
        self.keys.append(sample.key)


def _read_shard(tar_path: Path, image_size: int, caption_key: str) -> _Chunk:
    chunk = _Chunk([], [], [], [], SkipStats())
    for sample in iter_webdataset(str(tar_path), caption_key, chunk.skips):
        chunk.add(sample, image_size)
    return chunk


def _read_chunks(path: str, image_size: int, caption_key: str, limit: int | None, workers: int,
                 progress: bool, desc: str) -> Iterator[_Chunk]:
    """Shards decoded by ``workers`` processes at once, in shard order (so the pairs come in the order one
    process reads them); other formats, one process, or a ``limit``, sample by sample."""
    shards = tar_files(path) if detect_format(path) == "wds" else []
    with tqdm(desc=desc, unit=" pairs", disable=not progress, leave=False) as bar:
        if min(workers, len(shards)) > 1 and limit is None:
            with process_pool(min(workers, len(shards))) as pool:
                for chunk in pool.map(_read_shard, shards, [image_size] * len(shards),
                                      [caption_key] * len(shards)):
                    bar.update(len(chunk.captions))
                    yield chunk
            return
        chunk = _Chunk([], [], [], [], SkipStats())
        for sample in iter_samples(path, chunk.skips, caption_key):
            chunk.add(sample, image_size)
            bar.update(1)
            if limit is not None and len(chunk.captions) >= limit:
                break
        yield chunk


def load_pairs(path: str, image_size: int, caption_key: str = "txt", limit: int | None = None,
               progress: bool = False, desc: str = "reading", workers: int | None = None) -> PairSet:
    """Read every decodable pair under ``path`` (any reader format) into memory; WebDataset shards are
    decoded by ``workers`` processes at once (default: the CPU count)."""
    skips = SkipStats()
    arrays: list[np.ndarray] = []
    captions: list[str] = []
    labels: list[str | None] = []
    keys: list[str] = []
    for chunk in _read_chunks(path, image_size, caption_key, limit, workers or os.cpu_count() or 1, progress,
                              desc):
        arrays += chunk.arrays
        captions += chunk.captions
        labels += chunk.labels
        keys += chunk.keys
        skips.merge(chunk.skips)
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
