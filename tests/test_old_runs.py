"""Run directories written by an earlier release (checkpoint format v1: a two-tower CLIP) still load with
``counterpoint.load_checkpoint`` and evaluate with ``counterpoint eval``, to the numbers they were evaluated
to when they were written. The fixture and how it was made: ``tests/fixtures/run_v1/README.md``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import counterpoint
from counterpoint.cli import main
from counterpoint.data.make_world import make_world
from counterpoint.data.world import WorldConfig

FIXTURE = Path(__file__).parent / "fixtures" / "run_v1"


@pytest.fixture(scope="module")
def fixture_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The world the fixture run trained and was evaluated on (regenerated: it is a function of its seed)."""
    out = tmp_path_factory.mktemp("v1_world")
    make_world(out, WorldConfig(seed=0), "wds", train=96, test=16, zeroshot=64, progress=False)
    return out


def test_v1_checkpoint_loads_through_the_public_api() -> None:
    """load_checkpoint gives the two-tower model and tokenizer; embeddings are unit vectors of the saved size."""
    model, tokenizer = counterpoint.load_checkpoint(FIXTURE)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    u = counterpoint.encode_image(model, images)
    v = counterpoint.encode_text(model, tokenizer, ["a big red star at the top left.", "a small blue circle."])
    assert u.shape == v.shape == (2, 16)
    torch.testing.assert_close(u.norm(dim=1), torch.ones(2))


@pytest.mark.slow
def test_v1_run_evaluates_to_its_recorded_numbers(fixture_world: Path, tmp_path: Path) -> None:
    """`counterpoint eval` of the old run, on the data it was evaluated on, reproduces its eval.json."""
    run = tmp_path / "run_v1"
    shutil.copytree(FIXTURE, run)
    data = [f"data.test={fixture_world / 'test'}", f"data.zeroshot={fixture_world / 'zeroshot'}",
            f"data.classes={fixture_world / 'world.json'}", "eval.imagine=1", "eval.imagine_steps=5"]
    assert main(["eval", str(run), *data, "--out", str(tmp_path / "eval")]) == 0
    then = json.loads((FIXTURE / "eval.json").read_text())
    now = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert now["model"] == then["model"] == "tiny-cnn" and now["step"] == then["step"] == 2
    for direction in ("image_to_text", "text_to_image"):
        for k, value in then["retrieval"][direction].items():
            assert now["retrieval"][direction][k] == pytest.approx(value, abs=1e-6), (direction, k)
    for subset in ("heldout", "seen", "all"):
        assert now["zeroshot"][subset]["top1"] == pytest.approx(then["zeroshot"][subset]["top1"], abs=1e-6)
