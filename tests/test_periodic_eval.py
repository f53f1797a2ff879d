"""Zero-shot evaluation during training (``eval.every_steps``): when it runs, what it logs, that it leaves the
training itself untouched, and that its last point is the final evaluation's number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from counterpoint.config import ConfigError, RunConfig, from_dict
from counterpoint.errors import UserError
from counterpoint.evaluate.periodic import zeroshot_curve
from counterpoint.train.loop import train
from tests.conftest import tiny_config


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_curve_finds_the_first_point_at_the_threshold() -> None:
    rows = [{"step": s, "samples_seen": 10 * s, "loss": 1.0} for s in range(1, 7)]
    for s, v in ((2, 0.5), (4, 0.81), (6, 0.79)):
        rows[s - 1].update({"zeroshot/heldout": v, "zeroshot/seen": v + 0.1, "zeroshot/all": v})
    curve = zeroshot_curve(rows, threshold=0.8)
    assert curve["step"] == [2, 4, 6] and curve["samples_seen"] == [20, 40, 60]
    assert curve["heldout"] == [0.5, 0.81, 0.79] and curve["samples_to_threshold"] == 40
    assert zeroshot_curve(rows, threshold=0.9)["samples_to_threshold"] is None
    assert zeroshot_curve([{"step": 1, "samples_seen": 8, "loss": 1.0}]) is None


@pytest.mark.slow
def test_periodic_zeroshot_is_logged_plotted_and_changes_nothing(small_world: Path, tmp_path: Path) -> None:
    """Rows at every 3rd step and the last carry zeroshot/*; the losses equal those of a run without it (the
    evaluation touches no random stream and no weight, BatchNorm statistics included); the last point is
    the final evaluation's zero-shot top-1; eval.json and the report carry the curve."""
    common = {"max_steps": 7, "log_every": 1}
    with_eval = tiny_config(small_world, tmp_path / "with", **common)
    with_eval.eval.every_steps = 3
    with_eval.eval.retrieval = with_eval.eval.linear_probe = False
    without = tiny_config(small_world, tmp_path / "without", evaluate=False, **common)
    a, b = _rows(train(with_eval)), _rows(train(without))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    evaluated = [r["step"] for r in a if "zeroshot/heldout" in r]
    assert evaluated == [3, 6, 7]
    for r in a:
        if "zeroshot/all" in r:
            assert 0 <= r["zeroshot/heldout"] <= 1 and 0 <= r["zeroshot/seen"] <= 1
    result = json.loads((tmp_path / "with" / "eval.json").read_text())
    assert a[-1]["zeroshot/heldout"] == pytest.approx(result["zeroshot"]["heldout"]["top1"], abs=1e-4)
    assert a[-1]["zeroshot/all"] == pytest.approx(result["zeroshot"]["all"]["top1"], abs=1e-4)
    curve = result["zeroshot_during_training"]
    assert curve["step"] == [3, 6, 7] and curve["samples_seen"] == [3 * 64, 6 * 64, 7 * 64]
    assert (tmp_path / "with" / "zeroshot.png").is_file()
    assert "## Zero-shot during training" in (tmp_path / "with" / "report.md").read_text()


def test_every_steps_needs_labelled_images(small_world: Path, tmp_path: Path) -> None:
    cfg = tiny_config(small_world, tmp_path / "r")
    cfg.data.zeroshot = ""
    cfg.eval.every_steps = 5
    with pytest.raises(UserError, match=r"eval.every_steps needs labelled zero-shot images.*data.zeroshot"):
        train(cfg)
    with pytest.raises(ConfigError, match=r"eval.every_steps must be >= 0"):
        from_dict(RunConfig, {"eval": {"every_steps": -1}})
