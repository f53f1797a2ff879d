"""Streaming image-text batches from WebDataset shards, decoded in DataLoader workers, with exact resume.

    loader = StreamingLoader([Source.from_spec("data/shard-{000000..000099}.tar")], batch_size=256,
                             image_size=64, rank=rank, world_size=world_size, num_workers=4)
    loader.load_state_dict(checkpoint["data"])      # optional: continue where a run stopped
    for step, batch in zip(range(start, total), loader):   # endless: epoch after epoch
        ...                                               # batch: image [B, 3, S, S] uint8, caption, key
        checkpoint["data"] = loader.state_dict()

What goes in which batch is planned by :class:`~counterpoint.data.stream_plan.BatchPlan` (shard split by rank,
shuffling, epochs, resampling, mixing; see there). Worker ``w`` of ``W`` builds batches ``w, w + W, ...`` and
the DataLoader hands them out in turn, so the batches are the same for any number of workers, and a loader
restored at batch ``k`` starts every worker at its first batch from ``k`` on: no skipped sample is read,
let alone decoded. (Splitting workers by shard instead would tie the batch order to the worker count; the
price of splitting by batch is that every worker indexes the rank's shards, a header scan of about 5 us a
member.) The state is the number of batches handed out (plus what it is valid for), the same on
every rank, so rank 0's copy in a checkpoint serves all.

A sample that cannot be decoded (corrupt image, bad or empty caption, missing image member, truncated
shard) is left out of its batch and counted by reason: each batch carries the counts its worker made, and
:attr:`StreamingLoader.skips` adds them up. Such a batch is shorter than ``batch_size`` (filling it from
elsewhere would make the plan depend on decoding); a trainer whose all-gather needs equal sizes pads or
drops it. The counts cover the shards found damaged while planning (rank 0 only, as every rank plans the
same shards) and the batches handed out by this loader object; they are not part of the state, and a trainer
that resumes puts back the counts it saved (``skips`` is a plain attribute).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from counterpoint.config import StreamConfig
from counterpoint.data.readers import IMAGE_EXTS, SkipStats, caption_of, decode_members, metadata, to_square_array
from counterpoint.data.shards import ShardCache, index_tar, read_group
from counterpoint.data.stream_plan import BatchPlan, Remainder, Source
from counterpoint.errors import DataError


class SampleDecoder(Protocol):
    """What a sample is: ``decode`` turns one key's members into a sample (``None``, counted in ``skips``, if
    it is unusable) and ``collate`` a batch's samples into the batch dict."""

    def decode(self, key: str, members: dict[str, bytes], where: str, skips: SkipStats) -> Any | None: ...

    def collate(self, samples: list[Any]) -> dict: ...


class PairDecoder:
    """Image-caption pairs: batches ``{"image": uint8 [b, 3, S, S], "caption": [str], "key": [str]}``."""

    def __init__(self, image_size: int, caption_key: str = "txt") -> None:
        self.image_size, self.caption_key = image_size, caption_key

    def decode(self, key: str, members: dict[str, bytes], where: str,
               skips: SkipStats) -> tuple[np.ndarray, str, str] | None:
        sample = decode_members(key, members, self.caption_key, where, skips)
        return None if sample is None else (to_square_array(sample.image, self.image_size), sample.caption, key)

    def collate(self, samples: list[tuple[np.ndarray, str, str]]) -> dict:
        s = self.image_size
        # numpy's uint8 transpose-copy is about 10x faster than torch's permute().contiguous() here
        images = (torch.from_numpy(np.ascontiguousarray(np.stack([x[0] for x in samples]).transpose(0, 3, 1, 2)))
                  if samples else torch.empty(0, 3, s, s, dtype=torch.uint8))  # [b, 3, S, S]
        return {"image": images, "caption": [x[1] for x in samples], "key": [x[2] for x in samples]}


class PlannedBatches(IterableDataset):
    """Decodes the batches of ``plan`` from ``start`` on; in worker ``w`` of ``W`` only ``start + w + i W``."""

    def __init__(self, plan: BatchPlan, decoder: SampleDecoder, start: int = 0) -> None:
        self.plan, self.decoder, self.start = plan, decoder, start

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = ShardCache()
        try:
            for batch in itertools.count(self.start + worker, workers):
                yield self.decode(batch, shards)
        finally:
            shards.close()

    def decode(self, batch: int, shards: ShardCache) -> dict:
        """Batch ``batch``: the decoder's batch dict of its usable samples (``batch_size`` less the skipped
        ones), its ``batch`` number and the ``skips`` of its samples."""
        skips = SkipStats()
        samples = []
        for source, shard, position in self.plan.refs(batch):
            path = self.plan.path(source, shard)
            found = shards.read(path, position)
            if isinstance(found, str):
                skips.skip(found, f"{Path(path).name}#{position}")
                continue
            key, members = found
            sample = self.decoder.decode(key, members, f"{Path(path).name}:{key}", skips)
            if sample is not None:
                samples.append(sample)
        return {**self.decoder.collate(samples), "batch": batch, "skips": skips}


class StreamingLoader:
    """Endless per-rank batches ``{"image": uint8 [B, 3, S, S], "caption": [str], "key": [str]}`` from
    WebDataset shards, with ``state_dict`` / ``load_state_dict`` for exact mid-epoch resume. ``decoder``
    makes other samples of the same shards (interleaved documents: ``data.document_shards.DocumentDecoder``).

    Iterate it once at a time; a new iteration (after a ``break``, say) continues where the last one stopped.
    """

    def __init__(self, sources: Sequence[Source], batch_size: int, image_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, resampled: bool = False, remainder: Remainder = "drop",
                 num_workers: int = 0, caption_key: str = "txt", prefetch_factor: int = 2,
                 decoder: SampleDecoder | None = None) -> None:
        self.plan = BatchPlan(sources, batch_size, seed, rank, world_size, resampled, remainder)
        self.decoder = decoder or PairDecoder(image_size, caption_key)
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.batches = 0  # handed out so far: the next batch is number `batches`
        self.skips = SkipStats()
        if rank == 0:  # every rank plans the same shards; one counts the damaged ones
            for source in sources:
                for shard, reason in source.problems:
                    self.skips.skip(reason, Path(shard).name)

    @property
    def steps_per_epoch(self) -> int | None:
        """Batches per epoch for a single source in epoch mode; ``None`` for endless streams."""
        return self.plan.steps_per_epoch

    @property
    def samples_seen(self) -> int:
        """Sample slots handed out over all ranks (skipped samples included)."""
        return self.batches * self.plan.batch_size * self.plan.world_size

    def __iter__(self) -> Iterator[dict]:
        dataset = PlannedBatches(self.plan, self.decoder, start=self.batches)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None)
        try:
            for batch in loader:
                number = batch.pop("batch")
                assert number == self.batches, f"batch {number} arrived when {self.batches} was due"
                self.skips.merge(batch.pop("skips"))
                self.batches += 1  # counted before the caller trains on it: a checkpoint after it resumes after it
                yield batch
        except DataError as exc:
            # A worker's error comes back with the worker's whole traceback as its message; users get its
            # last line, the error itself.
            lines = str(exc).rstrip().splitlines()
            if len(lines) == 1:
                raise
            raise DataError(lines[-1].removeprefix(f"{DataError.__module__}.{DataError.__qualname__}: ")) from None

    def state_dict(self) -> dict:
        """A small JSON-able position: batches handed out, the epoch, and what the position is valid for."""
        state = {"batches": self.batches, "samples_seen": self.samples_seen, **self.plan.fingerprint()}
        if self.steps_per_epoch is not None:
            state["epoch"] = self.batches // self.steps_per_epoch
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; raises :class:`DataError` if it was saved for other data or settings."""
        for key, value in self.plan.fingerprint().items():
            if state.get(key) != value:
                raise DataError(f"the saved data position is for {key}={state.get(key)!r}, this loader has "
                                f"{key}={value!r}; resume with the settings and shards the run started with")
        self.batches = int(state["batches"])


def build_loader(cfg: StreamConfig, batch_size: int, image_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, caption_key: str = "txt", decoder: SampleDecoder | None = None) -> StreamingLoader:
    """The loader ``data.stream`` describes, for one rank; ``batch_size`` is that rank's share of the global
    batch."""
    if not cfg.sources:
        raise DataError("data.stream.sources is empty: name the shards to stream, e.g. "
                        "data.stream.sources=[{shards: data/world/train}]")
    sources = [Source.from_spec(s.shards, s.weight) for s in cfg.sources]
    return StreamingLoader(sources, batch_size, image_size, rank=rank, world_size=world_size, seed=seed,
                           resampled=cfg.resampled, remainder=cfg.remainder, num_workers=cfg.num_workers,
                           caption_key=caption_key, prefetch_factor=cfg.prefetch_factor, decoder=decoder)


def read_captions(sources: Sequence[Source], limit: int, caption_key: str = "txt") -> list[str]:
    """Up to ``limit`` captions from the first shards of the sources (shared by weight), reading only the
    caption members: text to train a tokenizer on without decoding an image."""
    total_weight = sum(s.weight for s in sources)
    captions: list[str] = []
    for source in sources:
        want = len(captions) + math.ceil(limit * source.weight / total_weight)
        for path in source.shards:
            if len(captions) >= want:
                break
            index = index_tar(path)
            with open(path, "rb") as handle:
                for group in index.groups:
                    if len(captions) >= want:
                        break
                    if group.duplicate or all(m.ext not in IMAGE_EXTS for m in group.members):
                        continue  # the loader would skip it: a duplicate key, or no image
                    members = read_group(handle, group, (caption_key, "txt", "json"))
                    try:
                        caption = caption_of(members, caption_key, metadata(members))
                    except ValueError:  # bad text or json: the loader skips it too
                        continue
                    if caption:
                        captions.append(caption)
    return captions[:limit]
