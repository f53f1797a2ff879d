"""``counterpoint balance compare``: a set of methods over several seeds on one benchmark, summarised as a
table (markdown + JSON) and the Figure-1-style plots.

Every run is an ordinary balance run (its own run directory under ``out_dir``, model selection on val, test
evaluated once for the selected checkpoint); the benchmark is generated or loaded once and shared. A run
whose directory already holds a finished run of the very same config is reused, so an interrupted
comparison continues where it stopped and a finished one is re-summarised in seconds (``--overwrite``
retrains everything).

``compare.json``: ``methods`` (label -> ``acc`` / ``shapley`` -> name -> ``{"mean", "std", "values"}`` over
seeds on test, ``selected_epoch``, ``step_ms``, ``conflict_rate``), ``weak_modality`` (the modality joint training
leaves furthest below its unimodal-alone accuracy when both methods ran, else the lowest unimodal-head accuracy
of the first method), ``seeds``, ``imbalance``
(when ``joint`` and ``unimodal`` both ran: the weak modality's accuracy under each and the gap in points),
``versus_uniform`` (each MMPareto entry's fused mean minus uniform's, when uniform ran), ``wall_seconds`` (of
this invocation; reused runs cost nothing) and ``train_seconds`` (sum over runs of their training time).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from counterpoint.config import to_dict
from counterpoint.report.plots_balance import plot_compare_accuracy, plot_compare_cosine
from counterpoint.report.run_report import read_metrics
from counterpoint.report.seeds import over_seeds, plus_minus, verdict
from counterpoint.train.balance_config import BalanceConfig, MethodConfig
from counterpoint.train.balance_loop import load_benchmark, train_balance


def summarise(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per method label, mean/std over seeds of the test accuracies, Shapley values and costs."""
    table = {}
    for label, runs in results.items():
        keys = list(runs[0]["test"]["acc"])
        row: dict[str, Any] = {"acc": {k: over_seeds([r["test"]["acc"][k] for r in runs]) for k in keys}}
        if "shapley" in runs[0]["test"]:
            row["shapley"] = {k: over_seeds([r["test"]["shapley"][k] for r in runs]) for k in runs[0]["modalities"]}
        row["selected_epoch"] = over_seeds([float(r["selected_epoch"]) for r in runs])
        row["step_ms"] = over_seeds([r["step_ms"] for r in runs])
        row["conflict_rate"] = {k: over_seeds([r["conflict_rate"][k] for r in runs]) for k in runs[0]["conflict_rate"]}
        table[label] = row
    return table


def _by_name(methods: tuple[MethodConfig, ...], name: str) -> str | None:
    return next((m.display for m in methods if m.name == name), None)


def findings(table: dict[str, dict[str, Any]], methods: tuple[MethodConfig, ...],
             modalities: list[str]) -> dict[str, Any]:
    """The weak modality, the imbalance under joint training, and MMPareto against uniform."""
    joint, alone = _by_name(methods, "joint"), _by_name(methods, "unimodal")
    if joint and alone:  # under-trained by joint training: the largest drop below training alone
        weak = max(modalities, key=lambda k: table[alone]["acc"][k]["mean"] - table[joint]["acc"][k]["mean"])
    else:
        weak = min(modalities, key=lambda k: table[methods[0].display]["acc"][k]["mean"])
    out: dict[str, Any] = {"weak_modality": weak}
    if joint and alone:
        a, b = table[joint]["acc"][weak]["mean"], table[alone]["acc"][weak]["mean"]
        out["imbalance"] = {"joint": a, "unimodal": b, "gap_points": 100 * (b - a)}
    uniform = _by_name(methods, "uniform")
    if uniform:
        base = table[uniform]["acc"]["fused"]["mean"]
        out["versus_uniform"] = {m.display: 100 * (table[m.display]["acc"]["fused"]["mean"] - base)
                                 for m in methods if m.name == "mmpareto"}
        out["versus_uniform_verdict"] = {m.display: verdict(table[m.display]["acc"]["fused"],
                                                            table[uniform]["acc"]["fused"])
                                         for m in methods if m.name == "mmpareto"}
    return out


def _finished(run_dir: Path, cfg: BalanceConfig) -> bool:
    """A completed run (eval.json written) of exactly ``cfg``."""
    if not (run_dir / "eval.json").is_file() or not (run_dir / "config.yaml").is_file():
        return False
    return yaml.safe_load((run_dir / "config.yaml").read_text()) == to_dict(cfg)


def markdown(summary: dict[str, Any], modalities: list[str], command: str) -> str:
    table, weak = summary["methods"], summary["weak_modality"]
    has_phi = all("shapley" in row for row in table.values())
    head = ["method", "fused", *modalities, *(f"Shapley {k}" for k in modalities if has_phi),
            "epoch (val)", "step ms", "conflict rate"]
    spread = "mean ± std over seeds" if len(summary["seeds"]) > 1 else "one seed (no spread known), seed"
    lines = [f"Test accuracy (%) at the epoch chosen on validation, {spread} {summary['seeds']}; "
             f"weak modality: **{weak}**. Shapley: contribution (points) of each modality to the fused accuracy. "
             "Conflict rate: fraction of steps with cos(g_m, g_u) < 0, per encoder.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in table.items():
        cells = [label, plus_minus(row["acc"]["fused"]), *(plus_minus(row["acc"][k]) for k in modalities)]
        if has_phi:
            cells += [plus_minus(row["shapley"][k]) for k in modalities]
        cells += [plus_minus(row["selected_epoch"], 1.0), plus_minus(row["step_ms"], 1.0),
                  ", ".join(f"{k} {v['mean']:.2f}" for k, v in row["conflict_rate"].items()) or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if "imbalance" in summary:
        im = summary["imbalance"]
        lines.append(f"Imbalance: under joint training the {weak} unimodal head reaches {100 * im['joint']:.1f}%, "
                     f"{im['gap_points']:.1f} points below the {weak}-alone model ({100 * im['unimodal']:.1f}%).")
    for label, said in summary.get("versus_uniform_verdict", {}).items():
        lines.append(f"{label} against uniform on fused accuracy: {said}.")
    lines += ["", f"Command: `{command}`", "", "![accuracy](compare_accuracy.png)", "",
              "![cosine](compare_cosine.png)", ""]
    return "\n".join(lines)


def compare(cfg: BalanceConfig, overwrite: bool = False, command: str = "") -> Path:
    """Run every method of ``cfg.compare`` (or ``cfg.method`` alone) on every seed; write ``compare.json``,
    ``compare.md`` and the plots to ``cfg.out_dir``; returns that folder."""
    methods = cfg.compare.methods or (cfg.method,)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = load_benchmark(cfg.data)
    results: dict[str, list[dict[str, Any]]] = {m.display: [] for m in methods}
    curves: dict[str, list[dict[str, Any]]] = {}
    bar = tqdm(total=len(methods) * len(cfg.compare.seeds), unit=" run", desc="compare",
               disable=not cfg.train.progress, dynamic_ncols=True)
    for method in methods:
        for seed in cfg.compare.seeds:
            bar.set_postfix(method=method.display, seed=seed)
            run_cfg = dataclasses.replace(cfg, out_dir=str(out / f"{method.display}-seed{seed}"), seed=seed,
                                          method=method, train=dataclasses.replace(cfg.train, progress=False))
            run_dir = Path(run_cfg.out_dir)
            if overwrite or not _finished(run_dir, run_cfg):
                # a run cut off before its eval.json is started again; a finished one of another config is
                # refused (train_balance) unless --overwrite
                train_balance(run_cfg, data, overwrite or not (run_dir / "eval.json").is_file())
            results[method.display].append(json.loads((run_dir / "eval.json").read_text()))
            if method.display not in curves:  # the first seed's curves are plotted
                curves[method.display] = read_metrics(run_dir / "metrics.jsonl")
            bar.update(1)
    bar.close()
    modalities = results[methods[0].display][0]["modalities"]
    table = summarise(results)
    summary = {"methods": table, "seeds": list(cfg.compare.seeds), **findings(table, methods, modalities),
               "wall_seconds": round(time.perf_counter() - t0, 1),
               "train_seconds": round(sum(r["train_seconds"] for runs in results.values() for r in runs), 1),
               "benchmark": data.name, "data": data.info}
    (out / "compare.json").write_text(json.dumps(summary, indent=2))
    plot_compare_accuracy(table, summary["weak_modality"], out / "compare_accuracy.png")
    plot_compare_cosine(curves, modalities, out / "compare_cosine.png")
    (out / "compare.md").write_text(markdown(summary, modalities, command))
    return out
