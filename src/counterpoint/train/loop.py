"""Contrastive pretraining loop: data -> task -> backward -> clip -> step, with logging and checkpoints.

Exact resume: the batch order is a function of (seed, epoch), per-step augmentation randomness of
(seed, step), the learning rate of the step, and everything else that changes (weights, buffers, Adam
moments) is in the checkpoint. A run stopped at step k and resumed therefore replays the very same steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from counterpoint.config import RunConfig, save_config
from counterpoint.data.pairs import PairSet, batch_indices, load_pairs
from counterpoint.data.readers import detect_format
from counterpoint.data.tokenizer import Tokenizer
from counterpoint.data.transforms import normalize, random_translate
from counterpoint.errors import UserError
from counterpoint.evaluate.runner import evaluate_model, load_classes
from counterpoint.models.presets import ModelSpec, build_model, resolve_spec
from counterpoint.models.two_tower import TwoTower
from counterpoint.objectives.contrastive import ContrastiveTask
from counterpoint.report.plots import plot_curves, plot_eval
from counterpoint.report.run_report import read_metrics, write_report
from counterpoint.train import checkpoint as ckpt
from counterpoint.train.optim import build_optimizer, lr_at


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but CUDA is not available; use train.device=cpu")
    return torch.device(name)


def _spec_from_json(data: dict[str, Any]) -> ModelSpec:
    tuples = {f.name for f in dataclasses.fields(ModelSpec) if "tuple" in str(f.type)}
    return ModelSpec(**{k: tuple(v) if k in tuples else v for k, v in data.items()})


def load_run_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[TwoTower, Tokenizer, dict]:
    """Model, tokenizer and checkpoint metadata from a run directory or checkpoint folder."""
    folder = ckpt.resolve_checkpoint(path)
    meta = ckpt.read_state(folder)
    spec = _spec_from_json(meta["model_spec"])
    tokenizer = Tokenizer.from_file(folder / "tokenizer.json", spec.context_length)
    bias = 0.0 if meta.get("logit_bias") else None  # the value comes from the weights
    model = build_model(spec, init_logit_bias=bias, pad_id=tokenizer.pad_id, eot_id=tokenizer.eot_id)
    ckpt.load_model_weights(folder, model)
    return model.to(device).eval(), tokenizer, meta


def _prepare_run_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> Path:
    run_dir = Path(cfg.out_dir)
    has_run = (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists()
    if has_run and not (resume or overwrite):
        raise UserError(f"run directory '{run_dir}' already holds a run; pass --resume to continue it, "
                        f"--overwrite to start again, or set out_dir=... to a new folder")
    if overwrite and not resume and run_dir.exists():
        for name in ("metrics.jsonl", "eval.json", "report.md"):
            (run_dir / name).unlink(missing_ok=True)
        import shutil

        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop log lines after ``last_step`` so a resumed run's log reads like an uninterrupted one."""
    rows = [r for r in read_metrics(path) if r["step"] <= last_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_batch(pairs: PairSet, tokens: torch.Tensor, idx: torch.Tensor, cfg: RunConfig, step: int,
               device: torch.device) -> dict[str, torch.Tensor]:
    images = pairs.images[idx]
    if cfg.train.translate > 0:
        gen = torch.Generator().manual_seed(cfg.seed * 7_919 + step)
        images = random_translate(images, cfg.train.translate, gen)
    return {"image": normalize(images.to(device, non_blocking=True)), "text": tokens[idx].to(device)}


def check_data_paths(cfg: RunConfig) -> None:
    """Fail before training, not after it, when an evaluation input is missing."""
    detect_format(cfg.data.train)
    if cfg.eval.retrieval and cfg.data.test:
        detect_format(cfg.data.test)
    if (cfg.eval.zeroshot or cfg.eval.linear_probe) and cfg.data.zeroshot:
        detect_format(cfg.data.zeroshot)
        load_classes(cfg.data.classes)


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Train, evaluate and report; returns the run directory."""
    check_data_paths(cfg)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    run_dir = _prepare_run_dir(cfg, resume, overwrite)
    save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.seed)

    resume_from = ckpt.resolve_checkpoint(run_dir) if resume and (run_dir / "checkpoints" / "latest").exists() else None
    meta = ckpt.read_state(resume_from) if resume_from else None
    spec = (_spec_from_json(meta["model_spec"]) if meta else
            resolve_spec(cfg.model.name, embed_dim=cfg.model.embed_dim, image_size=cfg.model.image_size,
                         context_length=cfg.model.context_length, vocab_size=cfg.model.vocab_size))

    pairs = load_pairs(cfg.data.train, spec.image_size, cfg.data.caption_key, cfg.data.max_train_samples,
                       cfg.train.progress, desc="reading train")
    if meta:
        tokenizer = Tokenizer.from_file(resume_from / "tokenizer.json", spec.context_length)
    else:
        tokenizer = Tokenizer.train(pairs.captions, spec.vocab_size, spec.context_length)
        spec = dataclasses.replace(spec, vocab_size=tokenizer.vocab_size)
    tokens = tokenizer(pairs.captions)  # [N, L], tokenised once for the whole run

    bias = cfg.objective.init_logit_bias if cfg.objective.name == "siglip" else None
    model = build_model(spec, cfg.objective.init_temperature, bias, pad_id=tokenizer.pad_id,
                        eot_id=tokenizer.eot_id).to(device)
    optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.betas, cfg.train.eps)
    start_step = 0
    if meta:
        ckpt.load_model_weights(resume_from, model)
        ckpt.load_optimizer_state(resume_from, optimizer, meta)
        start_step = meta["step"]
        _truncate_metrics(run_dir / "metrics.jsonl", start_step)
    task = ContrastiveTask(model, cfg.objective.name, cfg.objective.margin, cfg.objective.chunk_size)

    bs = cfg.train.batch_size
    steps_per_epoch = len(pairs) // bs
    total_steps = max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    end_step = min(total_steps, cfg.train.max_steps or total_steps)
    extra = {"model_spec": dataclasses.asdict(spec), "model_name": cfg.model.name, "total_steps": total_steps,
             "logit_bias": model.logit_bias is not None,
             "data_skipped": pairs.skips.as_dict()}
    (run_dir / "data.json").write_text(json.dumps({"train": {"pairs": len(pairs), "skipped": pairs.skips.as_dict()}}))
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.train.precision == "bf16"
                else nullcontext())

    model.train()
    log = open(run_dir / "metrics.jsonl", "a")
    bar = tqdm(total=(end_step - start_step) * bs, unit=" samples", unit_scale=True, desc="train",
               disable=not cfg.train.progress, dynamic_ncols=True)
    t_last = time.perf_counter()
    batches = batch_indices(len(pairs), bs, cfg.seed, start_step)
    try:
        for step, idx in batches:
            if step >= end_step:
                break
            lr = lr_at(step, total_steps, cfg.train.lr, cfg.train.warmup_steps, cfg.train.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = make_batch(pairs, tokens, idx, cfg, step, device)
            with autocast:
                losses, metrics = task(batch)
                loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                         if cfg.train.grad_clip > 0 else None)
            optimizer.step()
            model.clamp_logit_scale(cfg.objective.max_logit_scale)
            bar.update(bs)
            done = step + 1
            if done % cfg.train.log_every == 0 or done == end_step:
                now = time.perf_counter()
                row = {"step": done, "epoch": round(done / steps_per_epoch, 4), "lr": lr, "loss": float(loss.detach()),
                       **{f"loss/{k}": float(v.detach()) for k, v in losses.items()}, **metrics,
                       "samples_per_s": round(cfg.train.log_every * bs / max(now - t_last, 1e-9), 1)}
                if grad_norm is not None:
                    row["grad_norm"] = float(grad_norm)
                t_last = now
                log.write(json.dumps(row) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{row['loss']:.3f}", T=f"{metrics.get('temperature', 0):.3f}")
            if done % cfg.train.checkpoint_every == 0 and done < end_step:
                ckpt.save_checkpoint(run_dir / "checkpoints", done, model, optimizer, tokenizer.hf.to_str(),
                                     extra, cfg.train.keep_checkpoints)
    finally:
        bar.close()
        log.close()
    final_step = max(start_step, end_step)  # the loop only leaves early by an exception
    ckpt.save_checkpoint(run_dir / "checkpoints", final_step, model, optimizer, tokenizer.hf.to_str(), extra,
                         cfg.train.keep_checkpoints)
    finalize_run(run_dir, model, tokenizer, cfg, device, final_step)
    return run_dir


def finalize_run(run_dir: Path, model: TwoTower, tokenizer: Tokenizer, cfg: RunConfig, device: torch.device,
                 step: int) -> dict[str, Any]:
    """Evaluate, then write ``eval.json``, the plots and ``report.md``."""
    t0 = time.perf_counter()
    result = evaluate_model(model, tokenizer, cfg, device, progress=cfg.train.progress)
    data_file = run_dir / "data.json"
    if data_file.exists():
        result["data"]["skipped"]["train"] = json.loads(data_file.read_text())["train"]["skipped"]
    result.update(step=step, model=cfg.model.name, eval_seconds=round(time.perf_counter() - t0, 2))
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    rows = read_metrics(run_dir / "metrics.jsonl")
    plot_curves(rows, run_dir)
    plot_eval(result, run_dir)
    summary = {"model": cfg.model.name, "steps": step, "train data": cfg.data.train,
               "skipped samples": sum(s["total"] for s in result["data"]["skipped"].values())}
    write_report(run_dir, result, rows, summary)
    return result
