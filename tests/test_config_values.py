"""Config values that used to be accepted silently or to end in a traceback (issue 8).

Every value here is a user mistake: it is refused with one line naming the key, by ``load_config`` or by the
pre-flight of ``train()`` (``check_data_paths``, which resolves the model spec) before the run directory exists.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from pathlib import Path

import pytest

from counterpoint.cli import main
from counterpoint.config import ConfigError, ObjectiveConfig, RunConfig, from_dict, load_config
from counterpoint.errors import UserError
from counterpoint.models.presets import MODEL_PRESETS, ModelSpec
from counterpoint.train.balance_config import load_balance_config
from counterpoint.train.loop import check_data_paths

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "clip_world.yaml"
# Valid settings that only keep a run short: the old code trained with several of the bad values below, and
# these make such a test fail in seconds instead of minutes. They change nothing on the code that refuses them.
SHORT_RUN = ["train.max_steps=1", "train.batch_size=16", "train.progress=false", "eval.batch_size=128"]


def _leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, set[type]]]:
    """(dotted key, types a value may have besides None) of every non-dataclass field of ``cls``, recursively."""
    out: list[tuple[str, set[type]]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if tp is ObjectiveConfig:  # the section's fields are the task's: those of the default task (clip)
            tp = type(RunConfig().objective)
        if dataclasses.is_dataclass(tp):
            out += _leaf_fields(tp, f"{prefix}{f.name}.")
            continue
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            out.append((f"{prefix}{f.name}", {a for a in typing.get_args(tp) if a is not type(None)}))
        else:
            out.append((f"{prefix}{f.name}", {tp}))
    return out


FLOAT_KEYS = [key for key, tps in _leaf_fields(RunConfig) if tps == {float}]
NUMERIC_KEYS = [(key, tps) for key, tps in _leaf_fields(RunConfig) if tps and tps <= {int, float}]


def _data_at(world: Path) -> list[str]:
    """Overrides pointing every data path of the recipe at the generated ``small_world``."""
    return [f"data.train={world / 'train'}", f"data.test={world / 'test'}",
            f"data.zeroshot={world / 'zeroshot'}", f"data.classes={world / 'world.json'}"]


def _assert_one_line_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("counterpoint: error:"), err
    for needle in needles:
        assert needle in lines[0], err


# ----------------------------------------------------------------------------------------------------------
# 1. Non-finite numbers


@pytest.mark.parametrize("spelling", ["inf", "-inf", "nan", ".inf", "-.inf", ".nan"])
def test_every_float_setting_refuses_non_finite_values(spelling: str) -> None:
    """Every float field of RunConfig (and the floats inside its lists) refuses a non-finite value by key."""
    assert {"train.lr", "train.weight_decay", "train.epochs", "train.eps", "objective.margin",
            "objective.init_logit_bias"} <= set(FLOAT_KEYS)
    cases = [(key, f"{key}={spelling}") for key in FLOAT_KEYS] + [
        ("train.betas[0]", f"train.betas=[{spelling}, 0.98]"),
        ("train.betas[1]", f"train.betas=[0.9, {spelling}]"),
        ("data.stream.sources[0].weight", f"data.stream.sources=[{{shards: a.tar, weight: {spelling}}}]"),
    ]
    offenders = []
    for key, override in cases:
        try:
            load_config(None, [override])
        except ConfigError as exc:
            if key not in str(exc) or "\n" in str(exc):
                offenders.append(f"{override}: {exc}")
        else:
            offenders.append(f"{override}: accepted")
    assert not offenders, "\n".join(offenders)


# ----------------------------------------------------------------------------------------------------------
# 2. Values out of range, refused by load_config or by the pre-flight of train()

BAD_VALUES = [
    (["train.eps=-1"], "train.eps"),
    (["train.eps=0"], "train.eps"),
    (["train.betas=[2,3]"], "train.betas"),
    (["train.betas=[0.9,1.0]"], "train.betas"),
    (["train.device=bogus"], "train.device"),
    (["train.device=gpu"], "train.device"),
    (["seed=-1"], "seed"),
    (["train.threads=-1"], "train.threads"),
    (["eval.recall_at=[]"], "eval.recall_at"),
    (["model.embed_dim=0"], "model.embed_dim"),
    (["model.embed_dim=1"], "model.embed_dim"),
    (["model.image_size=-32"], "model.image_size"),
    (["model.context_length=1"], "model.context_length"),
    (["model.name=tiny-vit", "model.image_size=30"], "model.image_size"),
    (["model.name=tiny-cnn", "model.image_size=3"], "model.image_size"),
    ([f"train.threads={10**30}"], "train.threads"),
    ([f"model.embed_dim={10**30}"], "model.embed_dim"),
    ([f"model.embed_dim={2**40}"], "model.embed_dim"),
]


@pytest.mark.parametrize(("overrides", "key"), BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_value_is_a_one_line_config_error_before_training(overrides: list[str], key: str,
                                                              small_world: Path) -> None:
    """load_config or the pre-flight check_data_paths refuses the value with a one-line ConfigError naming it."""
    with pytest.raises(ConfigError) as err:
        check_data_paths(load_config(RECIPE, [*_data_at(small_world), *overrides]))
    assert key in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("overrides", "key"), BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_cli_train_refuses_bad_value_in_one_line(overrides: list[str], key: str, small_world: Path,
                                                 tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`counterpoint train` exits 2 with one line naming the key, and creates no run directory."""
    out = tmp_path / "run"
    rc = main(["train", str(RECIPE), *_data_at(small_world), *SHORT_RUN, f"out_dir={out}", *overrides])
    assert rc == 2
    _assert_one_line_error(capsys.readouterr().err, key)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------
# 3-4. out_dir that is a file; config files that are not UTF-8 or not YAML


def test_cli_out_dir_naming_a_file_is_refused(small_world: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    """out_dir naming an existing file exits 2 with one line naming out_dir, and leaves the file as it was."""
    target = tmp_path / "run"
    target.write_text("not a folder\n")
    rc = main(["train", str(RECIPE), *_data_at(small_world), *SHORT_RUN, f"out_dir={target}"])
    assert rc == 2
    _assert_one_line_error(capsys.readouterr().err, "out_dir")
    assert target.read_text() == "not a folder\n"


@pytest.mark.parametrize(("content", "pattern"), [
    (b"train:\n  lr: 0.1 \xff\xfe\n", "UTF-8"),
    (b"train: [1, 2\nmodel: x\n", r"line \d+, column \d+"),
], ids=["not-utf8", "yaml-syntax"])
def test_cli_unreadable_config_file_is_one_line(content: bytes, pattern: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    """A recipe that is not UTF-8 or not valid YAML exits 2 with one line naming the file (and where it breaks)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(content)
    out = tmp_path / "run"
    rc = main(["train", str(recipe), f"out_dir={out}"])
    assert rc == 2
    err = capsys.readouterr().err
    _assert_one_line_error(err, str(recipe))
    assert re.search(pattern, err), err
    assert not out.exists()
    with pytest.raises(ConfigError, match=pattern) as exc:
        load_config(recipe)
    assert "\n" not in str(exc.value)


# ----------------------------------------------------------------------------------------------------------
# 5. Model specs (as saved in checkpoints)


def _spec_json(**changes: object) -> dict:
    """tiny-cnn's spec as a checkpoint stores it (JSON: tuples become lists), with ``changes``."""
    return {**json.loads(json.dumps(dataclasses.asdict(MODEL_PRESETS["tiny-cnn"]))), **changes}


def test_from_dict_with_a_missing_required_field_is_a_config_error() -> None:
    """from_dict(ModelSpec, ...) without a required field raises a ConfigError naming it, not a TypeError."""
    data = _spec_json()
    del data["embed_dim"]
    with pytest.raises(ConfigError, match="embed_dim"):
        from_dict(ModelSpec, data)


def test_spec_from_json_round_trips_a_preset() -> None:
    """ModelSpec.from_json rebuilds a preset from its JSON form (lists back to tuples)."""
    assert ModelSpec.from_json(_spec_json()) == MODEL_PRESETS["tiny-cnn"]


@pytest.mark.parametrize(("changes", "needle"), [
    ({"embed_dim": "wide"}, "embed_dim"),
    ({"image_size": 32.5}, "image_size"),
    ({"cnn_widths": "32,64,128"}, "cnn_widths"),
    ({"text_pool": ["eot"]}, "text_pool"),
    ({"bogus": 1}, "bogus"),
    ({"embed_dim": 0}, "embed_dim"),
    ({"image_size": -32}, "image_size"),
    ({"context_length": 1}, "context_length"),
    ({"text_heads": 3}, "text_heads"),
    ({"image_tower": "mlp"}, "image_tower"),
    ({"cnn_depths": [1, 1]}, "cnn_depths"),
])
def test_spec_from_json_refuses_wrong_types_and_values(changes: dict, needle: str) -> None:
    """ModelSpec.from_json refuses a field of the wrong type or a bad value with a ConfigError naming it."""
    with pytest.raises(ConfigError, match=needle):
        ModelSpec.from_json(_spec_json(**changes))


# ----------------------------------------------------------------------------------------------------------
# 6. Rule: numeric extremes are user errors or accepted, never a crash


@pytest.mark.parametrize("extreme", ["-1", "0", "huge"])
def test_numeric_extremes_are_user_errors_or_accepted(extreme: str, small_world: Path) -> None:
    """Every int/float field at -1, 0 or 1e30 loads and passes the pre-flight or raises a UserError (never
    another exception). This rule held on the old code too, so it does not fail there; it guards the fixes."""
    assert len(NUMERIC_KEYS) >= 25
    offenders = []
    for key, tps in NUMERIC_KEYS:
        value = ("1e30" if tps == {float} else str(10**30)) if extreme == "huge" else extreme
        try:
            check_data_paths(load_config(None, [*_data_at(small_world), f"{key}={value}"]))
        except UserError:
            pass
        except Exception as exc:  # the rule: nothing else escapes
            offenders.append(f"{key}={value}: {type(exc).__name__}: {exc}")
    assert not offenders, "\n".join(offenders)


# ----------------------------------------------------------------------------------------------------------
# 7. Balance configs


@pytest.mark.parametrize("device", ["gpu", "bogus", "cuda:x"])
def test_balance_config_refuses_a_device_torch_does_not_know(device: str) -> None:
    """load_balance_config refuses train.device values that are not devices with a ConfigError naming the key."""
    with pytest.raises(ConfigError, match=r"train\.device") as err:
        load_balance_config(REPO / "configs" / "balance_av.yaml", [f"train.device={device}"])
    assert "\n" not in str(err.value)
