"""``train.loggers``: TensorBoard event files and W&B offline runs hold what metrics.jsonl and eval.json hold;
neither package is needed unless asked for."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from counterpoint.cli import main
from counterpoint.train.loop import train
from tests.conftest import one_line_error, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_tensorboard_and_wandb_receive_the_runs_scalars_evaluation_and_pictures(
        small_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config(small_world, tmp_path / "run", evaluate=False, max_steps=3, batch_size=32, threads=1)
    cfg.eval.zeroshot = True
    cfg.train.loggers = ("jsonl", "tensorboard", "wandb")
    run = train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    logged = events.Scalars("loss")
    assert [e.step for e in logged] == [r["step"] for r in rows] == [1, 2, 3]
    assert [e.value for e in logged] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    result = json.loads((run / "eval.json").read_text())
    top1 = events.Scalars("eval/zeroshot/all/top1")
    assert [e.step for e in top1] == [3] and top1[0].value == pytest.approx(result["zeroshot"]["all"]["top1"])
    assert "report/loss" in events.Tags()["images"]
    # W&B, offline: its run folder, one run per run directory (a resume continues it)
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    assert (run / "wandb_id").read_text().strip() in offline[0].name


def test_loggers_are_checked_before_training(small_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["train", str(Path(__file__).parents[1] / "configs" / "clip_world.yaml"), f"out_dir={tmp_path / 'run'}",
            f"data.train={small_world / 'train'}"]
    assert main([*base, "train.loggers=[tensorboard]"]) == 2
    one_line_error(capsys.readouterr().err, "train.loggers must include jsonl")
    assert main([*base, "train.loggers=[jsonl,mlflow]"]) == 2
    one_line_error(capsys.readouterr().err, "train.loggers", "tensorboard, wandb")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else
                        real_find_spec(name, *a))
    assert main([*base, "train.loggers=[jsonl,wandb]"]) == 2
    one_line_error(capsys.readouterr().err, "needs the wandb package", "counterpoint[wandb]")
    assert not (tmp_path / "run").exists()  # refused before anything was written
