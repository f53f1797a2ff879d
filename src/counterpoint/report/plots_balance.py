"""Plots of balanced multimodal training, after Figure 1 of MMPareto (Wei & Hu, ICML 2024): cos(g_m, g_u)
per encoder over the steps, and multimodal vs weak-modality accuracy per method."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from counterpoint.report.plots import metric_series  # noqa: E402  (after the backend)


def _cosines(rows: list[dict[str, Any]], modality: str) -> tuple[list[int], list[float]]:
    return metric_series(rows, f"cos/{modality}")


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the raw per-step cosine is noisy)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_run_cosine(rows: list[dict[str, Any]], modalities: Sequence[str], path: Path, title: str) -> Path | None:
    """cos(g_m, g_u) over steps, one line per encoder (raw, faint, and a 10-step moving average)."""
    series = {k: _cosines(rows, k) for k in modalities}
    if not any(s[0] for s in series.values()):
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.5), dpi=110)
    for i, (k, (steps, cos)) in enumerate(series.items()):
        ax.plot(steps, cos, color=f"C{i}", alpha=0.25, linewidth=0.8)
        ax.plot(steps, _smooth(cos, 10), color=f"C{i}", linewidth=1.6, label=f"{k} encoder")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("cos(g_multimodal, g_unimodal)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_run_accuracy(rows: list[dict[str, Any]], modalities: Sequence[str], path: Path,
                      selected_epoch: int) -> Path | None:
    """Validation accuracy per epoch of the fused head and every unimodal head; the selected epoch marked."""
    epochs = [r for r in rows if "val/acc/fused" in r]
    if not epochs:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.5), dpi=110)
    for key in ("fused", *modalities):
        ax.plot([r["epoch"] for r in epochs], [r[f"val/acc/{key}"] for r in epochs], marker=".", label=key)
    ax.axvline(selected_epoch, color="grey", linestyle="--", linewidth=0.8, label="selected (val)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_compare_cosine(runs: Mapping[str, list[dict[str, Any]]], modalities: Sequence[str],
                        path: Path) -> Path | None:
    """One panel per encoder, one smoothed cos(g_m, g_u) line per method (the methods that log it)."""
    logged = {m: rows for m, rows in runs.items() if any(_cosines(rows, k)[0] for k in modalities)}
    if not logged:
        return None
    fig, axes = plt.subplots(1, len(modalities), figsize=(5 * len(modalities), 3.5), dpi=110, squeeze=False)
    for ax, k in zip(axes[0], modalities):
        for i, (method, rows) in enumerate(logged.items()):
            steps, cos = _cosines(rows, k)
            ax.plot(steps, _smooth(cos, 10), color=f"C{i}", linewidth=1.3, label=method)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(f"{k} encoder")
        ax.set_xlabel("step")
        ax.set_ylabel("cos(g_m, g_u), 10-step mean")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


def plot_compare_accuracy(table: Mapping[str, Mapping[str, Any]], weak: str, path: Path) -> Path:
    """Per method, test accuracy (mean and std over seeds) of the fused head and of the weak modality."""
    methods = list(table)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(methods)), 3.8), dpi=110)
    width = 0.38
    for j, (key, label) in enumerate((("fused", "multimodal (fused head)"), (weak, f"{weak} (unimodal head)"))):
        means = [table[m]["acc"][key]["mean"] for m in methods]
        stds = [table[m]["acc"][key]["std"] for m in methods]
        xs = [i + (j - 0.5) * width for i in range(len(methods))]
        errors = None if None in stds else stds  # one seed: no error bars rather than bars of zero
        ax.bar(xs, means, width, yerr=errors, capsize=3, label=label, color=f"C{j}")
        for x, v in zip(xs, means):
            ax.text(x, v + 0.015, f"{v:.2f}", ha="center", fontsize=7)
    ax.set_xticks(range(len(methods)), methods, fontsize=8, rotation=15)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
