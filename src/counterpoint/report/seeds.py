"""Results over seeds: mean and spread, and whether two methods differ by more than the spread explains."""

from __future__ import annotations

import statistics
from typing import Any


def over_seeds(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation over seeds (``std`` is ``None`` for one seed: no spread is known)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "values": values}


def verdict(a: dict[str, Any], b: dict[str, Any]) -> str:
    """How mean ``a`` compares with mean ``b`` (fractions, reported in points), claiming a difference only when
    it exceeds twice its standard error; with one seed nothing can be claimed."""
    delta = 100 * (a["mean"] - b["mean"])
    n = len(a["values"])
    if n < 2 or a["std"] is None or b["std"] is None:
        return f"{delta:+.1f} points on one seed: too few seeds to tell a difference from noise"
    se = 100 * ((a["std"] ** 2 + b["std"] ** 2) / n) ** 0.5
    if abs(delta) <= 2 * se:
        return f"{delta:+.1f} points, within the seed-to-seed spread (2 standard errors: {2 * se:.1f}): no clear " \
               f"difference"
    return f"{delta:+.1f} points, more than 2 standard errors ({2 * se:.1f}): {'above' if delta > 0 else 'below'}"


def plus_minus(s: dict[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± std`` (scaled), or the mean alone for one seed."""
    if s["std"] is None:
        return f"{scale * s['mean']:.{digits}f}"
    return f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"
