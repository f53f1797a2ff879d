"""WebDataset shard lists, shard sizes and random access to a shard's samples by their tar headers.

A streaming loader needs three things from the shards before it decodes anything:

* the list of shards, from a brace pattern (``data/shard-{000000..000099}.tar``), a glob, a folder, or a list
  of any of these (:func:`expand_shards`);
* how many samples each holds, to plan an epoch: from ``sizes.json`` beside the shards (OpenCLIP's convention,
  written by :class:`~counterpoint.data.writers.ShardWriter`), else by reading the shard's headers
  (:func:`shard_sizes`);
* where each sample's members lie inside the tar, so any sample can be read with a seek and a read
  (:func:`index_tar`). Indexing reads only the 512-byte headers and seeks over the data, so skipping to
  sample ``k`` of a shard costs headers, never decoding.

A sample is the group of consecutive members sharing a key, as in :func:`~counterpoint.data.readers.iter_tar_groups`.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections import OrderedDict
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from counterpoint.data.readers import member_key_ext
from counterpoint.errors import DataError

SIZES_FILE = "sizes.json"
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """``a{00..02}b{x,y}`` -> ``a00bx a00by a01bx ...``: numeric ranges keep the zero padding of the first
    bound (as bash and WebDataset do); comma lists pick each alternative."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    rng = _RANGE.match(body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        if hi < lo:
            raise DataError(f"shard pattern '{pattern}': range {{{body}}} runs backwards")
        width = len(rng.group(1))
        options = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [out for opt in options for out in expand_braces(head + opt + tail)]


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Shard paths from a brace pattern, glob, folder (its ``*.tar``) or a list of these, in the given order
    (folders and globs sorted). Raises :class:`DataError` naming what matched nothing."""
    items = [spec] if isinstance(spec, str) else list(spec)
    shards: list[str] = []
    for item in items:
        for path in expand_braces(item):
            if Path(path).is_dir():
                found = sorted(str(p) for p in Path(path).glob("*.tar"))
            elif glob.has_magic(path):
                found = sorted(glob.glob(path))
            else:
                found = [path] if Path(path).is_file() else []
            if not found:
                raise DataError(f"shard path '{path}' matches no .tar file")
            shards.extend(found)
    if len(set(shards)) != len(shards):
        raise DataError(f"shard list '{spec}' names a shard twice; every shard must appear once")
    return shards


@dataclass(frozen=True)
class TarMember:
    ext: str
    offset: int  # of the data, in bytes from the start of the tar
    size: int


@dataclass(frozen=True)
class TarGroup:
    """One sample's members inside a tar; ``duplicate`` when two samples with the same key follow each other
    (an extension repeats), which cannot be told apart and is skipped as ``duplicate_key``."""

    key: str
    members: tuple[TarMember, ...]
    duplicate: bool = False


@dataclass(frozen=True)
class TarIndex:
    """Every complete sample of a shard; ``error`` is ``corrupt_shard`` (unreadable) or ``truncated_shard``
    (the samples before the damage are kept), else ``None``."""

    groups: tuple[TarGroup, ...]
    error: str | None = None


_BLOCK = 512
_FILE_TYPES = (b"0", b"\0", b"7")  # regular file (old and new flag), contiguous file


class _BadHeader(Exception):
    pass


def _number(field: bytes) -> int:
    """A numeric header field: octal text, or base-256 (high bit set) for values octal cannot hold."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise _BadHeader from None


def _pax_path(records: bytes) -> str | None:
    """The ``path`` record of a pax extended header (``"<len> path=<name>\n"`` records)."""
    for line in records.split(b"\n"):
        _, _, record = line.partition(b" ")
        if record.startswith(b"path="):
            return record[5:].decode("utf-8", "surrogateescape")
    return None


def tar_members(handle: BinaryIO) -> Iterator[tuple[str, int, int]]:
    """``(name, data offset, size)`` of each regular file of an uncompressed tar, read from its 512-byte
    headers only (ustar and GNU, with GNU long names and pax paths). Raises ``EOFError`` when the file ends
    inside a header and ``ValueError`` for a header that fails its checksum.

    ``tarfile`` does the same in seeking mode but parses every field of every header in Python (about 45 us a
    member); this reads the four fields a loader needs, about ten times faster, which matters because every
    DataLoader worker indexes the shards it reads.
    """
    pos, long_name = 0, None
    while True:
        handle.seek(pos)
        block = handle.read(_BLOCK)
        if not block or block == bytes(_BLOCK):
            return  # end of the archive (with or without its closing zero blocks)
        if len(block) < _BLOCK:
            raise EOFError
        try:
            if _number(block[148:156]) != sum(block[:148]) + 8 * 32 + sum(block[156:]):
                raise _BadHeader
            size = _number(block[124:136])
        except _BadHeader:
            raise ValueError(f"bad tar header at byte {pos}") from None
        flag, data = block[156:157], pos + _BLOCK
        pos = data + -(-size // _BLOCK) * _BLOCK
        if flag in (b"L", b"x"):  # the next member's name: GNU long name, or a pax header's path
            handle.seek(data)
            payload = handle.read(size)
            long_name = (payload.rstrip(b"\0").decode("utf-8", "surrogateescape") if flag == b"L"
                         else _pax_path(payload) or long_name)
            continue
        name = block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if block[257:262] == b"ustar" and block[345] != 0:
            name = block[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
        if flag in _FILE_TYPES:
            yield long_name or name, data, size
        long_name = None


def index_tar(path: str | Path) -> TarIndex:
    """Scan ``path``'s headers into sample groups; a truncated member drops its group and ends the scan (as
    :func:`~counterpoint.data.readers.iter_tar_groups` does).

    A missing file raises :class:`DataError` (a lost mount should stop a run, not skip every sample).
    """
    try:
        file_size = os.path.getsize(path)
    except OSError as exc:
        raise DataError(f"shard '{path}' cannot be read ({exc.strerror})") from None
    if file_size == 0:
        return TarIndex((), "corrupt_shard")  # an empty file is not a tar (tarfile refuses it too)
    groups: list[TarGroup] = []
    key: str | None = None
    members: list[TarMember] = []
    error = None

    def close_group() -> None:
        exts = [m.ext for m in members]
        groups.append(TarGroup(key, tuple(members), duplicate=len(set(exts)) < len(exts)))

    try:
        with open(path, "rb") as handle:
            for name, offset, size in tar_members(handle):
                parts = member_key_ext(name)
                if parts is None:
                    continue
                k, ext = parts
                if k != key and key is not None:
                    close_group()
                    members = []
                key = k
                if offset + size > file_size:
                    raise EOFError  # its header is whole, its data is cut off
                members.append(TarMember(ext, offset, size))
    except (OSError, EOFError, ValueError):
        error = "truncated_shard" if groups or members else "corrupt_shard"
    if key is not None and error is None:
        close_group()
    return TarIndex(tuple(groups), error)


def _read_sizes_file(file: Path) -> dict[str, int]:
    """``sizes.json``: ``{shard name: sample count}``; anything else is a one-line :class:`DataError`."""
    fix = f"fix or delete {file} (without it the shards' samples are counted)"
    try:
        table = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise DataError(f"{file} is not valid JSON; {fix}") from None
    if not isinstance(table, dict):
        raise DataError(f"{file} must map shard names to sample counts, got a {type(table).__name__}; {fix}")
    for name, n in table.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise DataError(f"{file}: the count of '{name}' must be an integer >= 0, got {n!r}; {fix}")
    return table


def scan_shards(shards: Sequence[str]) -> tuple[list[int], list[tuple[str, str]]]:
    """Samples per shard, and ``(shard, reason)`` for each shard found damaged on the way.

    Counts come from ``sizes.json`` in each shard's folder where it names the shard (the shard is not opened:
    damage shows up sample by sample when it is read), else from indexing the shard's headers, which also
    finds a shard that is not a tar (``corrupt_shard``) or is cut short (``truncated_shard``: its complete
    samples are kept).
    """
    tables: dict[Path, dict[str, int]] = {}
    sizes: list[int] = []
    problems: list[tuple[str, str]] = []
    for shard in shards:
        folder = Path(shard).parent
        if folder not in tables:
            file = folder / SIZES_FILE
            tables[folder] = _read_sizes_file(file) if file.is_file() else {}
        n = tables[folder].get(Path(shard).name)
        if n is None:
            index = index_tar(shard)
            n = len(index.groups)
            if index.error:
                problems.append((shard, index.error))
        sizes.append(n)
    return sizes, problems


def shard_sizes(shards: Sequence[str]) -> list[int]:
    """Samples per shard (see :func:`scan_shards`)."""
    return scan_shards(shards)[0]


def read_group(handle: BinaryIO, group: TarGroup, exts: Container[str] | None = None) -> dict[str, bytes]:
    """``{ext: bytes}`` of ``group``'s members (those in ``exts`` only, if given) from the open shard."""
    members = {}
    for m in group.members:
        if exts is None or m.ext in exts:
            handle.seek(m.offset)
            members[m.ext] = handle.read(m.size)
    return members


class ShardCache:
    """Indexes and open handles of the last few shards read (a worker reads its batches from one or two
    shards at a time), with the group bytes of any sample by position."""

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._open: OrderedDict[str, tuple[TarIndex, BinaryIO | None]] = OrderedDict()

    def _get(self, path: str) -> tuple[TarIndex, BinaryIO | None]:
        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path]
        index = index_tar(path)
        handle = open(path, "rb") if index.groups else None
        self._open[path] = (index, handle)
        if len(self._open) > self.capacity:
            _, (_, old) = self._open.popitem(last=False)
            if old is not None:
                old.close()
        return index, handle

    def read(self, path: str, position: int) -> tuple[str, dict[str, bytes]] | str:
        """``(key, {ext: bytes})`` of sample ``position`` of the shard, or the reason it cannot be read."""
        index, handle = self._get(path)
        if position >= len(index.groups):
            return index.error or "missing_sample"  # sizes.json promised more samples than the shard has
        group = index.groups[position]
        if group.duplicate:
            return "duplicate_key"
        return group.key, read_group(handle, group)

    def close(self) -> None:
        for _, handle in self._open.values():
            if handle is not None:
                handle.close()
        self._open.clear()
