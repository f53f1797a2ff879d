"""The pretraining loop: data -> task -> backward -> clip -> step -> task.after_step, with logging and
checkpoints. It never knows which method runs: the task (``objectives/base.py``, chosen by ``objective.name``)
builds the model, computes the losses and updates its own state after each step.

Exact resume: the batch order is a function of (seed, epoch) in memory, or of the loader position saved in
the checkpoint when streaming shards (``train/batches.py``); per-step augmentation randomness is one of
(seed, step), the learning rate one of the step, and everything else that changes (weights, buffers, Adam
moments) is in the checkpoint. A run stopped at step k and resumed therefore replays the very same steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from counterpoint.config import (
    ConfigError,
    ModelConfig,
    ObjectiveConfig,
    RunConfig,
    from_dict,
    load_config,
    save_config,
    to_dict,
)
from counterpoint.data.documents import detect_document_format
from counterpoint.data.readers import SkipStats, detect_format
from counterpoint.data.stream_plan import steps_for_samples
from counterpoint.data.tokenizer import Tokenizer
from counterpoint.errors import CheckpointError, UserError
from counterpoint.evaluate.inputs import (
    EvalInputs,
    check_eval_inputs,
    load_classes,
    resolve_eval_inputs,
    with_resolved_inputs,
)
from counterpoint.evaluate.periodic import PeriodicZeroShot, zeroshot_curve
from counterpoint.evaluate.runner import evaluate_model
from counterpoint.models.layers import set_grad_checkpointing
from counterpoint.models.presets import ModelSpec, resolve_spec
from counterpoint.models.two_tower import TwoTower
from counterpoint.objectives.base import Task, task_class
from counterpoint.objectives.distributed import world_info
from counterpoint.report.plots import plot_curves, plot_eval
from counterpoint.report.run_report import read_metrics, write_report
from counterpoint.train import checkpoint as ckpt
from counterpoint.train.batches import data_info, training_batches
from counterpoint.train.compute import compute_summary, counting_flops, matmul_peak_gflops
from counterpoint.train.distributed import (
    DistContext,
    ParallelTask,
    as_float,
    distributed_session,
    is_main_process,
    maybe_inject_fault,
    restarted_by_torchrun,
)
from counterpoint.train.interrupt import StopOnSignal, TrainingInterrupted
from counterpoint.train.optim import build_optimizer, lr_at
from counterpoint.train.tracking import check_logger_packages, open_trackers


def spec_from_state(meta: dict[str, Any], folder: Path) -> ModelSpec:
    """The model spec saved in a checkpoint's (validated) state, checked field by field."""
    try:
        return ModelSpec.from_json(meta["model_spec"])
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint '{folder}': state.json {exc}; it is damaged or from another "
                              f"version") from None


def check_architecture(spec: ModelSpec, saved_name: str | None, model: ModelConfig, folder: Path) -> None:
    """Refuse a checkpoint whose model differs from the one ``model`` (a run's config) describes, naming the
    first difference. The vocabulary size is not compared: the trained tokenizer sets it."""
    if saved_name is not None and saved_name != model.name:
        raise CheckpointError(f"checkpoint '{folder}' holds a {saved_name} model, the config describes "
                              f"model.name={model.name}; a run is resumed and evaluated with the model it trained")
    wanted = resolve_spec(model.name, embed_dim=model.embed_dim, image_size=model.image_size,
                          context_length=model.context_length)
    for f in dataclasses.fields(ModelSpec):
        if f.name != "vocab_size" and getattr(spec, f.name) != getattr(wanted, f.name):
            raise CheckpointError(f"checkpoint '{folder}' holds a model with {f.name}={getattr(spec, f.name)}, "
                                  f"the config describes {f.name}={getattr(wanted, f.name)}; a run is resumed and "
                                  f"evaluated with the model it trained")


def build_task(objective: ObjectiveConfig, spec: ModelSpec, tokenizer: Tokenizer) -> Task:
    """The registered task ``objective.name`` around a fresh model of ``spec``."""
    return task_class(objective.name).build(objective, spec, tokenizer)


def objective_from_state(meta: dict[str, Any], folder: Path) -> ObjectiveConfig:
    """The task options a checkpoint was trained with. Checkpoints written before tasks were plug-ins
    (release 0.1.0) hold no ``objective``: they are CLIP, or SigLIP when they saved a logit bias."""
    saved = meta.get("objective") or {"name": "siglip" if meta.get("logit_bias") else "clip"}
    try:
        return from_dict(task_class(saved["name"]).Config, saved, prefix="objective.")
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint '{folder}': state.json {exc}; it is damaged or from another "
                              f"version") from None


def load_task_state(task: Task, folder: Path) -> None:
    """The task's state beyond the encoder (momentum towers, queues) from checkpoint ``folder``."""
    tensors = ckpt.read_task_state(folder, expected=bool(task.extra_state()))
    try:
        task.load_extra_state(tensors)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint '{folder}': {exc}") from None


def load_tokenizer(folder: Path, spec: ModelSpec) -> Tokenizer:
    """The checkpoint's tokenizer, refused if it can produce ids the text tower has no embedding for."""
    tokenizer = Tokenizer.from_file(folder / "tokenizer.json", spec.context_length)
    if tokenizer.vocab_size > spec.vocab_size:
        raise CheckpointError(f"checkpoint '{folder}': tokenizer.json has {tokenizer.vocab_size} tokens, the text "
                              f"tower embeds {spec.vocab_size}; the tokenizer belongs to another model")
    return tokenizer


def load_run_model(path: str | Path, device: str | torch.device = "cpu",
                   expect: ModelConfig | None = None) -> tuple[TwoTower, Tokenizer, dict]:
    """Model, tokenizer and checkpoint metadata from a run directory or checkpoint folder. ``expect``: the
    model the run's config describes; a checkpoint holding another is refused. Without it, the config of a
    run directory is used when there is one."""
    folder = ckpt.resolve_checkpoint(path)
    meta = ckpt.read_state(folder)
    spec = spec_from_state(meta, folder)
    if expect is None and (Path(path) / "config.yaml").is_file():
        expect = load_config(Path(path) / "config.yaml").model
    if expect is not None:
        check_architecture(spec, meta.get("model_name"), expect, folder)
    tokenizer = load_tokenizer(folder, spec)
    model = build_task(objective_from_state(meta, folder), spec, tokenizer).encoder()
    ckpt.load_model_weights(folder, model)
    return model.to(device).eval(), tokenizer, meta


def prepare_run_dir(out_dir: str, resume: bool, overwrite: bool, resumable: bool = True) -> Path:
    """The run directory, refusing to mix a new run into an old one unless resuming or overwriting."""
    run_dir = Path(out_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"out_dir '{run_dir}' is a file; set out_dir=... to a folder")
    # A run is there once it logged a step or saved a checkpoint: a start that failed its checks before the
    # first step leaves nothing that blocks the corrected retry.
    has_run = bool(read_metrics(run_dir / "metrics.jsonl")) or bool(ckpt.checkpoint_candidates(run_dir / "checkpoints"))
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
    """Drop log lines after ``last_step`` (and a line a crash cut in half) so a resumed run's log reads like an
    uninterrupted one. Written aside and renamed: a crash now cannot lose the rows before ``last_step``."""
    rows = [r for r in read_metrics(path) if r["step"] <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json_line(r) for r in rows))
    os.replace(tmp, path)


def json_line(row: dict[str, Any]) -> str:
    """One metrics.jsonl line; a value that is not finite is written as null (JSON has no NaN/Infinity)."""
    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and not math.isfinite(v) else v
    return json.dumps({k: clean(v) for k, v in row.items()}, allow_nan=False) + "\n"


def check_data_paths(cfg: RunConfig) -> EvalInputs:
    """Fail before training, not after it, when the model cannot be built, the training data is missing or an
    evaluation input is missing or unusable; returns the evaluation inputs (``auto`` resolved)."""
    resolve_spec(cfg.model.name, embed_dim=cfg.model.embed_dim, image_size=cfg.model.image_size,
                 context_length=cfg.model.context_length, vocab_size=cfg.model.vocab_size)
    task = task_class(cfg.objective.name)
    task.check_run(cfg.objective, cfg.train.batch_size)
    if cfg.train.accum_steps > 1 and not task.grad_cache:
        raise UserError(f"train.accum_steps > 1 (GradCache) is not exact for objective.name={cfg.objective.name}; "
                        f"use train.accum_steps=1 (and train.grad_checkpointing=true for memory)")
    if not cfg.data.stream.sources:  # a streamed run's loader checks its shards when it plans them
        (detect_document_format if task.data == "documents" else detect_format)(cfg.data.train)
    inputs = resolve_eval_inputs(cfg)
    if cfg.eval.every_steps and not inputs.zeroshot:
        raise UserError("eval.every_steps needs labelled zero-shot images: set data.zeroshot (and data.classes), "
                        "or eval.every_steps=0")
    check_eval_inputs(cfg, inputs)
    check_logger_packages(cfg.train.loggers)
    return inputs


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Train, evaluate and report; returns the run directory.

    Under torchrun every process calls this; see ``train/distributed.py``. A job torchrun restarted after a
    failure resumes from the run's latest checkpoint by itself.
    """
    inputs = check_data_paths(cfg)
    cfg = with_resolved_inputs(cfg, inputs)  # the run's config.yaml names the data it is evaluated on
    if is_main_process():
        _print_eval_plan(cfg, inputs)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    with distributed_session(cfg.train.device) as ctx, contextlib.ExitStack() as exits:
        return _train(cfg, ctx, resume or restarted_by_torchrun(), overwrite, exits)


# Settings a resumed run may change: they do not alter what the run computes (logging, checkpoint cadence,
# evaluation, where and how fast it runs, when it stops). Every other setting must stay as the run started.
RESUMABLE_CHANGES = ("out_dir", "eval.", "data.test", "data.zeroshot", "data.classes", "data.stream.num_workers",
                     "data.stream.prefetch_factor", "train.log_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.progress", "train.threads", "train.max_steps", "train.device",
                     "train.parallel", "train.accum_steps", "train.grad_checkpointing", "train.on_nonfinite",
                     "train.loggers",
                     "objective.chunk_size")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(run_dir: Path, cfg: RunConfig) -> None:
    """Refuse to resume with settings that differ from the run's own (``config.yaml``) where the difference
    would make the continued run compute something else (batch size, learning rate, data, model, ...)."""
    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file():
        return  # a run directory without its config (written by hand): nothing to compare with
    try:
        saved = _flatten(to_dict(load_config(saved_file)))
    except UserError as exc:
        raise UserError(f"--resume: the run's own config.yaml cannot be read ({exc})") from None
    now = _flatten(to_dict(cfg))
    changed = [k for k in sorted(set(saved) | set(now))
               if saved.get(k) != now.get(k) and not k.startswith(RESUMABLE_CHANGES)]
    if changed:
        shown = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise UserError(f"--resume: {shown}{more} differ from the run's config.yaml; a resumed run must compute "
                        f"what it started computing: restore them, or start a new run (another out_dir, or "
                        f"--overwrite)")


def _print_eval_plan(cfg: RunConfig, inputs: EvalInputs) -> None:
    parts = []
    if cfg.eval.retrieval and inputs.test:
        parts.append(f"retrieval on {inputs.test}")
    if (cfg.eval.zeroshot or cfg.eval.linear_probe) and inputs.zeroshot:
        parts.append(f"zero-shot / linear probe on {inputs.zeroshot} "
                     f"(classes: {inputs.classes or 'the labels of the images'})")
    parts += [f"no {what} ({why})" for what, why in inputs.skipped.items()]
    if parts:
        print("evaluation after training: " + "; ".join(parts))


def _find_resume_checkpoint(run_dir: Path, ctx: DistContext, required: bool, existed: bool) -> Path | None:
    """The checkpoint to continue from (rank 0 decides, after putting back a re-save a crash cut off);
    ``required``: ``--resume`` was asked for, so having none is an error rather than a fresh start."""
    found: str | None = None
    if ctx.is_main:
        root = run_dir / "checkpoints"
        ckpt.remove_stale_temporaries(root)
        folder = ckpt.newest_checkpoint(root)
        if folder is None and required:
            where = "does not exist" if not existed else "holds no checkpoint"
            if not existed:  # leave no empty folder behind
                with contextlib.suppress(OSError):
                    run_dir.rmdir()
            raise UserError(f"--resume: run directory '{run_dir}' {where}, so there is nothing to resume; "
                            f"drop --resume to start a new run")
        found = str(folder) if folder is not None else None
    found = ctx.broadcast(found)
    return Path(found) if found is not None else None


def _init_checkpoint(cfg: RunConfig) -> tuple[Path, ModelSpec, Tokenizer]:
    """``train.init_from``'s checkpoint folder, model spec and tokenizer, checked against the config's model
    and the task's special tokens."""
    folder = ckpt.resolve_checkpoint(cfg.train.init_from)
    meta = ckpt.read_state(folder)
    spec = spec_from_state(meta, folder)
    check_architecture(spec, meta.get("model_name"), cfg.model, folder)
    tokenizer = load_tokenizer(folder, spec)
    missing = [t for t in task_class(cfg.objective.name).special_tokens if t not in tokenizer.hf.get_vocab()]
    if missing:
        raise CheckpointError(f"train.init_from '{cfg.train.init_from}': its tokenizer lacks {', '.join(missing)}, "
                              f"which objective.name={cfg.objective.name} needs; start from a run of that task")
    return folder, spec, tokenizer


def _train(cfg: RunConfig, ctx: DistContext, resume: bool, overwrite: bool, exits: contextlib.ExitStack) -> Path:
    """The run itself; ``exits`` closes what it opens for the whole run (the extra loggers) on any way out."""
    device = ctx.device
    bs = cfg.train.batch_size
    if bs % (ctx.world_size * cfg.train.accum_steps):
        raise UserError(f"train.batch_size={bs} (the global batch) must be divisible by the number of processes "
                        f"({ctx.world_size}) times train.accum_steps ({cfg.train.accum_steps})")
    run_dir = Path(cfg.out_dir)
    existed = run_dir.exists()
    if ctx.is_main:
        prepare_run_dir(cfg.out_dir, resume, overwrite)
    ctx.barrier()  # nobody reads the run directory while rank 0 may still be clearing it
    # Everything a resume reads is checked before anything in the run directory changes.
    resume_from = _find_resume_checkpoint(run_dir, ctx, required=resume and not restarted_by_torchrun(),
                                          existed=existed) if resume else None
    meta = ckpt.read_state(resume_from) if resume_from else None
    if meta:
        spec = spec_from_state(meta, resume_from)
        check_architecture(spec, meta.get("model_name"), cfg.model, resume_from)
        if ctx.is_main:
            check_resume_config(run_dir, cfg)
        tokenizer = load_tokenizer(resume_from, spec)
        if _finished_and_evaluated(run_dir, meta, cfg):
            if ctx.is_main:
                print(f"{run_dir} is finished (step {meta['step']}) and evaluated: nothing to resume; "
                      f"'counterpoint eval {run_dir}' evaluates it again")
            return run_dir
    init_from = _init_checkpoint(cfg) if not meta and cfg.train.init_from else None
    if init_from is not None:
        spec, tokenizer = init_from[1], init_from[2]
    elif not meta:
        spec = resolve_spec(cfg.model.name, embed_dim=cfg.model.embed_dim, image_size=cfg.model.image_size,
                            context_length=cfg.model.context_length, vocab_size=cfg.model.vocab_size)
    torch.manual_seed(cfg.seed)
    progress = cfg.train.progress and ctx.is_main

    task_type = task_class(cfg.objective.name)
    data = training_batches(cfg, spec.image_size, ctx, progress, task_type.data)
    if meta:
        data.load_state_dict(meta.get("data"), meta.get("data_skipped"))
    elif init_from is None:  # trained once and shared, so every rank holds the same vocabulary
        trained = (Tokenizer.train(data.captions(), spec.vocab_size, spec.context_length,
                                   task_type.special_tokens)
                   if ctx.is_main else None)
        tokenizer = Tokenizer.from_json(ctx.broadcast(trained.hf.to_str() if trained else None), spec.context_length)
        spec = dataclasses.replace(spec, vocab_size=tokenizer.vocab_size)

    task = build_task(cfg.objective, spec, tokenizer).to(device)
    model = task.encoder()
    data.set_tokenizer(tokenizer, model)
    if cfg.train.grad_checkpointing:
        set_grad_checkpointing(model, True)
    if meta:  # full weights on every rank, before DDP/FSDP2 take over the parameters
        ckpt.load_model_weights(resume_from, model)
        load_task_state(task, resume_from)
    elif init_from is not None:
        ckpt.load_model_weights(init_from[0], model)
        task.sync_from_encoder()
    par = ParallelTask(task, ctx, cfg.train.parallel)
    optimizer = build_optimizer(task, cfg.train.lr, cfg.train.weight_decay, cfg.train.betas, cfg.train.eps)
    start_step = meta["step"] if meta else 0
    nonfinite_steps = meta.get("nonfinite_steps", 0) if meta else 0
    if meta:
        state = ckpt.read_optimizer_state(resume_from, meta)
        ckpt.check_optimizer_state(state, [p for g in optimizer.param_groups for p in g["params"]], resume_from)
        par.load_optimizer(optimizer, state)
    if ctx.is_main:  # only now, with the checkpoint fully loaded, does the run directory change
        save_config(cfg, run_dir / "config.yaml")
        if resume:
            _truncate_metrics(run_dir / "metrics.jsonl", start_step)
            if meta:
                print(f"resuming {run_dir} from {resume_from.name} (step {start_step})")

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
    task.set_schedule(steps_per_epoch, total_steps)
    if ctx.is_main and not meta:
        _warn_about_cadence(cfg, total_steps)
    extra = {"model_spec": dataclasses.asdict(spec), "model_name": cfg.model.name, "total_steps": total_steps,
             "objective": to_dict(cfg.objective), "logit_bias": getattr(model, "logit_bias", None) is not None}

    def save(step: int) -> Path:
        model_sd, task_sd, optim_sd = par.state_dicts(optimizer)  # a collective under FSDP2
        skipped = data_info(data, ctx)["skipped"]  # a collective for a streamed run
        folder = run_dir / "checkpoints" / f"step-{step:08d}"
        if ctx.is_main:
            ckpt.save_checkpoint_state(run_dir / "checkpoints", step, model_sd, optim_sd, tokenizer.hf.to_str(),
                                       {**extra, "data": data.state_dict(), "data_skipped": skipped,
                                        "nonfinite_steps": nonfinite_steps}, cfg.train.keep_checkpoints,
                                       task_state=task_sd)
        return folder

    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.train.precision == "bf16"
                else nullcontext())

    # Compute, comparable across machines: the ranks' matmul peaks (summed: the job's capacity) now, and the
    # global batch's training FLOPs counted while the first step runs (train/compute.py).
    peak_gflops = ctx.mean({"peak": matmul_peak_gflops(device)})["peak"] * ctx.world_size
    flops_per_step: float | None = None

    # The labelled images are read once, now. The main process evaluates (the weights are the same on every
    # rank); under FSDP2 every rank takes part, as the towers' forward gathers the sharded weights.
    periodic = (PeriodicZeroShot(cfg, spec.image_size, tokenizer)
                if cfg.eval.every_steps and (ctx.is_main or par.fsdp) else None)
    every = cfg.eval.every_steps

    trackers = exits.enter_context(open_trackers(cfg, run_dir, start_step, enabled=ctx.is_main))
    par.module.train()
    log = open(run_dir / "metrics.jsonl", "a") if ctx.is_main else None
    bar = tqdm(total=(end_step - start_step) * bs, unit=" samples", unit_scale=True, desc="train",
               disable=not progress, dynamic_ncols=True)
    t_last, last_logged = time.perf_counter(), start_step
    batches = data.batches(start_step, device)
    with StopOnSignal() as stop:  # Ctrl-C / SIGTERM: finish the step, save, stop
        try:
            # zip asks the range first: a streamed loader is not advanced past the last step
            for step, batch in zip(range(start_step, end_step), batches):
                maybe_inject_fault(step, ctx.rank)
                lr = lr_at(step, total_steps, cfg.train.lr, cfg.train.warmup_steps, cfg.train.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                with counting_flops() if flops_per_step is None else nullcontext() as counted:
                    losses, metrics = par.forward_backward(batch, step, cfg.train.accum_steps, autocast)
                if flops_per_step is None:
                    flops_per_step = ctx.mean({"flops": float(counted.total)})["flops"] * ctx.world_size
                grad_norm = par.clip_grad_norm(cfg.train.grad_clip) if cfg.train.grad_clip > 0 else None
                # one check per step, agreed by all ranks: a non-finite value anywhere, a stop signal anywhere
                nonfinite, stopping = ctx.any_rank(not _is_finite(losses, grad_norm), stop.requested)
                finite = not nonfinite
                if finite:
                    optimizer.step()
                    task.after_step(step)
                else:
                    nonfinite_steps += 1
                bar.update(bs)
                done = step + 1
                evaluating = every > 0 and (done % every == 0 or done == end_step)
                if done % cfg.train.log_every == 0 or done == end_step or not finite or evaluating:
                    # the mean of the ranks' local losses is the global-batch loss
                    values = ctx.mean({"loss": sum(float(v.detach()) for v in losses.values()),
                                       **{f"loss/{k}": float(v.detach()) for k, v in losses.items()}, **metrics})
                    now = time.perf_counter()
                    epoch = {"epoch": round(done / steps_per_epoch, 4)} if steps_per_epoch else {}
                    seconds = max(now - t_last, 1e-9)
                    row = {"step": done, "samples_seen": done * bs, **epoch, "lr": lr, **values,
                           "samples_per_s": round((done - last_logged) * bs / seconds, 1),
                           "gflop": round(flops_per_step * done / 1e9, 3),
                           "mfu": round(flops_per_step * (done - last_logged) / seconds / (peak_gflops * 1e9), 4),
                           "matmul_peak_gflops": round(peak_gflops, 1)}
                    if grad_norm is not None:
                        row["grad_norm"] = as_float(grad_norm)
                    if nonfinite_steps:
                        row["nonfinite_steps"] = nonfinite_steps
                    if evaluating and periodic is not None:
                        row.update(periodic(model, device))
                        now = time.perf_counter()  # the evaluation's time is not the next interval's training
                    t_last, last_logged = now, done
                    if log is not None:
                        log.write(json_line(row))
                        log.flush()
                    trackers.log(row)
                    shown = {"loss": f"{row['loss']:.3f}", "T": f"{row.get('temperature', 0):.3f}"}
                    if "zeroshot/heldout" in row:
                        shown["zs_heldout"] = f"{row['zeroshot/heldout']:.3f}"
                    bar.set_postfix(shown)
                if not finite and cfg.train.on_nonfinite == "stop":
                    raise UserError(f"step {done}: the loss or the gradient is not finite (NaN or infinite), so the "
                                    f"update was not applied; lower train.lr, check the data, or set "
                                    f"train.on_nonfinite=skip to pass over such steps (the last checkpoint is intact)")
                if stopping and done < end_step:
                    save(done)
                    raise TrainingInterrupted(f"interrupted at step {done} of {end_step}; checkpoint saved in "
                                              f"{run_dir / 'checkpoints'}; continue with --resume")
                if done % cfg.train.checkpoint_every == 0 and done < end_step:
                    save(done)
        finally:
            batches.close()  # a streamed loader's workers and open shards go now, not after the evaluation
            bar.close()
            if log is not None:
                log.close()
    info = data_info(data, ctx)
    if ctx.is_main:
        (run_dir / "data.json").write_text(json.dumps({"train": info}))
    final_step = max(start_step, end_step)  # the loop only leaves early by an exception
    final = save(final_step)
    ctx.barrier()  # the final checkpoint is on disk before anyone reads it
    # Under FSDP2 the parameters are shards; evaluation runs on full weights read back from the checkpoint.
    eval_model = load_run_model(final, device)[0] if par.fsdp else model
    result = finalize_run(run_dir, eval_model, tokenizer, cfg, device, final_step, cfg.model.name)
    trackers.log_eval(result, final_step, run_dir)
    return run_dir


def _warn_about_cadence(cfg: RunConfig, total_steps: int) -> None:
    """Say when the recipe's warmup or log cadence does not fit a run this short (a small world, or an epochs
    override): most of the run at a rising learning rate, or a loss curve of a handful of points."""
    t = cfg.train
    if t.warmup_steps > total_steps / 4:
        print(f"counterpoint: warning: train.warmup_steps={t.warmup_steps} is {t.warmup_steps / total_steps:.0%} of "
              f"this run's {total_steps} steps; a warmup of ~5% would be train.warmup_steps="
              f"{max(1, total_steps // 20)}", file=sys.stderr)
    better = max(1, total_steps // 50)
    if total_steps / t.log_every < 10 and t.log_every > better:
        print(f"counterpoint: warning: train.log_every={t.log_every} logs {total_steps // t.log_every} row(s) of "
              f"this run's {total_steps} steps; train.log_every={better} would give {total_steps // better}",
              file=sys.stderr)


def _finished_and_evaluated(run_dir: Path, meta: dict[str, Any], cfg: RunConfig) -> bool:
    """Whether the checkpoint is the run's last step and ``eval.json`` holds that step's evaluation."""
    end = min(meta.get("total_steps") or math.inf, cfg.train.max_steps or math.inf)
    if meta["step"] < end:
        return False
    try:
        return json.loads((run_dir / "eval.json").read_text(encoding="utf-8")).get("step") == meta["step"]
    except (OSError, ValueError, AttributeError):
        return False


def _is_finite(losses: dict[str, torch.Tensor], grad_norm: torch.Tensor | None) -> bool:
    """Whether the step's loss (and gradient norm, when clipping computed it) are finite numbers."""
    values = [v.detach().float().reshape(1) for v in losses.values()]
    if grad_norm is not None:
        full = getattr(grad_norm, "full_tensor", None)  # a DTensor under FSDP2
        values.append((full() if full is not None else grad_norm).detach().float().reshape(1).to(values[0].device))
    return bool(torch.isfinite(torch.cat(values)).all())


def finalize_run(run_dir: Path, model: TwoTower, tokenizer: Tokenizer, cfg: RunConfig, device: torch.device,
                 step: int, model_name: str, out_dir: Path | None = None) -> dict[str, Any]:
    """Evaluate (spread over the ranks of a process group), then write ``eval.json``, the plots and
    ``report.md`` (rank 0) into ``out_dir``: the run directory itself by default, or another folder for an
    evaluation with other settings (the training curves stay in the run directory)."""
    out_dir = out_dir or run_dir
    rank, world_size = world_info()
    t0 = time.perf_counter()
    result = evaluate_model(model, tokenizer, cfg, device, progress=cfg.train.progress and rank == 0,
                            across_ranks=world_size > 1, picture_dir=out_dir if rank == 0 else None)
    if rank > 0:  # every rank took part in the evaluation; rank 0 writes the results
        return result
    train_info = read_data_info(run_dir / "data.json")
    if train_info is not None:
        result["data"]["skipped"]["train"] = SkipStats.from_dict(train_info["skipped"]).as_dict()
    result.update(step=step, model=model_name, eval_seconds=round(time.perf_counter() - t0, 2))
    rows = read_metrics(run_dir / "metrics.jsonl")
    compute = compute_summary(rows)
    if compute:
        result["compute"] = compute
    curve = zeroshot_curve(rows)
    if curve:
        result["zeroshot_during_training"] = curve
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.eval.imagine > 0:
        imagine_class_prompts(model, tokenizer, cfg, out_dir, result)
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2))
    if out_dir == run_dir:
        plot_curves(rows, run_dir)
    else:
        result["run"] = str(run_dir)
        save_config(cfg, out_dir / "config.yaml")
    plot_eval(result, out_dir)
    stream = cfg.data.stream.sources
    train_data = ("streamed from " + ", ".join(str(src.shards) for src in stream)) if stream else cfg.data.train
    summary = {"model": model_name, "steps": step, "train data": train_data,
               "skipped samples": sum(s["total"] for s in result["data"]["skipped"].values())}
    if out_dir != run_dir:
        summary = {"evaluation of": str(run_dir), **summary}
    write_report(out_dir, result, rows, summary)
    return result


def imagine_class_prompts(model: TwoTower, tokenizer: Tokenizer, cfg: RunConfig, out_dir: Path,
                          result: dict[str, Any]) -> None:
    """``imagine/grid.png``: what ``cfg.eval.imagine`` class prompts of the run's label set (spread over it, the
    held-out combinations first) mean to the model; recorded in ``result["imagine"]``."""
    from counterpoint.visualize.grid import save_pictures
    from counterpoint.visualize.imagine import imagine, text_targets

    inputs = resolve_eval_inputs(cfg)
    if not inputs.classes or not hasattr(model, "encode_text"):
        result["imagine"] = {"skipped": "no class file to take prompts from" if not inputs.classes else
                             "the model has no text tower"}
        return
    classes, templates, heldout = load_classes(inputs.classes)
    ordered = [c for c in classes if c in heldout] + [c for c in classes if c not in heldout]
    picked = ordered[:: max(1, len(ordered) // cfg.eval.imagine)][: cfg.eval.imagine]
    prompts = [templates[0].format(c=c) for c in picked]
    t0 = time.perf_counter()
    targets = text_targets(model, tokenizer, prompts)
    images, cosine = imagine(model, targets, steps=cfg.eval.imagine_steps, seed=cfg.seed,
                             progress=cfg.train.progress, desc="imagining")
    save_pictures(images, prompts, out_dir / "imagine", title="what the model imagines for these prompts")
    result["imagine"] = {"prompts": prompts, "cosine": [round(float(c), 4) for c in cosine],
                         "steps": cfg.eval.imagine_steps, "grid": "imagine/grid.png",
                         "seconds": round(time.perf_counter() - t0, 2)}


def read_data_info(path: Path) -> dict[str, Any] | None:
    """``data.json`` of a run (what training read and skipped), or ``None`` if it is missing or damaged (it is
    a report, not state: evaluation goes on without it)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))["train"]
        skipped = info["skipped"]
        if isinstance(skipped, dict) and isinstance(skipped.get("total"), int):
            return info
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        pass
    return None
