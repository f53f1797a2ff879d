"""Interleaved documents as WebDataset shards: one document per sample, streamable like pairs.

A sample is ``<key>.json`` holding ``{"items": [{"text": ...} | {"image": "<ext member>"}, ...], "source":
<the document's own key>}`` and one member per image, ``<key>.0.png``, ``<key>.1.png``, ... (WebDataset keys end
at the first dot, so the image members belong to the sample). ``counterpoint data documents SRC --out DIR``
writes them from any format ``data.documents`` reads; the streaming loader plans, shuffles and resumes them
exactly as it does pairs (``DocumentDecoder`` is its per-sample decode).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from counterpoint.data.documents import Document, decode_document, is_document_sample
from counterpoint.data.readers import SkipStats, caption_of, decode_members, metadata, to_square_array
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
    uint8 tensor [S, S, 3]]], "key": [str]}`` (images resized, texts as they are; the trainer lays them out).
    A pair sample (image + caption) is a two-item document, the image first when a coin seeded by ``seed``
    and its key says so (probability 0.5), so pair shards stream as documents too."""

    def __init__(self, image_size: int, seed: int = 0, caption_key: str = "txt") -> None:
        self.image_size, self.seed, self.caption_key = image_size, seed, caption_key

    def decode(self, key: str, members: dict[str, bytes], where: str,
               skips: SkipStats) -> tuple[list[Any], str] | None:
        if is_document_sample(members):
            doc = decode_document(key, members, where, skips)
        else:
            pair = decode_members(key, members, self.caption_key, where, skips)
            image_first = np.random.default_rng([self.seed, zlib.crc32(key.encode())]).random() < 0.5
            doc = None if pair is None else Document(key, [pair.image, pair.caption] if image_first
                                                     else [pair.caption, pair.image])
        if doc is None:
            return None
        # tensors, not numpy arrays: the DataLoader would convert those itself (warning that PIL's are read-only)
        items = [i if isinstance(i, str) else torch.from_numpy(np.array(to_square_array(i, self.image_size)))
                 for i in doc.items]
        return items, doc.key

    def collate(self, samples: list[tuple[list[Any], str]]) -> dict:
        return {"documents": [s[0] for s in samples], "key": [s[1] for s in samples]}


def read_document_texts(sources: Iterable[Source], limit: int, caption_key: str = "txt") -> list[str]:
    """Up to ``limit`` texts from the first shards of ``sources`` (documents' texts, or pairs' captions),
    reading only the text members: text to train a tokenizer on without decoding an image."""
    texts: list[str] = []
    for source in sources:
        for path in source.shards:
            index = index_tar(path)
            with open(path, "rb") as handle:
                for group in index.groups:
                    if len(texts) >= limit:
                        return texts
                    members = read_group(handle, group, ("json", caption_key, "txt"))
                    try:
                        meta = metadata(members)
                        if isinstance(meta.get("items"), list):
                            texts += [e["text"] for e in meta["items"]
                                      if isinstance(e, dict) and isinstance(e.get("text"), str)]
                        elif caption := caption_of(members, caption_key, meta):
                            texts.append(caption)
                    except ValueError:
                        continue  # the loader skips it as a bad row or caption
    return texts[:limit]
