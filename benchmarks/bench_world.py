"""Generation speed of the built-in world on one core: pairs/s of ``World.pair`` (with and without audio) and
of writing WebDataset shards with ``make_world`` (png images) to a temporary directory.

Everything runs on one thread: the world is plain numpy + PIL (single-threaded for these operations) and
``torch.set_num_threads(1)`` covers anything torch would parallelise. Each case first generates ``--warmup``
untimed pairs (fills the shape-mask cache, loads code), then times ``--repeats`` runs of ``--pairs`` pairs
at fresh indices and reports the median rate (and the best).

    python benchmarks/bench_world.py --pairs 5000 --shard-pairs 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np  # noqa: F401 -- imported so env_info records its version
import torch

from common import RESULTS, env_info, load_average, machine_line, markdown_table, median, write_json
from counterpoint.data.make_world import make_world
from counterpoint.data.world import World, WorldConfig


def time_pairs(world: World, start: int, n: int, with_audio: bool) -> float:
    t0 = time.perf_counter()
    for i in range(start, start + n):
        world.pair("train", i, with_audio)
    return time.perf_counter() - t0


def time_shards(cfg: WorldConfig, n: int, with_audio: bool, tmp_root: Path,
                tag: str) -> tuple[float, int, int]:
    """Seconds to write ``n`` training pairs as wds shards (png), bytes written, shard files."""
    out = Path(tempfile.mkdtemp(prefix=f"world-{tag}-", dir=tmp_root))
    try:
        t0 = time.perf_counter()
        make_world(out, cfg, fmt="wds", train=n, test=0, zeroshot=0, with_audio=with_audio,
                   image_format="png", progress=False)
        seconds = time.perf_counter() - t0
        files = [p for p in out.rglob("*") if p.is_file()]
        shards = sum(1 for p in files if p.suffix == ".tar")
        return seconds, sum(p.stat().st_size for p in files), shards
    finally:
        shutil.rmtree(out, ignore_errors=True)


def summarise(case: str, n: int, seconds: list[float], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    rates = [n / s for s in seconds]
    return {"case": case, "pairs_per_run": n, "runs": len(seconds), "seconds": seconds,
            "pairs_per_s_median": median(rates), "pairs_per_s_best": max(rates),
            "ms_per_pair_median": 1e3 / median(rates), **(extra or {})}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--pairs", type=int, default=5000, help="pairs per timed run of World.pair")
    ap.add_argument("--shard-pairs", type=int, default=2000, help="training pairs per timed make_world run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--no-audio", action="store_true", help="skip the with-audio cases")
    ap.add_argument("--tmp", type=Path, default=None, help="shard directory root (default: system temp)")
    ap.add_argument("--out", type=Path, default=RESULTS / "world.json")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    meta = env_info()
    print(machine_line(meta), flush=True)
    cfg = WorldConfig(image_size=args.image_size)
    world = World(cfg)
    audio_cases = [False] if args.no_audio else [False, True]
    load_before = load_average()
    records = []
    next_index = 10_000_000  # timed indices never overlap the warm-up ones
    for with_audio in audio_cases:
        case = "World.pair" + (" + audio" if with_audio else "")
        time_pairs(world, 0, args.warmup, with_audio)
        seconds = []
        for _ in range(args.repeats):
            seconds.append(time_pairs(world, next_index, args.pairs, with_audio))
            next_index += args.pairs
        records.append(summarise(case, args.pairs, seconds, {"with_audio": with_audio}))
        print(f"{case}: {records[-1]['pairs_per_s_median']:.0f} pairs/s", flush=True)
    tmp_root = args.tmp or Path(tempfile.gettempdir())
    for with_audio in audio_cases:
        case = "make_world wds/png" + (" + audio" if with_audio else "")
        tag = "audio" if with_audio else "img"
        time_shards(cfg, min(args.warmup, args.shard_pairs), with_audio, tmp_root, tag)
        seconds, sizes = [], []
        for _ in range(args.repeats):
            s, size, shards = time_shards(cfg, args.shard_pairs, with_audio, tmp_root, tag)
            seconds.append(s)
            sizes.append(size)
        records.append(summarise(case, args.shard_pairs, seconds,
                                 {"with_audio": with_audio, "bytes_written": sizes[-1], "shards": shards,
                                  "bytes_per_pair": sizes[-1] / args.shard_pairs}))
        print(f"{case}: {records[-1]['pairs_per_s_median']:.0f} pairs/s", flush=True)
    load_after = load_average()

    rows = [(r["case"], r["pairs_per_run"], r["runs"], f"{r['pairs_per_s_median']:.0f}",
             f"{r['pairs_per_s_best']:.0f}", f"{r['ms_per_pair_median']:.2f}",
             f"{r['bytes_per_pair'] / 1024:.1f}" if "bytes_per_pair" in r else "-") for r in records]
    md = markdown_table([f"case (1 thread, image_size {args.image_size})", "pairs/run", "runs",
                         "pairs/s (median)", "pairs/s (best)", "ms/pair", "KiB/pair on disk"], rows)
    md += f"\n\nLoad average (1 min) before / after: {load_before[0]} / {load_after[0]}."
    print()
    print(md)
    meta.update({"command_args": {k: str(v) for k, v in vars(args).items()}, "load_avg_before": load_before,
                 "load_avg_after": load_after, "world_config": {"image_size": args.image_size}})
    write_json(args.out, {"meta": meta, "records": records, "table_markdown": md})


if __name__ == "__main__":
    main()
