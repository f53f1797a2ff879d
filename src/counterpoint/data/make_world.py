"""Write the built-in world to disk: training pairs, test pairs, the labelled zero-shot set, stories.

Layout of ``OUT``::

    OUT/world.json        the WorldConfig used, class names, prompt templates, held-out combinations
    OUT/train/            training pairs (held-out combinations never appear)
    OUT/test/             retrieval test pairs (all combinations)
    OUT/zeroshot/         single-object images with a ``label`` (every class equally often)
    OUT/stories/          interleaved documents (stories.jsonl + images), only with ``stories > 0``
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import as_completed
from dataclasses import asdict
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from counterpoint.data.parallel import process_pool
from counterpoint.data.world import PROMPT_TEMPLATES, World, WorldConfig, WorldSample
from counterpoint.data.writers import Format, Record, ShardWriter, write_records, write_sizes
from counterpoint.errors import DataError

SAMPLES_PER_SHARD = 5000


def _record(world: World, split: str, i: int, with_audio: bool) -> Record:
    s: WorldSample = world.labelled(i, with_audio) if split == "zeroshot" else world.pair(split, i, with_audio)
    return Record(s.key, s.image, s.caption, s.meta(), s.audio, world.cfg.audio_sample_rate)


def _records(world: World, split: str, n: int, with_audio: bool, progress: bool) -> Iterator[Record]:
    for i in tqdm(range(n), desc=f"world/{split}", unit=" samples", disable=not progress, leave=False):
        yield _record(world, split, i, with_audio)


def _write_shard(cfg: WorldConfig, split: str, shard: int, n: int, with_audio: bool, out: Path,
                 image_format: str) -> dict[str, int]:
    """Samples ``shard * SAMPLES_PER_SHARD ..`` of ``split`` into one shard (a worker process's job)."""
    world = World(cfg)
    start = shard * SAMPLES_PER_SHARD
    with ShardWriter(out, SAMPLES_PER_SHARD, image_format, first_shard=shard, sizes_file=False) as writer:
        for i in range(start, min(start + SAMPLES_PER_SHARD, n)):
            writer.write(_record(world, split, i, with_audio))
    return writer.sizes


def _write_split(world: World, split: str, n: int, out: Path, fmt: Format, image_format: str, with_audio: bool,
                 workers: int, progress: bool) -> None:
    """One split; WebDataset shards are written by ``workers`` processes at once. Every sample is a pure
    function of its index and shard boundaries are fixed, so the files are the same for any ``workers``."""
    shards = -(-n // SAMPLES_PER_SHARD)
    workers = min(workers, shards)
    if fmt != "wds" or workers <= 1:
        write_records(_records(world, split, n, with_audio, progress), out, fmt, image_format, SAMPLES_PER_SHARD)
        return
    sizes: dict[str, int] = {}
    with (process_pool(workers) as pool,
          tqdm(total=n, desc=f"world/{split}", unit=" samples", disable=not progress, leave=False) as bar):
        jobs = [pool.submit(_write_shard, world.cfg, split, shard, n, with_audio, out, image_format)
                for shard in range(shards)]
        for job in as_completed(jobs):
            done = job.result()
            sizes.update(done)
            bar.update(sum(done.values()))
    write_sizes(out, sizes)


def write_stories(world: World, n: int, out_dir: Path, steps: int = 4) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "stories.jsonl", "w", encoding="utf-8") as fh:
        for i in range(n):
            story = world.story(i, steps)
            names: list[str | None] = []
            for j, img in enumerate(story["images"]):
                if img is None:
                    names.append(None)
                    continue
                name = f"{story['key']}-{j}.png"
                Image.fromarray(img).save(out_dir / name)
                names.append(name)
            fh.write(json.dumps({"key": story["key"], "texts": story["texts"], "images": names}) + "\n")


WORLD_ENTRIES = ("world.json", "train", "test", "zeroshot", "stories")


def make_world(out: str | Path, cfg: WorldConfig, fmt: Format = "wds", train: int = 100_000, test: int = 2_000,
               zeroshot: int = 2_048, stories: int = 0, with_audio: bool = False, image_format: str = "png",
               progress: bool = True, overwrite: bool = False, workers: int | None = None) -> dict:
    """Generate and write every split; returns the ``world.json`` content. ``workers``: processes writing
    shards at once (default: the CPU count).

    A folder that already holds a world (or any of its entries) is refused unless ``overwrite``, which first
    removes those entries (and nothing else): writing over them would mix two worlds' shards in one split.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out '{out}' is a file; name a folder")
    existing = [name for name in WORLD_ENTRIES if (out / name).exists()]
    if existing and not overwrite:
        raise DataError(f"'{out}' already holds {', '.join(existing)}; pass --overwrite to replace the world, or "
                        f"choose another --out")
    for name in existing:
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)
    world = World(cfg)
    workers = workers or os.cpu_count() or 1
    for split, n in (("train", train), ("test", test), ("zeroshot", zeroshot)):
        if n > 0:
            _write_split(world, split, n, out / split, fmt, image_format, with_audio, workers, progress)
    if stories > 0:
        write_stories(world, stories, out / "stories")
    info = {
        "world": asdict(cfg),
        "classes": world.classes,
        "templates": list(PROMPT_TEMPLATES),
        "heldout": sorted(f"{c} {s}" for c, s in world.heldout),
        "splits": {"train": train, "test": test, "zeroshot": zeroshot, "stories": stories},
        "format": fmt,
    }
    (out / "world.json").write_text(json.dumps(info, indent=2))
    return info
