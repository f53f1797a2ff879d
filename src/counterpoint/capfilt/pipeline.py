"""``counterpoint capfilt RECIPE``: BLIP's bootstrapping as a chain of ordinary runs, once per seed.

Per seed, under ``out_dir/seed<S>/``:

1. ``noisy``: pretrain on the noisy pairs (the baseline the CapFilt model is compared with);
2. ``captioner`` and ``filter``: each fine-tuned from ``noisy`` (``train.init_from``) on the small clean set,
   the captioner on captioning, the filter on contrast and matching;
3. ``bootstrap``: a synthetic caption for every noisy image, every caption filtered, the kept pairs written
   as shards (``capfilt/bootstrap.py``);
4. ``capfilt``: pretrain again, from scratch and with the same settings as ``noisy``, on those shards.

Every run is evaluated on the clean test pairs. A stage whose folder holds a finished run of the very same
config (or a bootstrap of the very same inputs) is reused, a run cut off mid-way is resumed from its last
checkpoint, so an interrupted chain continues where it stopped (``--overwrite`` redoes everything).
``capfilt.json`` / ``capfilt.md`` summarise the seeds: text-to-image R@1 of the noisy and the CapFilt model,
the filter against the truth and the captions' attributes where the data has them.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

from counterpoint.capfilt.bootstrap import bootstrap
from counterpoint.capfilt.config import CapFiltConfig
from counterpoint.config import ConfigError, RunConfig, load_config, to_dict
from counterpoint.errors import UserError
from counterpoint.evaluate.inputs import resolve_eval_inputs, with_resolved_inputs
from counterpoint.report.seeds import over_seeds, plus_minus, verdict
from counterpoint.train import checkpoint as ckpt
from counterpoint.train.loop import train

STAGES = ("noisy", "captioner", "filter", "bootstrap", "capfilt")


def stage_config(cfg: CapFiltConfig, seed: int, stage: str, data: str, extra: tuple[str, ...] = ()) -> RunConfig:
    """The run of ``stage`` for ``seed``: the recipe with the stage's data, the shared evaluation inputs and
    the stage's own settings (applied last, so a recipe may change anything)."""
    base = [f"out_dir={Path(cfg.out_dir) / f'seed{seed}' / stage}", f"seed={seed}", f"data.train={data}",
            f"data.test={cfg.test}", f"train.progress={str(cfg.progress).lower()}"]
    if cfg.zeroshot != "auto":
        base.append(f"data.zeroshot={cfg.zeroshot}")
    run = load_config(cfg.recipe, [*base, *extra])
    if run.objective.name != "blip":
        raise ConfigError(f"recipe '{cfg.recipe}' trains objective.name={run.objective.name}; CapFilt needs a BLIP "
                          f"recipe (a captioner and a matching head)")
    if stage in ("captioner", "filter", "capfilt") and cfg.zeroshot == "auto":
        # the noisy data's own evaluation sets, which the fine-tuning and bootstrapped data do not sit beside
        noisy = resolve_eval_inputs(stage_config(cfg, seed, "noisy", cfg.noisy))
        run.data.zeroshot, run.data.classes = noisy.zeroshot, noisy.classes
    return run


# Settings that change how a run is watched, not what it computes: a finished stage that differs only in these
# is reused.
COSMETIC = ("train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.progress", "train.threads",
            "data.stream.num_workers", "data.stream.prefetch_factor")


def _comparable(config: dict[str, Any] | None) -> dict[str, Any] | None:
    if config is None:
        return None
    out = copy.deepcopy(config)
    for key in COSMETIC:
        node = out
        *path, leaf = key.split(".")
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def _saved_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's config with today's defaults for settings added since it ran (None if there is none or it
    no longer loads)."""
    path = run_dir / "config.yaml"
    try:
        return to_dict(load_config(path)) if path.is_file() else None
    except ConfigError:
        return None


def finished_at(run_dir: Path) -> float:
    """When the run's last checkpoint was written (re-evaluating a run does not change it)."""
    return (ckpt.resolve_checkpoint(run_dir) / "state.json").stat().st_mtime


def run_stage(cfg: RunConfig, overwrite: bool, after: tuple[Path, ...] = ()) -> Path:
    """Reuse a finished run of exactly ``cfg`` that is newer than the stages it starts from (``after``: their
    finished-at marks), resume one that was cut off, else train from the start."""
    run_dir = Path(cfg.out_dir)
    wanted = to_dict(with_resolved_inputs(cfg, resolve_eval_inputs(cfg)))
    same = _comparable(_saved_config(run_dir)) == _comparable(wanted)
    if not overwrite and same and (run_dir / "eval.json").is_file():
        if all(finished_at(run_dir) >= p.stat().st_mtime for p in after):
            return run_dir
        return train(cfg, overwrite=True)  # what it started from was redone
    if (run_dir / "eval.json").is_file() and not same and not overwrite:
        raise UserError(f"'{run_dir}' holds a finished run of another config; pass --overwrite to redo the chain, or "
                        f"choose another out_dir")
    resumable = same and not overwrite and ckpt.newest_checkpoint(run_dir / "checkpoints") is not None
    return train(cfg, resume=resumable, overwrite=not resumable)


def run_bootstrap(cfg: CapFiltConfig, seed: int, captioner: Path, filt: Path, overwrite: bool) -> dict[str, Any]:
    """The bootstrap stage, reused when its ``bootstrap.json`` came from the same models, data and settings."""
    out = Path(cfg.out_dir) / f"seed{seed}" / "bootstrap"
    done = out / "bootstrap.json"
    if done.is_file() and not overwrite:
        result = json.loads(done.read_text())
        same = (result.get("noisy") == str(cfg.noisy) and result.get("captioner") == str(captioner)
                and result.get("filter") == str(filt) and result.get("settings") == vars(cfg.bootstrap) | {"seed": seed}
                and all(finished_at(p) <= done.stat().st_mtime for p in (captioner, filt)))
        if same:
            return result
    return bootstrap(captioner, filt, cfg.noisy, out, cfg.bootstrap, seed, cfg.progress)


def _eval(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "eval.json").read_text())


def _seed_result(runs: dict[str, Path], boot: dict[str, Any]) -> dict[str, Any]:
    """What one seed's chain measured."""
    out: dict[str, Any] = {"runs": {k: str(v) for k, v in runs.items()}}
    for model in ("noisy", "capfilt"):
        ev = _eval(runs[model])
        out[model] = {"t2i_R@1": ev["retrieval"]["text_to_image"]["R@1"],
                      "i2t_R@1": ev["retrieval"]["image_to_text"]["R@1"]}
        if "retrieval_itm" in ev:
            out[model]["t2i_R@1_itm"] = ev["retrieval_itm"]["text_to_image"]["R@1"]
        if "zeroshot" in ev:
            out[model]["zeroshot_top1"] = ev["zeroshot"]["all"]["top1"]
        out[model]["train_seconds"] = ev.get("train_seconds")
    caption_eval = _eval(runs["captioner"]).get("captioning", {})
    if "attributes" in caption_eval:
        out["captioner_test_attributes"] = caption_eval["attributes"]
    out["bootstrap"] = {k: boot[k] for k in ("counts", "pairs_written", "filter_vs_truth", "synthetic_attributes")
                        if k in boot}
    curve = boot.get("filter_vs_truth", {}).get("by_threshold")
    if curve:  # in hindsight: the threshold the truth would have chosen (the one with the best worse side)
        out["bootstrap"]["best_threshold_by_truth"] = max(curve, key=lambda c: min(c["precision"], c["recall"]))
    return out


def summarise(seeds: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over seeds of the figures the acceptance asks for."""
    rows = list(seeds.values())

    def stat(*path: str) -> dict[str, Any] | None:
        values = []
        for row in rows:
            node: Any = row
            for key in path:
                node = node.get(key) if isinstance(node, dict) else None
            if node is None:
                return None
            values.append(float(node))
        return over_seeds(values)

    table: dict[str, Any] = {}
    for model in ("noisy", "capfilt"):
        table[model] = {k: stat(model, k) for k in ("t2i_R@1", "i2t_R@1", "t2i_R@1_itm", "zeroshot_top1")}
    table["filter_precision"] = stat("bootstrap", "filter_vs_truth", "precision")
    table["filter_recall"] = stat("bootstrap", "filter_vs_truth", "recall")
    table["noise_after_filter"] = stat("bootstrap", "filter_vs_truth", "noise_after")
    for key in ("threshold", "precision", "recall"):
        table[f"best_{key}_by_truth"] = stat("bootstrap", "best_threshold_by_truth", key)
    for attribute in ("colour", "shape", "size", "position"):
        table[f"synthetic_{attribute}_recall_one_object"] = stat("bootstrap", "synthetic_attributes", "one_object",
                                                                 f"{attribute}_recall")
        table[f"captioner_{attribute}_recall_one_object"] = stat("captioner_test_attributes", "one_object",
                                                                 f"{attribute}_recall")
    a, b = table["capfilt"]["t2i_R@1"], table["noisy"]["t2i_R@1"]
    return {"table": table, "capfilt_vs_noisy_t2i_R@1": verdict(a, b), "gain_points": 100 * (a["mean"] - b["mean"])}


def _cell(s: dict[str, Any] | None, scale: float = 100.0, digits: int = 1) -> str:
    return "-" if s is None else plus_minus(s, scale, digits)


def markdown(summary: dict[str, Any], seeds: list[int], command: str) -> str:
    t = summary["table"]
    spread = "mean ± std over seeds" if len(seeds) > 1 else "one seed (no spread known):"
    lines = [f"# CapFilt, {spread} {seeds}", "",
             "Retrieval on the clean test pairs (%): pretrained on the noisy pairs, and pretrained again on what "
             "CapFilt kept and wrote.", "",
             "| pretrained on | text-to-image R@1 | + ITM re-ranking | image-to-text R@1 | zero-shot top-1 |",
             "|---|---|---|---|---|"]
    for model, label in (("noisy", "noisy pairs"), ("capfilt", "CapFilt pairs")):
        row = t[model]
        lines.append(f"| {label} | {_cell(row['t2i_R@1'])} | {_cell(row['t2i_R@1_itm'])} | {_cell(row['i2t_R@1'])} "
                     f"| {_cell(row['zeroshot_top1'])} |")
    lines += ["", f"CapFilt against noisy, text-to-image R@1: {summary['capfilt_vs_noisy_t2i_R@1']}.", ""]
    if t["filter_precision"] is not None:
        lines += ["The filter against the truth (the world knows which originals are mismatched): removal precision "
                  f"{_cell(t['filter_precision'])}%, recall {_cell(t['filter_recall'])}%; mismatched among the kept "
                  f"originals {_cell(t['noise_after_filter'])}%."]
        if t["best_threshold_by_truth"] is not None:
            lines += [f"In hindsight the truth would pick threshold {_cell(t['best_threshold_by_truth'], 1.0, 2)}: "
                      f"precision {_cell(t['best_precision_by_truth'])}%, recall {_cell(t['best_recall_by_truth'])}% "
                      f"(the curve: right panel of the filter picture)."]
        lines.append("")
    attrs = [a for a in ("colour", "shape", "size", "position") if t[f"synthetic_{a}_recall_one_object"] is not None]
    if attrs:
        lines += ["Attribute recall on one-object scenes (%): the synthetic captions of the noisy training images, and "
                  "the captioner's beam-search captions of the test images.", "",
                  "| captions | " + " | ".join(attrs) + " |", "|---|" + "---|" * len(attrs),
                  "| synthetic (nucleus) | " + " | ".join(_cell(t[f"synthetic_{a}_recall_one_object"]) for a in attrs)
                  + " |",
                  "| captioner on test (beam 3) | " + " | ".join(_cell(t[f"captioner_{a}_recall_one_object"])
                                                         for a in attrs) + " |", ""]
    first = f"seed{seeds[0]}/bootstrap"
    lines += [f"What the filter made of each caption (seed {seeds[0]}):", "", f"![filter]({first}/filter.png)", "",
              "Examples, original captions:", "", f"![original]({first}/examples/original/grid.png)", "",
              "The same images, synthetic captions:", "", f"![synthetic]({first}/examples/synthetic/grid.png)", "",
              f"Command: `{command}`", ""]
    return "\n".join(lines)


def run_capfilt(cfg: CapFiltConfig, overwrite: bool = False, command: str = "") -> Path:
    """Every stage for every seed, then ``capfilt.json`` and ``capfilt.md`` in ``cfg.out_dir``."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: dict[int, dict[str, Any]] = {}
    for seed in cfg.seeds:
        runs: dict[str, Path] = {}
        runs["noisy"] = run_stage(stage_config(cfg, seed, "noisy", cfg.noisy, cfg.pretrain), overwrite)
        pretrained = ckpt.resolve_checkpoint(runs["noisy"]) / "state.json"
        for stage in ("captioner", "filter"):
            extra = (f"train.init_from={runs['noisy']}", *getattr(cfg, stage))
            runs[stage] = run_stage(stage_config(cfg, seed, stage, cfg.clean, extra), overwrite, (pretrained,))
        boot = run_bootstrap(cfg, seed, runs["captioner"], runs["filter"], overwrite)
        booted = out / f"seed{seed}" / "bootstrap"
        runs["capfilt"] = run_stage(stage_config(cfg, seed, "capfilt", str(booted / "shards"), cfg.pretrain),
                                    overwrite, (booted / "bootstrap.json",))
        results[seed] = _seed_result(runs, boot)
    summary = {**summarise(results), "seeds": results, "wall_seconds": round(time.perf_counter() - t0, 1)}
    (out / "capfilt.json").write_text(json.dumps(summary, indent=2))
    (out / "capfilt.md").write_text(markdown(summary, list(cfg.seeds), command))
    return out
