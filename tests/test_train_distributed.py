"""``counterpoint train`` under torchrun with real processes (gloo, 2 ranks, CPU) against one process.

Every 2-process run trains the tiny ViT (LayerNorm only, so no per-rank batch statistics) on the same global
batches as the one-process run; the ranks split each batch, gather features with gradients and average
gradients, so per-step losses and final weights agree up to float32 summation order (asserted to 1e-5).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import counterpoint
from counterpoint.cli import main
from counterpoint.config import ConfigError, StreamConfig, from_dict, load_config, save_config
from counterpoint.data.make_world import make_world
from counterpoint.data.streaming import build_loader
from counterpoint.data.world import WorldConfig
from counterpoint.train.distributed import FAULT_ENV
from counterpoint.train.loop import train
from tests.conftest import tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

NO_EVAL = {"zeroshot": False, "retrieval": False, "linear_probe": False}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist_world")
    make_world(out, WorldConfig(seed=2), "wds", train=128, test=40, zeroshot=40, progress=False)
    return out


def _config(world: Path, out: Path, objective: str = "clip", evaluate: bool = False, **train_kw: object):
    cfg = tiny_config(world, out, epochs=1.5, batch_size=32, threads=1, device="cpu", **train_kw)
    cfg.model.name = "tiny-vit"
    cfg.eval.batch_size = 16  # several batches per rank's shard
    if objective == "siglip":
        cfg.objective.name = "siglip"
        cfg.objective.init_temperature = 0.1
    if not evaluate:
        for k, v in NO_EVAL.items():
            setattr(cfg.eval, k, v)
    return cfg


def torchrun(cfg, tmp_path: Path, *overrides: str, env: dict[str, str] | None = None,
             restarts: int = 0) -> subprocess.CompletedProcess:
    """``counterpoint train`` in 2 processes launched by torchrun, exactly as a user would."""
    recipe = tmp_path / f"{Path(cfg.out_dir).name}.yaml"
    save_config(cfg, recipe)
    src = str(Path(counterpoint.__file__).resolve().parents[1])
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
                **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", str(restarts), "-m", "counterpoint.cli", "train", str(recipe), *overrides]
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(run / "checkpoints" / latest / "model.safetensors")


def assert_same_run(a: Path, b: Path, atol: float) -> None:
    la, lb = _losses(a), _losses(b)
    assert [s for s, _ in la] == [s for s, _ in lb] == list(range(1, 7))
    for (_, x), (_, y) in zip(la, lb):
        assert abs(x - y) <= atol, (la, lb)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def assert_moved(run: Path, first_checkpoint: Path) -> None:
    """The comparison is not vacuous: the weights changed by much more than the tolerance."""
    a, b = _weights(run), load_file(first_checkpoint / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-3


@pytest.fixture(scope="module")
def clip_runs(world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One process, and 2 processes under DDP, on the same global batches (InfoNCE)."""
    tmp = tmp_path_factory.mktemp("clip_runs")
    one = train(_config(world, tmp / "one", keep_checkpoints=10, checkpoint_every=1))
    torchrun(_config(world, tmp / "ddp"), tmp)
    return {"one": one, "ddp": tmp / "ddp", "tmp": tmp}


def test_two_processes_equal_one_infonce(clip_runs: dict[str, Path]) -> None:
    assert_same_run(clip_runs["one"], clip_runs["ddp"], atol=1e-5)
    assert_moved(clip_runs["one"], clip_runs["one"] / "checkpoints" / "step-00000001")
    state = json.loads((clip_runs["ddp"] / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert state["step"] == 6 and "optimizer" in state  # rank 0 wrote a complete checkpoint


def test_two_processes_with_grad_cache_equal_one_siglip(world: Path, tmp_path: Path) -> None:
    """SigLIP, and GradCache in the 2-process run (2 micro-batches per rank, 4 in all): same as one process
    with the whole batch at once."""
    one = train(_config(world, tmp_path / "one", "siglip"))
    torchrun(_config(world, tmp_path / "ddp", "siglip", accum_steps=2), tmp_path)
    assert_same_run(one, tmp_path / "ddp", atol=1e-5)


def test_grad_cache_accumulation_equals_full_batch(world: Path, clip_runs: dict[str, Path], tmp_path: Path) -> None:
    accum = train(_config(world, tmp_path / "accum", accum_steps=4))
    assert_same_run(clip_runs["one"], accum, atol=1e-5)


def test_fsdp_matches_ddp_and_evaluates(world: Path, clip_runs: dict[str, Path], tmp_path: Path) -> None:
    """FSDP2 (sharded parameters and Adam state, full-state checkpoint gathered to rank 0) trains the same
    model as DDP; rank 0 writes the evaluation of the full weights."""
    cfg = _config(world, tmp_path / "fsdp", evaluate=True, parallel="fsdp")
    proc = torchrun(cfg, tmp_path)
    assert_same_run(clip_runs["ddp"], tmp_path / "fsdp", atol=1e-5)
    result = json.loads((tmp_path / "fsdp" / "eval.json").read_text())
    assert {"zeroshot", "retrieval", "linear_probe"} <= result.keys() and result["retrieval"]["n"] == 40
    assert proc.stdout.count("report:") == 1  # only rank 0 prints the summary


def test_killed_rank_restarts_and_resumes(world: Path, clip_runs: dict[str, Path], tmp_path: Path) -> None:
    """Rank 1 dies abruptly at step 3 (after the step-2 checkpoint); torchrun restarts both processes, they
    resume from step 2 and finish: losses and weights are bitwise those of the uninterrupted 2-process run."""
    marker = tmp_path / "died"
    cfg = _config(world, tmp_path / "faulty", checkpoint_every=2)
    torchrun(cfg, tmp_path, env={FAULT_ENV: f"1:3:{marker}"}, restarts=1)
    assert marker.exists()  # the fault did fire
    run = tmp_path / "faulty"
    assert _losses(run) == _losses(clip_runs["ddp"])
    a, b = _weights(run), _weights(clip_runs["ddp"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_from_two_processes_resumes_in_one(world: Path, clip_runs: dict[str, Path]) -> None:
    """Checkpoints hold full tensors in the one-process layout: a 2-process run stopped at step 4 resumes in
    one process and ends where the 2-process run did."""
    tmp = clip_runs["tmp"]
    cfg = _config(world, tmp / "switch", checkpoint_every=2, max_steps=4)
    torchrun(cfg, tmp)
    cfg.train.max_steps = None
    resumed = train(cfg, resume=True)
    assert_same_run(resumed, clip_runs["ddp"], atol=1e-5)


def test_recipe_keys_are_validated(world: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    save_config(_config(world, tmp_path / "x"), recipe)
    assert yaml.safe_load(recipe.read_text())["train"]["parallel"] == "ddp"
    for bad, words in (("train.parallel=zero3", "train.parallel"), ("train.accum_steps=0", "accum_steps"),
                       ("train.accum_steps=3", "divisible")):
        with pytest.raises(ConfigError, match=words):
            load_config(recipe, [bad])
        assert main(["train", str(recipe), bad]) == 2


# ---------------------------------------------------------------------------------------------------------
# Streaming from shards


@pytest.fixture(scope="module")
def shards(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 128 training pairs re-written as 8 shards of 16, so the ranks read different shards."""
    out = tmp_path_factory.mktemp("shards")
    members: dict[str, list[tuple[tarfile.TarInfo, bytes]]] = {}
    for tar_path in sorted((world / "train").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                members.setdefault(m.name.split(".", 1)[0], []).append((m, tar.extractfile(m).read()))
    keys = sorted(members)
    assert len(keys) == 128
    for i in range(0, 128, 16):
        with tarfile.open(out / f"shard-{i // 16:06d}.tar", "w") as tar:
            for key in keys[i : i + 16]:
                for info, payload in members[key]:
                    tar.addfile(info, io.BytesIO(payload))
    return out


def _stream_config(world: Path, shards: Path, out: Path, **train_kw: object):
    cfg = _config(world, out, **train_kw)
    cfg.data.train = ""  # the stream replaces the in-memory set
    cfg.data.stream = from_dict(StreamConfig, {"sources": [{"shards": str(shards)}], "num_workers": 0})
    return cfg


def test_streamed_run_resumes_mid_epoch_after_a_kill(world: Path, shards: Path, tmp_path: Path) -> None:
    """Shards streamed to 2 ranks; rank 1 dies at step 3, mid-epoch (4 steps an epoch), after the step-2
    checkpoint: the restarted job resumes the loader at its saved position, and losses and weights equal the
    uninterrupted run's bitwise (so it trained on the same batches). Each checkpoint stores the loader position
    of its step, and the plan those loaders follow covers every sample of the epoch once."""
    full = tmp_path / "full"
    torchrun(_stream_config(world, shards, full, checkpoint_every=1, keep_checkpoints=10), tmp_path)
    marker = tmp_path / "died"
    cfg = _stream_config(world, shards, tmp_path / "faulty", checkpoint_every=2)
    torchrun(cfg, tmp_path, env={FAULT_ENV: f"1:3:{marker}"}, restarts=1)
    assert marker.exists()
    faulty = tmp_path / "faulty"
    assert _losses(faulty) == _losses(full)
    a, b = _weights(faulty), _weights(full)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert_moved(full, full / "checkpoints" / "step-00000001")

    # The checkpoint of step s holds loader position s; the 4 batches of epoch 0 over both ranks (the plan the
    # trainer's loaders followed) hold every one of the 128 samples once.
    for s in range(1, 7):
        state = json.loads((full / "checkpoints" / f"step-{s:08d}" / "state.json").read_text())
        assert state["data"]["batches"] == s and state["data"]["samples_seen"] == 32 * s
    seen = []
    for rank in range(2):
        loader = build_loader(cfg.data.stream, 16, 32, rank=rank, world_size=2, seed=cfg.seed)
        seen += [k for _, batch in zip(range(4), loader) for k in batch["key"]]
    assert len(seen) == 128 and len(set(seen)) == 128


def test_streamed_skips_are_summed_over_ranks(world: Path, shards: Path, tmp_path: Path) -> None:
    """Damaged samples in every shard and a shard that is not a tar: a 2-process streamed run reports the same
    skips as one process over the same epoch (each rank counts what it read; the damaged shard is counted
    once, not once per rank)."""
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for shard in sorted(shards.glob("*.tar")):
        with tarfile.open(shard) as src, tarfile.open(damaged / shard.name, "w") as dst:
            members = src.getmembers()
            first_image = next(m for m in members if m.name.endswith((".png", ".jpg")))
            for m in members:
                payload = b"not an image" if m is first_image else src.extractfile(m).read()
                m.size = len(payload)
                dst.addfile(m, io.BytesIO(payload))
    (damaged / "shard-000008.tar").write_bytes(b"garbage, not a tar" * 40)
    one = train(_stream_config(world, damaged, tmp_path / "one", max_steps=4))  # one epoch: 4 steps of 32
    torchrun(_stream_config(world, damaged, tmp_path / "two", max_steps=4), tmp_path)
    skipped = [json.loads((run / "data.json").read_text())["train"]["skipped"] for run in (one, tmp_path / "two")]
    assert skipped[0]["by_reason"] == {"corrupt_image": 8, "corrupt_shard": 1}
    assert skipped[1]["by_reason"] == skipped[0]["by_reason"]
