"""Where a training step's batch comes from: pairs held in memory, or WebDataset shards streamed.

Both hand each rank its share of the global batch of step ``s``, as a pure function of the seed and ``s``
(in memory) or of the loader position saved in the checkpoint (streamed), so a resumed run continues with
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from counterpoint.config import RunConfig
from counterpoint.data.document_shards import DocumentDecoder, read_document_texts
from counterpoint.data.interleaved import (
    DocumentRow,
    DocumentSet,
    SequenceLayout,
    collate_rows,
    layout_arrays,
    layout_documents,
    load_documents,
)
from counterpoint.data.pairs import PairSet, batch_indices, load_pairs
from counterpoint.data.readers import SkipStats
from counterpoint.data.streaming import build_loader, read_captions
from counterpoint.data.tokenizer import Tokenizer
from counterpoint.data.transforms import normalize, random_translate
from counterpoint.errors import DataError, UserError
from counterpoint.train.distributed import DistContext

TOKENIZER_CAPTIONS = 100_000  # captions read from the shards to train the tokenizer of a streamed run
MAX_EMPTY_BATCHES = 50  # streamed batches in a row without a usable sample before the run stops


def _augment(images: torch.Tensor, cfg: RunConfig, step: int, offset: int, total: int) -> torch.Tensor:
    """Per-step shifts drawn for the global batch's ``total`` images; this rank's images are rows
    ``offset, offset + 1, ...`` of it."""
    if cfg.train.translate == 0:
        return images
    gen = torch.Generator().manual_seed(cfg.seed * 7_919 + step)
    return random_translate(images, cfg.train.translate, gen, offset=offset, total=total)


class InMemoryBatches:
    """``data.train`` decoded into memory; step ``s`` takes rows of the ``(seed, epoch)`` permutation."""

    def __init__(self, cfg: RunConfig, image_size: int, ctx: DistContext, progress: bool) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.pairs: PairSet = load_pairs(cfg.data.train, image_size, cfg.data.caption_key,
                                         cfg.data.max_train_samples, progress, desc="reading train")
        self.steps_per_epoch: int | None = len(self.pairs) // cfg.train.batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"'{cfg.data.train}' holds {len(self.pairs)} usable pairs, fewer than one batch of "
                            f"{cfg.train.batch_size}; lower train.batch_size")
        self.tokens: torch.Tensor | None = None

    def captions(self) -> list[str]:
        return self.pairs.captions

    def set_tokenizer(self, tokenizer: Tokenizer, model: nn.Module) -> None:
        """Tokenise every caption once for the run (``model``: the model trained, see
        :meth:`InMemoryDocuments.set_tokenizer`)."""
        self.tokens = tokenizer(self.pairs.captions)  # [N, L]

    def load_state_dict(self, state: dict[str, Any] | None, skipped: dict[str, Any] | None = None) -> None:
        """Nothing to restore: the order is a function of the seed and the step, and the skips are those of
        reading ``data.train`` again."""

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def info(self) -> dict[str, Any]:
        """What was read; every rank reads all of ``data.train``, so the skips are the same on every rank."""
        return {"pairs": len(self.pairs), "skipped": self.pairs.skips.as_dict()}

    def batches(self, start_step: int, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's batch of every step from ``start_step`` on (endless)."""
        local = self.cfg.train.batch_size // self.ctx.world_size
        for step, idx in batch_indices(len(self.pairs), self.cfg.train.batch_size, self.cfg.seed, start_step):
            mine = idx[self.ctx.rank * local : (self.ctx.rank + 1) * local]  # contiguous share of the global batch
            images = _augment(self.pairs.images[mine], self.cfg, step, self.ctx.rank * local,
                              local * self.ctx.world_size)
            yield {"image": normalize(images.to(device, non_blocking=True)), "text": self.tokens[mine].to(device)}


class InMemoryDocuments:
    """Interleaved documents from ``data.train`` decoded into memory (``counterpoint.data.interleaved``); step
    ``s`` takes documents of the ``(seed, epoch)`` permutation, as :class:`InMemoryBatches` takes pairs.
    Ranks take contiguous shares of the global batch's documents, so they hold different numbers of images."""

    def __init__(self, cfg: RunConfig, image_size: int, ctx: DistContext, progress: bool) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.docs: DocumentSet = load_documents(cfg.data.train, image_size, cfg.seed, cfg.data.max_train_samples,
                                                progress, cfg.data.caption_key)
        self.steps_per_epoch: int | None = len(self.docs) // cfg.train.batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"'{cfg.data.train}' holds {len(self.docs)} usable documents, fewer than one batch of "
                            f"{cfg.train.batch_size}; lower train.batch_size")
        self.rows: list[DocumentRow] = []
        self.layout: SequenceLayout | None = None

    def captions(self) -> list[str]:
        return self.docs.texts()

    def set_tokenizer(self, tokenizer: Tokenizer, model: nn.Module) -> None:
        """Lay every document out once for the run, with as many slots per image as ``model`` reads."""
        self.layout = SequenceLayout.of(tokenizer, model.image_tokens)
        self.rows = layout_documents(self.docs.docs, tokenizer, self.layout)

    def load_state_dict(self, state: dict[str, Any] | None, skipped: dict[str, Any] | None = None) -> None:
        """Nothing to restore (as :meth:`InMemoryBatches.load_state_dict`)."""

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def info(self) -> dict[str, Any]:
        return {"documents": len(self.docs), "images": len(self.docs.images), "skipped": self.docs.skips.as_dict()}

    def batches(self, start_step: int, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
        local = self.cfg.train.batch_size // self.ctx.world_size
        for step, idx in batch_indices(len(self.docs), self.cfg.train.batch_size, self.cfg.seed, start_step):
            rows = [self.rows[i] for i in idx.tolist()]
            mine = rows[self.ctx.rank * local : (self.ctx.rank + 1) * local]
            before = sum(len(r.images) for r in rows[: self.ctx.rank * local])  # this rank's first image, globally
            images = self.docs.images[[i for row in mine for i in row.images]]
            images = _augment(images, self.cfg, step, before, sum(len(r.images) for r in rows))
            batch = collate_rows(mine, self.layout)
            yield {**{k: v.to(device) for k, v in batch.items()},
                   "images": normalize(images.to(device, non_blocking=True))}


class StreamedBatches:
    """WebDataset shards from ``data.stream`` (``counterpoint.data.streaming``): each rank reads its own run
    of shards, and the loader position is part of the checkpoint (exact mid-epoch resume).

    A sample that cannot be decoded shortens its rank's batch; all ranks then cut theirs to the shortest (the
    feature gather needs equal sizes), so with damaged data a few good samples of that step go unused.
    """

    def __init__(self, cfg: RunConfig, image_size: int, ctx: DistContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.loader = build_loader(cfg.data.stream, cfg.train.batch_size // ctx.world_size, image_size,
                                   rank=ctx.rank, world_size=ctx.world_size, seed=cfg.seed,
                                   caption_key=cfg.data.caption_key)
        self.steps_per_epoch = self.loader.steps_per_epoch
        self.tokenizer: Tokenizer | None = None

    def captions(self) -> list[str]:
        limit = self.cfg.data.max_train_samples or TOKENIZER_CAPTIONS
        return read_captions(self.loader.plan.sources, limit, self.cfg.data.caption_key)

    def set_tokenizer(self, tokenizer: Tokenizer, model: nn.Module) -> None:
        self.tokenizer = tokenizer

    def load_state_dict(self, state: dict[str, Any] | None, skipped: dict[str, Any] | None = None) -> None:
        """Continue at the saved loader position; ``skipped``: the skip counts saved with it (the sum over
        ranks, so rank 0 takes them and the others start from zero)."""
        if state is None:
            raise UserError("the checkpoint has no data position (it was not saved by a streamed run); resume "
                            "with the data settings the run started with")
        self.loader.load_state_dict(state)
        if skipped and self.ctx.is_main:
            self.loader.skips = SkipStats.from_dict(skipped)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def info(self) -> dict[str, Any]:
        """What this rank streamed and skipped (:func:`data_info` sums the ranks)."""
        return {"streamed_batches_per_rank": self.loader.batches, "skipped": self.loader.skips.state_dict()}

    def _usable(self, start_step: int, size: Callable[[dict], int],
                enough: Callable[[int], bool]) -> Iterator[tuple[int, dict, int]]:
        """``(step, loader batch, n)`` from ``start_step`` on, ``n`` the smallest ``size`` over the ranks. A batch
        whose ``n`` is not ``enough`` is passed over by every rank (counted as ``empty_batch``); many in a row mean
        the data is broken and stop the run."""
        if self.loader.batches < start_step:
            raise UserError(f"the data position ({self.loader.batches} batches) is behind the checkpoint's "
                            f"step {start_step}")
        step, empty_in_a_row = start_step, 0
        for raw in self.loader:
            n = self.ctx.min_int(size(raw))  # every rank sees the same n: they pass over a batch together
            if not enough(n):
                empty_in_a_row += 1
                if self.ctx.is_main:
                    self.loader.skips.skip("empty_batch", f"batch {self.loader.batches - 1}")
                if empty_in_a_row >= MAX_EMPTY_BATCHES:
                    raise DataError(f"{empty_in_a_row} batches in a row hold no usable sample on some rank; the "
                                    f"streamed shards are damaged ({dict(self.loader.skips.counts)})")
                continue
            empty_in_a_row = 0
            yield step, raw, n
            step += 1

    def batches(self, start_step: int, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's batch of every step from ``start_step`` on; a batch in which fewer than two samples over
        all ranks could be decoded is passed over."""
        local = self.cfg.train.batch_size // self.ctx.world_size
        world = self.ctx.world_size
        for step, raw, n in self._usable(start_step, lambda raw: len(raw["caption"]), lambda n: n * world >= 2):
            images = _augment(raw["image"][:n], self.cfg, step, self.ctx.rank * local, local * world)
            yield {"image": normalize(images.to(device, non_blocking=True)),
                   "text": self.tokenizer(raw["caption"][:n]).to(device)}


class StreamedDocuments(StreamedBatches):
    """Interleaved documents streamed from WebDataset document shards (``data/document_shards.py``) with the
    pairs' shard plan and exact mid-epoch resume. Ranks keep different numbers of documents and images (the
    LCL loss is exact for that); a step at which some rank has no usable document is passed over by all."""

    def __init__(self, cfg: RunConfig, image_size: int, ctx: DistContext) -> None:
        self.cfg, self.ctx, self.image_size = cfg, ctx, image_size
        self.loader = build_loader(cfg.data.stream, cfg.train.batch_size // ctx.world_size, image_size,
                                   rank=ctx.rank, world_size=ctx.world_size, seed=cfg.seed,
                                   decoder=DocumentDecoder(image_size, cfg.seed, cfg.data.caption_key))
        self.steps_per_epoch = self.loader.steps_per_epoch
        self.tokenizer: Tokenizer | None = None
        self.layout: SequenceLayout | None = None

    def captions(self) -> list[str]:
        return read_document_texts(self.loader.plan.sources, self.cfg.data.max_train_samples or TOKENIZER_CAPTIONS,
                                   self.cfg.data.caption_key)

    def set_tokenizer(self, tokenizer: Tokenizer, model: nn.Module) -> None:
        self.tokenizer, self.layout = tokenizer, SequenceLayout.of(tokenizer, model.image_tokens)

    def batches(self, start_step: int, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
        for step, raw, _ in self._usable(start_step, lambda raw: len(raw["documents"]), lambda n: n > 0):
            rows, images = layout_arrays(raw["documents"], self.tokenizer, self.layout, self.image_size)
            if self.cfg.train.translate > 0:  # the shifts are drawn for the global batch's images
                counts = self.ctx.gather(len(images))
                images = _augment(images, self.cfg, step, sum(counts[: self.ctx.rank]), sum(counts))
            batch = collate_rows(rows, self.layout)
            yield {**{k: v.to(device) for k, v in batch.items()},
                   "images": normalize(images.to(device, non_blocking=True))}


def data_info(data: InMemoryBatches | InMemoryDocuments | StreamedBatches, ctx: DistContext) -> dict[str, Any]:
    """``data.info()`` for the whole job: a streamed run's skip counts summed over the ranks (a collective:
    every rank calls it); rank 0's view otherwise."""
    info = data.info()
    if isinstance(data, StreamedBatches) and ctx.world_size > 1:
        total = SkipStats()
        for part in ctx.gather(info["skipped"]):
            total.merge(SkipStats.from_dict(part))
        info["skipped"] = total.state_dict()
    return info


def training_batches(cfg: RunConfig, image_size: int, ctx: DistContext, progress: bool,
                     kind: str = "pairs") -> InMemoryBatches | InMemoryDocuments | StreamedBatches:
    """The batch source for a task's data ``kind`` (pairs or interleaved documents): streamed when
    ``data.stream.sources`` names shards, else ``data.train`` in memory."""
    if kind == "documents":
        if cfg.data.stream.sources:
            return StreamedDocuments(cfg, image_size, ctx)
        return InMemoryDocuments(cfg, image_size, ctx, progress)
    if cfg.data.stream.sources:
        return StreamedBatches(cfg, image_size, ctx)
    return InMemoryBatches(cfg, image_size, ctx, progress)
