"""Training-step throughput of counterpoint's CLIP models against Hugging Face ``transformers``' CLIPModel.

In one process: the machine's fp32 matmul peak (best of large square matmuls), then for each model preset

* counterpoint's full training step: ``ContrastiveTask(model, "clip")`` forward (image + text towers,
  InfoNCE), backward, ``clip_grad_norm_(1.0)``, AdamW step from ``counterpoint.train.optim.build_optimizer``
  (lr 1e-3, wd 0.1, betas (0.9, 0.98), eps 1e-6: the training defaults) and the logit-scale clamp;
* the peer: ``CLIPModel`` from a ``CLIPConfig`` of the same sizes (GELU-tanh as ours, SDPA attention when the
  installed version supports it), randomly initialised, ``model(..., return_loss=True).loss`` backward,
  the same clipping and a ``torch.optim.AdamW`` with the same hyper-parameters (one parameter group);

on the same random batch (images ``[B, 3, S, S]``; tokens ``[B, L]`` with an ``<eot>`` at a random position
and padding after it; HF gets the same ids and the padding mask). FLOPs per step are *counted* with
``FlopCounterMode`` over one forward + backward (matmuls, convolutions, attention; the CPU flash-attention
kernels counted with torch's SDPA formula). Step times exclude ``--warmup`` steps; the two implementations
alternate in blocks of ``--block`` steps; the figure is the median over ``--steps`` steps. The ratio is
also given *paired*: the median over rounds of (HF block median / our block median), which cancels load
that comes and goes on a shared machine (it hits neighbouring blocks alike), and from the best steps (other
load only ever adds time, so the fastest step is the closest to a quiet machine). When our step is
slower than HF's, both are profiled (``torch.profiler``, alternating steps) and the top operators are saved
and printed.

    python benchmarks/bench_train.py --models tiny-vit small-vit --batch 128 --steps 20
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
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
from counterpoint.models.presets import create_model, resolve_spec
from counterpoint.objectives.contrastive import ContrastiveTask
from counterpoint.train.optim import build_optimizer

# The training defaults (counterpoint.config.TrainConfig / ObjectiveConfig).
LR, WEIGHT_DECAY, BETAS, EPS, GRAD_CLIP, MAX_LOGIT_SCALE = 1e-3, 0.1, (0.9, 0.98), 1e-6, 1.0, 100.0
PAD_ID, BOS_ID, EOT_ID = 0, 1, 2


def make_batch(spec: Any, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random images and token ids shaped like a real batch: content ids in ``[3, vocab - 1)``, one <eot>
    at a random position in ``[1, L)``, padding after it."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, spec.image_size, spec.image_size, generator=g)
    L = spec.context_length
    tokens = torch.randint(3, spec.vocab_size - 1, (batch, L), generator=g)
    eot_pos = torch.randint(1, L, (batch,), generator=g)
    pos = torch.arange(L)[None, :]
    tokens = torch.where(pos == eot_pos[:, None], torch.full_like(tokens, EOT_ID), tokens)
    tokens = torch.where(pos > eot_pos[:, None], torch.full_like(tokens, PAD_ID), tokens)
    return {"image": images, "text": tokens}


def hf_clip(spec: Any, attn: str) -> tuple[torch.nn.Module, str]:
    """``CLIPModel`` with the sizes of ``spec``; returns the model and the attention implementation used.

    HF pools the text at the *first* ``eos_token_id``, except for the legacy id 2, where it takes the argmax
    of the ids; so HF's <eot> is written as ``vocab - 1`` (see :func:`hf_inputs`) and ``eos_token_id`` set
    to it: both models pool at the same position.
    """
    from transformers import CLIPConfig, CLIPModel

    text = {"vocab_size": spec.vocab_size, "hidden_size": spec.text_width,
            "intermediate_size": 4 * spec.text_width, "num_hidden_layers": spec.text_layers,
            "num_attention_heads": spec.text_heads,
            "max_position_embeddings": spec.context_length, "hidden_act": "gelu_pytorch_tanh",
            "pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": spec.vocab_size - 1}
    vision = {"image_size": spec.image_size, "patch_size": spec.patch_size, "hidden_size": spec.vision_width,
              "intermediate_size": 4 * spec.vision_width, "num_hidden_layers": spec.vision_layers,
              "num_attention_heads": spec.vision_heads, "hidden_act": "gelu_pytorch_tanh"}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec.embed_dim)
    try:
        model = CLIPModel._from_config(config, attn_implementation=attn)
    except (ValueError, ImportError) as e:  # this transformers version has no such kernel for CLIP
        print(f"attn_implementation={attn!r} unavailable ({e}); using 'eager'")
        model = CLIPModel._from_config(config, attn_implementation="eager")
    used = {model.config._attn_implementation, model.vision_model.config._attn_implementation,
            model.text_model.config._attn_implementation}
    return model.train(), "/".join(sorted(str(u) for u in used))


def hf_inputs(batch: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    tokens = batch["text"]
    return {"input_ids": torch.where(tokens == EOT_ID, torch.full_like(tokens, vocab_size - 1), tokens),
            "pixel_values": batch["image"], "attention_mask": (tokens != PAD_ID).long()}


def autocast_ctx(precision: str) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def phase(name: str, on: bool) -> contextlib.AbstractContextManager:
    """A ``record_function`` label when profiling (so the profile splits forward / backward / optimiser)."""
    return torch.profiler.record_function(name) if on else contextlib.nullcontext()


def ours_fns(model: torch.nn.Module, batch: dict[str, torch.Tensor], precision: str):  # noqa: ANN201
    task = ContrastiveTask(model, "clip")
    opt = build_optimizer(model, LR, WEIGHT_DECAY, BETAS, EPS)

    def fwd_bwd() -> None:
        with autocast_ctx(precision):
            losses, _ = task(batch)
            loss = sum(losses.values())
        loss.backward()

    def step(labels: bool = False) -> None:
        with phase("step.forward", labels), autocast_ctx(precision):
            losses, _ = task(batch)
            loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        with phase("step.backward", labels):
            loss.backward()
        with phase("step.clip_grad_norm", labels):
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        with phase("step.optimizer", labels):
            opt.step()
            model.clamp_logit_scale(MAX_LOGIT_SCALE)

    return fwd_bwd, step, opt


def hf_fns(model: torch.nn.Module, inputs: dict[str, torch.Tensor], precision: str):  # noqa: ANN201
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)

    def fwd_bwd() -> None:
        with autocast_ctx(precision):
            loss = model(**inputs, return_loss=True).loss
        loss.backward()

    def step(labels: bool = False) -> None:
        with phase("step.forward", labels), autocast_ctx(precision):
            loss = model(**inputs, return_loss=True).loss
        opt.zero_grad(set_to_none=True)
        with phase("step.backward", labels):
            loss.backward()
        with phase("step.clip_grad_norm", labels):
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        with phase("step.optimizer", labels):
            opt.step()

    return fwd_bwd, step, opt


def paired_ratio(ours: list[float], hf: list[float], block: int) -> float:
    """Median over alternation rounds of HF's block median step time over ours (> 1: ours is faster)."""
    rounds = range(0, min(len(ours), len(hf)), block)
    return median([median(hf[i:i + block]) / median(ours[i:i + block]) for i in rounds])


def profile_steps(steps: dict[str, Any], rounds: int, top: int) -> dict[str, dict[str, Any]]:
    """Profile labelled steps of each implementation with ``torch.profiler``, alternating one step of each
    per round (``rounds`` rounds, after one untimed labelled step each) so that load on the machine hits
    both alike; per implementation, the top operators by self CPU time per step and each phase's time."""
    from torch.profiler import ProfilerActivity, profile

    acc: dict[str, dict[str, list[float]]] = {name: {} for name in steps}
    for step in steps.values():
        step(labels=True)
    for _ in range(rounds):
        for name, step in steps.items():
            with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
                step(labels=True)
            for e in prof.key_averages():
                a = acc[name].setdefault(e.key, [0, 0.0, 0.0])
                a[0] += e.count
                a[1] += e.self_cpu_time_total
                a[2] += e.cpu_time_total
    out = {}
    for name, events in acc.items():
        phases = {k: v[2] / rounds / 1e3 for k, v in events.items() if k.startswith("step.")}
        ops = sorted(((k, v) for k, v in events.items() if not k.startswith("step.")),
                     key=lambda kv: -kv[1][1])
        total_self = sum(v[1] for _, v in ops) / rounds / 1e3
        rows = [{"op": k, "calls_per_step": v[0] / rounds, "self_ms_per_step": v[1] / rounds / 1e3,
                 "total_ms_per_step": v[2] / rounds / 1e3, "self_share": v[1] / rounds / 1e3 / total_self}
                for k, v in ops[:top]]
        out[name] = {"steps": rounds, "phases_ms_per_step": phases, "self_ms_per_step_all_ops": total_self,
                     "top_ops": rows}
    return out


def profile_table(name: str, prof: dict[str, Any]) -> str:
    phases = ", ".join(f"{k.removeprefix('step.')} {v:.1f} ms" for k, v in prof["phases_ms_per_step"].items())
    rows = [(f"`{r['op']}`", f"{r['calls_per_step']:.0f}", f"{r['self_ms_per_step']:.2f}",
             f"{100 * r['self_share']:.1f}%", f"{r['total_ms_per_step']:.2f}") for r in prof["top_ops"]]
    head = ["op", "calls/step", "self ms/step", "self share", "total ms/step"]
    return f"{name}: {phases}\n\n" + markdown_table(head, rows, "lrrrr")


def bench_model(name: str, args: argparse.Namespace,
                peaks: dict[str, float]) -> tuple[list[dict], list[dict]]:
    spec = resolve_spec(name)
    if spec.image_tower != "vit":
        raise SystemExit(f"{name}: only ViT presets have a CLIPModel peer")
    batch = make_batch(spec, args.batch, args.seed)
    torch.manual_seed(args.seed)
    ours = create_model(name).train()
    hf, attn_used = hf_clip(spec, args.hf_attn)
    inputs = hf_inputs(batch, spec.vocab_size)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    records, profiles = [], []
    for precision in args.precisions:
        o_fb, o_step, o_opt = ours_fns(ours, batch, precision)
        h_fb, h_step, h_opt = hf_fns(hf, inputs, precision)
        flops = {}
        for impl, fb, model in (("counterpoint", o_fb, ours), ("hf", h_fb, hf)):
            flops[impl] = count_flops(fb)
            model.zero_grad(set_to_none=True)
        load_before = load_average()
        t0 = time.perf_counter()
        times = interleaved_timing({"counterpoint": o_step, "hf": h_step}, args.steps, args.warmup,
                                   args.block)
        wall = time.perf_counter() - t0
        load_after = load_average()
        peak = peaks[precision]
        rec: dict[str, Any] = {"model": name, "precision": precision, "batch": args.batch,
                               "image_size": spec.image_size, "context_length": spec.context_length,
                               "hf_attn_implementation": attn_used, "threads": torch.get_num_threads(),
                               "steps": args.steps, "warmup": args.warmup, "block": args.block,
                               "load_avg_before": load_before, "load_avg_after": load_after,
                               "timing_wall_s": wall, "peak_gflops": peak}
        for impl, n_params in (("counterpoint", n_ours), ("hf", n_hf)):
            ts = sorted(times[impl])
            med = median(ts)
            total, per_op = flops[impl]
            rec[impl] = {"params": n_params, "step_s_median": med, "step_s_min": ts[0], "step_s_max": ts[-1],
                         "step_s_p25": ts[len(ts) // 4], "step_s_p75": ts[(3 * len(ts)) // 4],
                         "step_s_all": times[impl], "samples_per_s": args.batch / med,
                         "flops_per_step": total, "flops_by_op": per_op,
                         "achieved_gflops": total / med / 1e9, "mfu": total / med / 1e9 / peak}
        rec["ratio_ours_over_hf"] = rec["counterpoint"]["samples_per_s"] / rec["hf"]["samples_per_s"]
        rec["ratio_paired"] = paired_ratio(times["counterpoint"], times["hf"], args.block)
        rec["ratio_best_step"] = rec["hf"]["step_s_min"] / rec["counterpoint"]["step_s_min"]
        records.append(rec)
        print(f"{name} {precision}: ours {rec['counterpoint']['samples_per_s']:.1f} samples/s, "
              f"HF {rec['hf']['samples_per_s']:.1f} samples/s, ratio {rec['ratio_ours_over_hf']:.3f} "
              f"(paired {rec['ratio_paired']:.3f}), "
              f"ours MFU {100 * rec['counterpoint']['mfu']:.1f}%, load {load_before} -> {load_after}",
              flush=True)
        slower = rec["ratio_paired"] < 1.0
        if args.profile == "always" or (args.profile == "auto" and slower):
            prof = {"model": name, "precision": precision,
                    "reason": "slower than HF" if slower else "requested",
                    **profile_steps({"counterpoint": o_step, "hf": h_step}, args.profile_steps,
                                    args.profile_top)}
            profiles.append(prof)
            print()
            print(profile_table(f"counterpoint {name} {precision}", prof["counterpoint"]))
            print()
            print(profile_table(f"HF CLIPModel {name} {precision}", prof["hf"]))
            print()
        del o_opt, h_opt
    return records, profiles


def table(records: list[dict]) -> str:
    rows = []
    for r in records:
        o, h = r["counterpoint"], r["hf"]
        load = f"{r['load_avg_before'][0]} / {r['load_avg_after'][0]}"
        rows.append((r["model"], r["precision"], r["batch"], f"{o['samples_per_s']:.1f}",
                     f"{h['samples_per_s']:.1f}", f"{r['ratio_ours_over_hf']:.2f}", f"{r['ratio_paired']:.2f}",
                     f"{r['ratio_best_step']:.2f}",
                     f"{1e3 * o['step_s_median']:.0f}", f"{1e3 * h['step_s_median']:.0f}",
                     f"{o['flops_per_step'] / 1e9:.1f}", f"{o['achieved_gflops']:.1f}",
                     f"{r['peak_gflops']:.0f}", f"{100 * o['mfu']:.1f}%", f"{100 * h['mfu']:.1f}%",
                     r["steps"], load))
    head = ["model", "precision", "batch", "ours samples/s", "HF samples/s", "ours/HF", "ours/HF paired",
            "ours/HF best step",
            "ours ms/step", "HF ms/step", "GFLOP/step", "ours GFLOP/s", "matmul peak GFLOP/s", "ours MFU", "HF MFU",
            "steps", "load 1 min before / after"]
    return markdown_table(head, rows, "llr" + "r" * (len(head) - 3))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny-vit", "small-vit"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per implementation (median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per implementation first")
    ap.add_argument("--block", type=int, default=2, help="steps per turn when alternating implementations")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--bf16", action="store_true", help="also time both under bf16 autocast")
    ap.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32"],
                    help="precisions to time (--bf16 adds bf16)")
    ap.add_argument("--hf-attn", default="sdpa", help="CLIPModel attn_implementation (falls back to eager)")
    ap.add_argument("--peak-sizes", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--peak-repeats", type=int, default=5)
    ap.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                    help="profile both steps when ours is slower (auto), always, or never")
    ap.add_argument("--profile-steps", type=int, default=5, help="profiled steps per implementation")
    ap.add_argument("--profile-top", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "train_step.json")
    ap.add_argument("--merge", action="store_true",
                    help="keep records of other models/precisions already in --out (replace those rerun)")
    args = ap.parse_args(argv)
    if args.bf16 and "bf16" not in args.precisions:
        args.precisions.append("bf16")

    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers  # noqa: F401 -- imported so env_info records its version

    meta = env_info()
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S")
    print(machine_line(meta), flush=True)
    # The fp32 peak always (it is the machine's reference); the bf16 one when bf16 is timed.
    peaks_full = {"fp32": matmul_peak(args.peak_sizes, args.peak_repeats, "float32")}
    if "bf16" in args.precisions:
        peaks_full["bf16"] = matmul_peak(args.peak_sizes, args.peak_repeats, "bfloat16")
    peaks = {k: v["peak_gflops"] for k, v in peaks_full.items()}
    print(", ".join(f"{k} matmul peak {v:.1f} GFLOP/s" for k, v in peaks.items()), flush=True)

    records: list[dict] = []
    profiles: list[dict] = []
    for name in args.models:
        r, p = bench_model(name, args, peaks)
        records += [{"run": run_id, **x} for x in r]
        profiles += p

    old: dict[str, Any] = {}
    if args.merge and args.out.exists():
        old = json.loads(args.out.read_text())
        done = {(r["model"], r["precision"]) for r in records}
        records = [r for r in old["records"] if (r["model"], r["precision"]) not in done] + records
        profiles = [p for p in old.get("profiles", []) if (p["model"], p["precision"]) not in done] + profiles
    md = table(records)
    print()
    print(md)
    meta["command_args"] = vars(args) | {"out": str(args.out)}
    run = {"run": run_id, "meta": meta, "matmul_peak": peaks_full, "models": args.models,
           "precisions": args.precisions}
    used = {r.get("run") for r in records}  # runs whose records were all replaced are dropped
    runs = [x for x in old.get("runs", []) if x.get("run") in used] + [run]
    write_json(args.out, {"runs": runs, "records": records, "profiles": profiles, "table_markdown": md})


if __name__ == "__main__":
    main()
