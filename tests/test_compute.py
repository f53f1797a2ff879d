"""Compute accounting (``train/compute.py``): FLOPs counted against hand-computed values, and every run's
samples, GFLOP and MFU in metrics.jsonl, eval.json and report.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from counterpoint.train.compute import compute_summary, count_flops, matmul_peak_gflops
from counterpoint.train.loop import train
from tests.conftest import tiny_config


def test_linear_forward_and_backward_count_six_b_i_o() -> None:
    """y = x W^T: 2 B I O forward; the gradients of x and of W are 2 B I O each (the bias adds no matmul)."""
    layer = torch.nn.Linear(24, 40)
    x = torch.randn(8, 24, requires_grad=True)
    total, per_op = count_flops(lambda: layer(x).sum().backward())
    assert total == 6 * 8 * 24 * 40
    assert sum(per_op.values()) == total


def test_cpu_attention_is_counted_as_its_two_matmuls() -> None:
    """softmax(Q K^T) V on CPU's flash kernel: 2 b h s s d for Q K^T and as much for P V (torch's convention)."""
    q, k, v = (torch.randn(2, 3, 10, 8) for _ in range(3))
    total, _ = count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    assert total == 2 * (2 * 2 * 3 * 10 * 10 * 8)


def test_matmul_peak_is_a_positive_rate() -> None:
    peak = matmul_peak_gflops(torch.device("cpu"), n=256, repeats=2)
    assert 0.1 < peak < 1e5


def test_summary_takes_the_median_mfu_and_the_last_totals() -> None:
    rows = [{"step": s, "samples_seen": 32 * s, "gflop": 0.5 * s, "mfu": m, "matmul_peak_gflops": 60.0}
            for s, m in ((1, 0.01), (2, 0.3), (3, 0.2))]
    assert compute_summary(rows) == {"samples_seen": 96, "train_gflop": 1.5, "gflop_per_sample": 0.015625,
                                     "matmul_peak_gflops": 60.0, "mfu": 0.2}
    assert compute_summary([{"step": 1, "loss": 2.0}]) is None  # a run logged before compute was counted


@pytest.mark.slow
def test_every_run_reports_its_compute(small_world: Path, tmp_path: Path) -> None:
    """Each metrics row: cumulative GFLOP (steps x the first step's count) and the interval's MFU; eval.json
    and report.md carry the totals."""
    cfg = tiny_config(small_world, tmp_path / "run", max_steps=6)
    cfg.eval.linear_probe = False
    run = train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    per_step = rows[0]["gflop"]
    assert per_step > 0
    for r in rows:
        assert r["gflop"] == pytest.approx(per_step * r["step"], rel=1e-3)
        # no upper bound: the peak is timed once at start, and a machine busy then reads a low peak
        assert r["mfu"] > 0 and r["matmul_peak_gflops"] > 0
    compute = json.loads((run / "eval.json").read_text())["compute"]
    assert compute["samples_seen"] == 6 * 64 and compute["train_gflop"] == rows[-1]["gflop"]
    assert "## Compute" in (run / "report.md").read_text()
