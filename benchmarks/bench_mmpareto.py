"""Cost of an MMPareto training step against a uniform step and against the published procedure.

Three full training steps (zero_grad, forward, gradients, SGD step) on the same model and batch, timed
interleaved in blocks (``common.interleaved_timing``) so machine drift hits all alike:

* ``uniform``: one backward of L_mm + sum_k L_k (``counterpoint.optim.Uniform``);
* ``mmpareto``: ``counterpoint.optim.MMPareto`` (gamma 1.5, per_tensor): one forward, two backward passes
  (L_mm with retain_graph, then sum_k L_k), flat per-encoder cosines and weights, per-tensor rescale;
* ``published``: the official MMPareto training step (Wei & Hu, ICML 2024, github.com/GeWu-Lab/MMPareto_ICML2024,
  ``main.py``) restated on this model:

      loss_mm.backward(retain_graph=True);   record every encoder grad (clone); zero_grad
      loss_k.backward(retain_graph=True);    record, zero_grad                  (once per modality)
      cos_k = cosine(flat grad_mm_k, flat grad_k)
      weights_k = (0.5, 0.5) if cos_k > 0 else min-norm element of {grad_mm_k, grad_k}
      (loss_mm + sum_k loss_k).backward()   # the summed gradient, kept as-is for the heads
      per encoder parameter tensor: new = 2 w_mm grad_mm + 2 w_k grad_k;
                                    grad = gamma * new * max(1, ||summed grad|| / ||new||)
      optimizer.step()

  i.e. 1 forward and M + 2 backward passes (4 for two modalities). The encoder a parameter belongs to is
  known from the parameter groups rather than by splitting names, and the two-gradient min-norm element is
  ``counterpoint.optim.min_norm_two`` (the official MinNormSolver's two-vector closed form); neither
  changes the number of passes, which is what costs.

Reported: median step times and the ratios mmpareto / uniform (target <= 1.7) and published / mmpareto
(target >= 1.4), each from one run. JSON in benchmarks/results/mmpareto.json.

    python benchmarks/bench_mmpareto.py                       # both presets, 20 timed steps each
    python benchmarks/bench_mmpareto.py --preset resnet18 --steps 10 --batch 32
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from common import RESULTS, env_info, interleaved_timing, load_average, machine_line, markdown_table, median, write_json
from counterpoint.models.encoders import EncoderConfig
from counterpoint.models.fusion import MultimodalClassifier, build_classifier
from counterpoint.objectives.balance import classification_losses
from counterpoint.optim import MMPareto, Uniform, min_norm_two

# "recipe": the encoders of configs/balance_av.yaml at the AV benchmark's input sizes, batch 64; "resnet18":
# the published encoders (ResNet-18 stages, 64..512 channels) on 32 x 32 inputs, batch 16, so that a CPU step
# stays near a second.
PRESETS: dict[str, dict[str, Any]] = {
    "recipe": {"audio": (28, 32), "visual": (3, 16, 16), "dim": 64, "batch": 64,
               "encoders": {"audio": EncoderConfig(stem_stride=2), "visual": EncoderConfig()}},
    "resnet18": {"audio": (32, 32), "visual": (3, 32, 32), "dim": 512, "batch": 16,
                 "encoders": {k: EncoderConfig(widths=(64, 128, 256, 512), depths=(2, 2, 2, 2))
                              for k in ("audio", "visual")}},
}


def published_step(model: MultimodalClassifier, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                   gamma: float = 1.5) -> None:
    """The official one-backward-per-loss MMPareto step (see the module docstring)."""
    groups = model.parameter_groups()
    mods = model.modalities
    optimizer.zero_grad(set_to_none=True)
    losses = classification_losses(model(batch), batch["label"])
    losses["fused"].backward(retain_graph=True)
    grad_mm = {k: [p.grad.clone() for p in groups[k]] for k in mods}
    optimizer.zero_grad(set_to_none=True)
    grad_u = {}
    for k in mods:
        losses[k].backward(retain_graph=True)
        grad_u[k] = [p.grad.clone() for p in groups[k]]
        optimizer.zero_grad(set_to_none=True)
    weights = {}
    for k in mods:
        gm = torch.cat([g.flatten() for g in grad_mm[k]])
        gu = torch.cat([g.flatten() for g in grad_u[k]])
        if F.cosine_similarity(gm, gu, dim=0) > 0:
            weights[k] = (0.5, 0.5)
        else:
            alpha = float(min_norm_two(gm, gu)[0])
            weights[k] = (alpha, 1 - alpha)
    sum(losses.values()).backward()
    for k in mods:
        w_mm, w_u = weights[k]
        for p, gm, gu in zip(groups[k], grad_mm[k], grad_u[k]):
            new = 2 * w_mm * gm + 2 * w_u * gu
            ratio = torch.norm(p.grad) / torch.norm(new)
            p.grad = gamma * new * ratio if ratio > 1 else gamma * new
    optimizer.step()


def combiner_step(model: MultimodalClassifier, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                  combiner) -> None:  # noqa: ANN001
    optimizer.zero_grad(set_to_none=True)
    losses = classification_losses(model(batch), batch["label"])
    combiner.combine(losses, model.parameter_groups())
    optimizer.step()


def run(preset: str, batch_size: int | None, steps: int, warmup: int, block: int, threads: int,
        device: str = "cpu") -> dict[str, Any]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    spec = PRESETS[preset]
    batch_size = batch_size or spec["batch"]
    gen = torch.Generator().manual_seed(0)
    batch = {"audio": torch.randn(batch_size, *spec["audio"], generator=gen),
             "visual": torch.randint(0, 256, (batch_size, *spec["visual"]), generator=gen, dtype=torch.uint8),
             "label": torch.randint(0, 8, (batch_size,), generator=gen)}
    batch = {k: v.to(device) for k, v in batch.items()}
    models, fns = {}, {}
    procedures = {"uniform": Uniform(), "mmpareto": MMPareto(gamma=1.5), "published": None}
    for name, combiner in procedures.items():
        torch.manual_seed(0)  # identical weights for every procedure
        model = build_classifier({k: batch[k] for k in ("audio", "visual")}, 8, spec["dim"], "concat",
                                 spec["encoders"]).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4)
        models[name] = model
        fns[name] = ((lambda m=model, o=opt: published_step(m, batch, o)) if combiner is None else
                     (lambda m=model, o=opt, c=combiner: combiner_step(m, batch, o, c)))
    times = interleaved_timing(fns, steps, warmup, block, torch.cuda.synchronize if device == "cuda" else None)
    ms = {k: 1000 * median(v) for k, v in times.items()}
    params = sum(p.numel() for p in models["uniform"].parameters())
    return {"preset": preset, "device": device, "batch_size": batch_size, "steps": steps, "params": params,
            "median_ms": ms, "all_ms": {k: [round(1000 * t, 3) for t in v] for k, v in times.items()},
            "mmpareto_over_uniform": ms["mmpareto"] / ms["uniform"],
            "published_over_mmpareto": ms["published"] / ms["mmpareto"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), nargs="+", default=["recipe", "resnet18"])
    parser.add_argument("--batch", type=int, default=None, help="default: the preset's")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", default="mmpareto.json", help="file name in benchmarks/results/")
    args = parser.parse_args()
    load_before = load_average()
    results = [run(p, args.batch, args.steps, args.warmup, args.block, args.threads, args.device)
               for p in args.preset]
    meta = env_info()
    rows = [[r["preset"], r["batch_size"], f"{r['params'] / 1e6:.2f}M", f"{r['median_ms']['uniform']:.1f}",
             f"{r['median_ms']['mmpareto']:.1f}", f"{r['median_ms']['published']:.1f}",
             f"{r['mmpareto_over_uniform']:.2f}x", f"{r['published_over_mmpareto']:.2f}x"] for r in results]
    print(machine_line(meta))
    print(markdown_table(["model", "batch", "params", "uniform ms", "mmpareto ms", "published ms",
                          "mmpareto / uniform (<= 1.7)", "published / mmpareto (>= 1.4)"], rows))
    write_json(RESULTS / args.out, {"env": meta, "load_average_before": load_before,
                                           "load_average_after": load_average(), "results": results})


if __name__ == "__main__":
    main()
