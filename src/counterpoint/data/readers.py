"""Readers for real image-text data: WebDataset tar shards, CSV/TSV files, and folders.

The reader is chosen from what the path is:

* a ``.tar`` file, a folder of ``.tar`` files, or a glob such as ``shards/*.tar``: WebDataset. A sample is the
  group of members sharing a key (the name up to the first dot); the image is the ``jpg``/``jpeg``/``png``/
  ``webp`` member and the caption the ``txt`` member or a field of the ``json`` member.
* a ``.csv`` / ``.tsv`` file (or a folder holding ``pairs.csv``): one row per pair with an image path
  (column ``image``, ``filepath``, ``path`` or ``file``; relative to the file's folder) and a caption
  (column ``caption``, ``text`` or ``title``); an optional ``label`` column.
* any other folder: images with a same-name ``.txt`` caption (and optional ``.json`` with a ``label``).

We read tar files with the standard library instead of the ``webdataset`` package: the format is just a tar,
and owning the reader lets every bad sample be skipped *and counted by reason*, which the package's handlers
do not report.

A corrupt image, an empty or undecodable caption, or a missing file never stops a run: the sample is skipped
and counted in a :class:`SkipStats`, which ends up in the run summary and in ``eval.json``.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from counterpoint.errors import DataError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_CSV_IMAGE_COLUMNS = ("image", "filepath", "path", "file", "image_path")
_CSV_CAPTION_COLUMNS = ("caption", "text", "title")
# What a corrupt or truncated image file raises while PIL decodes it (shared by every reader); a
# decompression bomb (a header claiming a huge size) is one too.
CSV_FIELD_LIMIT = 16 * 2**20  # bytes
IMAGE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass
class SkipStats:
    """Skipped samples by reason: each distinct sample once (``counts``, ``total``), how often skips happened
    (``occurrences``: a damaged sample met again every epoch of a stream counts once per meeting), and a few
    examples for the report. A sample is identified by its ``where`` text (file and key, or file and line)."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    occurrences: int = 0
    seen: set[tuple[str, str]] = field(default_factory=set)  # (reason, where), up to SEEN_LIMIT

    SEEN_LIMIT: ClassVar[int] = 100_000  # beyond it, new skips count as new samples (memory stays bounded)

    def _add(self, reason: str, where: str) -> None:
        if (reason, where) in self.seen:
            return
        if len(self.seen) < self.SEEN_LIMIT:
            self.seen.add((reason, where))
        self.counts[reason] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{reason}: {where}")

    def skip(self, reason: str, where: str) -> None:
        self.occurrences += 1
        self._add(reason, where)

    def merge(self, other: SkipStats) -> None:
        """Add ``other``'s skips (those a loader worker sent back with a batch, or another rank's)."""
        self.occurrences += other.occurrences
        for reason, where in sorted(other.seen):
            self._add(reason, where)
        # samples ``other`` counted without remembering them (its limit, or counts read back from a report)
        self.counts.update(other.counts - Counter(reason for reason, _ in other.seen))
        self.examples.extend(e for e in other.examples[: 10 - len(self.examples)] if e not in self.examples)

    @classmethod
    def from_dict(cls, data: dict) -> SkipStats:
        """The inverse of :meth:`as_dict` / :meth:`state_dict` (e.g. counts saved in a checkpoint); malformed
        entries are ignored."""
        if not isinstance(data, dict):
            return cls()
        counts = Counter({str(k): v for k, v in (data.get("by_reason") or {}).items()
                          if isinstance(v, int) and not isinstance(v, bool) and v > 0})
        examples = [str(e) for e in (data.get("examples") or [])][:10]
        seen = {(str(x[0]), str(x[1])) for x in (data.get("seen") or []) if isinstance(x, list) and len(x) == 2}
        occurrences = data.get("occurrences")
        total = sum(counts.values())
        if not isinstance(occurrences, int) or isinstance(occurrences, bool) or occurrences < total:
            occurrences = total
        return cls(counts, examples, occurrences, seen)

    @property
    def total(self) -> int:
        """Distinct samples skipped."""
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        """For reports and eval.json: ``total`` distinct samples, ``occurrences``, ``by_reason``, ``examples``."""
        return {"total": self.total, "occurrences": self.occurrences, "by_reason": dict(self.counts),
                "examples": list(self.examples)}

    def state_dict(self) -> dict:
        """:meth:`as_dict` plus the samples seen, so a resumed run knows which skips are recurrences."""
        return {**self.as_dict(), "seen": [list(x) for x in sorted(self.seen)]}


@dataclass
class RawSample:
    """A decoded sample: RGB image, caption text and optional label (from metadata)."""

    key: str
    image: Image.Image
    caption: str
    label: str | None = None


def _decode_image(payload: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(payload))
    img.load()  # force full decode now, so truncated files fail here and are counted
    return img.convert("RGB")


def _decode_caption(payload: bytes) -> str:
    return payload.decode("utf-8").strip()


def metadata(members: dict[str, bytes]) -> dict:
    """The sample's ``json`` member as a dict (``{}`` if absent). Raises ``ValueError`` for a member that is
    not a UTF-8 JSON object: its label or caption would be lost without a word."""
    if "json" not in members:
        return {}
    meta = json.loads(members["json"].decode("utf-8"))  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    if not isinstance(meta, dict):
        raise ValueError("the json member is not an object")
    return meta


def caption_of(members: dict[str, bytes], caption_key: str, meta: dict) -> str:
    """The ``caption_key`` member, else ``txt``, else the ``caption_key`` or ``caption`` field of ``meta``;
    ``""`` if none. Raises ``UnicodeDecodeError`` for text that is not UTF-8."""
    if caption_key in members:
        return _decode_caption(members[caption_key])
    if "txt" in members:
        return _decode_caption(members["txt"])
    value = meta.get(caption_key, meta.get("caption"))
    return value.strip() if isinstance(value, str) else ""


def decode_members(key: str, members: dict[str, bytes], caption_key: str, where: str,
                   skips: SkipStats) -> RawSample | None:
    """The sample in one key's members (``{ext: bytes}``), or ``None`` (counted in ``skips``) if it is bad."""
    image_ext = next((e for e in IMAGE_EXTS if e in members), None)
    if image_ext is None:
        skips.skip("missing_image", where)
        return None
    try:
        meta = metadata(members)
    except ValueError:
        skips.skip("bad_json", where)
        return None
    try:
        caption = caption_of(members, caption_key, meta)
    except UnicodeDecodeError:
        skips.skip("bad_caption", where)
        return None
    if not caption:
        skips.skip("empty_caption", where)
        return None
    try:
        image = _decode_image(members[image_ext])
    except IMAGE_ERRORS:
        skips.skip("corrupt_image", where)
        return None
    label = meta.get("label")
    return RawSample(key, image, caption, label if isinstance(label, str) else None)


def tar_files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(p.glob("*.tar"))
    return sorted(Path(x) for x in glob.glob(path))


def member_key_ext(name: str) -> tuple[str, str] | None:
    """``("0001", "jpg")`` for ``dir/0001.jpg``: the WebDataset key and extension (lower-cased) of a member
    name, or ``None`` for hidden files and names without an extension."""
    name = name.rsplit("/", 1)[-1]
    if name.startswith(".") or "." not in name:
        return None
    key, ext = name.split(".", 1)
    return key, ext.lower()


def iter_tar_groups(tar_path: Path, skips: SkipStats) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` for consecutive members sharing a key (WebDataset convention).

    Two samples with the same key one after the other show up as a repeated extension; which image goes with
    which caption is then unknowable, so the group is skipped as ``duplicate_key`` (WebDataset refuses it).
    """
    try:
        tar = tarfile.open(tar_path, "r|*")  # streaming mode: no seeking, works on pipes too
    except (tarfile.TarError, OSError):
        skips.skip("corrupt_shard", str(tar_path))
        return
    key, group, duplicate = None, {}, False
    truncated = False
    try:
        for member in tar:
            if not member.isfile():
                continue
            parts = member_key_ext(member.name)
            if parts is None:
                continue
            k, ext = parts
            if k != key and key is not None:
                if duplicate:
                    skips.skip("duplicate_key", f"{tar_path.name}:{key}")
                else:
                    yield key, group
                group, duplicate = {}, False
            key = k
            duplicate = duplicate or ext in group
            fh = tar.extractfile(member)
            group[ext] = fh.read() if fh is not None else b""
    except (tarfile.TarError, OSError, EOFError):
        skips.skip("truncated_shard", str(tar_path))
        truncated = True  # the group being read is incomplete (it may lack its caption or label): drop it
    finally:
        tar.close()
    if key is not None and not truncated:
        if duplicate:
            skips.skip("duplicate_key", f"{tar_path.name}:{key}")
        else:
            yield key, group


def iter_webdataset(path: str, caption_key: str, skips: SkipStats) -> Iterator[RawSample]:
    for tar_path in tar_files(path):
        for key, members in iter_tar_groups(tar_path, skips):
            sample = decode_members(key, members, caption_key, f"{tar_path.name}:{key}", skips)
            if sample is not None:
                yield sample


def _pick_column(columns: list[str], options: tuple[str, ...], what: str, path: Path) -> str:
    lowered = {c.lower().strip(): c for c in columns}
    for opt in options:
        if opt in lowered:
            return lowered[opt]
    raise DataError(f"{path}: no {what} column (looked for {', '.join(options)}; found {', '.join(columns)})")


def _csv_rows(reader: csv.DictReader, path: Path, skips: SkipStats) -> Iterator[tuple[int, dict]]:
    """``(line number, row)`` of each row; a row the csv module cannot parse is skipped as ``bad_row`` (the
    reader starts afresh at the next line)."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            skips.skip("bad_row", f"{path.name}:{reader.line_num + 1} ({exc})")
            continue
        yield reader.line_num, row


def iter_csv(path: str, skips: SkipStats) -> Iterator[RawSample]:
    p = Path(path)
    if p.is_dir():
        p = p / "pairs.csv"
    delimiter = "\t" if p.suffix.lower() == ".tsv" else ","
    # csv's default field limit (128 KiB) turns one long caption into an exception that ends the file; the
    # tokenizer truncates long text anyway, so only a field beyond this is a bad row (skipped and counted).
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    # utf-8-sig: spreadsheet exports start with a byte-order mark that would otherwise glue onto the first
    # column name.
    with open(p, newline="", encoding="utf-8-sig", errors="replace") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        columns = reader.fieldnames or []
        image_col = _pick_column(columns, _CSV_IMAGE_COLUMNS, "image path", p)
        caption_col = _pick_column(columns, _CSV_CAPTION_COLUMNS, "caption", p)
        label_col = next((c for c in columns if c.lower().strip() == "label"), None)
        for row_no, row in _csv_rows(reader, p, skips):
            where = f"{p.name}:{row_no}"
            caption = (row.get(caption_col) or "").strip()
            rel = (row.get(image_col) or "").strip()
            if not rel:
                skips.skip("missing_file", where)
                continue
            file = (p.parent / rel) if not Path(rel).is_absolute() else Path(rel)
            if not caption or "\ufffd" in caption:
                skips.skip("empty_caption" if not caption else "bad_caption", where)
                continue
            try:
                payload = file.read_bytes()
            except OSError:
                skips.skip("missing_file", f"{where} ({rel})")
                continue
            try:
                image = _decode_image(payload)
            except IMAGE_ERRORS:
                skips.skip("corrupt_image", f"{where} ({rel})")
                continue
            label = (row.get(label_col) or "").strip() if label_col else ""
            yield RawSample(file.stem, image, caption, label or None)


def iter_folder(path: str, caption_key: str, skips: SkipStats) -> Iterator[RawSample]:
    root = Path(path)
    files = sorted(root.rglob("*"))
    images = [f for f in files if f.suffix.lower().lstrip(".") in IMAGE_EXTS]
    with_image = {f.with_suffix("") for f in images}
    for txt in files:  # a caption whose image is missing is a lost sample too: count it
        if txt.suffix.lower() == ".txt" and txt.with_suffix("") not in with_image:
            skips.skip("missing_image", str(txt.relative_to(root)))
    for img_path in images:
        members: dict[str, bytes] = {}
        where = str(img_path.relative_to(root))
        try:
            members[img_path.suffix.lower().lstrip(".")] = img_path.read_bytes()
            txt = img_path.with_suffix(".txt")
            if txt.exists():
                members["txt"] = txt.read_bytes()
            meta = img_path.with_suffix(".json")
            if meta.exists():
                members["json"] = meta.read_bytes()
        except OSError:
            skips.skip("missing_file", where)
            continue
        if "txt" not in members and "json" not in members:
            skips.skip("missing_caption", where)
            continue
        sample = decode_members(img_path.stem, members, caption_key, where, skips)
        if sample is not None:
            yield sample


def detect_format(path: str) -> str:
    """``wds``, ``csv`` or ``folder`` for ``path``; raises :class:`DataError` if there is nothing to read."""
    p = Path(path)
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".tar":
            return "wds"
        if suffix in (".csv", ".tsv"):
            return "csv"
        raise DataError(f"data path '{path}' is a {suffix or 'plain'} file; expected .tar, .csv or .tsv")
    if p.is_dir():
        if any(p.glob("*.tar")):
            return "wds"
        if (p / "pairs.csv").is_file():
            return "csv"
        return "folder"
    if glob.glob(path):
        return "wds"
    raise DataError(
        f"data path '{path}' does not exist; create the built-in world with "
        f"'counterpoint data make world --out data/world' or point the config at your own data"
    )


def iter_samples(path: str, skips: SkipStats, caption_key: str = "txt") -> Iterator[RawSample]:
    """Decoded samples from ``path`` in any supported format; bad samples are counted in ``skips``."""
    fmt = detect_format(path)
    if fmt == "wds":
        yield from iter_webdataset(path, caption_key, skips)
    elif fmt == "csv":
        yield from iter_csv(path, skips)
    else:
        yield from iter_folder(path, caption_key, skips)


def to_square_array(image: Image.Image, size: int) -> np.ndarray:
    """Centre-crop to a square and resize to ``size`` (bicubic); returns ``[size, size, 3]`` uint8."""
    w, h = image.size
    if w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return np.asarray(image, dtype=np.uint8)
