"""Evaluation spread over 2 real processes (gloo) gives one process's numbers: zero-shot, retrieval and the
linear probe, with shards of unequal size (one of them empty) gathered back in order."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from counterpoint.data.pairs import load_pairs
from counterpoint.data.tokenizer import Tokenizer
from counterpoint.evaluate.embed import embed_images
from counterpoint.evaluate.runner import evaluate_model
from counterpoint.models.presets import create_model
from counterpoint.models.two_tower import TwoTower
from tests.conftest import tiny_config
from tests.dist_utils import run_distributed

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(vocab_size: int) -> TwoTower:
    torch.manual_seed(5)
    return create_model("tiny-vit", embed_dim=16, vocab_size=vocab_size).eval()


def _worker(rank: int, world: int, cfg, tokenizer_file: str) -> dict:
    tokenizer = Tokenizer.from_file(tokenizer_file, 32)
    model = _model(tokenizer.vocab_size)
    images = load_pairs(cfg.data.test, 32, limit=5).images
    return {"eval": evaluate_model(model, tokenizer, cfg, torch.device("cpu"), across_ranks=True),
            "five": embed_images(model, images, 2, across_ranks=True),  # shards of 2 and 3 rows
            "one": embed_images(model, images[:1], 2, across_ranks=True)}  # rank 0's shard is empty


def test_distributed_eval_equals_single_process(small_world: Path, tmp_path: Path) -> None:
    cfg = tiny_config(small_world, tmp_path / "run")
    cfg.eval.batch_size = 24
    cfg.eval.max_retrieval_samples = 101  # shards of 50 and 51 pairs
    pairs = load_pairs(cfg.data.train, 32, limit=200)
    tokenizer = Tokenizer.train(pairs.captions, 256, 32)
    tokenizer.save(tmp_path / "tok.json")
    ranks = run_distributed(_worker, 2, cfg, str(tmp_path / "tok.json"), timeout=180)

    model = _model(tokenizer.vocab_size)
    ref = evaluate_model(model, tokenizer, cfg, torch.device("cpu"))
    assert ref["retrieval"]["n"] == 101 and ref["zeroshot"]["all"]["n"] == 128
    for r in ranks:
        assert r["eval"] == ref  # every metric, exactly
    images = load_pairs(cfg.data.test, 32, limit=5).images
    five = embed_images(model, images, 2)
    for r in ranks:
        torch.testing.assert_close(r["five"], five, atol=1e-6, rtol=0)
        torch.testing.assert_close(r["one"], five[:1], atol=1e-6, rtol=0)
