"""Interleaved documents held in memory and laid out as token sequences for a causal model (LCL).

A document ``[text, image, text, ...]`` becomes one row

    <sot> text-ids <boi> <img> x N <eoi> text-ids ... <eot> <pad> ...

where the ``N`` ``<img>`` slots are filled by the image's tokens inside the model. A document longer than the
context is cut: text may end mid-way, an image enters whole or not at all (its slots would otherwise hold half
an image), and ``<eot>`` is written only if the document ended. A batch of rows is

* ``tokens`` ``[B, L']`` ids (``L'`` the longest row of the batch, at most the context ``L``),
* ``images`` ``[M, 3, S, S]`` the images of all rows, in row order,
* ``boi`` ``[M]`` the flat position ``row * L' + column`` of each image's ``<boi>``,
* ``context`` ``[M]`` whether anything of the document precedes the image (an image right after ``<sot>``
  has no context to be predicted from).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from counterpoint.data.documents import iter_documents
from counterpoint.data.readers import SkipStats, to_square_array
from counterpoint.data.tokenizer import Tokenizer
from counterpoint.errors import DataError


@dataclass
class DocumentSet:
    """Documents decoded into memory: ``images`` ``[N, 3, S, S]`` uint8 (every document's images, in order);
    ``docs[i]`` the items of document i, a text or the index of its image in ``images``."""

    images: torch.Tensor
    docs: list[list[str | int]]
    keys: list[str]
    skips: SkipStats

    def __len__(self) -> int:
        return len(self.docs)

    def texts(self) -> list[str]:
        return [item for doc in self.docs for item in doc if isinstance(item, str)]


def load_documents(path: str, image_size: int, seed: int = 0, limit: int | None = None, progress: bool = False,
                   caption_key: str = "txt") -> DocumentSet:
    """Every usable document under ``path`` (any format of ``counterpoint.data.documents``), images resized
    to ``image_size``; at most ``limit`` documents. :class:`DataError` if none is usable."""
    skips = SkipStats()
    arrays: list[np.ndarray] = []
    docs: list[list[str | int]] = []
    keys: list[str] = []
    for doc in tqdm(iter_documents(path, skips, seed, caption_key), desc="reading documents", unit=" docs",
                    disable=not progress, dynamic_ncols=True):
        items: list[str | int] = []
        for item in doc.items:
            if isinstance(item, Image.Image):
                items.append(len(arrays))
                arrays.append(to_square_array(item, image_size))
            else:
                items.append(item)
        docs.append(items)
        keys.append(doc.key)
        if limit is not None and len(docs) >= limit:
            break
    if not docs:
        raise DataError(f"'{path}' holds no usable document (skipped: {dict(skips.counts) or 'none found'})")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return DocumentSet(images, docs, keys, skips)


@dataclass(frozen=True)
class SequenceLayout:
    """Special-token ids and sizes of the rows."""

    sot: int
    eot: int
    pad: int
    boi: int
    eoi: int
    img: int
    image_tokens: int  # slots per image
    length: int  # the context length L

    @classmethod
    def of(cls, tokenizer: Tokenizer, image_tokens: int) -> SequenceLayout:
        ids = (tokenizer.token_id(t) for t in ("<sot>", "<eot>", "<pad>", "<boi>", "<eoi>", "<img>"))
        return cls(*ids, image_tokens=image_tokens, length=tokenizer.context_length)


@dataclass
class DocumentRow:
    """One document laid out: ``ids`` (at most L), and for each image that fit, its index in the set's
    images and the column of its ``<boi>``."""

    ids: torch.Tensor  # [n] int64
    images: list[int]
    boi: list[int]


def layout_document(items: list[str | int], text_ids: dict[int, list[int]], layout: SequenceLayout) -> DocumentRow:
    """``items`` (texts as their position in ``text_ids``' keys, see :func:`layout_documents`) as one row."""
    ids = [layout.sot]
    images: list[int] = []
    boi: list[int] = []
    complete = True
    for pos, item in enumerate(items):
        room = layout.length - len(ids)
        if isinstance(item, int):
            if room < layout.image_tokens + 2:
                complete = False
                break
            images.append(item)
            boi.append(len(ids))
            ids += [layout.boi] + [layout.img] * layout.image_tokens + [layout.eoi]
        else:
            piece = text_ids[pos]
            if len(piece) > room:
                ids += piece[:room]
                complete = False
                break
            ids += piece
    if complete and len(ids) < layout.length:
        ids.append(layout.eot)
    return DocumentRow(torch.tensor(ids, dtype=torch.long), images, boi)


def layout_documents(docs: list[list[str | int]], tokenizer: Tokenizer, layout: SequenceLayout) -> list[DocumentRow]:
    """Every document as a row; the texts are tokenised in one batch call."""
    where = [(d, p) for d, doc in enumerate(docs) for p, item in enumerate(doc) if isinstance(item, str)]
    encoded = tokenizer.encode_ids([docs[d][p] for d, p in where])
    per_doc: list[dict[int, list[int]]] = [{} for _ in docs]
    for (d, p), ids in zip(where, encoded):
        per_doc[d][p] = ids
    return [layout_document(doc, per_doc[d], layout) for d, doc in enumerate(docs)]


def layout_arrays(docs: list[list[str | torch.Tensor]], tokenizer: Tokenizer, layout: SequenceLayout,
                  image_size: int) -> tuple[list[DocumentRow], torch.Tensor]:
    """Streamed documents (images as ``[S, S, 3]`` uint8 tensors) as rows, and the images ``[M, 3, S, S]``
    that made it into the rows, in row order (what :func:`collate_rows` expects)."""
    arrays: list[torch.Tensor] = []
    indexed: list[list[str | int]] = []
    for doc in docs:
        items: list[str | int] = []
        for item in doc:
            if isinstance(item, str):
                items.append(item)
            else:
                items.append(len(arrays))
                arrays.append(item)
        indexed.append(items)
    rows = layout_documents(indexed, tokenizer, layout)
    used = [arrays[i] for row in rows for i in row.images]
    images = (torch.stack(used).permute(0, 3, 1, 2).contiguous() if used
              else torch.empty(0, 3, image_size, image_size, dtype=torch.uint8))
    return rows, images


def collate_rows(rows: list[DocumentRow], layout: SequenceLayout) -> dict[str, torch.Tensor]:
    """``tokens``, ``boi`` and ``context`` of a batch of rows (``images``: the caller gathers
    ``[i for row in rows for i in row.images]``, in that order).

    Rows are padded to the longest of the batch, not to the context: the model is causal, so trailing padding
    changes nothing, and attention (which runs on whole rows) then costs nothing for padding beyond it. For
    short documents (pairs) that is most of the attention."""
    length = max(len(row.ids) for row in rows)
    tokens = torch.full((len(rows), length), layout.pad, dtype=torch.long)
    boi: list[int] = []
    for r, row in enumerate(rows):
        tokens[r, : len(row.ids)] = row.ids
        boi += [r * length + b for b in row.boi]
    boi_t = torch.tensor(boi, dtype=torch.long)
    # column > 1: something of the document (text or an earlier image) sits between <sot> and this <boi>
    return {"tokens": tokens, "boi": boi_t, "context": boi_t % length > 1}
