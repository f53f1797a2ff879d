"""Shared fixtures: a small built-in world on disk and a tiny training config pointed at it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from counterpoint.config import RunConfig, from_dict
from counterpoint.data.make_world import make_world
from counterpoint.data.tokenizer import Tokenizer
from counterpoint.data.world import WorldConfig

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist the workers share the cores: one thread each, in this process and in the processes its
    # tests start (torch reads OMP_NUM_THREADS), rather than threads spinning against each other.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    make_world(out, WorldConfig(seed=1), "wds", train=768, test=128, zeroshot=128, progress=False)
    return out


def task_tokenizer(*special: str, context_length: int = 16) -> Tokenizer:
    """A small real tokenizer with a task's special tokens: ids 4, 5, ... after ``<pad> <sot> <eot> <unk>``."""
    return Tokenizer.train(["a picture of a red star on the left"], 300, context_length, special)


NO_EVAL = {"zeroshot": False, "retrieval": False, "linear_probe": False}


def tiny_config(world: Path, out_dir: Path, evaluate: bool = True, **train: object) -> RunConfig:
    """A few-second CPU run on ``world``; ``evaluate=False`` turns the final evaluation off."""
    cfg = from_dict(RunConfig, {
        "out_dir": str(out_dir),
        "seed": 3,
        "model": {"name": "tiny-cnn", "embed_dim": 32},
        "data": {"train": str(world / "train"), "test": str(world / "test"),
                 "zeroshot": str(world / "zeroshot"), "classes": str(world / "world.json")},
        "train": {"epochs": 2, "batch_size": 64, "lr": 2e-3, "warmup_steps": 4, "log_every": 1,
                  "checkpoint_every": 1000, "progress": False, **train},
        "eval": {"batch_size": 128, "imagine": 0},  # the report's imagination grid has its own tests
    })
    if not evaluate:
        for k, v in NO_EVAL.items():
            setattr(cfg.eval, k, v)
    return cfg


def one_line_error(err: str, *needles: str) -> str:
    """Asserts ``err`` (stderr) is exactly one ``counterpoint: error:`` line holding ``needles``, no traceback."""
    err = err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("counterpoint: error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def steps_trained(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records the step of every training iteration (the loop asks ``lr_at`` once per step)."""
    from counterpoint.train import loop

    seen: list[int] = []
    real = loop.lr_at

    def spy(step: int, *args: object) -> float:
        seen.append(step)
        return real(step, *args)

    monkeypatch.setattr(loop, "lr_at", spy)
    return seen


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny float64 models: one intra-op thread is fastest and is not slowed by a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
