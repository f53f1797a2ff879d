"""Which samples make up batch ``g`` of rank ``r``: a pure function of the seed, the shard sizes and ``g``.

Nothing here reads a shard. Every random choice comes from a generator keyed by what it decides (seed,
purpose, source, epoch, shard, ...), never from a generator that advances as data flows. So any batch can be
planned on its own: a loader resumed at batch ``k`` plans batch ``k`` directly (exact resume with a state of
one integer), and DataLoader worker ``w`` of ``W`` plans just batches ``w, w + W, ...`` (the batch sequence does
not depend on the number of workers).

**Shuffling without a buffer.** WebDataset shuffles with a buffer that mixes samples of neighbouring
shards; its content is state that a checkpoint would have to hold. Here an epoch's order is a permutation of
the shards from ``(seed, epoch)`` followed, inside each shard, by a permutation of its samples from
``(seed, epoch, shard)``; random access by tar header (:mod:`counterpoint.data.shards`) makes reading a shard
in any order cheap. The order is as random as a shuffle buffer of one shard, and a batch draws from one or
two shards, like a buffered WebDataset pipeline early in its buffer.

**Epochs (one source, not resampled).** The epoch's order is cut into ``world_size`` contiguous slices of
``steps_per_epoch * batch_size`` samples, one per rank, so each rank reads its own run of shards (the split
by node) and every rank takes the same number of steps, as DDP needs. When the epoch does not divide into
``world_size * batch_size``, ``remainder="drop"`` leaves out the last ``N mod (world_size * batch_size)``
samples of the epoch's order (different ones every epoch; every other sample is seen exactly once), and
``remainder="wrap"`` adds a step and fills it from the start of the epoch's order (every sample at least once,
that many twice).

**Resampled.** Each rank draws whole shards with replacement, uniformly (a shard then makes up a share of the
stream proportional to its size: every sample is equally frequent), from ``(seed, source, rank, draw)``; the
stream is endless.

**Mixing.** Every slot of a batch takes its source with probability proportional to the sources' weights,
independently. Batches are grouped in blocks of :data:`MIX_BLOCK`: a block's per-source counts are one
multinomial draw and its slot order a permutation of them, which is the same distribution as independent
slots but lets the position reached in each source be summed block by block. Each source is an endless
stream (resampled, or its epochs one after the other with the epoch split contiguously by rank).
"""

from __future__ import annotations

import hashlib
import json
import math
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from counterpoint.data.shards import expand_shards, scan_shards
from counterpoint.errors import DataError

Remainder = Literal["drop", "wrap"]
# Purposes, so that e.g. the shard order of epoch 3 and the member order of shard 3 never share a generator.
_SHARD_ORDER, _MEMBER_ORDER, _DRAWS, _DRAW_MEMBERS, _MIX_COUNTS, _MIX_SLOTS = range(6)
MIX_BLOCK = 64  # batches per block of the mixing schedule
_DRAW_BLOCK = 1024  # resampled shard draws made per generator


def _rng(*key: int) -> np.random.Generator:
    """A generator keyed by ``key`` (SeedSequence hashes the whole tuple, so nearby keys are unrelated)."""
    return np.random.default_rng(np.random.SeedSequence([k % 2**64 for k in key]))


class _Memo:
    """A small least-recently-used cache: ``get(key, make)``."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict = OrderedDict()

    def get(self, key: object, make: Callable[[], object]) -> object:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = self._items[key] = make()
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return value


@dataclass(frozen=True)
class Source:
    """One data source: its shards, their sample counts and its mixing weight."""

    shards: tuple[str, ...]
    sizes: tuple[int, ...]
    weight: float = 1.0
    problems: tuple[tuple[str, str], ...] = ()  # (shard, reason) of shards found damaged while counting

    @classmethod
    def from_spec(cls, spec: str | Sequence[str], weight: float = 1.0) -> Source:
        """Shards from a pattern, folder or list (:func:`~counterpoint.data.shards.expand_shards`)."""
        if not weight > 0:
            raise DataError(f"source '{spec}': weight must be > 0, got {weight}")
        shards = expand_shards(spec)
        sizes, problems = scan_shards(shards)
        source = cls(tuple(shards), tuple(sizes), float(weight), tuple(problems))
        if source.total == 0:
            raise DataError(f"source '{spec}': its {len(shards)} shard(s) hold no samples")
        return source

    @property
    def total(self) -> int:
        return sum(self.sizes)


class EpochStream:
    """A rank's endless stream over a source's epochs: position ``p`` is sample ``(start + p mod length) mod
    N`` of epoch ``p // length``'s order (shards permuted, then samples within each shard)."""

    def __init__(self, sizes: Sequence[int], seed: int, source_id: int, start: int, length: int) -> None:
        self.sizes, self.seed, self.source_id = list(sizes), seed, source_id
        self.start, self.length, self.total = start, length, sum(sizes)
        self._epochs = _Memo(2)
        self._members = _Memo(16)

    def _epoch(self, epoch: int) -> tuple[list[int], list[int]]:
        """Shard order of ``epoch`` and the cumulative sample count after each shard in that order."""
        def make() -> tuple[list[int], list[int]]:
            order = _rng(self.seed, _SHARD_ORDER, self.source_id, epoch).permutation(len(self.sizes)).tolist()
            return order, np.cumsum([self.sizes[s] for s in order]).tolist()
        return self._epochs.get(epoch, make)

    def locate(self, pos: int) -> tuple[int, int]:
        """``(shard, sample within the shard)`` at position ``pos``."""
        epoch, q = divmod(pos, self.length)
        at = (self.start + q) % self.total
        order, ends = self._epoch(epoch)
        i = bisect_right(ends, at)  # the first shard ending after `at` (skips empty shards)
        shard, offset = order[i], at - (ends[i - 1] if i else 0)
        members = self._members.get((epoch, shard), lambda: _rng(
            self.seed, _MEMBER_ORDER, self.source_id, epoch, shard).permutation(self.sizes[shard]))
        return shard, int(members[offset])


class ResampledStream:
    """A rank's endless stream of whole shards drawn uniformly with replacement, each read in its own random
    order."""

    def __init__(self, sizes: Sequence[int], seed: int, source_id: int, rank: int) -> None:
        self.sizes, self.seed, self.source_id, self.rank = list(sizes), seed, source_id, rank
        self._draws: list[int] = []  # shard of each draw so far
        self._ends: list[int] = []  # stream position after each draw
        self._members = _Memo(16)

    def _draw_more(self) -> None:
        block = len(self._draws) // _DRAW_BLOCK
        rng = _rng(self.seed, _DRAWS, self.source_id, self.rank, block)
        end = self._ends[-1] if self._ends else 0
        for shard in rng.integers(len(self.sizes), size=_DRAW_BLOCK).tolist():
            end += self.sizes[shard]
            self._draws.append(shard)
            self._ends.append(end)

    def locate(self, pos: int) -> tuple[int, int]:
        while not self._ends or self._ends[-1] <= pos:
            self._draw_more()
        d = bisect_right(self._ends, pos)
        shard, offset = self._draws[d], pos - (self._ends[d - 1] if d else 0)
        members = self._members.get(d, lambda: _rng(
            self.seed, _DRAW_MEMBERS, self.source_id, self.rank, d).permutation(self.sizes[shard]))
        return shard, int(members[offset])


class MixSchedule:
    """Source of every slot of a rank's batches, and the position each slot takes in its source's stream."""

    def __init__(self, weights: Sequence[float], batch_size: int, seed: int, rank: int) -> None:
        self.p = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.batch_size, self.seed, self.rank = batch_size, seed, rank
        self._starts: list[np.ndarray] = [np.zeros(len(weights), dtype=np.int64)]  # positions at each block
        self._blocks = _Memo(2)

    def _counts(self, block: int) -> np.ndarray:
        return _rng(self.seed, _MIX_COUNTS, self.rank, block).multinomial(MIX_BLOCK * self.batch_size, self.p)

    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """Source of each slot of ``block`` and the slot's position in that source's stream."""
        def make() -> tuple[np.ndarray, np.ndarray]:
            while len(self._starts) <= block:
                self._starts.append(self._starts[-1] + self._counts(len(self._starts) - 1))
            counts = self._counts(block)
            slots = np.repeat(np.arange(len(self.p)), counts)
            slots = _rng(self.seed, _MIX_SLOTS, self.rank, block).permutation(slots)
            positions = np.empty(len(slots), dtype=np.int64)
            for s in range(len(self.p)):
                where = np.flatnonzero(slots == s)
                positions[where] = self._starts[block][s] + np.arange(len(where))
            return slots, positions
        return self._blocks.get(block, make)

    def slots(self, batch: int) -> tuple[list[int], list[int]]:
        slots, positions = self._block(batch // MIX_BLOCK)
        lo = (batch % MIX_BLOCK) * self.batch_size
        return slots[lo : lo + self.batch_size].tolist(), positions[lo : lo + self.batch_size].tolist()


def steps_for_samples(samples: int, global_batch: int) -> int:
    """Optimizer steps that see at least ``samples`` samples at ``global_batch`` samples per step (the
    training length of a run given in samples seen, which stays fixed when the batch or the GPUs change)."""
    if samples < 1 or global_batch < 1:
        raise DataError(f"training length needs samples >= 1 and a global batch >= 1, got {samples}, {global_batch}")
    return math.ceil(samples / global_batch)


class BatchPlan:
    """The samples of every batch of one rank: ``refs(g)`` lists ``(source, shard, sample)`` for batch ``g``.

    ``steps_per_epoch`` is set for a single non-resampled source (the stream then runs epoch after epoch:
    batch ``g`` is step ``g % steps_per_epoch`` of epoch ``g // steps_per_epoch``); otherwise it is ``None``.
    """

    def __init__(self, sources: Sequence[Source], batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, resampled: bool = False, remainder: Remainder = "drop") -> None:
        if not sources:
            raise DataError("the streaming loader needs at least one source of shards")
        if batch_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"bad batch_size={batch_size}, rank={rank}, world_size={world_size}")
        if remainder not in ("drop", "wrap"):
            raise DataError(f"remainder must be 'drop' or 'wrap', got {remainder!r}")
        if remainder == "wrap" and (resampled or len(sources) > 1):
            raise DataError("remainder='wrap' applies to one source in epochs; resampled and mixed streams are "
                            "endless and have no remainder")
        self.sources, self.batch_size, self.seed = tuple(sources), batch_size, seed
        self.rank, self.world_size, self.resampled, self.remainder = rank, world_size, resampled, remainder
        self.steps_per_epoch: int | None = None
        self.mix = (MixSchedule([s.weight for s in sources], batch_size, seed, rank) if len(sources) > 1
                    else None)
        if resampled:
            self.streams = [ResampledStream(s.sizes, seed, i, rank) for i, s in enumerate(sources)]
        elif len(sources) == 1:
            n, per_step = sources[0].total, world_size * batch_size
            steps = n // per_step if remainder == "drop" else math.ceil(n / per_step)
            if steps == 0:
                raise DataError(f"the source holds {n} samples, fewer than one global batch of {per_step} "
                                f"({world_size} ranks x {batch_size}); lower the batch size or use remainder=wrap")
            self.steps_per_epoch = steps
            length = steps * batch_size
            self.streams = [EpochStream(sources[0].sizes, seed, 0, rank * length, length)]
        else:
            self.streams = []
            for i, s in enumerate(sources):
                lo, hi = rank * s.total // world_size, (rank + 1) * s.total // world_size
                if hi == lo:
                    raise DataError(f"source {i} holds {s.total} samples, fewer than the {world_size} ranks")
                self.streams.append(EpochStream(s.sizes, seed, i, lo, hi - lo))

    def refs(self, batch: int) -> list[tuple[int, int, int]]:
        if self.mix is None:
            sources = [0] * self.batch_size
            positions = list(range(batch * self.batch_size, (batch + 1) * self.batch_size))
        else:
            sources, positions = self.mix.slots(batch)
        return [(s, *self.streams[s].locate(p)) for s, p in zip(sources, positions)]

    def path(self, source: int, shard: int) -> str:
        return self.sources[source].shards[shard]

    def fingerprint(self) -> dict:
        """What a saved data position is only valid for (rank excluded: every rank is at the same batch)."""
        data = [[[Path(p).name for p in s.shards], list(s.sizes), s.weight] for s in self.sources]
        digest = hashlib.sha1(json.dumps(data).encode()).hexdigest()[:16]
        mode = "resampled" if self.resampled else "mixed epochs" if self.mix else f"epochs, {self.remainder}"
        return {"seed": self.seed, "batch_size": self.batch_size, "world_size": self.world_size, "mode": mode,
                "sources": digest}
