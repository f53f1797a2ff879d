"""End to end on the built-in world: the CLI writes data, trains for real for a few seconds, evaluates, reports;
``counterpoint eval`` re-evaluates; damaged checkpoints are user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import counterpoint
from counterpoint.cli import main
from counterpoint.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("e2e")
    world = tmp / "world"
    assert main(["data", "make", "world", "--out", str(world), "--train", "1536", "--test", "200",
                 "--zeroshot", "256", "--quiet"]) == 0
    # Drop a corrupt sample into the test split: it must be skipped, counted and reported, not fatal.
    (world / "test" / "zz-corrupt.tar").write_bytes(b"this is not a tar file")
    run = tmp / "run"
    code = main(["train", str(ROOT / "configs" / "clip_world.yaml"), f"out_dir={run}",
                 f"data.train={world}/train", f"data.test={world}/test", f"data.zeroshot={world}/zeroshot",
                 f"data.classes={world}/world.json", "train.epochs=2", "train.batch_size=64",
                 "train.lr=3e-3", "train.warmup_steps=10", "train.log_every=4", "train.checkpoint_every=50",
                 "train.progress=false",
                 "eval.imagine=2", "eval.imagine_steps=10"])  # the report's grid, small (test_imagine pins it down)
    assert code == 0
    return run


@pytest.mark.slow
def test_run_directory_contract(trained_run: Path) -> None:
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "report.md", "loss.png", "temperature.png",
                 "eval.png", "checkpoints/latest"):
        assert (trained_run / name).exists(), name
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 * (1536 // 64)
    assert rows[-1]["loss"] < rows[0]["loss"] * 0.85  # it learned (4.07 -> 3.04 in 48 steps here)
    result = json.loads((trained_run / "eval.json").read_text())
    assert result["zeroshot"]["num_classes"] == 64
    assert {"heldout", "seen", "all"} <= set(result["zeroshot"])
    assert set(result["retrieval"]["text_to_image"]) == {"R@1", "R@5", "R@10"}
    assert result["retrieval"]["n"] == 200
    # Better than chance after a few seconds of training (chance: 1/64 top-1, 10/200 R@10).
    assert result["zeroshot"]["seen"]["top1"] > 3 / 64
    assert result["retrieval"]["text_to_image"]["R@10"] > 0.15
    assert 0 <= result["linear_probe"]["top1"] <= 1
    assert result["data"]["skipped"]["test"]["by_reason"] == {"corrupt_shard": 1}
    assert "corrupt_shard: 1" in (trained_run / "report.md").read_text()


@pytest.mark.slow
def test_eval_command_reproduces_eval_json(trained_run: Path) -> None:
    before = json.loads((trained_run / "eval.json").read_text())
    assert main(["eval", str(trained_run)]) == 0
    after = json.loads((trained_run / "eval.json").read_text())
    assert after["zeroshot"] == before["zeroshot"]
    assert after["retrieval"] == before["retrieval"]


@pytest.mark.slow
def test_public_api_loads_the_checkpoint(trained_run: Path) -> None:
    model, tokenizer = counterpoint.load_checkpoint(trained_run)
    images = torch.randint(0, 256, (3, 3, model.image_size, model.image_size), dtype=torch.uint8)
    u = counterpoint.encode_image(model, images)
    v = counterpoint.encode_text(model, tokenizer, ["a red circle.", "a big blue star at the top left."])
    assert u.shape[0] == 3 and v.shape[0] == 2 and u.shape[1] == v.shape[1]
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(3))
    assert counterpoint.get_tokenizer(trained_run).vocab_size == tokenizer.vocab_size


@pytest.mark.slow
def test_damaged_checkpoint_is_a_user_error(trained_run: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    run = tmp_path / "damaged"
    shutil.copytree(trained_run, run)
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    (latest / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="damaged"):
        counterpoint.load_checkpoint(run)
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "Traceback" not in err
    (latest / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="state.json"):
        counterpoint.load_checkpoint(run)
