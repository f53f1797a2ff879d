"""Data faults that used to go by silently or crash (issue 8): duplicate keys, broken json members, huge CSV
fields, damaged shards without ``sizes.json``, empty streamed batches, malformed ``sizes.json``, and skip counts
across a resume.

Every test writes its own small, real files (PIL images, ``tarfile`` shards, CSV) under ``tmp_path``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from counterpoint.config import StreamConfig, from_dict
from counterpoint.data import readers, shards
from counterpoint.data.pairs import load_pairs
from counterpoint.data.readers import SkipStats, iter_samples
from counterpoint.data.shards import SIZES_FILE, ShardCache, index_tar
from counterpoint.data.stream_plan import Source
from counterpoint.data.streaming import StreamingLoader
from counterpoint.data.world import World, WorldConfig
from counterpoint.data.writers import encode_image
from counterpoint.errors import DataError
from counterpoint.train.loop import train
from tests.conftest import tiny_config
from tests.test_readers import GREEN, RED, image_bytes, write_tar

IMAGE = 8


def pair_members(key: str, colour: tuple[int, int, int], caption: str) -> list[tuple[str, bytes]]:
    return [(f"{key}.png", image_bytes("PNG", (8, 8), colour)), (f"{key}.txt", caption.encode())]


def world_members(start: int, n: int, bad_every: int = 0) -> list[tuple[str, bytes]]:
    """Members of world training pairs ``start .. start + n - 1``; with ``bad_every``, every such sample holds a
    corrupt image instead of a PNG."""
    world = World(WorldConfig(seed=2))
    members = []
    for i in range(start, start + n):
        s = world.pair("train", i)
        bad = bad_every and i % bad_every == bad_every - 1
        image = np.random.default_rng(i).bytes(200) if bad else encode_image(s.image, "png")
        members += [(f"{s.key}.png", image), (f"{s.key}.txt", s.caption.encode())]
    return members


def stream_config(shard_dir: Path, out: Path, **train_kw: object):
    """A tiny CPU run streaming ``shard_dir`` (no evaluation)."""
    cfg = tiny_config(shard_dir, out, evaluate=False, batch_size=16, device="cpu", **train_kw)
    cfg.data.train = ""  # the stream replaces the in-memory set
    cfg.data.stream = from_dict(StreamConfig, {"sources": [{"shards": str(shard_dir)}], "num_workers": 0})
    return cfg


def read_data_json(run: Path) -> dict:
    return json.loads((run / "data.json").read_text())["train"]


# ----------------------------------------------------------------------------------------------------------
# 1. Two samples with the same key one after the other


def duplicate_shard(path: Path) -> Path:
    """Good x and y around a key ``a`` written twice (the second ``a`` has no caption), and a key ``z`` written
    twice at the end of the shard."""
    return write_tar(path, [
        *pair_members("x", RED, "first good"),
        ("a.png", image_bytes("PNG", (8, 8), RED)), ("a.txt", b"caption of the first a"),
        ("a.png", image_bytes("PNG", (8, 8), GREEN)),  # a second sample a, without a caption
        *pair_members("y", GREEN, "second good"),
        ("z.png", image_bytes("PNG", (8, 8), RED)), ("z.txt", b"caption of the first z"),
        ("z.png", image_bytes("PNG", (8, 8), GREEN)),
    ])


def test_duplicate_key_in_memory_is_skipped_and_counted(tmp_path: Path) -> None:
    """Reading a tar in memory skips a group whose key repeats (as ``duplicate_key``) and keeps its neighbours."""
    shard = duplicate_shard(tmp_path / "dup.tar")
    skips = SkipStats()
    assert [s.key for s in readers.iter_webdataset(str(shard), "txt", skips)] == ["x", "y"]
    assert dict(skips.counts) == {"duplicate_key": 2}
    skips = SkipStats()
    assert [s.caption for s in iter_samples(str(shard), skips)] == ["first good", "second good"]
    assert dict(skips.counts) == {"duplicate_key": 2}
    pairs = load_pairs(str(shard), IMAGE)
    assert pairs.captions == ["first good", "second good"]
    assert dict(pairs.skips.counts) == {"duplicate_key": 2}


def test_duplicate_key_in_streaming_is_skipped_and_counted(tmp_path: Path) -> None:
    """The header index flags a repeated key; the streaming loader skips it as ``duplicate_key``, neighbours read."""
    folder = tmp_path / "dup"
    folder.mkdir()
    shard = duplicate_shard(folder / "dup.tar")
    loader = StreamingLoader([Source.from_spec(str(folder))], 4, IMAGE, num_workers=0)
    batch = next(iter(loader))  # the whole epoch: 4 groups
    assert sorted(batch["key"]) == ["x", "y"]
    assert sorted(batch["caption"]) == ["first good", "second good"]
    assert dict(loader.skips.counts) == {"duplicate_key": 2}
    index = index_tar(shard)
    assert [(g.key, g.duplicate) for g in index.groups] == [("x", False), ("a", True), ("y", False), ("z", True)]
    cache = ShardCache()
    reads = [cache.read(str(shard), i) for i in range(4)]
    assert [r if isinstance(r, str) else r[0] for r in reads] == ["x", "duplicate_key", "y", "duplicate_key"]
    cache.close()


# ----------------------------------------------------------------------------------------------------------
# 2. A json member that is not a JSON object


def test_broken_json_member_is_skipped_as_bad_json(tmp_path: Path) -> None:
    """A sample whose ``json`` member is not a UTF-8 JSON object is skipped as ``bad_json``; others keep labels."""
    members = []
    for key, meta in [("s0", json.dumps({"label": "red square"}).encode()), ("s1", b"{not json"),
                      ("s2", b"[1, 2]"), ("s3", b"\xff\xfe{}"), ("s4", json.dumps({"label": "green one"}).encode()),
                      ("s5", b'"a string"')]:
        members += [*pair_members(key, RED, f"caption {key}"), (f"{key}.json", meta)]
    pairs = load_pairs(str(write_tar(tmp_path / "json.tar", members)), IMAGE)
    assert pairs.captions == ["caption s0", "caption s4"]
    assert pairs.labels == ["red square", "green one"]
    assert dict(pairs.skips.counts) == {"bad_json": 4}


# ----------------------------------------------------------------------------------------------------------
# 3. CSV fields beyond the csv module's default limit


def csv_images(root: Path) -> None:
    (root / "imgs").mkdir(parents=True)
    (root / "imgs" / "a.png").write_bytes(image_bytes("PNG", (8, 8), RED))
    (root / "imgs" / "b.png").write_bytes(image_bytes("PNG", (8, 8), GREEN))


def test_csv_caption_over_128_kib_is_read_whole(tmp_path: Path) -> None:
    """A 200 KiB CSV caption (over csv's default 128 KiB field limit) is read whole, with the rows after it."""
    csv_images(tmp_path)
    long = "word " * (200 * 1024 // 5)
    (tmp_path / "pairs.csv").write_text(f"image,caption\nimgs/a.png,{long}\nimgs/b.png,short one\n")
    pairs = load_pairs(str(tmp_path / "pairs.csv"), IMAGE)
    assert pairs.captions == [long.strip(), "short one"]
    assert len(pairs.captions[0]) > 128 * 1024
    assert pairs.skips.total == 0


def test_csv_row_over_the_field_limit_is_a_bad_row(tmp_path: Path) -> None:
    """A 17 MiB CSV field (over the 16 MiB limit) skips its row as ``bad_row``; the rows after it are read."""
    csv_images(tmp_path)
    with open(tmp_path / "pairs.csv", "w") as fh:
        fh.write("image,caption\nimgs/a.png,first row\n")
        fh.write("imgs/b.png," + "x" * (17 * 2**20) + "\n")
        fh.write("imgs/b.png,third row\nimgs/a.png,fourth row\n")
    pairs = load_pairs(str(tmp_path / "pairs.csv"), IMAGE)
    assert pairs.captions == ["first row", "third row", "fourth row"]
    assert dict(pairs.skips.counts) == {"bad_row": 1}


# ----------------------------------------------------------------------------------------------------------
# 4. Damaged shards found while counting samples (no sizes.json)


def test_damaged_shards_without_sizes_json_are_counted_like_in_memory(tmp_path: Path) -> None:
    """Truncated, garbage and empty shards (no sizes.json) are counted by the streaming loader as in memory."""
    folder = tmp_path / "shards"
    folder.mkdir()
    write_tar(folder / "a.tar", pair_members("a0", RED, "a zero") + pair_members("a1", GREEN, "a one"))
    write_tar(folder / "b.tar", pair_members("b0", GREEN, "b zero"))
    full = write_tar(folder / "c.tar", [m for i in range(4) for m in pair_members(f"c{i}", RED, f"c {i}")])
    data = full.read_bytes()
    full.write_bytes(data[: index_tar(full).groups[2].members[0].offset + 10])  # inside c2's image
    (folder / "d.tar").write_bytes(np.random.default_rng(3).bytes(3000))  # not a tar
    (folder / "e.tar").write_bytes(b"")  # empty
    assert not (folder / SIZES_FILE).exists()

    in_memory = load_pairs(str(folder), IMAGE)
    assert dict(in_memory.skips.counts) == {"corrupt_shard": 2, "truncated_shard": 1}

    source = Source.from_spec(str(folder))
    loader = StreamingLoader([source], source.total, IMAGE, num_workers=0)
    assert dict(loader.skips.counts) == dict(in_memory.skips.counts)  # counted at construction
    assert sorted((Path(s).name, r) for s, r in source.problems) == [
        ("c.tar", "truncated_shard"), ("d.tar", "corrupt_shard"), ("e.tar", "corrupt_shard")]
    batch = next(iter(loader))  # the whole epoch: the complete samples only, no further counts
    assert sorted(batch["caption"]) == sorted(in_memory.captions)
    assert dict(loader.skips.counts) == dict(in_memory.skips.counts)
    assert StreamingLoader([source], 2, IMAGE, rank=1, world_size=2).skips.total == 0  # rank 0 counts them

    sizes, problems = shards.scan_shards(list(source.shards))
    assert sizes == [2, 1, 2, 0, 0] and tuple(problems) == source.problems


# ----------------------------------------------------------------------------------------------------------
# 5. Streamed batches without a usable sample


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_streamed_run_passes_over_empty_batches(tmp_path: Path) -> None:
    """A sizes.json that overstates a shard leaves whole batches empty: training passes over and counts them."""
    folder = tmp_path / "shards"
    folder.mkdir()
    write_tar(folder / "a.tar", world_members(0, 32))
    write_tar(folder / "b.tar", world_members(32, 1))  # sizes.json promises 32 samples, it holds 1
    (folder / SIZES_FILE).write_text(json.dumps({"a.tar": 32, "b.tar": 32}))
    run = train(stream_config(folder, tmp_path / "run", max_steps=4))

    info = read_data_json(run)
    counts = info["skipped"]["by_reason"]
    empty = info["streamed_batches_per_rank"] - 4  # loader batches handed out, less those trained on
    assert empty >= 1 and counts["empty_batch"] == empty
    assert counts["missing_sample"] == 31  # b.tar's 31 promised samples that are not there, each counted once
    assert info["skipped"]["occurrences"] > info["skipped"]["total"]  # missing positions met again each epoch
    assert info["skipped"]["total"] == sum(counts.values())
    reported = json.loads((run / "eval.json").read_text())["data"]["skipped"]["train"]
    assert reported == {k: v for k, v in info["skipped"].items() if k != "seen"}
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert f"| train data | streamed from {folder} |" in (run / "report.md").read_text()  # not data.train


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_streamed_run_stops_after_many_empty_batches_in_a_row(tmp_path: Path) -> None:
    """A shard far shorter than sizes.json says stops the run with one DataError after 50 empty batches in a row."""
    folder = tmp_path / "shards"
    folder.mkdir()
    write_tar(folder / "a.tar", world_members(0, 32))
    write_tar(folder / "b.tar", world_members(32, 1))
    (folder / SIZES_FILE).write_text(json.dumps({"a.tar": 32, "b.tar": 16 * 100}))  # 100 batches of nothing
    with pytest.raises(DataError, match="50 batches in a row") as info:
        train(stream_config(folder, tmp_path / "run", max_steps=20))
    assert "'empty_batch': 50" in str(info.value) and "missing_sample" in str(info.value)


# ----------------------------------------------------------------------------------------------------------
# 6. A malformed sizes.json


@pytest.mark.parametrize("content", [
    '"shard-000000.tar"',
    '["shard-000000.tar", 2]',
    '{"shard-000000.tar": -1}',
    '{"shard-000000.tar": 2.5}',
    '{"shard-000000.tar": "2"}',
    '{"shard-000000.tar": true}',
    '{"shard-000000.tar": 2',
], ids=["string", "list", "negative", "float", "text-count", "bool", "invalid-json"])
def test_malformed_sizes_json_is_one_data_error(tmp_path: Path, content: str) -> None:
    """A malformed sizes.json raises a one-line DataError naming the file (no traceback from deep inside)."""
    shard = write_tar(tmp_path / "shard-000000.tar", pair_members("k0", RED, "zero") + pair_members("k1", RED, "one"))
    file = tmp_path / SIZES_FILE
    file.write_text(content)
    calls = [lambda: shards.shard_sizes([str(shard)]), lambda: Source.from_spec(str(tmp_path)),
             lambda: shards.scan_shards([str(shard)])]
    for call in calls:
        with pytest.raises(DataError) as info:
            call()
        message = str(info.value)
        assert str(file) in message and "\n" not in message


# ----------------------------------------------------------------------------------------------------------
# 7. Skip counts across a resume


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_resumed_streamed_run_keeps_the_skip_counts_from_before_the_stop(tmp_path: Path) -> None:
    """A streamed run stopped and resumed ends with the same skip counts as the uninterrupted run."""
    folder = tmp_path / "shards"
    folder.mkdir()
    write_tar(folder / "a.tar", world_members(0, 24, bad_every=4))
    write_tar(folder / "b.tar", world_members(24, 24, bad_every=4))
    (folder / "c.tar").write_bytes(np.random.default_rng(0).bytes(2000))  # counted once, when planning
    # 48 samples, 12 of them corrupt: 3 steps an epoch, 6 steps in all (2 epochs)
    full = train(stream_config(folder, tmp_path / "full"))
    reference = read_data_json(full)["skipped"]
    # 12 distinct corrupt samples, each met in both epochs; the bad shard once (it must not count twice)
    assert reference["by_reason"] == {"corrupt_image": 12, "corrupt_shard": 1} and reference["occurrences"] == 25

    stopped = train(stream_config(folder, tmp_path / "resumed", max_steps=2))
    assert 0 < read_data_json(stopped)["skipped"]["occurrences"] < 25
    resumed = train(stream_config(folder, tmp_path / "resumed"), resume=True)
    for key in ("total", "occurrences", "by_reason"):  # recurrences after the resume are known as such
        assert read_data_json(resumed)["skipped"][key] == reference[key], key
