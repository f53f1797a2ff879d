"""Do BriVL's momentum queues beat in-batch negatives at a small batch on weakly correlated pairs?

The acceptance experiment of BriVL in counterpoint (README, "BriVL"): on the built-in world with weak captions
(``counterpoint data make world --captions weak``), the same towers, batch, learning rate and number of steps,
trained either with in-batch InfoNCE (``objective.name=clip``: 31 negatives at batch 32) or with BriVL's
queues of K momentum keys. Every run is evaluated on the weak world's own test pairs and zero-shot split, and
again on the *literal* test pairs of a literal world of the same seed (``--literal``), so that retrieval is
also measured against captions that say what is in the picture.

Runs are ordinary ``counterpoint train`` runs under ``--out`` (one folder per objective, queue and seed); a
run whose eval.json exists is reused, so an interrupted sweep continues where it stopped. ``--jobs`` runs
that many at once with one CPU thread each. Writes ``summary.json`` and ``summary.md`` (mean and sample std
over seeds, and the verdict of each queue against in-batch: a difference is claimed only beyond 2 standard
errors).

    counterpoint data make world --out data/weak-20k --captions weak --train 20000 --test 1000
    counterpoint data make world --out data/literal-test --train 1000 --test 1000
    python experiments/brivl_queues.py --weak data/weak-20k --literal data/literal-test --out runs/brivl-queues
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from counterpoint.train.balance_compare import _stat as stat
from counterpoint.train.balance_compare import verdict

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "brivl_weak.yaml"
METRICS = {"weak t2i R@1": ("weak", "retrieval.text_to_image.R@1"),
           "literal t2i R@1": ("literal", "retrieval.text_to_image.R@1"),
           "weak i2t R@1": ("weak", "retrieval.image_to_text.R@1"),
           "zero-shot held-out top-1": ("weak", "zeroshot.heldout.top1"),
           "zero-shot all top-1": ("weak", "zeroshot.all.top1")}


def run_name(queue: int, seed: int) -> str:
    return f"{'in-batch' if queue == 0 else f'queue-{queue}'}-seed{seed}"


def command(args: argparse.Namespace, queue: int, seed: int, out: Path) -> list[str]:
    objective = ["objective.name=clip"] if queue == 0 else ["objective.name=brivl", f"objective.queue_size={queue}"]
    return [sys.executable, "-m", "counterpoint.cli", "train", str(RECIPE), "--overwrite", f"out_dir={out}",
            f"seed={seed}", f"data.train={args.weak / 'train'}", f"train.epochs={args.epochs}",
            f"train.lr={args.lr}", f"train.batch_size={args.batch}", "train.threads=1", "train.progress=false",
            "eval.imagine=0", *objective, *args.set]


def run_one(args: argparse.Namespace, queue: int, seed: int) -> dict[str, Any]:
    out = args.out / run_name(queue, seed)
    literal = out / "evals" / "literal"
    if not (out / "eval.json").exists():
        log = (args.out / f"{run_name(queue, seed)}.log").open("w")
        subprocess.run(command(args, queue, seed, out), check=True, stdout=log, stderr=subprocess.STDOUT)
    if not (literal / "eval.json").exists():
        subprocess.run([sys.executable, "-m", "counterpoint.cli", "eval", str(out), "--out", str(literal),
                        f"data.test={args.literal / 'test'}", "eval.zeroshot=false", "eval.linear_probe=false",
                        "eval.imagine=0"], check=True, capture_output=True)
    evals = {"weak": json.loads((out / "eval.json").read_text()),
             "literal": json.loads((literal / "eval.json").read_text())}
    values = {}
    for label, (which, key) in METRICS.items():
        value: Any = evals[which]
        for part in key.split("."):
            value = value[part]
        values[label] = float(value)
    return {"queue": queue, "seed": seed, **values}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    table: dict[str, dict[str, Any]] = {}
    for queue in sorted({r["queue"] for r in rows}):
        mine = [r for r in rows if r["queue"] == queue]
        table[run_name(queue, 0).rsplit("-seed", 1)[0]] = {
            "queue": queue, "seeds": [r["seed"] for r in mine],
            **{label: stat([r[label] for r in mine]) for label in METRICS}}
    return table


def markdown(table: dict[str, Any], args: argparse.Namespace) -> str:
    head = "| negatives | seeds | " + " | ".join(METRICS) + " |"
    lines = [head, "|" + "---|" * (2 + len(METRICS))]
    for label, entry in table.items():
        cells = []
        for metric in METRICS:
            s = entry[metric]
            cells.append(f"{s['mean']:.3f}" + (f" ± {s['std']:.3f}" if s["std"] is not None else ""))
        lines.append(f"| {label} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
    base = table.get("in-batch")
    if base:
        lines += ["", "Against in-batch, points (a difference is claimed beyond 2 standard errors):", ""]
        for label, entry in table.items():
            if label != "in-batch":
                lines.append(f"- {label}: " + "; ".join(
                    f"{metric} {verdict(entry[metric], base[metric])}" for metric in METRICS))
    lines += ["", f"Batch {args.batch}, {args.epochs} epochs, lr {args.lr}, recipe {RECIPE.name}, "
                  f"extra settings {args.set or 'none'}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weak", type=Path, required=True, help="world written with --captions weak")
    parser.add_argument("--literal", type=Path, required=True, help="literal world of the same seed (its test)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--queues", type=int, nargs="+", default=[0, 4096], help="0: in-batch (CLIP)")
    parser.add_argument("--sweep", type=int, nargs="*", default=[1024, 16384],
                        help="further queue sizes, run on the first seed only")
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], help="further key=value overrides for every run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    plan = [(q, s) for s in args.seeds for q in args.queues] + [(q, args.seeds[0]) for q in args.sweep]
    start = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda qs: run_one(args, *qs), plan))
    table = summarise(rows)
    (args.out / "summary.json").write_text(json.dumps({"runs": rows, "table": table, "epochs": args.epochs,
                                                       "batch": args.batch, "lr": args.lr, "set": args.set,
                                                       "wall_seconds": time.perf_counter() - start}, indent=2))
    (args.out / "summary.md").write_text(markdown(table, args))
    print(markdown(table, args))


if __name__ == "__main__":
    main()
