"""Throughput and MFU of an LCL training step, with token packing against padded rows.

Full training steps (zero_grad, ``LCLTask`` forward and backward, AdamW step, after-step clamp) on synthetic
documents laid out by the trainer's own code (``data/interleaved.py``), timed interleaved in blocks
(``common.interleaved_timing``). Reported per workload: documents, images and real tokens per second, and MFU
= FLOPs counted by the run's counter (``counterpoint.train.compute``) / step time / the matmul peak measured
here at start.

Workloads:

* ``stories``: 4 images and 4 sentences per document, the rows nearly full;
* ``pairs``: one image and one caption per document (image first for half), about a quarter of the row real;
* ``pairs, padded``: the same documents in rows of the full context with every padding position turned into
  a real token, i.e. what the step costs when padding is computed like text. Against ``pairs`` it measures
  what counterpoint saves without packing several documents into a row: the causal model runs its per-token
  layers (norms, projections, MLP) on the real tokens only (``models/layers.Packing``), and a batch's rows
  are only as long as its longest document (``data/interleaved.collate_rows``), so padding costs just the
  attention within that length (its share of the step's FLOPs is reported).

    python benchmarks/bench_lcl.py                      # small-vit, batch 16
    python benchmarks/bench_lcl.py --preset tiny-vit --batch 32
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from common import (
    RESULTS,
    count_flops,
    env_info,
    interleaved_timing,
    load_average,
    machine_line,
    markdown_table,
    matmul_peak,
    median,
    write_json,
)
from counterpoint.data.interleaved import DocumentRow, SequenceLayout, collate_rows, layout_document
from counterpoint.data.tokenizer import Tokenizer
from counterpoint.models.presets import resolve_spec
from counterpoint.objectives.lcl import LCLConfig, LCLTask
from counterpoint.train.optim import build_optimizer

VOCAB = 1024


def documents(kind: str, n: int, layout: SequenceLayout, gen: torch.Generator) -> list[DocumentRow]:
    """``n`` synthetic documents: sentences of 10-14 random tokens and images (indices into the batch)."""
    rows, image = [], 0
    for d in range(n):
        items: list[str | int] = []
        texts: dict[int, list[int]] = {}
        parts = ["t", "i"] * 4 if kind == "stories" else (["i", "t"] if d % 2 else ["t", "i"])
        for p, part in enumerate(parts):
            if part == "t":
                texts[p] = torch.randint(8, VOCAB, (int(torch.randint(10, 15, (1,), generator=gen)),),
                                         generator=gen).tolist()
                items.append("t")
            else:
                items.append(image)
                image += 1
        rows.append(layout_document(items, texts, layout))
    return rows


def make_batch(kind: str, n: int, layout: SequenceLayout, image_size: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    rows = documents(kind.split(",")[0], n, layout, gen)
    batch = collate_rows(rows, layout)
    if kind.endswith("padded"):  # full rows, every position real: the cost of computing padding like text
        short = batch["tokens"].shape[1]
        tokens = torch.full((n, layout.length), 7, dtype=torch.long)
        tokens[:, :short] = batch["tokens"]
        tokens[tokens == layout.pad] = 7
        batch = {"tokens": tokens, "context": batch["context"],
                 "boi": batch["boi"] // short * layout.length + batch["boi"] % short}
    images = sum(len(r.images) for r in rows)
    return {**batch, "images": torch.randn(images, 3, image_size, image_size, generator=gen)}


def run(preset: str, batch_size: int, context: int, steps: int, warmup: int, block: int,
        peak: float) -> list[dict[str, Any]]:
    spec = resolve_spec(preset, vocab_size=VOCAB, context_length=context)
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(["a red star"], 300, context, LCLTask.special_tokens)
    task = LCLTask.build(LCLConfig(), spec, tokenizer).train()
    layout = SequenceLayout.of(tokenizer, task.model.image_tokens)
    optimizer = build_optimizer(task, 1e-4, 0.1, (0.9, 0.98), 1e-6)
    kinds = ("stories", "pairs", "pairs, padded")
    batches = {k: make_batch(k, batch_size, layout, spec.image_size) for k in kinds}

    def step(batch: dict[str, torch.Tensor]) -> None:
        optimizer.zero_grad(set_to_none=True)
        losses, _ = task(batch)
        sum(losses.values()).backward()
        optimizer.step()
        task.after_step(0)

    def forward_backward(batch: dict[str, torch.Tensor]) -> None:
        losses, _ = task(batch)
        sum(losses.values()).backward()

    flops = {k: count_flops(lambda b=b: forward_backward(b)) for k, b in batches.items()}
    times = interleaved_timing({k: lambda b=b: step(b) for k, b in batches.items()}, steps, warmup, block)
    records = []
    for k in kinds:
        b, seconds = batches[k], median(times[k])
        total, per_op = flops[k]
        real = int((b["tokens"] != 0).sum())
        attention = sum(v for op, v in per_op.items() if "attention" in op)
        records.append({"preset": preset, "workload": k, "batch_docs": batch_size, "images": len(b["images"]),
                        "real_tokens": real, "row_tokens": b["tokens"].numel(), "median_ms": 1000 * seconds,
                        "docs_per_s": batch_size / seconds, "images_per_s": len(b["images"]) / seconds,
                        "tokens_per_s": real / seconds, "gflop": total / 1e9,
                        "attention_share": attention / total, "mfu": total / seconds / (peak * 1e9)})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", nargs="+", default=["small-vit"])
    parser.add_argument("--batch", type=int, default=16, help="documents per step")
    parser.add_argument("--context", type=int, default=352, help="row length (a story of 4 images fits)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--block", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="lcl.json", help="file name in benchmarks/results/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = load_average()
    peak = matmul_peak()
    records = [r for p in args.preset for r in run(p, args.batch, args.context, args.steps, args.warmup, args.block,
                                                   peak["peak_gflops"])]
    meta = env_info()
    print(machine_line(meta) + f"; matmul peak {peak['peak_gflops']:.1f} GFLOP/s")
    print(markdown_table(
        ["model", "workload", "images", "real / row tokens", "ms", "docs/s", "images/s", "tokens/s", "GFLOP",
         "attention share", "MFU"],
        [[r["preset"], r["workload"], r["images"], f"{r['real_tokens']} / {r['row_tokens']}",
          f"{r['median_ms']:.0f}", f"{r['docs_per_s']:.1f}", f"{r['images_per_s']:.1f}",
          f"{r['tokens_per_s']:.0f}", f"{r['gflop']:.1f}", f"{r['attention_share']:.1%}", f"{r['mfu']:.1%}"]
         for r in records]))
    write_json(RESULTS / args.out, {"env": meta, "matmul_peak": peak, "load_average_before": load_before,
                                    "load_average_after": load_average(), "records": records})


if __name__ == "__main__":
    main()
