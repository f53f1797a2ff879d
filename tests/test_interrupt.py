"""Ctrl-C (SIGINT) and SIGTERM during training: the step finishes, a checkpoint is saved, the command exits
130, and --resume then replays the uninterrupted run exactly (issue 9)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from counterpoint.cli import main
from counterpoint.config import save_config
from counterpoint.train import checkpoint as ckpt
from counterpoint.train.loop import train
from tests.conftest import tiny_config

STEPS = 10


def _cfg(world: Path, out: Path):
    # STEPS steps of 32, no periodic checkpoint
    return tiny_config(world, out, evaluate=False, epochs=1, batch_size=32, max_steps=STEPS, checkpoint_every=1000)


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


@pytest.fixture
def interactive_sigint() -> Iterator[None]:
    """Ctrl-C as in a terminal, also when the suite itself runs in the background with SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.slow
@pytest.mark.usefixtures("interactive_sigint")
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
    assert 3 <= stopped < STEPS
    assert json.loads((ckpt.resolve_checkpoint(tmp_path / "run") / "state.json").read_text())["step"] == stopped
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back

    assert main(["train", str(recipe), "--resume"]) == 0
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == STEPS
    a = load_file(ckpt.resolve_checkpoint(reference) / "model.safetensors")
    b = load_file(ckpt.resolve_checkpoint(tmp_path / "run") / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_signal_ignored_at_start_stays_ignored() -> None:
    """A run started with SIGINT ignored (``nohup``, a script's background job) is not made interruptible by
    Ctrl-C; SIGTERM still stops it cleanly; both handlers are put back afterwards."""
    from counterpoint.train.interrupt import StopOnSignal

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopOnSignal() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            assert not stop.requested
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            assert stop.requested
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, previous)
