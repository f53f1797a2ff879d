"""PNG plots of a run: training curves and evaluation results (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib import ticker  # noqa: E402


def metric_series(rows: list[dict[str, Any]], key: str, x: str = "step") -> tuple[list[int], list[float]]:
    """``(x values, values)`` of ``key``; rows where it is null (a non-finite value, logged as null) are left
    out."""
    pts = [(r[x], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and x in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def curve_figure(rows: list[dict[str, Any]], keys: list[str], ylabel: str, title: str, logy: bool,
                 x: str = "step") -> plt.Figure:
    """One panel of training curves: every key in ``keys`` against ``x`` (the step, or samples seen)."""
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for key in keys:
        steps, values = metric_series(rows, key, x)
        # a short run has few log rows: mark them, a line alone hides how few there are
        ax.plot(steps, values, label=key, linewidth=1.2, marker="o" if len(steps) <= 30 else None, markersize=3)
    ax.set_xlabel(x.replace("_", " "))
    if x == "samples_seen":
        ax.xaxis.set_major_formatter(ticker.EngFormatter(sep=""))  # 150k, not 150000
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy and all(v > 0 for k in keys for v in metric_series(rows, k)[1]):
        ax.set_yscale("log")
        # plain numbers on a log axis: "2" and "0.5", not "2x10^0" and "5x10^-1"
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    if len(keys) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_curves(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """``loss.png`` (every loss term), ``temperature.png``, ``lr.png`` and, with periodic evaluation,
    ``zeroshot.png`` (top-1 against samples seen) from metrics.jsonl rows."""
    written = []
    terms = sorted({k for r in rows for k in r if k.startswith("loss/")})
    loss_keys = ["loss", *terms] if len(terms) > 1 else ["loss"]  # one term is the total: draw it once
    panels = [("loss.png", loss_keys, "loss", "Training loss", True, "step"),
              ("temperature.png", ["temperature"], "temperature", "Temperature (1 / logit scale)", True, "step"),
              ("lr.png", ["lr"], "learning rate", "Learning rate schedule", False, "step"),
              ("zeroshot.png", [f"zeroshot/{s}" for s in ("heldout", "seen", "all")], "top-1",
               "Zero-shot top-1 during training", False, "samples_seen")]
    for name, keys, ylabel, title, logy, x in panels:
        present = [k for k in keys if metric_series(rows, k)[0]]
        if not present:
            continue
        fig = curve_figure(rows, present, ylabel, title, logy, x)
        fig.savefig(out_dir / name)
        plt.close(fig)
        written.append(out_dir / name)
    return written


def plot_eval(result: dict[str, Any], out_dir: Path) -> Path | None:
    """``eval.png``: a bar per headline metric (zero-shot subsets, Recall@K both ways, linear probe)."""
    bars: list[tuple[str, float]] = []
    zs = result.get("zeroshot", {})
    for subset in ("heldout", "seen", "all"):
        if subset in zs:
            bars.append((f"zero-shot\n{subset}", zs[subset]["top1"]))
    for direction, short in (("image_to_text", "i2t"), ("text_to_image", "t2i")):
        for k, v in result.get("retrieval", {}).get(direction, {}).items():
            bars.append((f"{short}\n{k}", v))
    if "linear_probe" in result:
        bars.append(("linear\nprobe", result["linear_probe"]["top1"]))
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(bars)), 3.5), dpi=110)
    names, values = zip(*bars)
    ax.bar(range(len(bars)), values, color="#4472c4")
    for i, v in enumerate(values):
        ax.text(i, v + 0.01, f"{v:.2f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(bars)), names, fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("accuracy / recall")
    ax.set_title(f"Evaluation at step {result['step']}" if "step" in result else "Evaluation")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out_dir / "eval.png"
    fig.savefig(path)
    plt.close(fig)
    return path
