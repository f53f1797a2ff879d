"""Balanced multimodal training: data -> model -> combiner -> SGD, per-epoch validation, model selection on
val, one test evaluation of the selected checkpoint.

Run directory: ``config.yaml`` (resolved), ``metrics.jsonl`` (one row per logged step: losses, batch
accuracies, the combiner's cos/norm/alpha/conflict stats per encoder, ``step_ms``; plus one row per epoch
with ``val/acc/...``), ``eval.json`` (below), ``checkpoints/best/model.safetensors``, ``cosine.png``,
``accuracy.png`` and ``report.md``.

``eval.json``: ``method``, ``selected_epoch`` (best validation score, earliest on ties: the fused accuracy,
or for ``unimodal`` the mean unimodal-head accuracy; ``train.select_on``), ``select_on``, ``val`` and
``test`` (``{"acc": {"fused", modality...}, "n", "shapley", "subsets"}`` of the selected checkpoint; test
is evaluated for that checkpoint only, never used to choose), ``step_ms`` (median over all steps),
``train_seconds``, ``conflict_rate`` (fraction of logged steps with cos < 0, per encoder), ``modalities``.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from counterpoint.config import ConfigError, save_config
from counterpoint.data.av_world import make_av_world
from counterpoint.data.multimodal import ModalDataset, ModalSplit
from counterpoint.data.shortcut import make_shortcut
from counterpoint.errors import UserError
from counterpoint.evaluate.modality import baseline_inputs, evaluate_split, recalibrate_batchnorm
from counterpoint.models.fusion import MultimodalClassifier, build_classifier
from counterpoint.objectives.balance import BalanceTask
from counterpoint.report.balance_report import write_balance_report
from counterpoint.report.plots_balance import plot_run_accuracy, plot_run_cosine
from counterpoint.report.run_report import read_metrics
from counterpoint.train.balance_config import BalanceConfig, BalanceDataConfig, build_method
from counterpoint.train.checkpoint import load_model_weights
from counterpoint.train.distributed import pick_device
from counterpoint.train.loop import prepare_run_dir


def load_benchmark(cfg: BalanceDataConfig) -> ModalDataset:
    """The dataset a config names, restricted to ``cfg.modalities`` when given."""
    if cfg.benchmark == "av_world":
        data = make_av_world(cfg.av_world)
    elif cfg.benchmark == "shortcut":
        data = make_shortcut(cfg.shortcut)
    else:
        data = ModalDataset.load(cfg.path)
    missing = [m for m in ("train", "val", "test") if m not in data.splits]
    if missing:
        raise UserError(f"dataset '{data.name}' has no {', '.join(missing)} split; balance runs need train, val "
                        "and test (model selection on val, never on test)")
    empty = [s for s in ("train", "val", "test") if len(data.splits[s]) == 0]
    if empty:
        raise UserError(f"dataset '{data.name}' has an empty {', '.join(empty)} split; balance runs need samples "
                        "in train, val and test (checked before training, not after it)")
    if not cfg.modalities:
        return data
    unknown = [m for m in cfg.modalities if m not in data.modalities]
    if unknown:
        raise UserError(f"data.modalities: {unknown} not in dataset '{data.name}' (it has {data.modalities})")
    splits = {s: ModalSplit({m: d.inputs[m] for m in cfg.modalities}, d.labels) for s, d in data.splits.items()}
    return ModalDataset(data.name, data.classes, splits, data.info)


def _save_weights(model: MultimodalClassifier, folder: Path, meta: dict[str, Any]) -> None:
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "model.safetensors.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp,
              metadata={k: str(v) for k, v in meta.items()})
    tmp.replace(folder / "model.safetensors")


def build_run_model(cfg: BalanceConfig, data: ModalDataset) -> MultimodalClassifier:
    """The classifier for ``data``'s modalities; an encoder setting that cannot encode them (a text encoder
    for spectrograms, a patch size that does not divide the input) is a one-line config error."""
    unknown = sorted(set(cfg.model.encoders) - set(data.modalities))
    if unknown:
        raise ConfigError(f"model.encoders names {unknown}, which the data does not have; its modalities are "
                          f"{data.modalities}")
    try:
        return build_classifier(data.splits["train"].inputs, len(data.classes), cfg.model.dim, cfg.model.fusion,
                                cfg.model.encoders, pad_id=int(data.info.get("pad_id", 0)))
    except ValueError as exc:
        raise ConfigError(f"model.encoders: {exc}") from None


def train_balance(cfg: BalanceConfig, data: ModalDataset | None = None, overwrite: bool = False) -> Path:
    """Train one method on one seed, select on val, evaluate test; returns the run directory. ``data`` may
    be passed in when several runs share a benchmark (``counterpoint balance compare``)."""
    data = data if data is not None else load_benchmark(cfg.data)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    torch.manual_seed(cfg.seed)
    # before the run directory: a bad encoder setting leaves nothing behind
    model = build_run_model(cfg, data).to(device)
    run_dir = prepare_run_dir(cfg.out_dir, resume=False, overwrite=overwrite, resumable=False)
    save_config(cfg, run_dir / "config.yaml")
    combiner = build_method(cfg.method, cfg.train.diagnostics, generator=torch.Generator(device).manual_seed(cfg.seed))
    task = BalanceTask(model, combiner)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum,
                                weight_decay=cfg.train.weight_decay)

    train, val = data.splits["train"], data.splits["val"]
    bs = cfg.train.batch_size
    steps_per_epoch = len(train) // bs  # drop the ragged last batch (batch norm on a tiny batch is noise)
    if steps_per_epoch < 1:
        raise UserError(f"train split has {len(train)} samples, fewer than train.batch_size={bs}")
    order = torch.Generator().manual_seed(cfg.seed)
    bn_batches = torch.Generator().manual_seed(cfg.seed + 1)  # apart from `order`: BN settings keep the order
    select_on = cfg.train.select_on
    if select_on == "auto":
        select_on = "unimodal" if cfg.method.name == "unimodal" else "fused"
    best_acc, best_epoch, step, step_ms = -1.0, 0, 0, []
    bar = tqdm(total=cfg.train.epochs * steps_per_epoch, unit=" step", desc=cfg.method.display,
               disable=not cfg.train.progress, dynamic_ncols=True)
    t_start = time.perf_counter()
    with open(run_dir / "metrics.jsonl", "w") as log:
        for epoch in range(1, cfg.train.epochs + 1):
            model.train()
            perm = torch.randperm(len(train), generator=order)
            for b in range(steps_per_epoch):
                idx = perm[b * bs:(b + 1) * bs]
                batch = {k: x[idx].to(device, non_blocking=True) for k, x in train.inputs.items()}
                batch["label"] = train.labels[idx].to(device)
                t0 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                row = task.step(batch)
                optimizer.step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                step_ms.append(1000 * (time.perf_counter() - t0))
                step += 1
                bar.update(1)
                if step % cfg.train.log_every == 0:
                    log.write(json.dumps({"step": step, "epoch": epoch, **row,
                                          "step_ms": round(step_ms[-1], 3)}) + "\n")
            recalibrate_batchnorm(model, train, cfg.train.precise_bn_batches, bs, bn_batches)
            acc = evaluate_split(model, val, cfg.train.eval_batch_size)["acc"]
            log.write(json.dumps({"step": step, "epoch": epoch, **{f"val/acc/{k}": v for k, v in acc.items()}})
                      + "\n")
            log.flush()
            bar.set_postfix({f"val {k}": f"{v:.3f}" for k, v in acc.items()})
            score = selection_score(acc, select_on)
            if score > best_acc:
                best_acc, best_epoch = score, epoch
                _save_weights(model, run_dir / "checkpoints" / "best", {"epoch": epoch, "val_score": score})
    bar.close()
    train_seconds = time.perf_counter() - t_start

    load_model_weights(run_dir / "checkpoints" / "best", model)
    baselines = baseline_inputs(train, cfg.eval.baseline) if cfg.eval.shapley else None
    result = {
        "method": cfg.method.display, "combiner": repr(combiner), "seed": cfg.seed,
        "modalities": model.modalities, "classes": data.classes, "selected_epoch": best_epoch,
        "select_on": select_on,
        "val": evaluate_split(model, val, cfg.train.eval_batch_size, baselines),
        "test": evaluate_split(model, data.splits["test"], cfg.train.eval_batch_size, baselines),
        "step_ms": round(statistics.median(step_ms), 3), "steps": step, "train_seconds": round(train_seconds, 2),
        "shapley_baseline": cfg.eval.baseline if baselines is not None else None,
    }
    rows = read_metrics(run_dir / "metrics.jsonl")
    result["conflict_rate"] = conflict_rates(rows, model.modalities)
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    plot_run_cosine(rows, model.modalities, run_dir / "cosine.png", cfg.method.display)
    plot_run_accuracy(rows, model.modalities, run_dir / "accuracy.png", best_epoch)
    write_balance_report(run_dir, result, cfg)
    return run_dir


def selection_score(acc: dict[str, float], select_on: str) -> float:
    """The validation score an epoch is chosen by: the fused head's accuracy, or the mean over unimodal
    heads (unimodal-alone training is a per-modality reference; its fused head is only a probe)."""
    if select_on == "fused":
        return acc["fused"]
    heads = [v for k, v in acc.items() if k != "fused"]
    return sum(heads) / len(heads)


def conflict_rates(rows: list[dict[str, Any]], modalities: list[str]) -> dict[str, float]:
    """Fraction of logged steps with cos(g_m, g_u) < 0, per encoder (only encoders with logged cosines)."""
    out = {}
    for k in modalities:
        flags = [r[f"conflict/{k}"] for r in rows if f"conflict/{k}" in r]
        if flags:
            out[k] = sum(flags) / len(flags)
    return out
