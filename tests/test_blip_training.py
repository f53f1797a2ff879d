"""BLIP trained for real on the world for a few seconds, evaluated with ITM re-ranking, and captioning from the
command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from counterpoint.cli import main
from counterpoint.objectives.blip import BLIPConfig
from counterpoint.train.checkpoint import resolve_checkpoint
from counterpoint.train.loop import train
from tests.conftest import one_line_error, tiny_config
from tests.test_train_distributed import two_ranks

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def blip_run(small_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = tiny_config(small_world, tmp_path_factory.mktemp("blip") / "run", epochs=2, batch_size=32, lr=2e-3,
                      warmup_steps=4, threads=1)
    cfg.model.name, cfg.model.context_length = "tiny-vit", 40
    cfg.objective = BLIPConfig(queue_size=128)
    cfg.eval.linear_probe, cfg.eval.rerank_k, cfg.eval.captions = False, 8, 12
    return train(cfg)


def test_blip_learns_to_caption_and_evaluates_with_reranking(blip_run: Path) -> None:
    """48 steps: the captioning loss falls by a third (ITC and ITM move slowly this early: the queue starts as
    random keys and ITM first learns the 2:1 ratio of negatives), all three losses stay finite, and the
    evaluation re-ranks retrieval by the matching head."""
    rows = [json.loads(line) for line in (blip_run / "metrics.jsonl").read_text().splitlines()]
    first, last = np.mean([r["loss/lm"] for r in rows[:4]]), np.mean([r["loss/lm"] for r in rows[-4:]])
    assert last < 0.67 * first, (first, last)
    assert all(np.isfinite([r["loss/itc"], r["loss/itm"]]).all() and 0.001 <= r["temperature"] <= 0.5
               for r in rows)
    result = json.loads((blip_run / "eval.json").read_text())
    itm = result["retrieval_itm"]
    assert itm["k"] == 8 and itm["n"] == result["retrieval"]["n"] == 128
    # re-ranking moves keys within the top 8 only: at K >= 8 the hits are ITC's
    for direction in ("image_to_text", "text_to_image"):
        assert itm[direction]["R@10"] == result["retrieval"][direction]["R@10"]
    report = (blip_run / "report.md").read_text()
    assert "Re-ranked by the matching head" in report and "## Captioning" in report
    captioning = result["captioning"]
    assert captioning["n"] == 12 and captioning["references_per_image"] == 5 and len(captioning["examples"]) == 8
    assert 0 <= captioning["bleu4"] <= 1 and captioning["cider"] >= 0
    assert set(captioning["attributes"]) == {"all", "one_object"} and captioning["attributes"]["all"]["n"] == 12
    assert (blip_run / captioning["grid"]).is_file()


def test_caption_command(blip_run: Path, small_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    paths = []
    for i, colour in enumerate([(220, 30, 30), (30, 30, 220)]):
        Image.new("RGB", (40, 32), colour).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    assert main(["caption", str(blip_run), *paths, "--beams", "2", "--max-tokens", "6"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == paths
    assert all(line.split(": ", 1)[1].startswith("a picture of") for line in lines)
    assert main(["caption", str(blip_run), str(tmp_path / "missing.png")]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_init_from_starts_from_the_runs_weights_tokenizer_and_momentum(blip_run: Path, small_world: Path,
                                                                         tmp_path: Path) -> None:
    """A fine-tuning stage (CapFilt's captioner): the source run's weights and tokenizer, momentum encoders
    equal to the loaded weights, a fresh optimizer and schedule. One step at lr 1e-12 moves nothing."""
    cfg = tiny_config(small_world, tmp_path / "tuned", evaluate=False, epochs=1, batch_size=32, lr=1e-12,
                      threads=1, max_steps=1)
    cfg.model.name, cfg.model.context_length = "tiny-vit", 40
    cfg.objective = BLIPConfig(queue_size=128, itc_weight=0.0, itm_weight=0.0)
    cfg.train.init_from = str(blip_run)
    tuned = train(cfg)
    source_ckpt, tuned_ckpt = resolve_checkpoint(blip_run), resolve_checkpoint(tuned)
    assert (tuned_ckpt / "tokenizer.json").read_text() == (source_ckpt / "tokenizer.json").read_text()
    source, weights = load_file(source_ckpt / "model.safetensors"), load_file(tuned_ckpt / "model.safetensors")
    assert source.keys() == weights.keys()
    for name, value in source.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-6, msg=name)
    momentum = load_file(tuned_ckpt / "task.safetensors")
    for name, value in momentum.items():
        if name.startswith("momentum."):  # momentum.<part>.<param> copies model <part>.<param>
            torch.testing.assert_close(value, source[name.removeprefix("momentum.")], rtol=0, atol=1e-6, msg=name)


def test_init_from_refuses_a_tokenizer_without_the_tasks_tokens(small_world: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    old_clip_run = Path(__file__).parent / "fixtures" / "run_v1"  # tiny-cnn CLIP: no <enc> / <dec>
    recipe = Path(__file__).parents[1] / "configs" / "blip_world.yaml"
    code = main(["train", str(recipe), f"out_dir={tmp_path / 'run'}", f"data.train={small_world / 'train'}",
                 "model.name=tiny-cnn", "model.embed_dim=16", "model.context_length=16",
                 f"train.init_from={old_clip_run}"])
    assert code == 2
    one_line_error(capsys.readouterr().err, "train.init_from", "lacks <enc>, <dec>")


def test_captioner_only_trains_the_same_in_two_processes(small_world: Path, tmp_path: Path) -> None:
    """With ITC and ITM off, the encoder-only parameters get no gradient: DDP looks for them (unused
    parameters) and 2 processes still compute what one does."""
    def config(name: str):
        cfg = tiny_config(small_world, tmp_path / name, evaluate=False, batch_size=32, lr=2e-3, threads=1,
                          device="cpu", max_steps=3)
        cfg.model.name, cfg.model.context_length = "tiny-vit", 40
        cfg.objective = BLIPConfig(queue_size=64, itc_weight=0.0, itm_weight=0.0)
        return cfg

    one = train(config("one"))
    two_ranks(config("two"), tmp_path)
    rows = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            for run in (one, tmp_path / "two")]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == [1, 2, 3]
    for a, b in zip(*rows):
        assert set(a) >= {"loss/lm"} and "loss/itc" not in a and abs(a["loss"] - b["loss"]) <= 1e-5
    weights = [load_file(resolve_checkpoint(run) / "model.safetensors") for run in (one, tmp_path / "two")]
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=0, atol=1e-5, msg=name)
