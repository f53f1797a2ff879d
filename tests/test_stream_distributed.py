"""Streaming from shards under torchrun (gloo, 2 ranks, CPU): a rank killed mid-epoch resumes the loader where
it stopped, and damaged samples are counted once over the ranks. Kept apart from ``test_train_distributed.py``
so the two long files run on different pytest workers."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from counterpoint.config import StreamConfig, from_dict
from counterpoint.data.make_world import make_world
from counterpoint.data.streaming import build_loader
from counterpoint.data.world import WorldConfig
from counterpoint.train.distributed import FAULT_ENV
from counterpoint.train.loop import train
from tests.test_train_distributed import _config, _losses, _weights, assert_moved, two_ranks

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist_world")
    make_world(out, WorldConfig(seed=2), "wds", train=128, test=40, zeroshot=40, progress=False)
    return out


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
    two_ranks(_stream_config(world, shards, full, checkpoint_every=1, keep_checkpoints=10), tmp_path)
    marker = tmp_path / "died"
    cfg = _stream_config(world, shards, tmp_path / "faulty", checkpoint_every=2)
    # What torchrun --max-restarts does (its own restart is tested in test_train_distributed): the job fails,
    # then both ranks start again with TORCHELASTIC_RESTART_COUNT=1 and resume by themselves.
    assert two_ranks(cfg, tmp_path, env={FAULT_ENV: f"1:3:{marker}"}, check=False).returncode != 0
    assert marker.exists()
    two_ranks(cfg, tmp_path, env={"TORCHELASTIC_RESTART_COUNT": "1"}, logs="restart-logs")
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
    two_ranks(_stream_config(world, damaged, tmp_path / "two", max_steps=4), tmp_path)
    skipped = [json.loads((run / "data.json").read_text())["train"]["skipped"] for run in (one, tmp_path / "two")]
    assert skipped[0]["by_reason"] == {"corrupt_image": 8, "corrupt_shard": 1}
    assert skipped[1]["by_reason"] == skipped[0]["by_reason"]
