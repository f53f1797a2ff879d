"""BriVL under FSDP2 in 2 processes: both tower copies sharded, the EMA on the shards, the queues replicated;
the same losses, weights and queues as one process. (A file of its own so it runs beside the other long
BriVL test on another pytest worker.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from counterpoint.train.loop import train


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_fsdp_shards_both_tower_copies_and_matches_one_process(tmp_path: Path) -> None:
    """Under FSDP2 (2 processes) the query and momentum towers are sharded, the EMA runs on the shards and the
    queues stay replicated: losses, weights and queues match one process to 1e-5."""
    from counterpoint.data.make_world import make_world
    from counterpoint.data.world import WorldConfig
    from tests.test_task_contract import _config, _losses, _state
    from tests.test_train_distributed import two_ranks

    world = tmp_path / "world"
    make_world(world, WorldConfig(seed=4), "wds", train=128, test=32, zeroshot=64, progress=False)
    one = train(_config(world, tmp_path / "one", "brivl"))
    two_ranks(_config(world, tmp_path / "fsdp", "brivl", parallel="fsdp"), tmp_path)
    for (s1, x), (s2, y) in zip(_losses(one), _losses(tmp_path / "fsdp"), strict=True):
        assert s1 == s2 and abs(x - y) <= 1e-5, (s1, x, y)
    a, b = _state(one), _state(tmp_path / "fsdp")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
