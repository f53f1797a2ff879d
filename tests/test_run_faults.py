"""A run under faults: a loss that goes NaN, a full disk, a log line cut in half, an empty split, and the
collectives' deprecation warnings (issue 8)."""

from __future__ import annotations

import errno
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from counterpoint.cli import main
from counterpoint.config import save_config
from counterpoint.data.multimodal import ModalDataset, ModalSplit
from counterpoint.data.shortcut import ShortcutConfig, make_shortcut
from counterpoint.errors import UserError
from counterpoint.objectives.contrastive import ContrastiveTask
from counterpoint.objectives.distributed import gather_with_grad
from counterpoint.train import checkpoint as ckpt
from counterpoint.train.balance_config import load_balance_config
from counterpoint.train.balance_loop import train_balance
from counterpoint.train.loop import train
from tests.conftest import tiny_config
from tests.dist_utils import run_distributed


def _cfg(world: Path, out: Path, **train_kw: object):
    return tiny_config(world, out, evaluate=False, **{"max_steps": 4, "checkpoint_every": 2, **train_kw})


def _strict_rows(path: Path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON (NaN and Infinity are not JSON)."""
    def refuse(name: str) -> None:
        raise ValueError(f"{name} in metrics.jsonl")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def _nan_on_calls(monkeypatch: pytest.MonkeyPatch, calls: set[int]) -> None:
    """The task's loss becomes NaN on the given forward calls (1-based)."""
    real = ContrastiveTask.forward
    count = [0]

    def poisoned(self: ContrastiveTask, batch: dict, step: int = 0) -> tuple[dict, dict]:
        count[0] += 1
        losses, metrics = real(self, batch, step)
        if count[0] in calls:
            losses = {k: v * float("nan") for k, v in losses.items()}
        return losses, metrics

    monkeypatch.setattr(ContrastiveTask, "forward", poisoned)


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_with_one_line_and_a_valid_log(
        small_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-finite loss stops the run (the update is not applied); the log stays strict JSON."""
    _nan_on_calls(monkeypatch, {3})
    with pytest.raises(UserError, match="step 3: the loss or the gradient is not finite"):
        train(_cfg(small_world, tmp_path / "run"))
    rows = _strict_rows(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["loss"] is None
    weights = load_file(ckpt.resolve_checkpoint(tmp_path / "run") / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.slow
def test_skip_mode_passes_over_non_finite_steps(small_world: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``train.on_nonfinite=skip`` leaves the weights untouched on a NaN step and counts it."""
    _nan_on_calls(monkeypatch, {2})
    run = train(_cfg(small_world, tmp_path / "run", on_nonfinite="skip"))
    rows = _strict_rows(run / "metrics.jsonl")
    assert [r.get("nonfinite_steps", 0) for r in rows] == [0, 1, 1, 1]
    assert math.isfinite(rows[-1]["loss"])
    weights = load_file(ckpt.resolve_checkpoint(run) / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert json.loads((ckpt.resolve_checkpoint(run) / "state.json").read_text())["nonfinite_steps"] == 1


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(
        small_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """ENOSPC while writing a checkpoint: one line, exit 2, the previous checkpoint intact, no half folder."""
    recipe = tmp_path / "recipe.yaml"
    save_config(_cfg(small_world, tmp_path / "run"), recipe)
    real, calls = ckpt.save_file, [0]

    def fill_disk(tensors: dict, path: Path, **kw: object) -> None:
        calls[0] += 1
        if calls[0] > 2:  # step 2's model and optimiser files fit; step 4's do not
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(tensors, path, **kw)

    monkeypatch.setattr(ckpt, "save_file", fill_disk)
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "Traceback" not in err
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002"]
    assert ckpt.resolve_checkpoint(root) == root / "step-00000002"


@pytest.mark.slow
def test_a_log_line_cut_in_half_does_not_stop_eval_or_resume(small_world: Path, tmp_path: Path) -> None:
    """The partial last line a crash or a full disk leaves in metrics.jsonl is dropped, not fatal."""
    run = train(_cfg(small_world, tmp_path / "run"))
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "loss": 0.12')
    assert main(["eval", str(run)]) == 0
    train(_cfg(small_world, run, max_steps=6), resume=True)
    assert [r["step"] for r in _strict_rows(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_balance_run_with_an_empty_test_split_stops_before_training(tmp_path: Path) -> None:
    """An empty val or test split is refused before any epoch runs and before the run directory exists."""
    data = make_shortcut(ShortcutConfig(train=64, val=16, test=16, image_size=16))
    test = data.splits["test"]
    data.splits["test"] = ModalSplit({m: x[:0] for m, x in test.inputs.items()}, test.labels[:0])
    path = ModalDataset(data.name, data.classes, data.splits, data.info).save(tmp_path / "empty_test")
    cfg = load_balance_config("configs/balance_av.yaml", [
        "data.benchmark=file", f"data.path={path}", f"out_dir={tmp_path / 'run'}", "train.epochs=1",
        "train.batch_size=16", "train.progress=false"])
    with pytest.raises(UserError, match="empty test split"):
        train_balance(cfg)
    assert not (tmp_path / "run").exists()


def _gather_without_warnings(rank: int, world_size: int) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = torch.full((2, 3), float(rank), requires_grad=True)
        gathered, _ = gather_with_grad(x)
        gathered.sum().backward()
    return [str(w.message) for w in caught]


def test_feature_gather_raises_no_deprecation_warnings() -> None:
    """gather_with_grad uses collectives this torch does not deprecate (no warning on every step)."""
    for messages in run_distributed(_gather_without_warnings, 2):
        assert not [m for m in messages if "deprecated" in m], messages
