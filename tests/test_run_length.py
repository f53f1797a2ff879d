"""Training length in samples seen (``train.samples``) instead of epochs."""

import json

import pytest

from counterpoint.config import ConfigError
from counterpoint.train.loop import train
from tests.conftest import tiny_config


def test_length_in_samples_sets_the_schedule(small_world, tmp_path, one_thread):
    # 3 full batches of 64 plus one sample: the run needs 4 steps to have seen them all (epochs is ignored).
    run = train(tiny_config(small_world, tmp_path / "run", samples=3 * 64 + 1, epochs=50, warmup_steps=1))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and rows[-1]["samples_seen"] == 4 * 64
    assert rows[-1]["lr"] < rows[0]["lr"]  # the cosine schedule ran its course within those 4 steps


def test_bad_length_is_a_config_error(small_world, tmp_path):
    with pytest.raises(ConfigError, match="train.samples must be >= 1"):
        tiny_config(small_world, tmp_path / "run", samples=0)
