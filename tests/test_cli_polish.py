"""The command line a newcomer meets: help, version, overrides anywhere, config show, one error line under
several processes, retries after a failed start, honest comparisons and readable plots (issue 9)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from PIL import Image

import counterpoint
from counterpoint.cli import main
from counterpoint.config import RunConfig, describe, save_config
from counterpoint.data.readers import SkipStats, iter_folder
from counterpoint.report.plots import curve_figure
from counterpoint.report.seeds import over_seeds, verdict
from counterpoint.train.balance_compare import markdown
from counterpoint.train.balance_config import BalanceConfig
from counterpoint.train.loop import train
from tests.conftest import tiny_config


def _cfg(world: Path, out: Path, **train_kw: object):
    return tiny_config(world, out, evaluate=False, **train_kw)


def test_bare_command_prints_help_and_version_works(capsys: pytest.CaptureFixture) -> None:
    """``counterpoint`` alone shows the commands and examples; ``--version`` prints the version."""
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: counterpoint" in out and "examples:" in out and "config show" in out
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and counterpoint.__version__ in capsys.readouterr().out


def test_subcommand_help_shows_defaults(capsys: pytest.CaptureFixture) -> None:
    """Each option's default is in its command's --help."""
    with pytest.raises(SystemExit):
        main(["data", "make", "world", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps long lines
    assert "training pairs (default: 100000)" in out and "(default: wds)" in out
    assert "--seed SEED the whole world follows from it (default: 0)" in out


@pytest.mark.slow
def test_flags_and_overrides_mix_in_any_order(small_world: Path, tmp_path: Path) -> None:
    """``train cfg.yaml --overwrite key=value`` works (overrides after a flag used to be refused)."""
    recipe = tmp_path / "recipe.yaml"
    save_config(_cfg(small_world, tmp_path / "run", max_steps=1), recipe)
    assert main(["train", str(recipe), "train.max_steps=1"]) == 0
    assert main(["train", str(recipe), "--overwrite", "train.max_steps=2", "train.log_every=1"]) == 0
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2]


def test_config_show_lists_every_setting_with_its_meaning(capsys: pytest.CaptureFixture) -> None:
    """Every setting of both recipe kinds has a description; config show prints value, default and meaning."""
    for cfg in (RunConfig(), BalanceConfig()):
        undocumented = [key for key, _, _, text in describe(cfg) if not text]
        assert not undocumented, undocumented
    assert main(["config", "show", "configs/clip_world.yaml", "train.lr=0.005"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "0.005" in lines["train.lr"] and "(default 0.001)" in lines["train.lr"]
    assert "peak AdamW learning rate" in lines["train.lr"]
    assert "(default" not in lines["train.batch_size"]  # the recipe keeps the default: no mark
    assert main(["config", "show", "configs/balance_av.yaml", "method.name=uniform"]) == 0
    assert '"uniform"' in capsys.readouterr().out


@pytest.mark.slow
def test_launch_prints_a_user_error_once_without_a_traceback(tmp_path: Path) -> None:
    """``counterpoint launch`` with 2 processes and a bad key: one error line, exit 2, no launcher traceback."""
    src = str(Path(counterpoint.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "counterpoint.cli", "launch", "--nproc-per-node", "2", "--",
                           "train", "configs/clip_world.yaml", "train.lrr=1", f"out_dir={tmp_path / 'run'}"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("counterpoint: error:")]
    assert errors == ["counterpoint: error: unknown config key 'train.lrr' (did you mean 'train.lr'?)"]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_start_that_fails_its_checks_does_not_block_the_retry(small_world: Path, tmp_path: Path) -> None:
    """A run stopped before its first step ("fewer than one batch") leaves nothing that says it holds a run."""
    with pytest.raises(counterpoint.errors.DataError, match="fewer than one batch"):
        train(_cfg(small_world, tmp_path / "run", batch_size=1024))
    train(_cfg(small_world, tmp_path / "run", max_steps=1))  # the corrected retry, no --overwrite needed
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 1


def test_folder_caption_without_its_image_is_counted(tmp_path: Path) -> None:
    """A ``.txt`` caption whose image is missing is a skipped sample (``missing_image``), not ignored."""
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red square")
    (tmp_path / "b.txt").write_text("a caption without its picture")
    skips = SkipStats()
    assert [s.key for s in iter_folder(str(tmp_path), "txt", skips)] == ["a"]
    assert dict(skips.counts) == {"missing_image": 1} and skips.examples == ["missing_image: b.txt"]


def _table(fused: dict[str, list[float]]) -> dict:
    return {label: {"acc": {"fused": over_seeds(v), "audio": over_seeds(v)},
                    "selected_epoch": over_seeds([1.0] * len(v)), "step_ms": over_seeds([1.0] * len(v)),
                    "conflict_rate": {}} for label, v in fused.items()}


def test_comparisons_claim_only_what_the_seeds_carry() -> None:
    """One seed: no ± and no verdict; differences within 2 standard errors: no winner; beyond: a direction."""
    one = _table({"uniform": [0.90], "mmpareto-1.5": [0.95]})
    summary = {"methods": one, "seeds": [0], "weak_modality": "audio",
               "versus_uniform_verdict": {"mmpareto-1.5": verdict(one["mmpareto-1.5"]["acc"]["fused"],
                                                                  one["uniform"]["acc"]["fused"])}}
    text = markdown(summary, ["audio"], "cmd")
    assert "±" not in text and "beats" not in text and "too few seeds" in text and "one seed" in text
    close = _table({"uniform": [0.90, 0.92, 0.91], "m": [0.91, 0.92, 0.93]})
    assert "no clear difference" in verdict(close["m"]["acc"]["fused"], close["uniform"]["acc"]["fused"])
    far = _table({"uniform": [0.80, 0.81, 0.80], "m": [0.90, 0.91, 0.90]})
    assert verdict(far["m"]["acc"]["fused"], far["uniform"]["acc"]["fused"]).endswith("above")


def test_curves_have_titles_plain_log_labels_and_markers_on_short_runs() -> None:
    """A log-scale loss axis reads 2, 3, 0.5 (not 2x10^0); a handful of points is drawn with markers."""
    rows = [{"step": s, "loss": 4.0 / s} for s in range(1, 9)]
    fig = curve_figure(rows, ["loss"], "loss", "Training loss", logy=True)
    fig.canvas.draw()
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels(minor=False) + ax.get_yticklabels(minor=True)]
    assert ax.get_title() == "Training loss" and ax.get_yscale() == "log"
    assert labels and not any("10^" in t or "times" in t or "mathdefault" in t for t in labels), labels
    assert ax.lines[0].get_marker() == "o"
    plt.close(fig)


@pytest.mark.slow
def test_a_warmup_longer_than_the_run_is_warned_about(small_world: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    """The recipe's warmup and log cadence are checked against the run's length, with the fitting values."""
    train(_cfg(small_world, tmp_path / "run", warmup_steps=100, log_every=20, max_steps=1))
    err = capsys.readouterr().err
    assert "warning: train.warmup_steps=100 is 417% of this run's 24 steps" in err
    assert "warning: train.log_every=20 logs 1 row(s)" in err


@pytest.mark.slow
def test_eval_with_other_settings_keeps_the_training_time_results(small_world: Path, tmp_path: Path) -> None:
    """``counterpoint eval RUN data.test=...`` writes to RUN/evals/<overrides>/ (or --out), never over the run's
    own eval.json and report.md."""
    run = train(_cfg(small_world, tmp_path / "run", max_steps=1))
    before = {name: (run / name).read_bytes() for name in ("eval.json", "report.md")}
    assert main(["eval", str(run), f"data.test={small_world / 'test'}", "eval.retrieval=true"]) == 0
    assert {name: (run / name).read_bytes() for name in before} == before
    (out,) = (run / "evals").iterdir()
    assert json.loads((out / "eval.json").read_text())["retrieval"]["n"] == 128
    assert main(["eval", str(run), "eval.retrieval=true", "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "report.md").is_file()
