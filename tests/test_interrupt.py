"""Ctrl-C (SIGINT) and SIGTERM during training: the step finishes, a checkpoint is saved, the command exits
130, and --resume then replays the uninterrupted run exactly (issue 9)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from counterpoint.cli import main
from counterpoint.config import save_config
from counterpoint.train import checkpoint as ckpt
from counterpoint.train.loop import train
from tests.conftest import tiny_config


def _cfg(world: Path, out: Path):
    return tiny_config(world, out, evaluate=False, checkpoint_every=1000)  # no periodic checkpoint before the end


def _signal_after_rows(metrics: Path, rows: int, signum: int) -> threading.Thread:
    """Sends ``signum`` to this process once ``metrics`` holds ``rows`` lines (the loop is mid-run)."""
    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= rows:
                os.kill(os.getpid(), signum)
                return
            time.sleep(0.002)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_and_resume_replays_the_run(
        small_world: Path, tmp_path: Path, signum: int, capsys: pytest.CaptureFixture) -> None:
    """The interrupted run stops at a step boundary with a checkpoint there; resuming ends bit-identical."""
    reference = train(_cfg(small_world, tmp_path / "reference"))
    recipe = tmp_path / "recipe.yaml"
    save_config(_cfg(small_world, tmp_path / "run"), recipe)
    watcher = _signal_after_rows(tmp_path / "run" / "metrics.jsonl", 3, signum)
    assert main(["train", str(recipe)]) == 130
    watcher.join()
    err = capsys.readouterr().err
    assert "received; stopping after this step" in err and "continue with --resume" in err

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    stopped = rows[-1]["step"]
    assert 3 <= stopped < 24
    assert json.loads((ckpt.resolve_checkpoint(tmp_path / "run") / "state.json").read_text())["step"] == stopped
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back

    assert main(["train", str(recipe), "--resume"]) == 0
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 24
    a = load_file(ckpt.resolve_checkpoint(reference) / "model.safetensors")
    b = load_file(ckpt.resolve_checkpoint(tmp_path / "run") / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
