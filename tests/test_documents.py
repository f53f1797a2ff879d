"""Readers of interleaved documents (``data/documents.py``) on small real files: OBELICS-style JSONL and
Parquet, MMC4 JSONL and zipped JSONL, image-text pairs as documents; damaged items skipped and counted."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from counterpoint.data.document_shards import DocumentDecoder, read_document_texts
from counterpoint.data.documents import MMC4_MAX_IMAGES, detect_document_format, iter_documents
from counterpoint.data.interleaved import load_documents
from counterpoint.data.make_world import make_world
from counterpoint.data.readers import SkipStats
from counterpoint.data.stream_plan import Source
from counterpoint.data.streaming import StreamingLoader
from counterpoint.data.world import WorldConfig
from counterpoint.errors import DataError


def _png(colour: tuple[int, int, int], size: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def _jsonl(path: Path, rows: list[object]) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _kinds(items: list) -> str:
    return "".join("I" if isinstance(i, Image.Image) else "T" for i in items)


def test_obelics_jsonl_with_damaged_items(tmp_path: Path) -> None:
    (tmp_path / "red.png").write_bytes(_png((255, 0, 0)))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "cut.png").write_bytes(_png((0, 0, 255))[:40])  # truncated
    _jsonl(tmp_path / "docs.jsonl", [
        {"key": "d0", "texts": ["first", None, "then"], "images": [None, "red.png", None]},
        {"key": "d1", "texts": ["kept", None, None], "images": [None, "bad.png", "red.png"]},  # one image lost
        {"key": "d2", "texts": ["alone", None], "images": [None, "missing.png"]},  # nothing left to see
        {"key": "d3", "texts": [None, "  "], "images": ["red.png", None]},  # no text
        {"key": "d4", "texts": ["a"], "images": [None, None]},  # misaligned lists
        "{not json",
        {"key": "d5", "texts": ["x", None], "images": [None, "cut.png"]},
    ])
    skips = SkipStats()
    docs = list(iter_documents(str(tmp_path / "docs.jsonl"), skips))
    assert [(d.key, _kinds(d.items)) for d in docs] == [("d0", "TIT"), ("d1", "TI")]
    assert docs[0].items[0] == "first" and docs[0].items[1].getpixel((0, 0)) == (255, 0, 0)
    assert dict(skips.counts) == {"unreadable_image": 3, "no_image": 2, "no_text": 1, "bad_row": 2}


def test_the_worlds_stories_are_obelics_documents(tmp_path: Path) -> None:
    make_world(tmp_path, WorldConfig(seed=2), "wds", train=8, test=4, zeroshot=8, stories=5, progress=False)
    assert detect_document_format(str(tmp_path / "stories")) == "obelics"
    docs = load_documents(str(tmp_path / "stories"), image_size=16)
    assert len(docs) == 5 and docs.images.shape == (20, 3, 16, 16)
    assert [["T" if isinstance(i, str) else "I" for i in d] for d in docs.docs] == [list("TITITITI")] * 5
    assert docs.skips.total == 0


def test_obelics_parquet_with_bytes_and_structs(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({
        "texts": [["a cat", None], [None, "two"], ["x", None]],
        "images": [[None, _png((0, 255, 0))], [_png((1, 2, 3)), None], [None, b"garbage"]],
    })
    pq.write_table(table, tmp_path / "docs.parquet")
    skips = SkipStats()
    docs = list(iter_documents(str(tmp_path), skips))
    assert [_kinds(d.items) for d in docs] == ["TI", "IT"]
    assert docs[0].items[1].getpixel((3, 3)) == (0, 255, 0)
    assert dict(skips.counts) == {"unreadable_image": 1, "no_image": 1}


def _mmc4_doc(n_images: int, sims: list[float]) -> dict:
    return {"url": f"https://example.com/{n_images}", "text_list": ["s0", "s1", "s2"],
            "image_info": [{"image_name": f"im{j}.png", "matched_text_index": j % 3, "matched_sim": sims[j]}
                           for j in range(n_images)]}


def test_mmc4_similarity_filter_image_limit_and_placement(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for j in range(8):
        (images / f"im{j}.png").write_bytes(_png((j * 30, 0, 0)))
    sims = [0.30, 0.10, 0.25, 0.31, 0.32, 0.33, 0.34, 0.35]  # image 1 is below 0.24
    _jsonl(tmp_path / "docs_shard_0.jsonl", [_mmc4_doc(8, sims)])
    assert detect_document_format(str(tmp_path / "docs_shard_0.jsonl")) == "mmc4"
    skips = SkipStats()
    (doc,) = iter_documents(str(tmp_path / "docs_shard_0.jsonl"), skips, seed=0)
    assert doc.num_images == MMC4_MAX_IMAGES and [i for i in doc.items if isinstance(i, str)] == ["s0", "s1", "s2"]
    kept = sorted(i.getpixel((0, 0))[0] // 30 for i in doc.items if isinstance(i, Image.Image))
    assert kept == [0, 3, 4, 5, 6, 7]  # below the threshold: 1; beyond six, the worst matched: 2
    assert dict(skips.counts) == {"image_below_similarity": 1, "image_over_limit": 1}
    # each image sits right before or right after its own sentence (only other images in between); the same
    # seed places it the same way
    position = {item: p for p, item in enumerate(doc.items) if isinstance(item, str)}
    sides = set()
    for p, item in enumerate(doc.items):
        if isinstance(item, Image.Image):
            q = position[f"s{(item.getpixel((0, 0))[0] // 30) % 3}"]
            assert all(isinstance(i, Image.Image) for i in doc.items[min(p, q) + 1 : max(p, q)])
            sides.add(p < q)
    assert sides == {True, False}  # six coins: both sides occur for this seed
    (again,) = iter_documents(str(tmp_path / "docs_shard_0.jsonl"), SkipStats(), seed=0)
    assert _kinds(again.items) == _kinds(doc.items)


def test_mmc4_zipped_jsonl(tmp_path: Path) -> None:
    (tmp_path / "im0.png").write_bytes(_png((10, 20, 30)))
    with zipfile.ZipFile(tmp_path / "docs_shard_1.jsonl.zip", "w") as zf:
        zf.writestr("docs_shard_1.jsonl", json.dumps(_mmc4_doc(1, [0.5])) + "\nnot json\n")
    skips = SkipStats()
    docs = list(iter_documents(str(tmp_path / "docs_shard_1.jsonl.zip"), skips))
    assert len(docs) == 1 and docs[0].num_images == 1 and dict(skips.counts) == {"bad_row": 1}


def test_pairs_are_two_item_documents_in_either_order(tmp_path: Path) -> None:
    make_world(tmp_path, WorldConfig(seed=3), "wds", train=64, test=4, zeroshot=8, progress=False)
    assert detect_document_format(str(tmp_path / "train")) == "pairs"
    docs = list(iter_documents(str(tmp_path / "train"), SkipStats(), seed=0))
    orders = [_kinds(d.items) for d in docs]
    assert len(docs) == 64 and set(orders) == {"IT", "TI"}
    assert 16 <= orders.count("IT") <= 48  # image first with probability 0.5
    assert orders == [_kinds(d.items) for d in iter_documents(str(tmp_path / "train"), SkipStats(), seed=0)]


def test_nothing_usable_is_a_data_error(tmp_path: Path) -> None:
    _jsonl(tmp_path / "docs.jsonl", [{"texts": ["only text"], "images": [None]}])
    with pytest.raises(DataError, match="no usable document"):
        load_documents(str(tmp_path / "docs.jsonl"), image_size=8)
    _jsonl(tmp_path / "other.jsonl", [{"something": 1}])
    with pytest.raises(DataError, match="neither OBELICS"):
        detect_document_format(str(tmp_path / "other.jsonl"))


def test_pair_shards_stream_as_documents(tmp_path: Path) -> None:
    """The streaming decoder reads pair samples as two-item documents (both orders, the same for a seed), and
    the tokenizer's texts come from their captions."""
    make_world(tmp_path, WorldConfig(seed=5), "wds", train=48, test=4, zeroshot=8, progress=False)
    source = Source.from_spec(str(tmp_path / "train"))

    def orders(seed: int) -> list[str]:
        loader = StreamingLoader([source], 48, 16, seed=0, decoder=DocumentDecoder(16, seed))
        batch = next(iter(loader))
        assert all(isinstance(i, str) or tuple(i.shape) == (16, 16, 3) for d in batch["documents"] for i in d)
        return ["".join("T" if isinstance(i, str) else "I" for i in d) for d in batch["documents"]]

    first = orders(0)
    assert len(first) == 48 and set(first) == {"IT", "TI"} and orders(0) == first and orders(1) != first
    texts = read_document_texts([source], 10)
    assert len(texts) == 10 and all(isinstance(t, str) and t for t in texts)


def test_single_files_of_pairs_or_shards_and_corrupt_files(tmp_path: Path) -> None:
    make_world(tmp_path / "w", WorldConfig(seed=8), "csv", train=6, test=2, zeroshot=4, progress=False)
    assert detect_document_format(str(tmp_path / "w" / "train" / "pairs.csv")) == "pairs"
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.jsonl.zip").write_bytes(b"PK\x03\x04 not really a zip")
    (docs / "red.png").write_bytes(_png((255, 0, 0)))
    _jsonl(docs / "b.jsonl", [{"texts": ["kept", None], "images": [None, "red.png"]}])
    skips = SkipStats()
    assert len(list(iter_documents(str(docs), skips))) == 1 and dict(skips.counts) == {"corrupt_file": 1}
    with pytest.raises(DataError, match="no document could be read"):
        detect_document_format(str(docs / "a.jsonl.zip"))
    pytest.importorskip("pyarrow")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 garbage PAR1")
    skips = SkipStats()
    assert list(iter_documents(str(tmp_path / "broken.parquet"), skips)) == []
    assert dict(skips.counts) == {"corrupt_file": 1}


def test_documents_command_refuses_a_non_empty_output_and_bad_sizes(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    from counterpoint.cli import main

    (tmp_path / "red.png").write_bytes(_png((255, 0, 0)))
    _jsonl(tmp_path / "docs.jsonl", [{"texts": ["a", None], "images": [None, "red.png"]}])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("taken")
    assert main(["data", "documents", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["data", "documents", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "o2"),
                 "--docs-per-shard", "0"]) == 2
    assert main(["data", "documents", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "o3"), "--quiet"]) == 0
    assert "wrote 1 documents (obelics)" in capsys.readouterr().out
    assert detect_document_format(str(tmp_path / "o3")) == "shards"
