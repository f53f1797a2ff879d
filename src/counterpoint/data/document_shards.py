"""Interleaved documents as WebDataset shards: one document per sample, streamable like pairs.

A sample is ``<key>.json`` holding ``{"items": [{"text": ...} | {"image": "<ext member>"}, ...], "source":
<the document's own key>}`` and one member per image, ``<key>.0.png``, ``<key>.1.png``, ... (WebDataset keys end
at the first dot, so the image members belong to the sample). ``counterpoint data documents SRC --out DIR``
writes them from any format ``data.documents`` reads; the streaming loader plans, shuffles and resumes them
exactly as it does pairs (``DocumentDecoder`` is its per-sample decode).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from counterpoint.data.documents import Document, decode_document
from counterpoint.data.readers import SkipStats, to_square_array
from counterpoint.data.shards import index_tar, read_group
from counterpoint.data.stream_plan import Source
from counterpoint.data.writers import ShardWriter, encode_image

DOCS_PER_SHARD = 1000


def document_members(doc: Document, image_format: str = "png") -> dict[str, bytes]:
    """The members (extension -> bytes) of ``doc`` as one sample."""
    items: list[dict[str, str]] = []
    members: dict[str, bytes] = {}
    for item in doc.items:
        if isinstance(item, str):
            items.append({"text": item})
        else:
            ext = f"{len(members)}.{image_format}"
            members[ext] = encode_image(np.asarray(item.convert("RGB")), image_format)
            items.append({"image": ext})
    members["json"] = json.dumps({"items": items, "source": doc.key}).encode("utf-8")
    return members


def write_document_shards(docs: Iterable[Document], out_dir: str | Path, docs_per_shard: int = DOCS_PER_SHARD,
                          image_format: str = "png", progress: bool = False) -> int:
    """Write ``docs`` as ``shard-NNNNNN.tar`` (+ ``sizes.json``) in ``out_dir``; returns how many."""
    n = 0
    with ShardWriter(out_dir, docs_per_shard, image_format) as writer:
        for doc in tqdm(docs, desc="writing documents", unit=" docs", disable=not progress, dynamic_ncols=True):
            writer.write_members(f"doc-{n:09d}", document_members(doc, image_format))
            n += 1
    return n


class DocumentDecoder:
    """The streaming loader's per-sample decode for document shards: batches ``{"documents": [[str |
    uint8 tensor [S, S, 3]]], "key": [str]}`` (images resized, texts as they are; the trainer lays them out)."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def decode(self, key: str, members: dict[str, bytes], where: str,
               skips: SkipStats) -> tuple[list[Any], str] | None:
        doc = decode_document(key, members, where, skips)
        if doc is None:
            return None
        # tensors, not numpy arrays: the DataLoader would convert those itself (warning that PIL's are read-only)
        items = [i if isinstance(i, str) else torch.from_numpy(np.array(to_square_array(i, self.image_size)))
                 for i in doc.items]
        return items, doc.key

    def collate(self, samples: list[tuple[list[Any], str]]) -> dict:
        return {"documents": [s[0] for s in samples], "key": [s[1] for s in samples]}


def read_document_texts(sources: Iterable[Source], limit: int) -> list[str]:
    """Up to ``limit`` texts from the first document shards of ``sources``, reading only the json members
    (to train a tokenizer on without decoding an image)."""
    texts: list[str] = []
    for source in sources:
        for path in source.shards:
            index = index_tar(path)
            with open(path, "rb") as handle:
                for group in index.groups:
                    if len(texts) >= limit:
                        return texts
                    try:
                        entries = json.loads(read_group(handle, group, ("json",))["json"].decode("utf-8"))["items"]
                        texts += [e["text"] for e in entries if isinstance(e, dict) and isinstance(e.get("text"), str)]
                    except (KeyError, ValueError, TypeError):
                        continue  # the loader skips it as a bad row
    return texts[:limit]
