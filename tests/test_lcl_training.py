"""LCL trained for real on the world's stories: in memory and streamed from document shards (written by
``counterpoint data documents``), resumed bit-exactly after a kill mid-epoch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from counterpoint.cli import main
from counterpoint.config import SourceConfig, from_dict, save_config
from counterpoint.data.documents import iter_documents
from counterpoint.data.make_world import make_world
from counterpoint.data.readers import SkipStats
from counterpoint.data.world import WorldConfig
from counterpoint.objectives.lcl import LCLConfig
from counterpoint.train import checkpoint as ckpt
from counterpoint.train.distributed import FAULT_ENV
from counterpoint.train.loop import train
from tests.conftest import tiny_config
from tests.dist_utils import start_cli
from tests.test_train_distributed import two_ranks

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def stories(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A world with 96 stories, and the stories again as document shards of 20."""
    out = tmp_path_factory.mktemp("story_world")
    make_world(out, WorldConfig(seed=6), "wds", train=32, test=32, zeroshot=64, stories=96, progress=False)
    assert main(["data", "documents", str(out / "stories"), "--out", str(out / "docshards"),
                 "--docs-per-shard", "20", "--quiet"]) == 0
    return out


def _config(world: Path, out: Path, streamed: bool = False, **train_kw: object):
    cfg = tiny_config(world, out, evaluate=False, batch_size=8, threads=1, device="cpu", **train_kw)
    cfg.model.name, cfg.model.embed_dim, cfg.model.context_length = "tiny-vit", None, 288
    cfg.objective = LCLConfig()
    cfg.data.train = str(world / "stories")
    if streamed:
        cfg.data.stream.sources = [from_dict(SourceConfig, {"shards": str(world / "docshards")})]
        cfg.data.stream.num_workers = 0
    return cfg


def test_document_shards_hold_the_documents_they_were_written_from(stories: Path) -> None:
    source = list(iter_documents(str(stories / "stories"), SkipStats()))
    shards = list(iter_documents(str(stories / "docshards"), SkipStats()))
    assert len(shards) == len(source) == 96 and sorted(p.name for p in (stories / "docshards").glob("*.tar")) == [
        f"shard-{i:06d}.tar" for i in range(5)]
    for a, b in zip(source, shards):
        assert a.key == b.key and len(a.items) == len(b.items)
        for x, y in zip(a.items, b.items):
            assert x == y if isinstance(x, str) else np.array_equal(np.asarray(x), np.asarray(y))  # PNG: lossless


def test_lcl_learns_on_stories_in_memory(stories: Path, tmp_path: Path) -> None:
    """Two epochs of 96 stories: the text after each image is predicted better (generation CE falls), and
    the run evaluates through the causal model (zero-shot, retrieval) and the probes."""
    cfg = _config(stories, tmp_path / "run", epochs=2, lr=2e-3, warmup_steps=2)
    cfg.eval.zeroshot = cfg.eval.retrieval = cfg.eval.linear_probe = cfg.eval.attentive_probe = True
    run = train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ce = [r["generation_ce"] for r in rows]
    assert len(rows) == 24 and sum(ce[-4:]) / 4 < 0.8 * sum(ce[:4]) / 4, ce
    result = json.loads((run / "eval.json").read_text())
    assert {"zeroshot", "retrieval", "linear_probe", "attentive_probe"} <= set(result)
    assert json.loads((run / "data.json").read_text())["train"] == {
        "documents": 96, "images": 384, "skipped": {"total": 0, "occurrences": 0, "by_reason": {}, "examples": []}}


def _state(run: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt.resolve_checkpoint(run) / "model.safetensors")


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_streamed_documents_resume_bit_exactly_after_a_kill(stories: Path, tmp_path: Path) -> None:
    """Streamed from document shards, killed at step 5 of 8 (after the step-4 checkpoint, mid-epoch: an epoch
    is 12 steps): --resume ends bitwise where the uninterrupted run did."""
    reference = train(_config(stories, tmp_path / "one", streamed=True, max_steps=8, checkpoint_every=4))
    cfg = _config(stories, tmp_path / "killed", streamed=True, max_steps=8, checkpoint_every=4)
    recipe = tmp_path / "recipe.yaml"
    save_config(cfg, recipe)
    proc = start_cli(["train", str(recipe)], tmp_path / "logs", {FAULT_ENV: f"0:5:{tmp_path / 'died'}"})
    proc.join(300)
    assert proc.exitcode == 1 and (tmp_path / "died").exists(), (tmp_path / "logs" / "cli.err").read_text()[-2000:]
    state = json.loads((ckpt.resolve_checkpoint(tmp_path / "killed") / "state.json").read_text())
    assert state["step"] == 4 and state["data"]["batches"] == 4
    train(cfg, resume=True)
    assert _losses(tmp_path / "killed") == _losses(reference)
    a, b = _state(reference), _state(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_under_fsdp2_equal_one_on_stories(stories: Path, tmp_path: Path) -> None:
    """Stories give every rank several images with context: 2 processes under FSDP2 log the losses of one
    (DDP: the contract test), and the periodic zero-shot evaluation, which calls the sharded model's methods
    rather than the task's forward, runs and agrees too."""
    cfg = _config(stories, tmp_path / "one", max_steps=4)
    cfg.eval.every_steps, cfg.eval.zeroshot = 2, True
    one = train(cfg)
    cfg.out_dir, cfg.train.parallel = str(tmp_path / "two"), "fsdp"
    two_ranks(cfg, tmp_path)
    rows = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            for run in (one, tmp_path / "two")]
    for a, b in zip(*rows, strict=True):
        for key in ("loss", "loss/generation", "loss/contrastive"):
            assert abs(a[key] - b[key]) <= 1e-5, (a["step"], key, a[key], b[key])
        assert a.get("zeroshot/all") == pytest.approx(b.get("zeroshot/all"), abs=1e-6)
    assert sum("zeroshot/all" in r for r in rows[1]) == 2
