"""Writers for image-text(-audio) samples: WebDataset tar shards, CSV + files, or plain folders.

The built-in world goes through these, so the demo exercises exactly the readers that real data uses.
Shards are written to a temporary name and renamed when complete, so a crash never leaves a truncated shard
that looks finished. Beside them, ``sizes.json`` maps each shard's name to its sample count (OpenCLIP's
convention): a streaming loader plans an epoch from it without opening every shard.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf
from PIL import Image

from counterpoint.data.shards import SIZES_FILE

Format = Literal["wds", "csv", "folder"]


@dataclass
class Record:
    """One sample to write; ``meta`` goes to ``<key>.json`` (WebDataset) or extra CSV columns."""

    key: str
    image: np.ndarray  # [H, W, 3] uint8
    caption: str
    meta: dict
    audio: np.ndarray | None = None
    sample_rate: int = 16000


def encode_image(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    pil = Image.fromarray(image)
    if fmt in ("jpg", "jpeg"):
        pil.save(buf, format="JPEG", quality=95)
    else:
        pil.save(buf, format=fmt.upper())
    return buf.getvalue()


def encode_wav(audio: np.ndarray, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # reproducible shards
    tar.addfile(info, io.BytesIO(payload))


def write_sizes(out_dir: Path, sizes: dict[str, int]) -> None:
    """``sizes.json`` (shard name -> samples), written atomically."""
    tmp = out_dir / f".{SIZES_FILE}.tmp"
    tmp.write_text(json.dumps(dict(sorted(sizes.items())), indent=2))
    os.replace(tmp, out_dir / SIZES_FILE)


class ShardWriter:
    """Writes ``shard-000000.tar``, ``shard-000001.tar``, ... with at most ``samples_per_shard`` each, and
    ``sizes.json`` (shard name -> samples) on close. ``first_shard`` and ``sizes_file=False`` let several
    processes write disjoint shards of one split; the caller then merges their ``sizes``."""

    def __init__(self, out_dir: str | Path, samples_per_shard: int = 5000, image_format: str = "png",
                 first_shard: int = 0, sizes_file: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.image_format = image_format
        self.sizes_file = sizes_file
        self.shard = first_shard
        self.count = 0
        self.sizes: dict[str, int] = {}
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None

    def _open(self) -> None:
        self._tmp = self.out_dir / f".shard-{self.shard:06d}.tar.tmp"
        # GNU headers: long member names like PAX, without PAX's per-member header cost (a third of the time
        # of writing the world went to it)
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.GNU_FORMAT)

    def _close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        name = f"shard-{self.shard:06d}.tar"
        os.replace(self._tmp, self.out_dir / name)
        self.sizes[name] = self.count - sum(self.sizes.values())
        self._tar = None
        self.shard += 1

    def write(self, rec: Record) -> None:
        members = {self.image_format: encode_image(rec.image, self.image_format), "txt": rec.caption.encode("utf-8"),
                   "json": json.dumps(rec.meta).encode("utf-8")}
        if rec.audio is not None:
            members["wav"] = encode_wav(rec.audio, rec.sample_rate)
        self.write_members(rec.key, members)

    def write_members(self, key: str, members: dict[str, bytes]) -> None:
        """One sample: ``<key>.<ext>`` for every ``ext -> bytes`` of ``members``, in order."""
        if self._tar is None:
            self._open()
        for ext, payload in members.items():
            _add_member(self._tar, f"{key}.{ext}", payload)
        self.count += 1
        if self.count % self.samples_per_shard == 0:
            self._close()

    def close(self) -> None:
        self._close()
        if self.sizes and self.sizes_file:
            write_sizes(self.out_dir, self.sizes)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_records(records: Iterable[Record], out_dir: str | Path, fmt: Format, image_format: str = "png",
                  samples_per_shard: int = 5000) -> int:
    """Write ``records`` to ``out_dir`` in ``fmt``; returns how many were written.

    * ``wds``: tar shards of ``<key>.<img>``, ``<key>.txt``, ``<key>.json`` (and ``<key>.wav``).
    * ``csv``: ``pairs.csv`` (columns image, caption, label, and audio if present) beside ``files/``.
    * ``folder``: ``<key>.<img>`` with a same-name ``.txt`` caption and ``.json`` metadata.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    if fmt == "wds":
        with ShardWriter(out, samples_per_shard, image_format) as writer:
            for rec in records:
                writer.write(rec)
                n += 1
        return n
    files = out / "files" if fmt == "csv" else out
    files.mkdir(exist_ok=True)
    rows = []
    for rec in records:
        image_name = f"{rec.key}.{image_format}"
        (files / image_name).write_bytes(encode_image(rec.image, image_format))
        audio_name = ""
        if rec.audio is not None:
            audio_name = f"{rec.key}.wav"
            (files / audio_name).write_bytes(encode_wav(rec.audio, rec.sample_rate))
        if fmt == "folder":
            (files / f"{rec.key}.txt").write_text(rec.caption, encoding="utf-8")
            (files / f"{rec.key}.json").write_text(json.dumps(rec.meta), encoding="utf-8")
        else:
            rows.append({"image": f"files/{image_name}", "caption": rec.caption,
                         "label": rec.meta.get("label", ""), "audio": f"files/{audio_name}" if audio_name else ""})
        n += 1
    if fmt == "csv":
        columns = ["image", "caption", "label"] + (["audio"] if any(r["audio"] for r in rows) else [])
        tmp = out / ".pairs.csv.tmp"
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, out / "pairs.csv")
    return n
