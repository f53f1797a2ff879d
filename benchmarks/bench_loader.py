"""Streaming loader throughput from WebDataset shards against what the tiny-cnn trainer consumes, in one run.

Writes ``--pairs`` training pairs of the built-in world as png shards of ``--shard-pairs`` (with
``sizes.json``) to a temporary folder, then measures, interleaved over ``--repeats`` rounds so that load
from other work on the machine hits every case alike:

* **loader**: decoded samples/s of :class:`StreamingLoader` (batch ``--batch``) with 0, 1 and 2 workers, over
  ``--batches`` batches after the first (the first batch, which includes starting the workers, is reported
  apart as ``first_batch_s``);
* **train**: samples/s of the tiny-cnn training step (``ContrastiveTask`` clip forward, backward, clipping,
  AdamW step) on an in-memory batch of the same size: what the model consumes;
* **pipeline**: samples/s of the two together, as a trainer would run them (loader batch -> tokenise ->
  normalise -> step), for each worker count;
* **resume**: seconds to the first batch of a loader restored at batch ``k`` (mid-epoch) against ``k = 0``:
  skipping is planning plus tar headers, no decoding.

Figures are medians over rounds. Worker processes and the training step share the machine's cores.

    python benchmarks/bench_loader.py --pairs 4096 --batch 256 --batches 12 --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from common import RESULTS, env_info, load_average, machine_line, markdown_table, median, write_json
from counterpoint.data.stream_plan import Source
from counterpoint.data.streaming import StreamingLoader, read_captions
from counterpoint.data.tokenizer import Tokenizer
from counterpoint.data.transforms import normalize
from counterpoint.data.world import World, WorldConfig
from counterpoint.data.writers import Record, write_records
from counterpoint.models.presets import build_model, resolve_spec
from counterpoint.objectives.contrastive import ContrastiveTask
from counterpoint.train.optim import build_optimizer

WORKERS = (0, 1, 2)


def write_shards(out: Path, pairs: int, per_shard: int) -> tuple[float, int]:
    """Seconds to generate and write the shards, and their total bytes."""
    world = World(WorldConfig(seed=0))
    records = (Record(s.key, s.image, s.caption, s.meta()) for s in map(lambda i: world.pair("train", i), range(pairs)))
    t0 = time.perf_counter()
    write_records(records, out, "wds", "png", per_shard)
    return time.perf_counter() - t0, sum(p.stat().st_size for p in out.glob("*.tar"))


def time_loader(source: Source, batch: int, image_size: int, workers: int, batches: int) -> dict[str, float]:
    loader = StreamingLoader([source], batch, image_size, seed=1, num_workers=workers)
    it = iter(loader)
    t0 = time.perf_counter()
    next(it)
    t1 = time.perf_counter()
    samples = sum(len(b["key"]) for b in islice(it, batches))
    t2 = time.perf_counter()
    return {"first_batch_s": t1 - t0, "samples_per_s": samples / (t2 - t1)}


class Trainer:
    """The tiny-cnn training step of ``counterpoint.train.loop`` (clip objective, training defaults)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        spec = resolve_spec("tiny-cnn", vocab_size=tokenizer.vocab_size)
        self.image_size = spec.image_size
        self.tokenizer = tokenizer
        self.model = build_model(spec, pad_id=tokenizer.pad_id, eot_id=tokenizer.eot_id)
        self.task = ContrastiveTask(self.model, "clip")
        self.opt = build_optimizer(self.model, 1e-3, 0.1, (0.9, 0.98), 1e-6)

    def step(self, batch: dict) -> None:
        inputs = {"image": normalize(batch["image"]), "text": self.tokenizer(batch["caption"])}
        losses, _ = self.task(inputs)
        self.opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.model.clamp_logit_scale(100.0)


def time_train(trainer: Trainer, batch: dict, steps: int) -> float:
    """Samples/s of ``steps`` training steps on one in-memory batch (tokenising included, as in the pipeline)."""
    trainer.step(batch)  # untimed warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step(batch)
    return steps * len(batch["key"]) / (time.perf_counter() - t0)


def time_pipeline(source: Source, trainer: Trainer, batch: int, workers: int, steps: int) -> float:
    loader = StreamingLoader([source], batch, trainer.image_size, seed=2, num_workers=workers)
    it = iter(loader)
    trainer.step(next(it))  # untimed: worker start-up and warm-up
    t0 = time.perf_counter()
    samples = 0
    for b in islice(it, steps):
        trainer.step(b)
        samples += len(b["key"])
    return samples / (time.perf_counter() - t0)


def time_resume(source: Source, batch: int, image_size: int, at: int) -> float:
    loader = StreamingLoader([source], batch, image_size, seed=3, num_workers=0)
    loader.load_state_dict(loader.state_dict() | {"batches": at})
    t0 = time.perf_counter()
    next(iter(loader))
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=4096)
    ap.add_argument("--shard-pairs", type=int, default=256)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=12, help="timed batches per loader / pipeline case")
    ap.add_argument("--train-steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the training step")
    ap.add_argument("--tmp", default=None, help="folder for the shards (default: the system's temp folder)")
    ap.add_argument("--out", default=str(RESULTS / "loader.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = load_average()

    root = Path(tempfile.mkdtemp(prefix="bench-loader-", dir=args.tmp))
    try:
        write_s, nbytes = write_shards(root, args.pairs, args.shard_pairs)
        source = Source.from_spec(str(root))
        tokenizer = Tokenizer.train(read_captions([source], args.pairs), 1024, 32)
        trainer = Trainer(tokenizer)
        steps_per_epoch = args.pairs // args.batch
        mid = steps_per_epoch // 2 + steps_per_epoch  # the middle of epoch 1
        batch0 = next(iter(StreamingLoader([source], args.batch, trainer.image_size, num_workers=0)))

        rounds: list[dict[str, Any]] = []
        for r in range(args.repeats):
            row: dict[str, Any] = {"loader": {}, "pipeline": {}}
            for w in WORKERS:
                row["loader"][w] = time_loader(source, args.batch, trainer.image_size, w, args.batches)
            row["train_samples_per_s"] = time_train(trainer, batch0, args.train_steps)
            for w in WORKERS:
                row["pipeline"][w] = time_pipeline(source, trainer, args.batch, w, args.batches)
            row["resume_s"] = {"0": time_resume(source, args.batch, trainer.image_size, 0),
                               str(mid): time_resume(source, args.batch, trainer.image_size, mid)}
            rounds.append(row)
            print(f"round {r + 1}/{args.repeats}: "
                  + ", ".join(f"loader w{w} {row['loader'][w]['samples_per_s']:.0f}/s" for w in WORKERS)
                  + f", train {row['train_samples_per_s']:.0f}/s, "
                  + ", ".join(f"pipeline w{w} {row['pipeline'][w]:.0f}/s" for w in WORKERS))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    train_rate = median([r["train_samples_per_s"] for r in rounds])
    summary = {"train_samples_per_s": train_rate, "loader": {}, "pipeline": {},
               "resume_first_batch_s": {k: median([r["resume_s"][k] for r in rounds]) for k in rounds[0]["resume_s"]}}
    table = []
    for w in WORKERS:
        rate = median([r["loader"][w]["samples_per_s"] for r in rounds])
        first = median([r["loader"][w]["first_batch_s"] for r in rounds])
        pipe = median([r["pipeline"][w] for r in rounds])
        summary["loader"][str(w)] = {"samples_per_s": rate, "first_batch_s": first,
                                     "ratio_to_train": rate / train_rate}
        summary["pipeline"][str(w)] = {"samples_per_s": pipe, "fraction_of_train": pipe / train_rate}
        table.append([w, f"{rate:,.0f}", f"{rate / train_rate:.2f}x", f"{first:.2f}", f"{pipe:,.0f}",
                      f"{pipe / train_rate:.0%}"])
    meta = env_info() | {"command_args": {k: str(v) for k, v in vars(args).items()},
                         "load_avg_before": load_before, "load_avg_after": load_average(),
                         "shards": {"pairs": args.pairs, "per_shard": args.shard_pairs, "image_format": "png",
                                    "image_size": trainer.image_size, "bytes": nbytes, "write_s": write_s}}
    print()
    print(machine_line(meta))
    print(f"tiny-cnn training step consumes {train_rate:,.0f} samples/s (batch {args.batch}, "
          f"{args.threads} threads)")
    print(markdown_table(["workers", "loader samples/s", "vs train", "first batch s", "pipeline samples/s",
                          "of train rate"], table))
    res = summary["resume_first_batch_s"]
    print("first batch after resume: " + ", ".join(f"at batch {k}: {v * 1e3:.0f} ms" for k, v in res.items()))
    write_json(Path(args.out), {"meta": meta, "summary": summary, "rounds": rounds})


if __name__ == "__main__":
    main()
