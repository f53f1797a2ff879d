"""Training throughput from 1 to N processes on CPU: ``counterpoint train`` launched by torchrun (gloo, DDP).

    python benchmarks/bench_scaling.py [--model tiny-vit] [--batch 64] [--steps 14] [--procs 1 2]

The global batch is fixed, so N processes each compute 1/N of it (strong scaling). Every process gets one
intra-op thread; the "1 process, N threads" row is the alternative use of the same cores. Throughput is
the median of the per-step samples/s that the trainer logs, after ``--warmup`` steps. Writes
``results/scaling.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import RESULTS, env_info, load_average, machine_line, markdown_table, median, write_json

SRC = Path(__file__).resolve().parents[1] / "src"


def run(config: dict, procs: int, out_dir: Path, threads: int) -> list[float]:
    """Per-step samples/s of one ``counterpoint train`` job in ``procs`` processes."""
    cfg = {**config, "out_dir": str(out_dir), "train": {**config["train"], "threads": threads}}
    recipe = out_dir.with_suffix(".json")  # JSON is YAML
    recipe.write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
           "-m", "counterpoint.cli", "train", str(recipe)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["samples_per_s"] for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-vit")
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=4, help="steps left out of the median")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--train", type=int, default=1024, help="training pairs in the generated world")
    parser.add_argument("--out", type=Path, default=RESULTS / "scaling.json")
    args = parser.parse_args()

    sys.path.insert(0, str(SRC))
    from counterpoint.data.make_world import make_world
    from counterpoint.data.world import WorldConfig

    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="cp-scaling-") as tmp:
        world = Path(tmp) / "world"
        make_world(world, WorldConfig(seed=0), "wds", train=args.train, test=8, zeroshot=8, progress=False)
        config = {"seed": 0, "model": {"name": args.model},
                  "data": {"train": str(world / "train"), "test": "", "zeroshot": ""},
                  "train": {"batch_size": args.batch, "max_steps": args.steps, "epochs": 100, "log_every": 1,
                            "checkpoint_every": 10**6, "progress": False, "device": "cpu", "warmup_steps": 2},
                  "eval": {"zeroshot": False, "retrieval": False, "linear_probe": False}}
        cases = [(p, 1) for p in args.procs] + [(1, max(args.procs))] * (max(args.procs) > 1)
        results = []
        for procs, threads in cases:
            per_step = run(config, procs, Path(tmp) / f"p{procs}t{threads}", threads)
            results.append({"processes": procs, "threads_per_process": threads,
                            "samples_per_s": round(median(per_step[args.warmup:]), 1), "per_step": per_step})
    base = results[0]["samples_per_s"]
    for r in results:
        r["speedup_vs_1_process"] = round(r["samples_per_s"] / base, 3)
    meta = {**env_info(), "load_average_before": load_before, "load_average_after": load_average()}
    write_json(args.out, {"meta": meta, "args": {k: str(v) for k, v in vars(args).items()}, "results": results})
    print(machine_line(meta))
    print(markdown_table(["processes", "threads each", "samples/s", "vs 1 process"],
                         [[r["processes"], r["threads_per_process"], r["samples_per_s"], r["speedup_vs_1_process"]]
                          for r in results]))


if __name__ == "__main__":
    main()
