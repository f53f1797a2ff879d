"""Helpers shared by the benchmarks: environment description, the machine's matmul peak, a timing loop that
interleaves implementations in blocks, FLOP counting, markdown tables and JSON output.

Imported by the scripts in this folder (``python benchmarks/bench_*.py`` puts the folder on ``sys.path``).
Nothing here imports torch at module level, so a benchmark can set thread counts before torch loads.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------------------------------------
# Environment


def cpu_model() -> str:
    """The ``model name`` line of ``/proc/cpuinfo`` (the processor's name), or ``platform``'s guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


MATMUL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_flags(wanted: Sequence[str] = MATMUL_FLAGS) -> list[str]:
    """Which of the ``wanted`` instruction-set flags ``/proc/cpuinfo`` lists (those matmul speed hangs on)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: other work on the machine shows up here and in the timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def env_info() -> dict[str, Any]:
    """Machine and software description saved with every result."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    if "torch" in sys.modules:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["torch_blas"] = "mkl" if torch.backends.mkl.is_available() else "other"
    if "numpy" in sys.modules:
        info["numpy"] = sys.modules["numpy"].__version__
    if "transformers" in sys.modules:
        info["transformers"] = sys.modules["transformers"].__version__
    return info


def machine_line(meta: dict[str, Any]) -> str:
    """One line for a README: CPU, cores, threads, torch version."""
    parts = [meta.get("cpu_model", "?"), f"{meta.get('usable_cpus', '?')} cores"]
    if "torch" in meta:
        parts.append(f"torch {meta['torch']} ({meta.get('torch_threads', '?')} threads)")
    if "transformers" in meta:
        parts.append(f"transformers {meta['transformers']}")
    parts.append(f"Python {meta.get('python', '?')}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------------------
# Timing


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def matmul_peak(sizes: Sequence[int] = (2048, 4096), repeats: int = 5,
                dtype: str = "float32") -> dict[str, Any]:
    """The machine's practical matmul peak: best time of ``repeats`` square ``n x n @ n x n`` products for
    each ``n`` (after one untimed product), GFLOP/s = 2 n^3 / t. The best over sizes is the ``peak`` that MFU
    is measured against (the best, not the median: the peak is what the hardware *can* do)."""
    import torch

    dt = getattr(torch, dtype)
    per_size = {}
    for n in sizes:
        g = torch.Generator().manual_seed(n)
        a = torch.randn(n, n, generator=g).to(dt)
        b = torch.randn(n, n, generator=g).to(dt)
        torch.mm(a, b)  # untimed: first-call setup, page faults of the output
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
        per_size[str(n)] = {"best_s": min(times), "median_s": median(times),
                            "gflops_best": 2 * n**3 / min(times) / 1e9,
                            "gflops_median": 2 * n**3 / median(times) / 1e9}
        del a, b
    best = max(per_size.values(), key=lambda r: r["gflops_best"])
    return {"dtype": dtype, "repeats": repeats, "sizes": per_size, "peak_gflops": best["gflops_best"]}


def interleaved_timing(fns: dict[str, Callable[[], object]], steps: int, warmup: int, block: int,
                       sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Per-call wall times (seconds) of each function in ``fns``.

    Each function first runs ``warmup`` untimed calls (all functions' warmups before any timing); then the
    functions take turns in blocks of ``block`` timed calls until each has ``steps``: A A A B B B A A A ...
    Slow drift of the machine (other jobs, thermal state) then hits every implementation alike instead of
    whichever happened to run last.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if sync:
        sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    while any(len(t) < steps for t in times.values()):
        for name, fn in fns.items():
            for _ in range(min(block, steps - len(times[name]))):
                t0 = time.perf_counter()
                fn()
                if sync:
                    sync()
                times[name].append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------------------------------------
# FLOP counting


def count_flops(fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """FLOPs that ``fn()`` executes (total, per op), by the counter every training run uses
    (``counterpoint.train.compute``), imported here lazily so torch loads after the thread settings."""
    from counterpoint.train.compute import count_flops as count

    return count(fn)


# ----------------------------------------------------------------------------------------------------------
# Output


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """``align``: one character per column, ``l`` or ``r`` (default: first column left, the rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {path}")
