"""LCL's Table 1 in the small: which pretraining objective on interleaved documents gives a usable vision encoder?

The acceptance experiment of LCL in counterpoint (README, "LCL"). From scratch on the built-in world's stories,
the same ViT and the same images seen, four objectives:

* ``lcl``: generation + 0.1 x contrastive (``configs/lcl_stories.yaml``);
* ``generation``: next-token generation only (``objective.contrastive_weight=0``);
* ``generation+regression``: generation plus MSE of the ``<boi>`` state onto the image latent, Emu-style
  (``contrastive_weight=0, regression_weight=1``): the paper's collapse;
* ``clip``: a CLIP reference on the stories' image-caption pairs (each image with the sentence before it),
  batch 4x as many pairs as LCL's documents (4 images each), so every step sees the same images.

Every run is an ordinary ``counterpoint train`` run under ``--out`` (reused when its eval.json exists; ``--jobs``
at once with one thread each), evaluated by the frozen-encoder linear probe and attentive probe on the world's
64-class labelled images. Writes ``summary.json`` and ``summary.md`` (mean and sample std over seeds).

    counterpoint data make world --out data/stories-world --train 256 --test 1000 --stories 3000
    python experiments/lcl_ablation.py --world data/stories-world --out runs/lcl-ablation
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

import numpy as np
import torch
from PIL import Image

import counterpoint
from counterpoint.data.documents import iter_documents
from counterpoint.data.pairs import load_pairs
from counterpoint.data.readers import SkipStats
from counterpoint.data.transforms import normalize
from counterpoint.data.writers import Record, ShardWriter
from counterpoint.train.balance_compare import _stat as stat

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "lcl_stories.yaml"
VARIANTS: dict[str, list[str]] = {
    "lcl": [],
    "generation": ["objective.contrastive_weight=0"],
    "generation+regression": ["objective.contrastive_weight=0", "objective.regression_weight=1"],
    "clip": ["objective.name=clip", "model.context_length=48"],
}
METRICS = {"linear probe top-1": "linear_probe.top1", "attentive probe top-1": "attentive_probe.top1",
           "zero-shot top-1": "zeroshot.all.top1", "latent spread": "latent_spread"}


def latent_spread(run: Path, world: Path) -> float:
    """How much the image latents vary across images, relative to their mean: the mean distance of a raw
    latent from the mean latent over the mean latent's norm, on 512 labelled images. Collapse (every image
    the same latent) drives it to 0; a linear probe standardises features and can still read what is left."""
    model, _ = counterpoint.load_checkpoint(run)
    images = load_pairs(str(world / "zeroshot"), model.image_size, limit=512).images
    with torch.no_grad():
        z = model.encode_image(normalize(images), normalize=False)
    centre = z.mean(dim=0)
    return float((z - centre).norm(dim=1).mean() / centre.norm())


def story_pairs(stories: Path, out: Path, limit: int) -> int:
    """Each image of the first ``limit`` stories with the sentence right before it, as pair shards."""
    n = 0
    with ShardWriter(out, 5000) as writer:
        for d, doc in enumerate(iter_documents(str(stories), SkipStats())):
            if d == limit:
                break
            for before, item in zip(doc.items, doc.items[1:]):
                if isinstance(item, Image.Image) and isinstance(before, str):
                    writer.write(Record(f"pair-{n:08d}", np.asarray(item), before, {}))
                    n += 1
    return n


def command(args: argparse.Namespace, variant: str, seed: int, out: Path) -> list[str]:
    if variant == "clip":
        data = [f"data.train={args.out / 'story-pairs'}", f"train.batch_size={4 * args.batch}"]
    else:
        data = [f"data.train={args.world / 'stories'}", f"data.max_train_samples={args.stories}",
                f"train.batch_size={args.batch}"]
    return [sys.executable, "-m", "counterpoint.cli", "train", str(RECIPE), "--overwrite", f"out_dir={out}",
            f"seed={seed}", f"train.epochs={args.epochs}", f"train.lr={args.lr}", "train.threads=1",
            "train.progress=false", "eval.imagine=0", "eval.attentive_probe=true",
            f"data.test={args.world / 'test'}", f"data.zeroshot={args.world / 'zeroshot'}",
            f"data.classes={args.world / 'world.json'}", *data, *VARIANTS[variant], *args.set]


def run_one(args: argparse.Namespace, variant: str, seed: int) -> dict[str, Any]:
    out = args.out / f"{variant}-seed{seed}"
    if not (out / "eval.json").exists():
        with (args.out / f"{variant}-seed{seed}.log").open("w") as log:
            subprocess.run(command(args, variant, seed, out), check=True, stdout=log, stderr=subprocess.STDOUT)
    result = json.loads((out / "eval.json").read_text())
    result["latent_spread"] = latent_spread(out, args.world)
    values = {}
    for label, key in METRICS.items():
        value: Any = result
        for part in key.split("."):
            value = value[part]
        values[label] = float(value)
    return {"variant": variant, "seed": seed, **values}


def markdown(table: dict[str, Any], args: argparse.Namespace) -> str:
    lines = ["| objective | seeds | " + " | ".join(METRICS) + " |", "|" + "---|" * (2 + len(METRICS))]
    for variant, entry in table.items():
        cells = [f"{entry[m]['mean']:.3f}" + (f" ± {entry[m]['std']:.3f}" if entry[m]["std"] is not None else "")
                 for m in METRICS]
        lines.append(f"| {variant} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
    lines += ["", f"{args.stories} stories (4 images each), {args.epochs} epochs, {args.batch} documents "
                  f"(clip: {4 * args.batch} pairs) per step, lr {args.lr}, recipe {RECIPE.name}, extra settings "
                  f"{args.set or 'none'}. Chance is 1/64 = 0.016."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=Path, required=True, help="a world written with --stories")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stories", type=int, default=3000, help="stories read (the budget)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--batch", type=int, default=32, help="documents per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], help="further key=value overrides for every run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if "clip" in args.variants and not (args.out / "story-pairs" / "sizes.json").exists():
        story_pairs(args.world / "stories", args.out / "story-pairs", args.stories)
    start = time.perf_counter()
    plan = [(v, s) for s in args.seeds for v in args.variants]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda vs: run_one(args, *vs), plan))
    table = {v: {"seeds": [r["seed"] for r in rows if r["variant"] == v],
                 **{m: stat([r[m] for r in rows if r["variant"] == v]) for m in METRICS}} for v in args.variants}
    (args.out / "summary.json").write_text(json.dumps({"runs": rows, "table": table, "stories": args.stories,
                                                       "epochs": args.epochs, "batch": args.batch, "lr": args.lr,
                                                       "set": args.set, "wall_seconds": time.perf_counter() - start},
                                                      indent=2))
    (args.out / "summary.md").write_text(markdown(table, args))
    print(markdown(table, args))


if __name__ == "__main__":
    main()
