from __future__ import annotations

import subprocess
import sys

import pytest

from counterpoint.config import ConfigError, RunConfig, from_dict, load_config, parse_override, to_dict
from tests.conftest import one_line_error

REPO = __file__.rsplit("/tests/", 1)[0]


def test_defaults_round_trip_through_dict() -> None:
    cfg = RunConfig()
    assert from_dict(RunConfig, to_dict(cfg)) == cfg


def test_unknown_key_names_the_key_and_suggests() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr' \(did you mean 'train.lr'\?\)"):
        from_dict(RunConfig, {"train": {"lrr": 1.0}})
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        from_dict(RunConfig, {"bogus": 1})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"train": {"lr": "fast"}}, "train.lr: expected a number"),
        ({"train": {"batch_size": 2.5}}, "train.batch_size: expected an integer"),
        ({"train": {"precision": "fp8"}}, "train.precision: 'fp8' is not one of 'fp32', 'bf16'"),
        ({"train": {"progress": "yes"}}, "train.progress: expected true or false"),
        ({"train": {"betas": [0.9]}}, "train.betas: expected a list of 2 values"),
        ({"train": {"lr": -1.0}}, "train.lr must be > 0"),
        ({"objective": {"name": "siglip2"}}, "objective.name"),
        ({"model": 3}, "model: expected a mapping"),
    ],
)
def test_bad_values_are_one_line_errors(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(RunConfig, data)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_overrides_merge_over_yaml(tmp_path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: 0.01\n  epochs: 3\nmodel:\n  name: tiny-vit\n")
    cfg = load_config(recipe, ["train.lr=3e-4", "eval.recall_at=[1,2]", "model.embed_dim=64"])
    assert cfg.train.lr == 3e-4 and cfg.train.epochs == 3.0
    assert cfg.model.name == "tiny-vit" and cfg.model.embed_dim == 64
    assert cfg.eval.recall_at == (1, 2)


def test_override_syntax_errors() -> None:
    assert parse_override("a.b=1") == {"a": {"b": 1}}
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.lr")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("train..lr=1")


def test_missing_recipe_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train", "configs/clip_world.yaml", "train.lrr=1"], "unknown config key 'train.lrr'"),
        (["train", "configs/clip_world.yaml", "train.batch_size=abc"], "train.batch_size: expected an integer"),
        (["train", "configs/clip_world.yaml", "data.train=/nonexistent/x", "out_dir={tmp}/run"],
         "data path '/nonexistent/x' does not exist"),
        (["eval", "{tmp}"], "is not a run directory"),
    ],
)
def test_cli_user_errors_exit_2_without_traceback(tmp_path, monkeypatch, capsys, args: list[str],
                                                   needle: str) -> None:
    """In process (the entry point itself is checked below, once: each new interpreter costs seconds)."""
    from counterpoint.cli import main

    monkeypatch.chdir(REPO)
    assert main([a.replace("{tmp}", str(tmp_path)) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "Traceback" not in err and err.count("\n") == 0, err


def test_the_installed_entry_point_reports_a_user_error_in_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "counterpoint.cli", "train", "configs/clip_world.yaml",
                           "train.lrr=1"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    one_line_error(proc.stderr, "unknown config key 'train.lrr'")
