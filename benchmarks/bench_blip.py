"""BLIP costs: caption decoding with the KV cache against without it, and a BLIP training step against a CLIP
step on the same towers and batch.

* Decoding: greedy captions of ``--images`` images, exactly ``--tokens`` new tokens each (the end token is
  suppressed, so both paths do the same steps), with the cache (the image's cross-attention keys/values once,
  one new position per step) and without it (the whole prefix again every step). Both run the ViT once on
  the images; its time is measured alongside and the decoding speed-up is reported without it as well.
  Target: >= 3x at 30 tokens.
* Step: zero_grad, forward, backward, AdamW step and after-step update; BLIP (ITC with momentum encoders and
  queues, ITM on 3x the batch, LM) against CLIP (InfoNCE) on the same ViT and text width, timed interleaved
  (``common.interleaved_timing``).

    python benchmarks/bench_blip.py                       # tiny-vit, batch 32, 30 tokens
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from common import RESULTS, env_info, interleaved_timing, load_average, machine_line, markdown_table, median, write_json
from counterpoint.data.tokenizer import Tokenizer
from counterpoint.models import decoding
from counterpoint.models.presets import resolve_spec
from counterpoint.objectives.blip import BLIPConfig, BLIPTask
from counterpoint.objectives.contrastive import ContrastiveConfig, ContrastiveTask
from counterpoint.train.optim import build_optimizer


def decoding_times(task: BLIPTask, images: int, tokens: int, steps: int, warmup: int) -> dict[str, Any]:
    model = task.model.eval()
    with torch.no_grad():
        model.text.token_embed.weight[model.eot_id] = -1e4  # <eot> never wins: every caption is `tokens` long
    x = torch.randn(images, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(0))
    fns = {"cache": lambda: decoding.greedy(model, x, [], tokens),
           "no cache": lambda: decoding.greedy(model, x, [], tokens, use_cache=False),
           "image encoder": lambda: model.image_tokens(x)}  # run once by both: not decoding
    assert fns["cache"]() == fns["no cache"]() and len(fns["cache"]()[0]) == tokens
    with torch.no_grad():
        times = interleaved_timing(fns, steps, warmup, 1)
    ms = {k: 1000 * median(v) for k, v in times.items()}
    encoder = ms["image encoder"]
    return {"images": images, "tokens": tokens, "median_ms": ms, "speedup": ms["no cache"] / ms["cache"],
            "decoding_speedup": (ms["no cache"] - encoder) / (ms["cache"] - encoder)}


def step_times(preset: str, batch_size: int, steps: int, warmup: int, block: int) -> dict[str, Any]:
    spec = resolve_spec(preset, vocab_size=1024, context_length=40)
    tokenizer = Tokenizer.train(["a picture of a red star"], 300, spec.context_length, BLIPTask.special_tokens)
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(8, 1024, (batch_size, spec.context_length), generator=gen)
    text[:, 0], text[:, 25], text[:, 26:] = tokenizer.sot_id, tokenizer.eot_id, tokenizer.pad_id
    batch = {"image": torch.randn(batch_size, 3, spec.image_size, spec.image_size, generator=gen), "text": text}
    torch.manual_seed(0)
    tasks = {"clip": ContrastiveTask.build(ContrastiveConfig(), spec, tokenizer),
             "blip": BLIPTask.build(BLIPConfig(queue_size=batch_size * 64), spec, tokenizer)}
    fns = {}
    for name, task in tasks.items():
        task.train()
        opt = build_optimizer(task, 1e-4, 0.05, (0.9, 0.98), 1e-6)

        def step(t: torch.nn.Module = task, o: torch.optim.Optimizer = opt) -> None:
            o.zero_grad(set_to_none=True)
            losses, _ = t(batch, 10)
            sum(losses.values()).backward()
            o.step()
            t.after_step(10)

        fns[name] = step
    times = interleaved_timing(fns, steps, warmup, block)
    ms = {k: 1000 * median(v) for k, v in times.items()}
    return {"preset": preset, "batch_size": batch_size, "median_ms": ms, "blip_over_clip": ms["blip"] / ms["clip"],
            "decoding_task": tasks["blip"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny-vit")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=8, help="images captioned at once")
    parser.add_argument("--tokens", type=int, default=30, help="new tokens per caption")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--block", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="blip.json", help="file name in benchmarks/results/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = load_average()
    step = step_times(args.preset, args.batch, args.steps, args.warmup, args.block)
    decode = decoding_times(step.pop("decoding_task"), args.images, args.tokens, args.steps, args.warmup)
    meta = env_info()
    print(machine_line(meta))
    print(markdown_table(["model", "batch", "clip ms", "blip ms", "blip / clip"],
                         [[step["preset"], step["batch_size"], f"{step['median_ms']['clip']:.1f}",
                           f"{step['median_ms']['blip']:.1f}", f"{step['blip_over_clip']:.2f}x"]]))
    print(markdown_table(["images", "tokens", "with cache ms", "without ms", "image encoder ms (in both)",
                          "speed-up", "decoding speed-up (>= 3x)"],
                         [[decode["images"], decode["tokens"], f"{decode['median_ms']['cache']:.1f}",
                           f"{decode['median_ms']['no cache']:.1f}", f"{decode['median_ms']['image encoder']:.1f}",
                           f"{decode['speedup']:.2f}x", f"{decode['decoding_speedup']:.2f}x"]]))
    write_json(RESULTS / args.out, {"env": meta, "load_average_before": load_before,
                                    "load_average_after": load_average(), "step": step, "decoding": decode})


if __name__ == "__main__":
    main()
