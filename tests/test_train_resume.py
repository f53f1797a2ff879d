"""Exact resume: a run stopped at step k and resumed equals an uninterrupted run, step for step."""

from __future__ import annotations

import json
import shutil
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
@pytest.mark.parametrize("model", ["tiny-cnn", "tiny-vit"])
def test_resume_replays_the_uninterrupted_run(small_world: Path, tmp_path: Path, model: str) -> None:
    def cfg(out: str, **train_kw: object):
        c = tiny_config(small_world, tmp_path / out, checkpoint_every=5, **train_kw)
        c.model.name = model
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


@pytest.mark.slow
def test_resume_from_mid_run_checkpoint_after_a_crash(small_world: Path, tmp_path: Path) -> None:
    """A crash leaves only the periodic checkpoint; resuming from it still reproduces the full run."""
    base = tiny_config(small_world, tmp_path / "ref", checkpoint_every=5)
    for k, v in NO_EVAL.items():
        setattr(base.eval, k, v)
    ref = train(base)

    crashed = tiny_config(small_world, tmp_path / "crash", checkpoint_every=5, keep_checkpoints=10)
    for k, v in NO_EVAL.items():
        setattr(crashed.eval, k, v)
    train(crashed)
    ckpts = Path(crashed.out_dir) / "checkpoints"
    # Simulate a crash after step 13: keep only the step-10 checkpoint and the log up to step 13.
    for d in ckpts.glob("step-*"):
        if d.name != "step-00000010":
            shutil.rmtree(d)
    (ckpts / "latest").write_text("step-00000010\n")
    rows = (Path(crashed.out_dir) / "metrics.jsonl").read_text().splitlines()[:13]
    (Path(crashed.out_dir) / "metrics.jsonl").write_text("\n".join(rows) + "\n")

    resumed = train(crashed, resume=True)
    assert _losses(resumed) == _losses(ref)
    a, b = _final_weights(ref), _final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
