"""Contrastive pretraining loop: data -> task -> backward -> clip -> step, with logging and checkpoints.

Exact resume: the batch order is a function of (seed, epoch) in memory, or of the loader position saved in
the checkpoint when streaming shards (``train/batches.py``); per-step augmentation randomness is one of
(seed, step), the learning rate one of the step, and everything else that changes (weights, buffers, Adam
moments) is in the checkpoint. A run stopped at step k and resumed therefore replays the very same steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from counterpoint.config import RunConfig, save_config
from counterpoint.data.readers import detect_format
from counterpoint.data.stream_plan import steps_for_samples
from counterpoint.data.tokenizer import Tokenizer
from counterpoint.errors import UserError
from counterpoint.evaluate.runner import evaluate_model, load_classes
from counterpoint.models.presets import ModelSpec, build_model, resolve_spec
from counterpoint.models.two_tower import TwoTower
from counterpoint.objectives.contrastive import ContrastiveTask
from counterpoint.objectives.distributed import world_info
from counterpoint.report.plots import plot_curves, plot_eval
from counterpoint.report.run_report import read_metrics, write_report
from counterpoint.train import checkpoint as ckpt
from counterpoint.train.batches import training_batches
from counterpoint.train.distributed import (
    DistContext,
    ParallelTask,
    as_float,
    distributed_session,
    maybe_inject_fault,
    restarted_by_torchrun,
)
from counterpoint.train.optim import build_optimizer, lr_at


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


def prepare_run_dir(out_dir: str, resume: bool, overwrite: bool, resumable: bool = True) -> Path:
    """The run directory, refusing to mix a new run into an old one unless resuming or overwriting."""
    run_dir = Path(out_dir)
    has_run = (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists()
    if has_run and not (resume or overwrite):
        how = "pass --resume to continue it, --overwrite to start again," if resumable else \
            "pass --overwrite to start again"
        raise UserError(f"run directory '{run_dir}' already holds a run; {how} or set out_dir=... to a new folder")
    if overwrite and not resume and run_dir.exists():
        for name in ("metrics.jsonl", "eval.json", "report.md"):
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop log lines after ``last_step`` so a resumed run's log reads like an uninterrupted one."""
    rows = [r for r in read_metrics(path) if r["step"] <= last_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def check_data_paths(cfg: RunConfig) -> None:
    """Fail before training, not after it, when an evaluation input is missing."""
    if not cfg.data.stream.sources:
        detect_format(cfg.data.train)
    if cfg.eval.retrieval and cfg.data.test:
        detect_format(cfg.data.test)
    if (cfg.eval.zeroshot or cfg.eval.linear_probe) and cfg.data.zeroshot:
        detect_format(cfg.data.zeroshot)
        load_classes(cfg.data.classes)


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Train, evaluate and report; returns the run directory.

    Under torchrun every process calls this; see ``train/distributed.py``. A job torchrun restarted after a
    failure resumes from the run's latest checkpoint by itself.
    """
    check_data_paths(cfg)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    with distributed_session(cfg.train.device) as ctx:
        return _train(cfg, ctx, resume or restarted_by_torchrun(), overwrite)


def _train(cfg: RunConfig, ctx: DistContext, resume: bool, overwrite: bool) -> Path:
    device = ctx.device
    bs = cfg.train.batch_size
    if bs % (ctx.world_size * cfg.train.accum_steps):
        raise UserError(f"train.batch_size={bs} (the global batch) must be divisible by the number of processes "
                        f"({ctx.world_size}) times train.accum_steps ({cfg.train.accum_steps})")
    run_dir = Path(cfg.out_dir)
    if ctx.is_main:
        prepare_run_dir(cfg.out_dir, resume, overwrite)
        save_config(cfg, run_dir / "config.yaml")
    ctx.barrier()  # nobody reads the run directory while rank 0 may still be clearing it
    torch.manual_seed(cfg.seed)
    progress = cfg.train.progress and ctx.is_main

    resume_from = ckpt.resolve_checkpoint(run_dir) if resume and (run_dir / "checkpoints" / "latest").exists() else None
    meta = ckpt.read_state(resume_from) if resume_from else None
    spec = (_spec_from_json(meta["model_spec"]) if meta else
            resolve_spec(cfg.model.name, embed_dim=cfg.model.embed_dim, image_size=cfg.model.image_size,
                         context_length=cfg.model.context_length, vocab_size=cfg.model.vocab_size))

    data = training_batches(cfg, spec.image_size, ctx, progress)
    if meta:
        tokenizer = Tokenizer.from_file(resume_from / "tokenizer.json", spec.context_length)
        data.load_state_dict(meta.get("data"))
    else:  # trained once and shared, so every rank holds the same vocabulary
        trained = Tokenizer.train(data.captions(), spec.vocab_size, spec.context_length) if ctx.is_main else None
        tokenizer = Tokenizer.from_json(ctx.broadcast(trained.hf.to_str() if trained else None), spec.context_length)
        spec = dataclasses.replace(spec, vocab_size=tokenizer.vocab_size)
    data.set_tokenizer(tokenizer)

    bias = cfg.objective.init_logit_bias if cfg.objective.name == "siglip" else None
    model = build_model(spec, cfg.objective.init_temperature, bias, pad_id=tokenizer.pad_id,
                        eot_id=tokenizer.eot_id).to(device)
    if cfg.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if meta:  # full weights on every rank, before DDP/FSDP2 take over the parameters
        ckpt.load_model_weights(resume_from, model)
    task = ContrastiveTask(model, cfg.objective.name, cfg.objective.margin, cfg.objective.chunk_size)
    par = ParallelTask(task, ctx, cfg.train.parallel)
    optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.betas, cfg.train.eps)
    start_step = meta["step"] if meta else 0
    if meta:
        par.load_optimizer(optimizer, ckpt.read_optimizer_state(resume_from, meta))
    if resume and ctx.is_main:
        _truncate_metrics(run_dir / "metrics.jsonl", start_step)

    steps_per_epoch = data.steps_per_epoch
    if cfg.train.samples is not None:
        total_steps = steps_for_samples(cfg.train.samples, cfg.train.batch_size)
    elif steps_per_epoch is None and cfg.train.max_steps is None:
        raise UserError("a resampled or mixed stream has no epochs; set train.samples (samples to train on) "
                        "or train.max_steps")
    else:
        total_steps = (cfg.train.max_steps if steps_per_epoch is None
                       else max(1, math.ceil(cfg.train.epochs * steps_per_epoch)))
    end_step = min(total_steps, cfg.train.max_steps or total_steps)
    extra = {"model_spec": dataclasses.asdict(spec), "model_name": cfg.model.name, "total_steps": total_steps,
             "logit_bias": model.logit_bias is not None}

    def save(step: int) -> Path:
        model_sd, optim_sd = par.state_dicts(optimizer)  # a collective under FSDP2
        folder = run_dir / "checkpoints" / f"step-{step:08d}"
        if ctx.is_main:
            ckpt.save_checkpoint_state(run_dir / "checkpoints", step, model_sd, optim_sd, tokenizer.hf.to_str(),
                                       {**extra, "data": data.state_dict(), "data_skipped": data.info()["skipped"]},
                                       cfg.train.keep_checkpoints)
        return folder

    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.train.precision == "bf16"
                else nullcontext())

    par.module.train()
    log = open(run_dir / "metrics.jsonl", "a") if ctx.is_main else None
    bar = tqdm(total=(end_step - start_step) * bs, unit=" samples", unit_scale=True, desc="train",
               disable=not progress, dynamic_ncols=True)
    t_last, last_logged = time.perf_counter(), start_step
    batches = data.batches(start_step, device)
    try:
        # zip asks the range first: a streamed loader is not advanced past the last step
        for step, batch in zip(range(start_step, end_step), batches):
            maybe_inject_fault(step, ctx.rank)
            lr = lr_at(step, total_steps, cfg.train.lr, cfg.train.warmup_steps, cfg.train.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            losses, metrics = par.forward_backward(batch, cfg.train.accum_steps, autocast)
            grad_norm = par.clip_grad_norm(cfg.train.grad_clip) if cfg.train.grad_clip > 0 else None
            optimizer.step()
            model.clamp_logit_scale(cfg.objective.max_logit_scale)
            bar.update(bs)
            done = step + 1
            if done % cfg.train.log_every == 0 or done == end_step:
                # the mean of the ranks' local losses is the global-batch loss
                values = ctx.mean({"loss": sum(float(v.detach()) for v in losses.values()),
                                   **{f"loss/{k}": float(v.detach()) for k, v in losses.items()}, **metrics})
                now = time.perf_counter()
                row = {"step": done, "samples_seen": done * bs,
                       **({"epoch": round(done / steps_per_epoch, 4)} if steps_per_epoch else {}), "lr": lr, **values,
                       "samples_per_s": round((done - last_logged) * bs / max(now - t_last, 1e-9), 1)}
                if grad_norm is not None:
                    row["grad_norm"] = as_float(grad_norm)
                t_last, last_logged = now, done
                if log is not None:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                bar.set_postfix(loss=f"{row['loss']:.3f}", T=f"{row.get('temperature', 0):.3f}")
            if done % cfg.train.checkpoint_every == 0 and done < end_step:
                save(done)
    finally:
        batches.close()  # a streamed loader's workers and open shards go now, not after the evaluation
        bar.close()
        if log is not None:
            log.close()
    if ctx.is_main:
        (run_dir / "data.json").write_text(json.dumps({"train": data.info()}))
    final_step = max(start_step, end_step)  # the loop only leaves early by an exception
    final = save(final_step)
    ctx.barrier()  # the final checkpoint is on disk before anyone reads it
    # Under FSDP2 the parameters are shards; evaluation runs on full weights read back from the checkpoint.
    eval_model = load_run_model(final, device)[0] if par.fsdp else model
    finalize_run(run_dir, eval_model, tokenizer, cfg, device, final_step)
    return run_dir


def finalize_run(run_dir: Path, model: TwoTower, tokenizer: Tokenizer, cfg: RunConfig, device: torch.device,
                 step: int) -> dict[str, Any]:
    """Evaluate (spread over the ranks of a process group), then write ``eval.json``, the plots and
    ``report.md`` (rank 0)."""
    rank, world_size = world_info()
    t0 = time.perf_counter()
    result = evaluate_model(model, tokenizer, cfg, device, progress=cfg.train.progress and rank == 0,
                            across_ranks=world_size > 1)
    if rank > 0:  # every rank took part in the evaluation; rank 0 writes the results
        return result
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
