"""The contract every registered pretraining task is held to (``objectives/base.py``): it trains a few steps
on the built-in world, resumes bit-exactly after its process is killed, computes in 2 processes what it
computes in one, and its run loads with ``counterpoint.load_checkpoint`` and evaluates.

A new task gets all of this by registering; its own tests only pin down its math.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import counterpoint
import counterpoint.objectives.tasks  # noqa: F401  (registers the built-in tasks: the contract runs over them)
from counterpoint.config import save_config
from counterpoint.data.make_world import make_world
from counterpoint.data.world import WorldConfig
from counterpoint.evaluate.runner import evaluate_model
from counterpoint.objectives.base import TASKS, task_class
from counterpoint.train import checkpoint as ckpt
from counterpoint.train.distributed import FAULT_ENV
from counterpoint.train.loop import train
from tests.conftest import tiny_config
from tests.dist_utils import start_cli
from tests.test_train_distributed import two_ranks

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
STEPS = 4
# Options a task needs to train at the contract's small sizes (e.g. a queue that fits the tiny world).
TASK_OPTIONS: dict[str, dict[str, object]] = {"siglip": {"init_temperature": 0.1}, "brivl": {"queue_size": 64},
                                              "blip": {"queue_size": 64}}
# Model settings a task needs: LCL's latents have the causal model's width, and a pair (as a document of an
# image's 65 slots and its caption) must fit the context.
MODEL_OPTIONS: dict[str, dict[str, object]] = {"lcl": {"embed_dim": None, "context_length": 112}}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("contract_world")
    make_world(out, WorldConfig(seed=4), "wds", train=128, test=32, zeroshot=64, progress=False)
    return out


def _config(world: Path, out: Path, task: str, **train_kw: object):
    """Tiny ViT (LayerNorm only: 2 processes compute what one does), 4 steps of 32, evaluation off."""
    cfg = tiny_config(world, out, evaluate=False, batch_size=32, threads=1, device="cpu", max_steps=STEPS,
                      checkpoint_every=2, **train_kw)
    cfg.model.name = "tiny-vit"
    for key, value in MODEL_OPTIONS.get(task, {}).items():
        setattr(cfg.model, key, value)
    cfg.objective = task_class(task).Config(name=task, **TASK_OPTIONS.get(task, {}))
    return cfg


def _state(run: Path) -> dict[str, torch.Tensor]:
    """Everything a checkpoint holds in tensors: encoder weights and the task's own state."""
    folder = ckpt.resolve_checkpoint(run)
    tensors = {f"model/{k}": v for k, v in load_file(folder / "model.safetensors").items()}
    if (folder / ckpt.TASK_FILE).is_file():
        tensors |= {f"task/{k}": v for k, v in load_file(folder / ckpt.TASK_FILE).items()}
    return tensors


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module", params=sorted(TASKS))
def reference(request: pytest.FixtureRequest, world: Path, tmp_path_factory: pytest.TempPathFactory):
    """An uninterrupted one-process run of each registered task."""
    task = request.param
    run = train(_config(world, tmp_path_factory.mktemp(f"contract_{task}") / "one", task))
    return task, run


def test_every_builtin_task_is_registered() -> None:
    """The contract runs over these; a task that is not registered would escape it."""
    task_class("clip")
    assert {"clip", "siglip", "margin", "brivl", "lcl", "blip"} <= set(TASKS)


def test_trains_and_logs_every_step(reference) -> None:
    """A few steps on the world: finite losses, every step logged, the weights moved."""
    task, run = reference
    losses = _losses(run)
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(v)) for _, v in losses)
    first = load_file(run / "checkpoints" / "step-00000002" / "model.safetensors")
    last = load_file(ckpt.resolve_checkpoint(run) / "model.safetensors")
    assert max(float((first[k] - last[k]).abs().max()) for k in first) > 0, task


def test_resumes_bit_exactly_after_a_kill(reference, world: Path, tmp_path: Path) -> None:
    """The process (forked, see ``dist_utils``) dies abruptly at step 3 (after the step-2 checkpoint);
    --resume ends bitwise where the uninterrupted run did, task state (momentum towers, queues) included."""
    task, run = reference
    cfg = _config(world, tmp_path / "killed", task)
    recipe = tmp_path / "recipe.yaml"
    save_config(cfg, recipe)
    proc = start_cli(["train", str(recipe)], tmp_path / "logs", {FAULT_ENV: f"0:3:{tmp_path / 'died'}"})
    proc.join(300)
    assert proc.exitcode == 1 and (tmp_path / "died").exists(), (tmp_path / "logs" / "cli.err").read_text()[-2000:]
    assert json.loads((ckpt.resolve_checkpoint(tmp_path / "killed") / "state.json").read_text())["step"] == 2
    train(cfg, resume=True)
    assert _losses(tmp_path / "killed") == _losses(run)
    a, b = _state(run), _state(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), task


def test_two_processes_equal_one(reference, world: Path, tmp_path: Path) -> None:
    """Under torchrun with 2 processes (each half of every global batch), losses and state match one process
    to 1e-5."""
    task, run = reference
    two_ranks(_config(world, tmp_path / "two", task), tmp_path)
    for (s1, x), (s2, y) in zip(_losses(run), _losses(tmp_path / "two"), strict=True):
        assert s1 == s2 and abs(x - y) <= 1e-5, (task, s1, x, y)
    a, b = _state(run), _state(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=lambda m, k=k: f"{task} {k}: {m}")


def test_loads_and_evaluates(reference, world: Path) -> None:
    """``load_checkpoint`` gives the encoder and tokenizer; every evaluation the task supports runs on it."""
    task, run = reference
    model, tokenizer = counterpoint.load_checkpoint(run)
    cfg = _config(world, run, task)
    for what in task_class(task).evaluations:
        setattr(cfg.eval, what, True)
    result = evaluate_model(model, tokenizer, cfg, torch.device("cpu"))
    assert set(task_class(task).evaluations) <= set(result), (task, sorted(result))
    assert result["retrieval"]["n"] == 32 and result["zeroshot"]["all"]["n"] == 64
