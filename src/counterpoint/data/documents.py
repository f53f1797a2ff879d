"""Interleaved image-text documents: an ordered list of text and image items, and readers for the formats
they come in.

Most image-text data on the web is interleaved (MMC4, OBELICS), not captions; LCL pretrains on it
(``objectives/lcl.py``). Every reader yields :class:`Document` objects with decoded images and counts what it
drops in a :class:`~counterpoint.data.readers.SkipStats`, by reason:

* ``unreadable_image``: an image that cannot be read or decoded is dropped alone; its document is kept if
  something is left;
* ``no_image`` / ``no_text``: a document left without any usable image or without any text is skipped;
* ``bad_row``: a line or row that is not a document of the format; ``corrupt_file``: a zip or Parquet file
  that cannot be read on (the documents before the damage are kept);
* MMC4's own filters (``image_below_similarity``: CLIP similarity to its sentence < 0.24,
  ``image_over_limit``: beyond the 6th image), which are the format's rules rather than damage.

Formats (:func:`detect_document_format` picks one from the path):

* ``obelics``: OBELICS-style rows with aligned ``texts`` and ``images`` lists, ``null`` in the gaps (the world's
  ``stories/stories.jsonl`` is one); images are paths relative to the file's folder, or bytes (Parquet, or a
  ``{"bytes": ..., "path": ...}`` struct as Hugging Face datasets store them); ``.jsonl`` or ``.parquet``.
* ``mmc4``: MMC4's ``docs_shard_*.jsonl`` / ``.jsonl.zip``: ``text_list`` sentences and ``image_info`` entries
  ``{image_name, matched_text_index, matched_sim}``; image files beside the file or in its ``images/`` folder.
  Each kept image goes before or after its sentence at random (a fixed function of the seed and document).
* ``shards``: WebDataset shards with one document per sample (``data/document_shards.py`` writes them; they
  stream with exact resume).
* ``pairs``: any image-text pair data counterpoint reads (shards, CSV, folders): a pair is a document of two
  items, the image first with probability 0.5 (a captioning-style loss only), else the text first.
"""

from __future__ import annotations

import base64
import io
import json
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from counterpoint.data.readers import (
    IMAGE_ERRORS,
    SkipStats,
    detect_format,
    iter_samples,
    iter_tar_groups,
    tar_files,
)
from counterpoint.errors import DataError

MMC4_MIN_SIMILARITY = 0.24  # MMC4 / LCL: an image whose best sentence matches worse than this is dropped
MMC4_MAX_IMAGES = 6  # LCL keeps at most 6 images per MMC4 document

DOCUMENT_SUFFIXES = (".jsonl", ".jsonl.zip", ".parquet")
Item = str | Image.Image


@dataclass
class Document:
    """``items``: text (``str``) and images (RGB ``PIL.Image``) in reading order; ``key`` names it in reports."""

    key: str
    items: list[Item]

    @property
    def num_images(self) -> int:
        return sum(isinstance(item, Image.Image) for item in self.items)


def _decode(payload: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(payload))
    img.load()  # a truncated file fails here, where it is counted, not later in a batch
    return img.convert("RGB")


def _read_image(ref: Any, base: Path) -> Image.Image:
    """An image given as a path (relative to ``base``), raw bytes, base64 text, or a ``{bytes, path}`` struct.
    Raises one of :data:`IMAGE_ERRORS` (or ``TypeError``) for anything unreadable."""
    if isinstance(ref, dict):
        ref = ref.get("bytes") or ref.get("path")
    if isinstance(ref, (bytes, bytearray)):
        return _decode(bytes(ref))
    if isinstance(ref, str):
        if ref.startswith("data:") and "," in ref:  # a data URI: base64 after the comma
            return _decode(base64.b64decode(ref.split(",", 1)[1]))
        return _decode((base / ref).read_bytes())
    raise TypeError(f"an image reference must be a path or bytes, got {type(ref).__name__}")


def finish_document(key: str, items: list[Item], where: str, skips: SkipStats) -> Document | None:
    """The document, or ``None`` (counted) when it lacks an image or text."""
    if not any(isinstance(i, Image.Image) for i in items):
        skips.skip("no_image", where)
        return None
    if not any(isinstance(i, str) for i in items):
        skips.skip("no_text", where)
        return None
    return Document(key, items)


def obelics_document(row: Any, base: Path, where: str, skips: SkipStats) -> Document | None:
    """One OBELICS-style row ``{"texts": [...], "images": [...]}`` (aligned, ``null`` in the gaps)."""
    texts, images = (row.get("texts"), row.get("images")) if isinstance(row, dict) else (None, None)
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        skips.skip("bad_row", where)
        return None
    items: list[Item] = []
    for j, (text, image) in enumerate(zip(texts, images)):
        if isinstance(text, str) and text.strip():
            items.append(text.strip())
        if image is not None:
            try:
                items.append(_read_image(image, base))
            except (*IMAGE_ERRORS, TypeError):
                skips.skip("unreadable_image", f"{where} image {j}")
    return finish_document(str(row.get("key") or row.get("id") or where), items, where, skips)


def mmc4_document(row: Any, image_dir: Path, where: str, skips: SkipStats, seed: int) -> Document | None:
    """One MMC4 document: each image with similarity >= 0.24 (at most 6, the best-matched kept) placed before
    or after its matched sentence, by a coin that is a fixed function of ``seed`` and the document."""
    sentences, info = (row.get("text_list"), row.get("image_info")) if isinstance(row, dict) else (None, None)
    if not isinstance(sentences, list) or not isinstance(info, list):
        skips.skip("bad_row", where)
        return None
    kept = []
    for j, entry in enumerate(info):
        try:
            name, index, sim = entry["image_name"], int(entry["matched_text_index"]), float(entry["matched_sim"])
        except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: int(Infinity)
            skips.skip("bad_row", f"{where} image {j}")
            continue
        if not sim >= MMC4_MIN_SIMILARITY:  # NaN fails this too
            skips.skip("image_below_similarity", f"{where} image {j}")
        elif not 0 <= index < len(sentences):
            skips.skip("bad_row", f"{where} image {j}")
        else:
            kept.append((sim, j, name, index))
    kept.sort(key=lambda k: (-k[0], k[1]))  # the best-matched images survive the limit
    for _, j, _, _ in kept[MMC4_MAX_IMAGES:]:
        skips.skip("image_over_limit", f"{where} image {j}")
    rng = np.random.default_rng([seed, zlib.crc32(where.encode())])
    before: dict[int, list[Image.Image]] = {}
    after: dict[int, list[Image.Image]] = {}
    for _, j, name, index in sorted(kept[:MMC4_MAX_IMAGES], key=lambda k: k[1]):
        try:
            image = _read_image(name, image_dir)
        except (*IMAGE_ERRORS, TypeError):
            skips.skip("unreadable_image", f"{where} image {j}")
            continue
        (before if rng.random() < 0.5 else after).setdefault(index, []).append(image)
    items: list[Item] = []
    for i, sentence in enumerate(sentences):
        items += before.get(i, [])
        if isinstance(sentence, str) and sentence.strip():
            items.append(sentence.strip())
        items += after.get(i, [])
    return finish_document(str(row.get("url") or where), items, where, skips)


def is_document_sample(members: dict[str, bytes]) -> bool:
    """Whether a sample's members are a document (a json member with ``items``) rather than a pair."""
    try:
        return "json" in members and "items" in json.loads(members["json"].decode("utf-8"))
    except (ValueError, TypeError):
        return False


def decode_document(key: str, members: dict[str, bytes], where: str, skips: SkipStats) -> Document | None:
    """The document in one sample's members; an unreadable image is dropped alone (counted), and a document
    left without image or text is skipped (counted), as every document reader does."""
    try:
        meta = json.loads(members["json"].decode("utf-8"))
        entries = meta["items"]
        if not isinstance(entries, list):
            raise TypeError("items is not a list")
    except (KeyError, ValueError, TypeError):
        skips.skip("bad_row", where)
        return None
    items: list[Item] = []
    for j, entry in enumerate(entries):
        if not isinstance(entry, dict):
            skips.skip("bad_row", f"{where} item {j}")
        elif isinstance(entry.get("text"), str) and entry["text"].strip():
            items.append(entry["text"].strip())
        elif "image" in entry:
            try:
                items.append(_decode(members[str(entry["image"]).lower()]))
            except (*IMAGE_ERRORS, KeyError):
                skips.skip("unreadable_image", f"{where} image {j}")
    return finish_document(str(meta.get("source") or key), items, where, skips)


def _jsonl_rows(path: Path, skips: SkipStats) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` for every line of a ``.jsonl`` file or of the ``.jsonl`` members of a ``.zip``; lines
    that are not JSON are counted as ``bad_row``."""
    if path.suffix == ".zip":
        try:
            with zipfile.ZipFile(path) as zf:
                for name in sorted(n for n in zf.namelist() if n.endswith(".jsonl")):
                    text = zf.read(name).decode("utf-8", "replace")
                    yield from _lines(text.splitlines(), f"{path.name}/{name}", skips)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError):
            skips.skip("corrupt_file", path.name)  # what was read before the damage stays read
        return
    with open(path, encoding="utf-8", errors="replace") as fh:
        yield from _lines(fh, path.name, skips)


def _lines(lines: Iterable[str], name: str, skips: SkipStats) -> Iterator[tuple[str, Any]]:
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield f"{name}:{n}", json.loads(line)
        except ValueError:
            skips.skip("bad_row", f"{name}:{n}")


def _parquet_rows(path: Path, skips: SkipStats) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading '{path}' needs pyarrow: pip install 'counterpoint[documents]'") from None
    n = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            for row in batch.to_pylist():
                n += 1
                yield f"{path.name}:{n}", row
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError, its IO errors OSErrors
        skips.skip("corrupt_file", f"{path.name} ({exc.__class__.__name__})")


def document_files(path: str) -> list[Path]:
    """The files a document path names: the file itself, or the document files in a folder (sorted)."""
    p = Path(path)
    if p.is_file():
        return [p] if p.name.endswith(DOCUMENT_SUFFIXES) else []
    if p.is_dir():
        return sorted(f for f in p.iterdir() if f.name.endswith(DOCUMENT_SUFFIXES))
    return []


def detect_document_format(path: str) -> str:
    """``obelics``, ``mmc4``, ``shards`` or ``pairs`` for ``path`` (a file or folder); :class:`DataError` if
    nothing fits. A JSONL file is MMC4 when its first document has ``text_list``, OBELICS when it has
    ``texts``; WebDataset shards hold documents when their first sample does."""
    files = document_files(path)
    if not files:
        if detect_format(path) == "wds":  # else pair data (CSV, folder), or the one-line error: nothing there
            for tar_path in tar_files(path):
                for _, members in iter_tar_groups(tar_path, SkipStats()):
                    return "shards" if is_document_sample(members) else "pairs"
        return "pairs"
    for file in files:  # the first file with a readable first row decides
        if file.suffix == ".parquet":
            return "obelics"
        for _, row in _jsonl_rows(file, SkipStats()):
            if isinstance(row, dict) and "text_list" in row:
                return "mmc4"
            if isinstance(row, dict) and "texts" in row:
                return "obelics"
            raise DataError(f"'{file}' holds neither OBELICS-style documents (\"texts\" / \"images\") nor MMC4 "
                            f"ones (\"text_list\" / \"image_info\")")
    raise DataError(f"no document could be read from '{path}' (every file is empty or damaged)")


def iter_documents(path: str, skips: SkipStats, seed: int = 0, caption_key: str = "txt") -> Iterator[Document]:
    """Every usable document under ``path``, in file order, whatever its format (see the module doc)."""
    fmt = detect_document_format(path)
    if fmt == "shards":
        for tar_path in tar_files(path):
            for key, members in iter_tar_groups(tar_path, skips):
                doc = decode_document(key, members, f"{tar_path.name}:{key}", skips)
                if doc is not None:
                    yield doc
        return
    if fmt == "pairs":
        for n, sample in enumerate(iter_samples(path, skips, caption_key)):
            image_first = np.random.default_rng([seed, n]).random() < 0.5
            items: list[Item] = [sample.image, sample.caption] if image_first else [sample.caption, sample.image]
            yield Document(sample.key, items)
        return
    for file in document_files(path):
        base = file.parent
        rows = _parquet_rows(file, skips) if file.suffix == ".parquet" else _jsonl_rows(file, skips)
        for where, row in rows:
            if fmt == "mmc4":
                image_dir = base / "images" if (base / "images").is_dir() else base
                doc = mmc4_document(row, image_dir, where, skips, seed)
            else:
                doc = obelics_document(row, base, where, skips)
            if doc is not None:
                yield doc
