"""Exact resume: a run stopped at step k and resumed equals an uninterrupted run, step for step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from counterpoint.errors import UserError
from counterpoint.train.loop import train
from tests.conftest import tiny_config

NO_EVAL = {"zeroshot": False, "retrieval": False, "linear_probe": False}


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(run / "checkpoints" / latest / "model.safetensors")


@pytest.mark.slow
def test_resume_replays_the_uninterrupted_run(small_world: Path, tmp_path: Path) -> None:
    """Stopped at step 7 by max_steps, between checkpoints; resumed, every step's loss and the final weights are
    those of the run that went straight through (BatchNorm CNN; the ViT and every task: the contract test)."""
    def cfg(out: str, **train_kw: object):
        c = tiny_config(small_world, tmp_path / out, epochs=1, checkpoint_every=5, **train_kw)
        for k, v in NO_EVAL.items():
            setattr(c.eval, k, v)
        return c

    full = train(cfg("full"))
    stopped = train(cfg("resumed", max_steps=7))  # stops at 7 (between checkpoints), saves step 7
    assert [s for s, _ in _losses(stopped)] == list(range(1, 8))
    with pytest.raises(UserError, match="--resume"):
        train(cfg("resumed"))
    resumed = train(cfg("resumed"), resume=True)

    assert _losses(resumed) == _losses(full)  # bit-identical per-step losses, every step logged once
    a, b = _final_weights(full), _final_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
