"""Checkpoints under faults: resume without ``latest``, ``latest`` leading elsewhere, re-saves cut short,
damaged state files, foreign tokenizers and architectures (issue 8)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import counterpoint
from counterpoint.cli import main
from counterpoint.config import save_config
from counterpoint.data.tokenizer import Tokenizer
from counterpoint.errors import CheckpointError
from counterpoint.models.presets import create_model
from counterpoint.train import checkpoint as ckpt
from counterpoint.train.loop import train
from tests.conftest import one_line_error, steps_trained, tiny_config


def _cfg(world: Path, out: Path, **train_kw: object):
    return tiny_config(world, out, evaluate=False,
                       **{"max_steps": 4, "checkpoint_every": 2, "keep_checkpoints": 2, **train_kw})


@pytest.fixture(scope="module")
def trained(small_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step tiny-cnn run with checkpoints at steps 2 and 4 (read-only: tests copy it)."""
    return train(_cfg(small_world, tmp_path_factory.mktemp("runs") / "base"))


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _config_file(world: Path, run: Path, tmp_path: Path, **train_kw: object) -> Path:
    path = tmp_path / "recipe.yaml"
    save_config(_cfg(world, run, **train_kw), path)
    return path


def _one_line_error(capsys: pytest.CaptureFixture, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    return one_line_error(err, *needles)




# ----------------------------------------------------------------------------------------------------------
# Resume and rotation


@pytest.mark.slow
def test_resume_without_latest_continues_from_the_newest_step_folder(
        small_world: Path, run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``latest`` gone, --resume continues at the highest complete step and keeps the log's rows."""
    before = (run / "metrics.jsonl").read_text().splitlines()
    (run / "checkpoints" / "latest").unlink()
    seen = steps_trained(monkeypatch)
    train(_cfg(small_world, run, max_steps=6), resume=True)
    assert seen == [4, 5]
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert rows[:4] == before and [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000006"
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000004", "step-00000006"]


def test_rotation_keeps_the_checkpoint_just_written(tmp_path: Path) -> None:
    """Saving a lower step than existing folders (a restarted run) never deletes the folder just written."""
    root = tmp_path / "checkpoints"
    weights = {"w": torch.ones(2)}
    for step in (10, 20):
        ckpt.save_checkpoint_state(root, step, weights, None, None, {"model_spec": {}}, keep=5)
    ckpt.save_checkpoint_state(root, 5, weights, None, None, {"model_spec": {}}, keep=2)
    assert (root / "step-00000005" / "model.safetensors").is_file()
    assert ckpt.resolve_checkpoint(root) == root / "step-00000005"


# ----------------------------------------------------------------------------------------------------------
# `latest` and step folders stay inside checkpoints/


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_latest_leading_outside_the_run_is_refused(
        small_world: Path, trained: Path, tmp_path: Path, how: str, capsys: pytest.CaptureFixture) -> None:
    """``latest`` naming ``../``, an absolute path or a symlinked folder elsewhere is refused by eval, the
    Python API and --resume, and the run's files are left as they were."""
    other = tmp_path / "other"
    shutil.copytree(trained, other)
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    root = run / "checkpoints"
    if how == "dotdot":
        (root / "latest").write_text("../../other/checkpoints/step-00000004\n")
    elif how == "absolute":
        (root / "latest").write_text(f"{other / 'checkpoints' / 'step-00000004'}\n")
    else:
        os.symlink(other / "checkpoints" / "step-00000004", root / "step-00000009")
        (root / "latest").write_text("step-00000009\n")
    metrics = (run / "metrics.jsonl").read_bytes()

    with pytest.raises(CheckpointError, match="inside|outside"):
        counterpoint.load_checkpoint(run)
    _one_line_error(capsys, main(["eval", str(run)]), "checkpoint")
    recipe = _config_file(small_world, run, tmp_path, max_steps=6)
    _one_line_error(capsys, main(["train", str(recipe), "--resume"]), "checkpoint")
    assert (run / "metrics.jsonl").read_bytes() == metrics


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_of_another_architecture(small_world: Path, run: Path) -> None:
    """Resuming a tiny-cnn run with a tiny-vit config (or another width) stops before touching the run."""
    metrics, config = (run / "metrics.jsonl").read_bytes(), (run / "config.yaml").read_bytes()
    other = _cfg(small_world, run, max_steps=6)
    other.model.name = "tiny-vit"
    with pytest.raises(CheckpointError, match="tiny-cnn"):
        train(other, resume=True)
    wider = _cfg(small_world, run, max_steps=6)
    wider.model.embed_dim = 64
    with pytest.raises(CheckpointError, match="embed_dim"):
        train(wider, resume=True)
    assert (run / "metrics.jsonl").read_bytes() == metrics and (run / "config.yaml").read_bytes() == config


# ----------------------------------------------------------------------------------------------------------
# Writing: a re-save cut short, temporaries of dead processes


_KILLED_DURING_RESAVE = """
import os, sys, torch
from pathlib import Path
from counterpoint.train import checkpoint as ckpt
real = os.replace
def die_on_publish(src, dst):
    if Path(src).name.startswith(".tmp-step"):
        os._exit(9)  # killed between moving the old folder aside and publishing the new one
    real(src, dst)
ckpt.os.replace = die_on_publish
ckpt.save_checkpoint_state(Path(sys.argv[1]), 5, {"w": torch.ones(3)}, None, None, {"model_spec": {}})
"""


def test_resave_of_a_step_keeps_a_complete_copy_if_killed(tmp_path: Path) -> None:
    """A process killed between the renames of a re-save of the same step still leaves that step loadable,
    and the next save puts the folder back under its name and clears the half-written one."""
    root = tmp_path / "checkpoints"
    ckpt.save_checkpoint_state(root, 5, {"w": torch.zeros(3)}, None, None, {"model_spec": {}})
    killed = subprocess.run([sys.executable, "-c", _KILLED_DURING_RESAVE, str(root)])
    assert killed.returncode == 9
    found = ckpt.resolve_checkpoint(root)
    assert torch.equal(load_file(found / "model.safetensors")["w"], torch.zeros(3))
    ckpt.save_checkpoint_state(root, 6, {"w": torch.ones(3)}, None, None, {"model_spec": {}}, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000005", "step-00000006"]
    assert torch.equal(load_file(root / "step-00000005" / "model.safetensors")["w"], torch.zeros(3))


def test_half_written_folders_of_dead_processes_are_removed(tmp_path: Path) -> None:
    """``.tmp-step-*`` folders left by a crashed process go at the next save; a live process's stay."""
    root = tmp_path / "checkpoints"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = root / f".tmp-step-00000003-{dead.pid}"
    live = root / f".tmp-step-00000003-{os.getppid()}"
    for folder in (stale, live):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half")
    ckpt.save_checkpoint_state(root, 4, {"w": torch.ones(1)}, None, None, {"model_spec": {}})
    assert not stale.exists() and live.exists()


# ----------------------------------------------------------------------------------------------------------
# Reading: state.json, tokenizer, weights, model name


def _corrupt_state(run: Path, how: str) -> None:
    state_file = ckpt.resolve_checkpoint(run) / "state.json"
    meta = json.loads(state_file.read_text())
    if how == "non-utf8":
        state_file.write_bytes(b'{"step": 4, "format": "\xff\xfe"}')
        return
    if how == "list":
        state_file.write_text("[1, 2]")
        return
    if how == "no-step":
        del meta["step"]
    elif how == "spec-field":
        meta["model_spec"]["image_size"] = "big"
    elif how == "spec-missing":
        del meta["model_spec"]["embed_dim"]
    elif how == "groups":
        meta["optimizer"]["param_groups"] = "x"
    else:
        meta["step"] = {"abc": "abc", "float": 7.5, "negative": -1, "bool": True}[how]
    state_file.write_text(json.dumps(meta))


@pytest.mark.parametrize("how", ["abc", "float", "negative", "bool", "no-step", "list", "non-utf8", "spec-field",
                                 "spec-missing", "groups"])
def test_damaged_state_json_is_one_line_and_touches_nothing(
        small_world: Path, run: Path, tmp_path: Path, how: str, capsys: pytest.CaptureFixture) -> None:
    """Wrong types or shapes in state.json are refused by eval and --resume before the log is cut."""
    _corrupt_state(run, how)
    metrics = (run / "metrics.jsonl").read_bytes()
    _one_line_error(capsys, main(["eval", str(run)]), "state.json")
    recipe = _config_file(small_world, run, tmp_path, max_steps=6)
    _one_line_error(capsys, main(["train", str(recipe), "--resume"]), "state.json")
    assert (run / "metrics.jsonl").read_bytes() == metrics


def test_tokenizer_larger_than_the_text_tower_is_refused(run: Path) -> None:
    """A tokenizer that can emit ids beyond the embedding table is refused at load, not at an IndexError."""
    folder = ckpt.resolve_checkpoint(run)
    tokenizer = Tokenizer.from_file(folder / "tokenizer.json", 32)
    tokenizer.hf.add_tokens([f"extra{i}" for i in range(50)])
    tokenizer.save(folder / "tokenizer.json")
    with pytest.raises(CheckpointError, match="tokenizer.json has"):
        counterpoint.load_checkpoint(run)
    with pytest.raises(CheckpointError, match="tokenizer.json has"):
        counterpoint.get_tokenizer(run)


def test_weight_mismatch_names_what_differs(run: Path) -> None:
    """Loading weights into another architecture says which tensors differ and how."""
    folder = ckpt.resolve_checkpoint(run)
    with pytest.raises(CheckpointError) as info:
        ckpt.load_model_weights(folder, create_model("tiny-cnn", embed_dim=48))
    message = str(info.value)
    assert "differ in shape" in message and "proj.weight [32, 128] vs [48, 128]" in message
    with pytest.raises(CheckpointError, match="missing from the checkpoint"):
        ckpt.load_model_weights(folder, create_model("tiny-vit", embed_dim=32))


@pytest.mark.slow
def test_eval_names_the_model_it_evaluated(run: Path, capsys: pytest.CaptureFixture) -> None:
    """eval.json names the checkpoint's model; an override asking for another model is refused."""
    _one_line_error(capsys, main(["eval", str(run), "model.name=small-vit"]), "model.name=small-vit")
    assert main(["eval", str(run)]) == 0
    assert json.loads((run / "eval.json").read_text())["model"] == "tiny-cnn"
    assert "| model | tiny-cnn |" in (run / "report.md").read_text()
