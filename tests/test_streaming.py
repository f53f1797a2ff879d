"""Streaming from WebDataset shards: shard lists and headers, the batch plan (rank split, epochs, resampling,
mixing), decoding in real DataLoader worker processes, exact resume, and skipped samples.

Shards are real tars written by :class:`ShardWriter` from the built-in world (or tiny solid-colour images),
a few samples per shard so every epoch crosses many shard boundaries.
"""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from counterpoint.config import ConfigError, load_config
from counterpoint.data import streaming
from counterpoint.data.readers import SkipStats, iter_samples, iter_tar_groups, to_square_array
from counterpoint.data.shards import (
    ShardCache,
    expand_braces,
    expand_shards,
    index_tar,
    shard_sizes,
    tar_members,
)
from counterpoint.data.stream_plan import (
    MIX_BLOCK,
    BatchPlan,
    EpochStream,
    ResampledStream,
    Source,
    steps_for_samples,
)
from counterpoint.data.streaming import StreamingLoader, build_loader, read_captions
from counterpoint.data.world import World, WorldConfig
from counterpoint.data.writers import Record, ShardWriter
from counterpoint.errors import DataError
from tests.test_readers import add_member, image_bytes, mixed_shard

IMAGE = 16
N_WORLD = 90  # 13 per shard: 7 shards, the last one of 12


def write_shards(out: Path, records: list[Record], per_shard: int) -> Path:
    with ShardWriter(out, per_shard) as writer:
        for rec in records:
            writer.write(rec)
    return out


def colour_records(prefix: str, n: int) -> list[Record]:
    """Solid 4x4 images whose red channel is the index: a key's pixels are known without decoding."""
    return [Record(f"{prefix}{i:04d}", np.full((4, 4, 3), i % 256, dtype=np.uint8), f"{prefix} {i}", {})
            for i in range(n)]


@pytest.fixture(scope="module")
def world_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    world = World(WorldConfig(seed=2))
    records = []
    for i in range(N_WORLD):
        s = world.pair("train", i)
        records.append(Record(s.key, s.image, s.caption, s.meta()))
    return write_shards(tmp_path_factory.mktemp("world_shards"), records, 13)


@pytest.fixture(scope="module")
def world_source(world_shards: Path) -> Source:
    return Source.from_spec(str(world_shards))


def take(loader: StreamingLoader, n: int) -> list[dict]:
    return list(islice(loader, n))


def keys_of(batches: list[dict]) -> list[list[str]]:
    return [b["key"] for b in batches]


# ----------------------------------------------------------------------------------------------------------
# Shard lists, sizes, header index


def test_expand_braces_and_shard_specs(tmp_path: Path) -> None:
    assert expand_braces("s-{008..011}.tar") == ["s-008.tar", "s-009.tar", "s-010.tar", "s-011.tar"]
    assert expand_braces("{a,b}/x{1..2}") == ["a/x1", "a/x2", "b/x1", "b/x2"]
    with pytest.raises(DataError, match="backwards"):
        expand_braces("s{3..1}")
    write_shards(tmp_path / "d", colour_records("k", 10), 3)  # shard-000000 .. shard-000003
    names = [f"shard-{i:06d}.tar" for i in range(4)]
    full = [str(tmp_path / "d" / n) for n in names]
    assert expand_shards(str(tmp_path / "d")) == full
    assert expand_shards(str(tmp_path / "d" / "shard-*.tar")) == full
    assert expand_shards(str(tmp_path / "d" / "shard-{000002..000003}.tar")) == full[2:]
    assert expand_shards([full[3], str(tmp_path / "d" / "shard-00000{0,1}.tar")]) == [full[3], *full[:2]]
    with pytest.raises(DataError, match="shard-000004.tar. matches no .tar"):
        expand_shards(str(tmp_path / "d" / "shard-{000003..000004}.tar"))
    with pytest.raises(DataError, match="twice"):
        expand_shards([full[0], str(tmp_path / "d")])


def test_sizes_json_and_header_count_agree(tmp_path: Path) -> None:
    shards = expand_shards(str(write_shards(tmp_path / "d", colour_records("k", 10), 3)))
    assert json.loads((tmp_path / "d" / "sizes.json").read_text()) == {
        "shard-000000.tar": 3, "shard-000001.tar": 3, "shard-000002.tar": 3, "shard-000003.tar": 1}
    from_json = shard_sizes(shards)
    (tmp_path / "d" / "sizes.json").unlink()
    assert shard_sizes(shards) == from_json == [3, 3, 3, 1]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_header_scan_agrees_with_tarfile(tmp_path: Path, fmt: int) -> None:
    """Names past 100 characters (ustar prefix, GNU long-name member, pax path record), folders, links and
    empty files: the same regular members at the same offsets as ``tarfile``."""
    path = tmp_path / "t.tar"
    deep = "/".join(["folder-with-a-long-name"] * 5)  # 119 characters: ustar splits it into prefix + name
    with tarfile.open(path, "w", format=fmt) as tar:
        folder = tarfile.TarInfo(deep)
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        add_member(tar, f"{deep}/k1.png", image_bytes("PNG", (9, 9), (1, 2, 3)))
        add_member(tar, f"{deep}/k1.txt", b"")
        link = tarfile.TarInfo("k1.lnk")
        link.type, link.linkname = tarfile.SYMTYPE, "k1.png"
        tar.addfile(link)
        if fmt != tarfile.USTAR_FORMAT:  # ustar cannot hold a file name of 130 characters
            add_member(tar, "k2." + "x" * 130, b"long extension")
        add_member(tar, "k3.txt", b"x" * 1025)
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
    with open(path, "rb") as handle:
        assert list(tar_members(handle)) == expected
    assert len(expected) == (3 if fmt == tarfile.USTAR_FORMAT else 4)


def test_index_reads_the_same_samples_as_the_stream_reader(tmp_path: Path) -> None:
    shard = mixed_shard(tmp_path / "mixed.tar")
    streamed = list(iter_tar_groups(shard, SkipStats()))
    index = index_tar(shard)
    assert index.error is None and [g.key for g in index.groups] == [k for k, _ in streamed]
    cache = ShardCache()
    assert [cache.read(str(shard), i) for i in range(len(streamed))] == streamed
    assert cache.read(str(shard), len(streamed)) == "missing_sample"  # a position beyond the shard
    cache.close()


def test_index_of_truncated_and_garbage_shards(tmp_path: Path) -> None:
    whole = write_shards(tmp_path / "w", colour_records("k", 4), 10) / "shard-000000.tar"
    data = whole.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: index_tar(whole).groups[2].members[0].offset + 10])  # inside sample 2's image
    index = index_tar(cut)
    assert index.error == "truncated_shard" and [g.key for g in index.groups] == ["k0000", "k0001"]
    assert [k for k, _ in iter_tar_groups(cut, SkipStats())] == ["k0000", "k0001"]  # as the stream reader
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar" * 200)
    assert index_tar(garbage) == type(index)((), "corrupt_shard")
    with pytest.raises(DataError, match="cannot be read"):
        index_tar(tmp_path / "gone.tar")


# ----------------------------------------------------------------------------------------------------------
# The plan


def test_steps_for_samples() -> None:
    assert [steps_for_samples(n, 256) for n in (1, 256, 1000, 1024, 1025)] == [1, 1, 4, 4, 5]
    with pytest.raises(DataError):
        steps_for_samples(0, 256)


def test_epoch_streams_split_every_epoch_exactly_once_across_ranks() -> None:
    sizes = [5, 0, 7, 3, 9]  # an empty shard too
    n, world = sum(sizes), 3
    orders = []
    for epoch in range(2):
        seen = []
        for rank in range(world):
            lo, hi = rank * n // world, (rank + 1) * n // world
            stream = EpochStream(sizes, 7, 0, lo, hi - lo)
            seen += [stream.locate(epoch * (hi - lo) + p) for p in range(hi - lo)]
        assert sorted(seen) == [(s, m) for s, k in enumerate(sizes) for m in range(k)]
        orders.append(seen)
    assert orders[0] != orders[1]  # a new shuffle each epoch
    # Shuffled within shards only: each shard's samples are contiguous in the epoch order.
    shards_in_order = [s for s, _ in orders[0]]
    assert sum(a != b for a, b in zip(shards_in_order, shards_in_order[1:])) == 3  # 4 non-empty shards


@pytest.mark.parametrize("remainder,steps,twice,unseen", [("drop", 11, 0, 2), ("wrap", 12, 6, 0)])
def test_ranks_take_equal_steps_and_the_remainder_is_dropped_or_wrapped(
        world_source: Source, remainder: str, steps: int, twice: int, unseen: int) -> None:
    """90 samples, 2 ranks x batch 4: 11 full steps leave 2 out, or 12 steps with 6 seen twice."""
    plans = [BatchPlan([world_source], 4, seed=5, rank=r, world_size=2, remainder=remainder) for r in range(2)]
    assert [p.steps_per_epoch for p in plans] == [steps, steps]
    for epoch in range(2):
        counts = Counter(ref for p in plans for g in range(epoch * steps, (epoch + 1) * steps) for ref in p.refs(g))
        assert sum(counts.values()) == 2 * 4 * steps
        assert Counter(counts.values()) == Counter({1: N_WORLD - unseen - twice, 2: twice})
    # Each rank reads its own contiguous run of shards: they share the one where they meet (and with "wrap",
    # the one rank 1 wraps into).
    shards = [{s for g in range(steps) for _, s, _ in p.refs(g)} for p in plans]
    assert len(shards[0] & shards[1]) <= (1 if remainder == "drop" else 2)


def test_wrap_is_refused_for_endless_streams(world_source: Source) -> None:
    for kwargs in ({"resampled": True}, {}):
        sources = [world_source] if kwargs else [world_source, world_source]
        with pytest.raises(DataError, match="no remainder"):
            BatchPlan(sources, 4, remainder="wrap", **kwargs)


def test_resampled_plan_is_deterministic_and_every_sample_equally_frequent() -> None:
    sizes = [10, 30, 60]
    def stream(seed: int, rank: int, positions: range) -> list[tuple[int, int]]:
        s = ResampledStream(sizes, seed, 0, rank)
        return [s.locate(p) for p in positions]

    refs = stream(1, 0, range(3000))
    assert refs == stream(1, 0, range(2999, -1, -1))[::-1]  # random access = sequential
    assert refs != stream(1, 1, range(3000)) and refs != stream(2, 0, range(3000))
    # A drawn shard is read whole, in a random order; shards are drawn uniformly, so shard s makes up a share
    # sizes[s] / 100 of the stream: every sample equally often.
    first = sizes[refs[0][0]]
    assert sorted(m for _, m in refs[:first]) == list(range(first))
    draws = Counter(shard for shard, _ in stream(3, 0, range(60_000)))
    share = np.array([draws[s] for s in range(3)]) / 60_000
    assert np.abs(share - np.array(sizes) / 100).max() < 0.03


def test_mixing_follows_the_weights_and_reads_each_source_in_order() -> None:
    weights, batch, batches = [3.0, 1.0, 0.5], 32, 3 * MIX_BLOCK + 5
    plan_sources = [Source((f"s{i}.tar",), (1000,), w) for i, w in enumerate(weights)]
    plan = BatchPlan(plan_sources, batch, seed=4, resampled=True)
    slots = [plan.mix.slots(g) for g in range(batches)]
    sources = np.array([s for src, _ in slots for s in src])
    share = np.bincount(sources, minlength=3) / len(sources)
    expected = np.array(weights) / sum(weights)
    sigma = np.sqrt(expected * (1 - expected) / len(sources))
    assert np.all(np.abs(share - expected) < 4 * sigma), (share, expected)
    # Position in each source: 0, 1, 2, ... in slot order, across block boundaries, and random access to
    # any batch gives what the sequential walk gave.
    for s in range(3):
        positions = [p for src, pos in slots for q, p in zip(src, pos) if q == s]
        assert positions == list(range(len(positions)))
    fresh = BatchPlan(plan_sources, batch, seed=4, resampled=True)
    assert fresh.mix.slots(batches - 1) == slots[-1] and fresh.refs(2 * MIX_BLOCK) == plan.refs(2 * MIX_BLOCK)


# ----------------------------------------------------------------------------------------------------------
# The loader: worker processes, resume, skips


def test_every_sample_once_per_epoch_across_two_ranks_of_two_workers(world_source: Source,
                                                                      world_shards: Path) -> None:
    """2 ranks x batch 5 divide 90 samples into 9 steps: each epoch shows every key once, in a new order,
    and a decoded image equals the reader's."""
    loaders = [StreamingLoader([world_source], 5, IMAGE, rank=r, world_size=2, seed=1, num_workers=2)
               for r in range(2)]
    assert [ld.steps_per_epoch for ld in loaders] == [9, 9]
    per_rank = [take(ld, 18) for ld in loaders]
    expected = sorted(f"train-{i:08d}" for i in range(N_WORLD))
    epochs = []
    for e in range(2):
        keys = [k for batches in per_rank for b in batches[9 * e : 9 * (e + 1)] for k in b["key"]]
        assert sorted(keys) == expected
        epochs.append(keys)
    assert epochs[0] != epochs[1]
    assert all(ld.state_dict()["epoch"] == 2 for ld in loaders)
    reference = {s.key: s for s in iter_samples(str(world_shards), SkipStats())}
    batch = per_rank[1][3]
    assert batch["image"].shape == (5, 3, IMAGE, IMAGE) and batch["image"].dtype == torch.uint8
    for key, image, caption in zip(batch["key"], batch["image"], batch["caption"]):
        assert caption == reference[key].caption
        want = torch.from_numpy(to_square_array(reference[key].image, IMAGE).copy()).permute(2, 0, 1)
        assert torch.equal(image, want)


@pytest.fixture(scope="module")
def mix_sources(tmp_path_factory: pytest.TempPathFactory) -> list[Source]:
    root = tmp_path_factory.mktemp("mix")
    return [Source.from_spec(str(write_shards(root / "a", colour_records("a", 40), 6)), 3.0),
            Source.from_spec(str(write_shards(root / "b", colour_records("b", 25), 6)), 1.0)]


@pytest.mark.parametrize("mode", ["epochs", "resampled", "mixed"])
def test_resume_at_batch_k_continues_exactly(world_source: Source, mix_sources: list[Source], mode: str) -> None:
    """Stop after k batches, keep only the JSON state, resume in a new loader (another worker count):
    the batches equal an uninterrupted loader's, across the epoch boundary (batch 9 in epoch mode)."""
    sources = mix_sources if mode == "mixed" else [world_source]

    def loader(workers: int) -> StreamingLoader:
        return StreamingLoader(sources, 5, IMAGE, rank=1, world_size=2, seed=3, resampled=mode == "resampled",
                               num_workers=workers)

    full = take(loader(2), 13)
    first = loader(2)
    head = take(first, 6)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = loader(1)
    resumed.load_state_dict(state)
    tail = take(resumed, 7)
    assert keys_of(head + tail) == keys_of(full)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(head + tail, full))
    assert resumed.state_dict() == loader(0).state_dict() | {"batches": 13, "samples_seen": 130} | (
        {"epoch": 1} if mode == "epochs" else {})


def test_resume_reads_only_the_batches_it_hands_out(world_source: Source, monkeypatch: pytest.MonkeyPatch) -> None:
    """Resumed at batch 7 (mid-epoch), the loader reads and decodes the 5 samples of batch 7, nothing before."""
    reads: list[tuple[str, int]] = []
    decoded: list[str] = []
    real_read, real_decode = ShardCache.read, streaming.decode_members

    def read(self: ShardCache, path: str, position: int):  # noqa: ANN202
        reads.append((Path(path).name, position))
        return real_read(self, path, position)

    def decode(key: str, *args: object):  # noqa: ANN202
        decoded.append(key)
        return real_decode(key, *args)

    monkeypatch.setattr(ShardCache, "read", read)
    monkeypatch.setattr(streaming, "decode_members", decode)
    loader = StreamingLoader([world_source], 5, IMAGE, world_size=2, seed=1, num_workers=0, prefetch_factor=2)
    loader.load_state_dict(loader.state_dict() | {"batches": 7})
    batch = next(iter(loader))
    plan = loader.plan
    assert reads == [(Path(plan.path(s, shard)).name, m) for s, shard, m in plan.refs(7)]
    assert decoded == batch["key"] and len(decoded) == 5


def test_corrupt_samples_are_skipped_and_counted_from_workers(tmp_path: Path) -> None:
    """A shard with a corrupt image, bad and empty captions and a missing image, beside a shard cut short
    of what ``sizes.json`` promises: each good sample once per epoch, every bad one counted by reason, once
    however often it is met (the counts travel back from workers)."""
    folder = tmp_path / "bad"
    folder.mkdir()
    mixed_shard(folder / "a.tar")  # good: a, b, c; bad: d, e (corrupt), f, i (empty), g (bad), h (no image)
    with tarfile.open(folder / "b.tar", "w") as tar:
        for i in range(3):
            add_member(tar, f"t{i}.png", image_bytes("PNG", (8, 8), (i, 0, 0)))
            add_member(tar, f"t{i}.txt", f"good {i}".encode())
    data = (folder / "b.tar").read_bytes()
    (folder / "b.tar").write_bytes(data[: index_tar(folder / "b.tar").groups[2].members[1].offset + 2])
    (folder / "sizes.json").write_text(json.dumps({"b.tar": 3}))  # a.tar's size comes from its headers
    source = Source.from_spec(str(folder))
    assert source.sizes == (9, 3)
    loader = StreamingLoader([source], 12, IMAGE, num_workers=2)
    batches = take(loader, 2)
    for batch in batches:  # one batch per epoch
        assert sorted(batch["key"]) == ["a", "b", "c", "t0", "t1"]
        assert batch["image"].shape == (5, 3, IMAGE, IMAGE)
    # each damaged sample counted once, though met in both epochs (occurrences: every meeting)
    assert dict(loader.skips.counts) == {"corrupt_image": 2, "empty_caption": 2, "bad_caption": 1,
                                         "missing_image": 1, "truncated_shard": 1}
    assert loader.skips.total == 7 and loader.skips.occurrences == 14 and len(loader.skips.examples) == 7


def test_saved_position_for_other_settings_is_refused(world_source: Source) -> None:
    state = StreamingLoader([world_source], 5, IMAGE, world_size=2).state_dict()
    for kwargs, field in [({"world_size": 3}, "world_size"), ({"world_size": 2, "seed": 1}, "seed"),
                          ({"world_size": 2, "remainder": "wrap"}, "mode")]:
        with pytest.raises(DataError, match=f"is for {field}="):
            StreamingLoader([world_source], 5, IMAGE, **kwargs).load_state_dict(state)
    other = Source(world_source.shards[:-1], world_source.sizes[:-1])
    with pytest.raises(DataError, match="is for sources="):
        StreamingLoader([other], 5, IMAGE, world_size=2).load_state_dict(state)


# ----------------------------------------------------------------------------------------------------------
# Config and captions


def test_data_stream_config_builds_the_loader(world_shards: Path, world_source: Source) -> None:
    cfg = load_config(None, [f"data.stream.sources=[{{shards: '{world_shards}/shard-{{000000..000006}}.tar'}}]",
                             "data.stream.num_workers=0", "data.stream.remainder=wrap"])
    loader = build_loader(cfg.data.stream, 5, IMAGE, rank=1, world_size=2, seed=3)
    direct = StreamingLoader([world_source], 5, IMAGE, rank=1, world_size=2, seed=3, remainder="wrap")
    assert keys_of(take(loader, 3)) == keys_of(take(direct, 3))
    with pytest.raises(DataError, match="data.stream.sources is empty"):
        build_loader(load_config().data.stream, 5, IMAGE)
    for override, message in [("data.stream.sources=[{shards: a, weight: -1}]", "weight must be > 0"),
                              ("data.stream.num_workers=-1", "data.stream.num_workers must be >= 0"),
                              ("data.stream.resampled=maybe", "data.stream.resampled: expected true or false")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])


def test_read_captions_reads_text_only(world_shards: Path, world_source: Source, mix_sources: list[Source],
                                       tmp_path: Path) -> None:
    reference = [s.caption for s in iter_samples(str(world_shards), SkipStats())]
    assert read_captions([world_source], 20) == reference[:20]
    assert read_captions(mix_sources, 8) == [f"a {i}" for i in range(6)] + ["b 0", "b 1"]  # weights 3 : 1
    folder = tmp_path / "bad"
    folder.mkdir()
    mixed_shard(folder / "a.tar")  # d, e hold corrupt images: their captions still count (no image decoding)
    assert read_captions([Source.from_spec(str(folder))], 10) == [
        "a red, wide thing", "a green one", "caption from json", "corrupt", "truncated"]
