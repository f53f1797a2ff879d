"""What a run costs in compute, so runs on different machines can be compared: FLOPs counted op by op, and the
machine's matmul peak measured in a fraction of a second, for the model FLOPs utilisation (MFU).

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` while the first training step runs (the
counter only watches the ops, so the step computes exactly what it would have), the way
``benchmarks/bench_train.py`` counts them: matmuls, convolutions and attention, forward and backward;
elementwise ops, norms and the optimizer count 0 (the PaLM convention, Chowdhery et al. 2022, appendix B).
What runs is what is counted: with GradCache (``train.accum_steps > 1``) the second forward pass of every
micro-batch is counted too, and a BriVL step includes the momentum towers' forward.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def _cpu_sdpa_mapping() -> dict[Any, Callable[..., int]]:
    """FLOP formulas for the CPU flash-attention kernels that ``FlopCounterMode`` does not know (it counts
    only the CUDA ones; without this, attention would add 0 FLOPs on CPU). Same convention as torch's CUDA
    formulas: QK^T and PV (and their gradients) counted as dense matmuls, even under a causal mask."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def fwd(query, key, value, *args, out_shape=None, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        return sdpa_flop_count(query, key, value)

    def bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        return sdpa_backward_flop_count(grad_out, query, key, value)

    return {aten._scaled_dot_product_flash_attention_for_cpu: fwd,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd}


class FlopCount:
    """Filled in by :func:`counting_flops` when its block ends."""

    total: int = 0
    per_op: dict[str, int]

    def __init__(self) -> None:
        self.per_op = {}


@contextmanager
def counting_flops() -> Iterator[FlopCount]:
    """``with counting_flops() as count: ...``: the FLOPs the block executed, in ``count.total`` and
    ``count.per_op`` once it ends."""
    from torch.utils.flop_counter import FlopCounterMode

    count = FlopCount()
    with FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_mapping()) as counter:
        yield count
    count.total = int(counter.get_total_flops())
    count.per_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}


def count_flops(fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """FLOPs that ``fn()`` executes: the total and the per-op totals."""
    with counting_flops() as count:
        fn()
    return count.total, count.per_op


def matmul_peak_gflops(device: torch.device, n: int | None = None, repeats: int = 3) -> float:
    """The machine's fp32 matmul rate in GFLOP/s, the best of ``repeats`` square products of size ``n``
    (1024 on CPU: ~0.1 s on 2 slow cores; 4096 on GPU), after one untimed product. Cheap enough to run at the
    start of every run, and measured once per process, device and thread count (several runs in one Python
    session share it); ``benchmarks/common.matmul_peak`` measures it more thoroughly (larger sizes)."""
    n = n or (4096 if device.type == "cuda" else 1024)
    return _measured_peak(device, n, repeats, torch.get_num_threads())


@functools.cache
def _measured_peak(device: torch.device, n: int, repeats: int, threads: int) -> float:
    gen = torch.Generator().manual_seed(n)
    a = torch.randn(n, n, generator=gen).to(device)
    b = torch.randn(n, n, generator=gen).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def compute_summary(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """eval.json's ``compute`` from a run's metrics rows: samples seen, training GFLOP, the measured matmul
    peak and the MFU (median over the logged intervals, so the first one, which also counted the FLOPs, and a
    checkpoint save do not decide it). ``None`` for a run logged before compute was counted."""
    rows = [r for r in rows if isinstance(r.get("gflop"), (int, float)) and isinstance(r.get("mfu"), (int, float))]
    if not rows:
        return None
    mfu = sorted(r["mfu"] for r in rows)
    return {"samples_seen": rows[-1]["samples_seen"], "train_gflop": rows[-1]["gflop"],
            "gflop_per_sample": round(rows[-1]["gflop"] / max(rows[-1]["samples_seen"], 1), 6),
            "matmul_peak_gflops": rows[-1]["matmul_peak_gflops"], "mfu": mfu[len(mfu) // 2]}
