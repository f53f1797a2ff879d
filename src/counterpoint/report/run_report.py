"""``report.md``: a human-readable summary of a run that links its plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``. A line that is not a JSON object with an integer ``step`` (the half
    line a crash or a full disk leaves at the end, or damage) is left out: the log is a record, and one bad
    line must not stop a resume or an evaluation."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row["step"], bool):
            rows.append(row)
    return rows


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def write_report(run_dir: Path, result: dict[str, Any], rows: list[dict[str, Any]], summary: dict[str, Any]) -> Path:
    lines = [f"# counterpoint run: `{run_dir.name}`", ""]
    lines += ["## Summary", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in summary.items()]
    lines.append("")
    compute = result.get("compute")
    if compute:
        lines += ["## Compute", "",
                  f"{compute['samples_seen']:,} training samples seen, {compute['train_gflop']:,.1f} GFLOP of training "
                  f"({compute['gflop_per_sample']:.4f} per sample; matmuls, convolutions and attention, forward and "
                  f"backward, counted on the first step). Model FLOPs utilisation {100 * compute['mfu']:.1f}% "
                  f"(median over the logged intervals) of a matmul peak of {compute['matmul_peak_gflops']:,.1f} "
                  f"GFLOP/s measured at the start of the run.", ""]
    not_run = result.get("skipped_evaluations") or {}
    if not_run:
        lines += ["## Not evaluated", ""]
        lines += [f"* {what.replace('_', ' ')}: {why}" for what, why in not_run.items()]
        lines.append("")
    zs = result.get("zeroshot")
    if zs:
        lines += ["## Zero-shot classification", "",
                  f"{zs['num_classes']} classes, {zs['num_templates']} prompt templates per class"
                  + (f"; images from `{result['zeroshot_data']['path']}`, classes from "
                     f"{result['zeroshot_data']['classes']}." if "zeroshot_data" in result else "."), "",
                  "| subset | top-1 | top-5 | images |", "|---|---|---|---|"]
        for subset in ("heldout", "seen", "all"):
            if subset in zs:
                s = zs[subset]
                lines.append(f"| {subset} | {s['top1']:.4f} | {s.get('top5', float('nan')):.4f} | {s['n']} |")
        lines.append("")
    ret = result.get("retrieval")
    if ret:
        ks = list(ret["image_to_text"])
        lines += ["## Retrieval", "", f"{ret['n']} test pairs.", "",
                  "| direction | " + " | ".join(ks) + " |", "|---|" + "---|" * len(ks)]
        for direction in ("image_to_text", "text_to_image"):
            lines.append(f"| {direction} | " + " | ".join(f"{ret[direction][k]:.4f}" for k in ks) + " |")
        lines.append("")
    itm = result.get("retrieval_itm")
    if itm:
        ks = list(itm["image_to_text"])
        lines += [f"Re-ranked by the matching head (top {itm['k']} ITC candidates of each query, BLIP's protocol):",
                  "", "| direction | " + " | ".join(ks) + " |", "|---|" + "---|" * len(ks)]
        for direction in ("image_to_text", "text_to_image"):
            lines.append(f"| {direction} | " + " | ".join(f"{itm[direction][k]:.4f}" for k in ks) + " |")
        lines.append("")
    cap = result.get("captioning")
    if cap:
        lines += ["## Captioning", "", f"{cap['n']} test images captioned ({cap['method']}); "
                  + (f"BLEU-4 {cap['bleu4']:.4f}, CIDEr {cap['cider']:.4f} against {cap['references_per_image']} "
                     f"references per image." if "bleu4" in cap else cap.get("bleu_cider_skipped", "")), ""]
        attributes = cap.get("attributes")
        if attributes:
            lines += ["What the captions name against what the scenes hold (precision / recall):", "",
                      "| scenes | n | size | colour | shape | place |", "|---|---|---|---|---|---|"]
            for group, s in attributes.items():
                cells = [f"{s[f'{a}_precision']:.3f} / {s[f'{a}_recall']:.3f}" for a in ("size", "colour", "shape",
                                                                                      "place")]
                lines.append(f"| {group.replace('_', ' ')} | {s['n']} | " + " | ".join(cells) + " |")
            lines.append("")
        if cap.get("grid"):
            lines += [f"![captions of test images]({cap['grid']})", ""]
    curve = result.get("zeroshot_during_training")
    if curve:
        track = "held-out" if "heldout" in curve else "overall"
        reached = curve["samples_to_threshold"]
        lines += ["## Zero-shot during training", "",
                  f"Evaluated {len(curve['step'])} times (`eval.every_steps`). {track.capitalize()} top-1 "
                  + (f"first reached {curve['threshold']:g} after {reached:,} training samples."
                     if reached is not None else f"never reached {curve['threshold']:g} (last: "
                     f"{curve.get('heldout', curve['all'])[-1]:.4f})."), "",
                  "![zero-shot top-1 during training](zeroshot.png)", ""]
    lp = result.get("linear_probe")
    if lp:
        lines += ["## Linear probe", "",
                  f"Test top-1 {lp['top1']:.4f} (validation {lp['val_top1']:.4f}, l2 = {lp['l2']:g}, "
                  f"{lp['n_train']} train / {lp['n_test']} test images).", ""]
    ap = result.get("attentive_probe")
    if ap:
        lines += ["## Attentive probe", "",
                  f"Test top-1 {ap['top1']:.4f} (validation {ap['val_top1']:.4f} at epoch {ap['epoch']}, "
                  f"{ap['n_train']} train / {ap['n_test']} test images): a learned attention pooling and a linear "
                  f"layer on the frozen image tokens.", ""]
    imagined = result.get("imagine", {})
    if imagined.get("grid"):
        lines += ["## Imagination", "", "Images optimised so that the model's image embedding matches each class "
                  "prompt (Fourier parameterisation, random transforms; `counterpoint imagine` makes more). Final "
                  "cosine to the prompt: " + ", ".join(f"{c:.2f}" for c in imagined["cosine"]) + ".", "",
                  f"![imagined class prompts]({imagined['grid']})", ""]
    skipped = result.get("data", {}).get("skipped", {})
    lines += ["## Data", "", "Samples that could not be used, each counted once; a streamed run meets a damaged "
              "sample again every epoch (`times met`).", "",
              "| split | skipped samples | times met | reasons |", "|---|---|---|---|"]
    for split, s in skipped.items():
        reasons = ", ".join(f"{k}: {v}" for k, v in s["by_reason"].items()) or "-"
        lines.append(f"| {split} | {s['total']} | {s.get('occurrences', s['total'])} | {reasons} |")
    lines.append("")
    lines += ["## Plots", ""]
    for name, title in (("loss.png", "Training loss"), ("temperature.png", "Temperature"),
                        ("lr.png", "Learning rate"), ("eval.png", "Evaluation")):
        if (run_dir / name).exists():
            lines += [f"### {title}", "", f"![{title}]({name})", ""]
    if rows:
        lines += ["## Last logged step", "", "```", json.dumps(rows[-1], indent=1), "```", ""]
    lines += ["Files: `config.yaml` (resolved config), `metrics.jsonl`, `eval.json`, `checkpoints/`.", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
