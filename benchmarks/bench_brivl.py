"""Cost of a BriVL training step against a CLIP step on the same towers and batch, and the cost of its queues.

Full training steps (zero_grad, the task's forward and backward, AdamW step, the task's after-step update),
timed interleaved in blocks (``common.interleaved_timing``) so machine drift hits both alike:

* ``clip``: ``ContrastiveTask`` (InfoNCE over the batch), after-step: the logit-scale clamp;
* ``brivl``: ``BriVLTask`` with queues of ``--queue`` keys: the same query forward and backward, plus the
  momentum towers' forward (no graph) for the keys, logits against the queue, and after the step the enqueue
  and the EMA of every momentum parameter (foreach).

Reported: median step times and brivl / clip (target <= 1.45). Separately, the queue's own cost at
``--queue-k`` keys of dimension ``--queue-d`` (default K = 65,536, d = 512): the logits of a batch of queries
against both queues, their backward, and the enqueue. JSON in benchmarks/results/brivl.json.

    python benchmarks/bench_brivl.py                          # tiny-cnn and tiny-vit, batch 32, queue 4096
    python benchmarks/bench_brivl.py --preset small-vit --batch 64 --steps 10
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from common import RESULTS, env_info, interleaved_timing, load_average, machine_line, markdown_table, median, write_json
from counterpoint.data.tokenizer import Tokenizer
from counterpoint.models.presets import resolve_spec
from counterpoint.objectives.brivl import BriVLConfig, BriVLTask, multi_positive_ce, queue_logits
from counterpoint.objectives.contrastive import ContrastiveConfig, ContrastiveTask
from counterpoint.train.optim import build_optimizer


def _step(task: torch.nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, step: int) -> None:
    optimizer.zero_grad(set_to_none=True)
    losses, _ = task(batch, step)
    sum(losses.values()).backward()
    optimizer.step()
    task.after_step(step)


def run_steps(preset: str, batch_size: int, queue: int, steps: int, warmup: int, block: int) -> dict[str, Any]:
    spec = resolve_spec(preset, vocab_size=1024)
    gen = torch.Generator().manual_seed(0)
    size = spec.image_size
    batch = {"image": torch.randn(batch_size, 3, size, size, generator=gen),
             "text": torch.randint(4, 1024, (batch_size, spec.context_length), generator=gen)}
    tasks = {}
    tokenizer = Tokenizer.train(["a red star"], 300, spec.context_length)
    torch.manual_seed(0)
    tasks["clip"] = ContrastiveTask.build(ContrastiveConfig(), spec, tokenizer)
    torch.manual_seed(0)
    tasks["brivl"] = BriVLTask.build(BriVLConfig(queue_size=queue), spec, tokenizer)
    fns = {}
    for name, task in tasks.items():
        task.train()
        opt = build_optimizer(task, 1e-4, 0.1, (0.9, 0.98), 1e-6)
        counter = iter(range(10**9))
        fns[name] = lambda t=task, o=opt, c=counter: _step(t, batch, o, next(c))
    times = interleaved_timing(fns, steps, warmup, block)
    ms = {k: 1000 * median(v) for k, v in times.items()}
    return {"preset": preset, "batch_size": batch_size, "queue": queue, "steps": steps, "median_ms": ms,
            "brivl_over_clip": ms["brivl"] / ms["clip"]}


def run_queue(batch_size: int, k: int, d: int, steps: int, warmup: int, block: int) -> dict[str, Any]:
    """The queues alone: logits of ``batch_size`` queries against two queues of ``k`` x ``d`` keys with
    their backward, and the enqueue of the batch's keys."""
    gen = torch.Generator().manual_seed(0)
    queues = [F.normalize(torch.randn(k, d, generator=gen), dim=1) for _ in range(2)]
    u = F.normalize(torch.randn(batch_size, d, generator=gen), dim=1).requires_grad_()
    v = F.normalize(torch.randn(batch_size, d, generator=gen), dim=1).requires_grad_()
    keys = [F.normalize(torch.randn(batch_size, d, generator=gen), dim=1) for _ in range(2)]
    positives = torch.zeros(batch_size, 1 + k, dtype=torch.bool)
    positives[:, 0] = True
    ptr = [0]

    def loss_and_backward() -> None:
        loss = (multi_positive_ce(queue_logits(u, keys[1], queues[1]) / 0.07, positives)
                + multi_positive_ce(queue_logits(v, keys[0], queues[0]) / 0.07, positives))
        loss.backward()

    def enqueue() -> None:
        rows = (ptr[0] + torch.arange(batch_size)) % k
        for q, key in zip(queues, keys):
            q.index_copy_(0, rows, key)
        ptr[0] = (ptr[0] + batch_size) % k

    times = interleaved_timing({"logits+backward": loss_and_backward, "enqueue": enqueue}, steps, warmup, block)
    ms = {name: 1000 * median(t) for name, t in times.items()}
    return {"batch_size": batch_size, "k": k, "d": d, "median_ms": ms,
            "queue_bytes": 2 * k * d * 4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", nargs="+", default=["tiny-cnn", "tiny-vit"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--queue", type=int, default=4096, help="queue size of the step comparison")
    parser.add_argument("--queue-k", type=int, default=65_536)
    parser.add_argument("--queue-d", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="brivl.json", help="file name in benchmarks/results/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = load_average()
    steps = [run_steps(p, args.batch, args.queue, args.steps, args.warmup, args.block) for p in args.preset]
    queue = run_queue(args.batch, args.queue_k, args.queue_d, args.steps, args.warmup, args.block)
    meta = env_info()
    print(machine_line(meta))
    print(markdown_table(["model", "batch", "queue", "clip ms", "brivl ms", "brivl / clip (<= 1.45)"],
                         [[r["preset"], r["batch_size"], r["queue"], f"{r['median_ms']['clip']:.1f}",
                           f"{r['median_ms']['brivl']:.1f}", f"{r['brivl_over_clip']:.2f}x"] for r in steps]))
    print(f"queues of K={queue['k']} x d={queue['d']} (two, {queue['queue_bytes'] / 2**20:.0f} MiB), batch "
          f"{queue['batch_size']}: logits + backward {queue['median_ms']['logits+backward']:.1f} ms, enqueue "
          f"{queue['median_ms']['enqueue']:.2f} ms")
    write_json(RESULTS / args.out, {"env": meta, "load_average_before": load_before,
                                    "load_average_after": load_average(), "steps": steps, "queue": queue})


if __name__ == "__main__":
    main()
