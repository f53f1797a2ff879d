"""``report.md`` of a balanced multimodal training run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from counterpoint.train.balance_config import BalanceConfig


def write_balance_report(run_dir: Path, result: dict[str, Any], cfg: BalanceConfig) -> Path:
    mods = result["modalities"]
    lines = [f"# counterpoint balance run: `{run_dir.name}`", "",
             f"Method **{result['method']}** (`{result['combiner']}`), fusion `{cfg.model.fusion}`, seed "
             f"{result['seed']}, {result['steps']} steps in {result['train_seconds']} s "
             f"(median step {result['step_ms']} ms).", "",
             f"Selected epoch **{result['selected_epoch']}** of {cfg.train.epochs}: the best validation "
             f"accuracy ({'fused head' if result['select_on'] == 'fused' else 'mean of the unimodal heads'}). "
             "The test split was evaluated for that checkpoint only.", "",
             "## Accuracy", "", "| split | fused | " + " | ".join(mods) + " |", "|---|---|" + "---|" * len(mods)]
    for split in ("val", "test"):
        acc = result[split]["acc"]
        lines.append(f"| {split} (n={result[split]['n']}) | {acc['fused']:.4f} | "
                     + " | ".join(f"{acc[k]:.4f}" for k in mods) + " |")
    lines.append("")
    if "shapley" in result["test"]:
        phi = result["test"]["shapley"]
        lines += ["## Modality contribution (test)", "",
                  f"Exact Shapley value of each modality to the fused accuracy; a missing modality's input is "
                  f"replaced by its {result['shapley_baseline']} baseline. The values sum to v(all) - v(none), "
                  f"v(none) = {result['test']['subsets']['']:.4f}.", "",
                  "| modality | Shapley |", "|---|---|"]
        lines += [f"| {k} | {phi[k]:.4f} |" for k in mods]
        lines.append("")
    if result["conflict_rate"]:
        lines += ["## Gradient conflicts", "", "Fraction of logged steps with cos(g_m, g_u) < 0 per encoder: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in result["conflict_rate"].items()) + ".", ""]
    lines += ["## Plots", ""]
    for name, title in (("cosine.png", "cos(g_m, g_u) per encoder"), ("accuracy.png", "Validation accuracy")):
        if (run_dir / name).exists():
            lines += [f"### {title}", "", f"![{title}]({name})", ""]
    lines += ["Files: `config.yaml` (resolved config), `metrics.jsonl`, `eval.json`, "
              "`checkpoints/best/model.safetensors`.", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
