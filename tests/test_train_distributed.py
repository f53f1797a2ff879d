"""``counterpoint train`` under torchrun with real processes (gloo, 2 ranks, CPU) against one process.

Every 2-process run trains the tiny ViT (LayerNorm only, so no per-rank batch statistics) on the same global
batches as the one-process run; the ranks split each batch, gather features with gradients and average
gradients, so per-step losses and final weights agree up to float32 summation order (asserted to 1e-5).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import counterpoint
from counterpoint.cli import main
from counterpoint.config import ConfigError, load_config, save_config
from counterpoint.data.make_world import make_world
from counterpoint.data.world import WorldConfig
from counterpoint.train.distributed import FAULT_ENV
from counterpoint.train.loop import train
from tests.conftest import tiny_config
from tests.dist_utils import launch_ranks

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


def two_ranks(cfg, tmp_path: Path, env: dict[str, str] | None = None, check: bool = True,
              logs: str = "logs") -> subprocess.CompletedProcess:
    """``counterpoint train`` in 2 processes with torchrun's worker environment (``dist_utils.launch_ranks``:
    the processes are forked, not started by torchrun's launcher, which costs seconds of imports)."""
    recipe = tmp_path / f"{Path(cfg.out_dir).name}.yaml"
    save_config(cfg, recipe)
    return launch_ranks(["train", str(recipe)], tmp_path / f"{Path(cfg.out_dir).name}-{logs}", env, check=check)


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
    two_ranks(_config(world, tmp / "ddp"), tmp)
    return {"one": one, "ddp": tmp / "ddp", "tmp": tmp}


def test_two_processes_equal_one_infonce(clip_runs: dict[str, Path]) -> None:
    assert_same_run(clip_runs["one"], clip_runs["ddp"], atol=1e-5)
    assert_moved(clip_runs["one"], clip_runs["one"] / "checkpoints" / "step-00000001")
    state = json.loads((clip_runs["ddp"] / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert state["step"] == 6 and "optimizer" in state  # rank 0 wrote a complete checkpoint
    # The ranks' FLOPs add up to the one process's: each computes half the towers' work and its rows of the
    # logits against the gathered batch.
    gflop = [[r["gflop"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
             for run in (clip_runs["one"], clip_runs["ddp"])]
    assert gflop[0] == pytest.approx(gflop[1], rel=1e-6)


def test_grad_cache_accumulation_equals_full_batch(world: Path, clip_runs: dict[str, Path], tmp_path: Path) -> None:
    accum = train(_config(world, tmp_path / "accum", accum_steps=4))
    assert_same_run(clip_runs["one"], accum, atol=1e-5)


def test_fsdp_matches_ddp_and_evaluates(world: Path, clip_runs: dict[str, Path], tmp_path: Path) -> None:
    """FSDP2 (sharded parameters and Adam state, full-state checkpoint gathered to rank 0) trains the same
    model as DDP; rank 0 writes the evaluation of the full weights."""
    cfg = _config(world, tmp_path / "fsdp", evaluate=True, parallel="fsdp")
    cfg.eval.every_steps = 3  # every rank takes part in the periodic zero-shot (the towers gather their shards)
    proc = two_ranks(cfg, tmp_path)
    assert_same_run(clip_runs["ddp"], tmp_path / "fsdp", atol=1e-5)
    result = json.loads((tmp_path / "fsdp" / "eval.json").read_text())
    assert result["zeroshot_during_training"]["step"] == [3, 6]
    assert result["zeroshot_during_training"]["all"][-1] == pytest.approx(result["zeroshot"]["all"]["top1"], abs=1e-4)
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
    two_ranks(cfg, tmp)
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
