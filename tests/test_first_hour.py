"""A new user's first hour (issue 9): switching a recipe's method, --resume with nothing to resume or with
changed settings, finished runs, worlds written over worlds, and evaluation inputs that belong to the
training data (auto), checked before training.

Each test writes its own tiny data under ``tmp_path``; imports of what issue 9 added are inside the tests, so
that each test fails for its own reason on the code before it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from counterpoint.cli import main
from counterpoint.config import RunConfig, from_dict, save_config
from counterpoint.data.readers import SkipStats, iter_samples
from counterpoint.errors import DataError, UserError
from counterpoint.train import loop
from counterpoint.train.balance_config import load_balance_config
from counterpoint.train.loop import train
from tests.conftest import one_line_error, steps_trained, tiny_config

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 60, 230), "yellow": (230, 220, 30),
           "purple": (140, 40, 180), "cyan": (30, 210, 220)}  # >= 5 classes: zero-shot reports top-5


# ----------------------------------------------------------------------------------------------------------
# helpers


def _cfg(world: Path, out: Path, **train_kw: object) -> RunConfig:
    """A tiny run on the shared world: 4 steps, checkpoints at 2 and 4, no evaluation."""
    return tiny_config(world, out, evaluate=False,
                       **{"max_steps": 4, "checkpoint_every": 2, "keep_checkpoints": 2, **train_kw})


def _own_cfg(out: Path, train_path: Path, data: dict | None = None, evaluate: dict | None = None) -> RunConfig:
    """A 3-step run on one's own data; evaluation inputs left at their defaults unless ``data`` sets them."""
    return from_dict(RunConfig, {
        "out_dir": str(out),
        "seed": 3,
        "model": {"name": "tiny-cnn", "embed_dim": 32},
        "data": {"train": str(train_path), **(data or {})},
        "train": {"epochs": 1, "batch_size": 16, "lr": 2e-3, "warmup_steps": 1, "max_steps": 3, "log_every": 1,
                  "checkpoint_every": 1000, "progress": False},
        "eval": {"batch_size": 64, "imagine": 0, **(evaluate or {})},
    })


def write_csv(path: Path, n: int, label: bool = True, colours: tuple[str, ...] = tuple(COLOURS)) -> Path:
    """``path`` (a CSV of ``n`` rows: image, caption[, label]) and its small, real PNG images beside it."""
    images = path.parent / f"{path.stem}-images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(path.name) + n)
    rows = ["image,caption,label" if label else "image,caption"]
    for i in range(n):
        name = colours[i % len(colours)]
        noise = rng.integers(-25, 26, (16, 16, 3))
        Image.fromarray(np.clip(np.array(COLOURS[name]) + noise, 0, 255).astype(np.uint8)).save(images / f"{i}.png")
        rows.append(f"{images.name}/{i}.png,a {name} square number {i % 7}" + (f",{name}" if label else ""))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def _one_line_error(capsys: pytest.CaptureFixture, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    return one_line_error(err, *needles)


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` with its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}




@pytest.fixture(scope="module")
def trained(small_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run (checkpoints at steps 2 and 4, eval.json at step 4); read-only, tests copy it."""
    return train(_cfg(small_world, tmp_path_factory.mktemp("first-hour") / "base"))


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


@pytest.fixture
def world_in_cwd(small_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working directory holds ``data/world`` (where the old defaults pointed); returns the cwd."""
    (tmp_path / "data").mkdir()
    os.symlink(small_world, tmp_path / "data" / "world")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ----------------------------------------------------------------------------------------------------------
# 1. Switching the recipe's method by an override


@pytest.mark.parametrize("name", ["uniform", "joint"])
def test_switching_method_drops_the_recipe_options(name: str) -> None:
    """``method.name=X`` over the mmpareto recipe loads without its gamma / rescale."""
    cfg = load_balance_config("configs/balance_av.yaml", [f"method.name={name}"])
    assert cfg.method.name == name
    assert cfg.method.gamma is None and cfg.method.rescale is None
    assert cfg.train.lr == 0.02  # the rest of the recipe stays


def test_same_method_override_keeps_the_recipe_options() -> None:
    """``method.name=mmpareto method.gamma=1.0`` keeps the recipe's rescale and takes the new gamma."""
    cfg = load_balance_config("configs/balance_av.yaml", ["method.name=mmpareto", "method.gamma=1.0"])
    assert (cfg.method.name, cfg.method.gamma, cfg.method.rescale) == ("mmpareto", 1.0, "per_tensor")
    switched = load_balance_config("configs/balance_av.yaml", ["method.name=ogm_ge", "method.alpha=0.5"])
    assert (switched.method.alpha, switched.method.gamma, switched.method.rescale) == (0.5, None, None)


@pytest.mark.slow
def test_balance_train_cli_with_switched_method(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``counterpoint balance train configs/balance_av.yaml method.name=uniform`` trains (exit 0)."""
    rc = main(["balance", "train", "configs/balance_av.yaml", "method.name=uniform", f"out_dir={tmp_path / 'bal'}",
               "data.av_world.train=32", "data.av_world.val=16", "data.av_world.test=16", "train.epochs=1",
               "train.batch_size=16", "train.progress=false", "train.diagnostics=false",
               "train.precise_bn_batches=1", "eval.shapley=false"])
    assert rc == 0, capsys.readouterr().err
    saved = (tmp_path / "bal" / "config.yaml").read_text()
    assert "name: uniform" in saved and "gamma: null" in saved


# ----------------------------------------------------------------------------------------------------------
# 2.-4. --resume


@pytest.mark.slow
def test_resume_with_nothing_to_resume_is_refused(small_world: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """--resume without a checkpoint (no folder; only a metrics.jsonl) is an error and keeps the log."""
    with pytest.raises(UserError, match="nothing to resume"):
        train(_cfg(small_world, tmp_path / "never-ran"), resume=True)
    assert not (tmp_path / "never-ran" / "metrics.jsonl").exists()

    crashed = tmp_path / "crashed"
    crashed.mkdir()
    rows = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3))
    (crashed / "metrics.jsonl").write_text(rows)
    with pytest.raises(UserError, match="nothing to resume"):
        train(_cfg(small_world, crashed), resume=True)
    assert (crashed / "metrics.jsonl").read_text() == rows
    assert not (crashed / "checkpoints").exists()

    recipe = tmp_path / "recipe.yaml"
    save_config(_cfg(small_world, crashed), recipe)
    capsys.readouterr()
    _one_line_error(capsys, main(["train", str(recipe), "--resume"]), "nothing to resume")
    assert (crashed / "metrics.jsonl").read_text() == rows


@pytest.mark.slow
def test_resume_says_where_it_continues(small_world: Path, run: Path, capsys: pytest.CaptureFixture,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Resuming with settings that do not change the computation (log / checkpoint cadence, max_steps, eval.*)
    proceeds and prints ``resuming <run> from step-00000004 (step 4)``."""
    cfg = _cfg(small_world, run, max_steps=5, log_every=2, checkpoint_every=3, keep_checkpoints=3)
    cfg.eval.batch_size = 64
    seen = steps_trained(monkeypatch)
    capsys.readouterr()
    train(cfg, resume=True)
    assert f"resuming {run} from step-00000004 (step 4)" in capsys.readouterr().out
    assert seen == [4]
    assert [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_resuming_a_finished_evaluated_run_does_nothing(small_world: Path, run: Path, capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """--resume of a run whose last step is saved and evaluated says it is finished and changes nothing."""
    assert json.loads((run / "eval.json").read_text())["step"] == 4
    before = _snapshot(run)
    seen = steps_trained(monkeypatch)
    capsys.readouterr()
    train(_cfg(small_world, run), resume=True)
    out = capsys.readouterr().out
    assert "is finished" in out and "step 4" in out, out
    assert seen == []
    assert _snapshot(run) == before  # metrics.jsonl, eval.json, checkpoints: not even re-written


@pytest.mark.slow
@pytest.mark.parametrize(("changes", "needles"), [
    ({"batch_size": 32, "lr": 1e-3, "seed": 4, "data.train": "test"},
     ["train.batch_size 64 -> 32", "train.lr 0.002 -> 0.001", "seed 3 -> 4", "data.train"]),
    ({"embed_dim": 16}, ["embed_dim"]),
], ids=["batch-lr-seed-data", "embed_dim"])
def test_resume_refuses_changed_settings(small_world: Path, run: Path, changes: dict, needles: list[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """--resume with settings that change the computation is refused, naming each one; the run is left as it was."""
    cfg = _cfg(small_world, run, max_steps=6)
    cfg.train.batch_size = changes.get("batch_size", cfg.train.batch_size)
    cfg.train.lr = changes.get("lr", cfg.train.lr)
    cfg.seed = changes.get("seed", cfg.seed)
    cfg.model.embed_dim = changes.get("embed_dim", cfg.model.embed_dim)
    if "data.train" in changes:
        cfg.data.train = str(small_world / changes["data.train"])
    before = _snapshot(run)
    seen = steps_trained(monkeypatch)
    with pytest.raises(UserError) as err:
        train(cfg, resume=True)
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    assert seen == [] and _snapshot(run) == before


# ----------------------------------------------------------------------------------------------------------
# 5. data make world over a world


def test_make_world_refuses_an_existing_world_unless_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A second ``data make world`` into the same folder is refused; ``--overwrite`` replaces the world."""
    out = tmp_path / "w"
    small = ["--test", "8", "--zeroshot", "64", "--quiet", "--format", "folder"]
    assert main(["data", "make", "world", "--out", str(out), "--train", "64", *small]) == 0
    assert len(list(iter_samples(str(out / "train"), SkipStats()))) == 64
    before = _snapshot(out)
    capsys.readouterr()
    _one_line_error(capsys, main(["data", "make", "world", "--out", str(out), "--train", "10", *small]),
                    str(out), "--overwrite")
    assert _snapshot(out) == before

    from counterpoint.data.make_world import make_world
    from counterpoint.data.world import WorldConfig

    with pytest.raises(DataError, match="--overwrite"):
        make_world(out, WorldConfig(), "folder", train=10, test=8, zeroshot=8, progress=False)
    assert _snapshot(out) == before

    assert main(["data", "make", "world", "--out", str(out), "--train", "10", *small, "--overwrite"]) == 0
    assert len(list(iter_samples(str(out / "train"), SkipStats()))) == 10  # not the union with the old 64
    assert json.loads((out / "world.json").read_text())["splits"]["train"] == 10


# ----------------------------------------------------------------------------------------------------------
# 6.-10. Evaluation inputs: auto, checked before training


@pytest.mark.slow
def test_own_data_is_not_evaluated_on_the_builtin_world(world_in_cwd: Path) -> None:
    """Own CSV data with a world in ./data/world: retrieval on the sibling test.csv; zero-shot and the linear probe
    are skipped and said (eval.json, report.md), never run on the world."""
    own = world_in_cwd / "mine"
    train_csv = write_csv(own / "train.csv", 48)
    write_csv(own / "test.csv", 12)
    run_dir = train(_own_cfg(world_in_cwd / "run", train_csv))
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["retrieval"]["n"] == 12
    assert "zeroshot" not in result and "linear_probe" not in result
    skipped = result["skipped_evaluations"]
    assert set(skipped) == {"zeroshot", "linear_probe"}
    assert all("data.zeroshot" in why for why in skipped.values()), skipped
    report = (run_dir / "report.md").read_text()
    assert "## Not evaluated" in report and "zeroshot" in report.split("## Not evaluated")[1]
    saved = (run_dir / "config.yaml").read_text()
    assert str(own / "test.csv") in saved and "data/world" not in saved


@pytest.mark.slow
def test_zeroshot_classes_come_from_the_labels_without_a_class_file(world_in_cwd: Path) -> None:
    """``data.zeroshot`` set, ``data.classes`` left at auto, no world.json beside it: the labels are the classes."""
    own = world_in_cwd / "mine"
    train_csv = write_csv(own / "train.csv", 32)
    labelled = write_csv(own / "labelled.csv", 12)
    run_dir = train(_own_cfg(world_in_cwd / "run", train_csv, data={"zeroshot": str(labelled)},
                             evaluate={"retrieval": False, "linear_probe": False}))
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["zeroshot"]["num_classes"] == len(COLOURS)
    assert result["zeroshot"]["num_templates"] == 1
    assert result["zeroshot"]["all"]["n"] == 12
    assert result["zeroshot_data"]["classes"] == "labels of the images"
    assert result["data"]["skipped"]["zeroshot"]["total"] == 0


def _class_file(path: Path, classes: list[str], templates: list[str]) -> Path:
    path.write_text(json.dumps({"classes": classes, "templates": templates}))
    return path


def test_class_template_without_placeholder_is_refused(tmp_path: Path) -> None:
    """``load_classes`` refuses a template without ``{c}``, naming it."""
    try:
        from counterpoint.evaluate.inputs import load_classes
    except ImportError:  # where it lived before issue 9
        from counterpoint.evaluate.runner import load_classes

    bad = _class_file(tmp_path / "classes.json", ["red", "green"], ["a photo of a {c}.", "a photo of a thing."])
    with pytest.raises(DataError, match=r"'a photo of a thing\.'"):
        load_classes(str(bad))
    good = _class_file(tmp_path / "ok.json", ["red", "green"], ["a {c} thing"])
    assert load_classes(str(good)) == (["red", "green"], ["a {c} thing"], set())


@pytest.mark.slow
def test_class_template_without_placeholder_is_refused_before_training(
        small_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``counterpoint train`` with such a class file exits 2 with one line and does not create the run."""
    world_classes = json.loads((small_world / "world.json").read_text())["classes"]
    bad = _class_file(tmp_path / "classes.json", world_classes, ["a picture"])
    cfg = tiny_config(small_world, tmp_path / "run", max_steps=1)
    cfg.data.classes = str(bad)
    cfg.eval.retrieval = cfg.eval.linear_probe = False
    recipe = tmp_path / "recipe.yaml"
    save_config(cfg, recipe)
    capsys.readouterr()
    _one_line_error(capsys, main(["train", str(recipe)]), "'a picture'", "{c}")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_unknown_zeroshot_labels_are_counted(tmp_path: Path) -> None:
    """Zero-shot images whose label is not in the class file are counted as ``unknown_label`` in eval.json."""
    train_csv = write_csv(tmp_path / "mine" / "train.csv", 32)
    labelled = write_csv(tmp_path / "zs" / "labelled.csv", 12)  # two of each colour
    classes = _class_file(tmp_path / "classes.json", list(COLOURS)[:5], ["a {c} square"])  # no cyan
    run_dir = train(_own_cfg(tmp_path / "run", train_csv, data={"zeroshot": str(labelled), "classes": str(classes)},
                             evaluate={"retrieval": False, "linear_probe": False}))
    result = json.loads((run_dir / "eval.json").read_text())
    skipped = result["data"]["skipped"]["zeroshot"]
    assert skipped["by_reason"] == {"unknown_label": 2} and skipped["total"] == 2
    assert result["zeroshot"]["num_classes"] == 5 and result["zeroshot"]["all"]["n"] == 10


@pytest.mark.slow
def test_zeroshot_data_without_labels_is_refused_before_training(
        small_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A zero-shot CSV without a ``label`` column fails ``check_data_paths`` and ``counterpoint train`` (exit 2)
    before the run directory holds a metrics.jsonl."""
    unlabelled = write_csv(tmp_path / "zs" / "pairs.csv", 8, label=False)
    cfg = tiny_config(small_world, tmp_path / "run", max_steps=1)
    cfg.data.zeroshot = str(unlabelled)
    cfg.eval.retrieval = cfg.eval.linear_probe = False
    with pytest.raises(DataError, match="label"):
        loop.check_data_paths(cfg)
    recipe = tmp_path / "recipe.yaml"
    save_config(cfg, recipe)
    capsys.readouterr()
    _one_line_error(capsys, main(["train", str(recipe)]), str(unlabelled), "label")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_zeroshot_with_fewer_classes_than_top5() -> None:
    """Zero-shot accuracy over 3 classes reports top-1 (and no top-5) instead of failing."""
    import torch

    from counterpoint.evaluate.zeroshot import topk_accuracy

    emb = torch.eye(3)
    assert topk_accuracy(emb, emb, torch.tensor([0, 1, 2])) == {"top1": 1.0}
