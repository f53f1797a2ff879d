"""Readers for real data: WebDataset tars, CSV/TSV, folders; skip counting; square crops; ``load_pairs``.

Every test writes its own small, real files (PIL images, ``tarfile`` shards) under ``tmp_path``.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from counterpoint.data.pairs import load_pairs
from counterpoint.data.readers import SkipStats, detect_format, iter_samples, to_square_array
from counterpoint.errors import DataError

RED, GREEN, BLUE = (220, 20, 20), (20, 200, 40), (30, 60, 230)


# ----------------------------------------------------------------------------------------------------------
# helpers


def image_bytes(fmt: str, size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def noise_png(seed: int, side: int = 32) -> bytes:
    """A PNG that does not compress away, so its data spans several tar blocks."""
    arr = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            add_member(tar, name, payload)
    return path


def read_all(path: str | Path, caption_key: str = "txt") -> tuple[dict, SkipStats]:
    skips = SkipStats()
    samples = {s.key: s for s in iter_samples(str(path), skips, caption_key)}
    return samples, skips


def mean_rgb(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(axis=0)


def bomb_png() -> bytes:
    """A valid PNG whose header claims 20000 x 20000 pixels (PIL refuses it as a decompression bomb)."""
    b = bytearray(image_bytes("PNG", (1, 1), RED))
    b[16:24] = struct.pack(">II", 20000, 20000)  # IHDR width/height
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))  # IHDR CRC over type + data
    return bytes(b)


# ----------------------------------------------------------------------------------------------------------
# WebDataset


def mixed_shard(path: Path) -> Path:
    png = image_bytes("PNG", (20, 10), RED)
    return write_tar(path, [
        # good samples
        ("a.png", png),
        ("a.txt", b"  a red, wide thing \n"),
        ("a.json", json.dumps({"label": "red square"}).encode()),
        ("b.JPG", image_bytes("JPEG", (16, 16), GREEN)),  # upper-case extension
        ("b.txt", b"a green one"),
        ("c.webp", image_bytes("WEBP", (12, 12), BLUE)),
        ("c.json", json.dumps({"caption": "caption from json", "label": "blue circle"}).encode()),
        # caption only under a custom key of the json: empty with the default key
        ("i.png", png),
        ("i.json", json.dumps({"alt": "custom key caption", "label": 3}).encode()),
        # bad samples
        ("d.jpg", np.random.default_rng(0).bytes(600)),  # corrupt image
        ("d.txt", b"corrupt"),
        ("e.png", noise_png(1)[:300]),  # truncated PNG
        ("e.txt", b"truncated"),
        ("f.png", png),
        ("f.txt", b"  \n "),  # empty caption
        ("g.png", png),
        ("g.txt", b"caf\xe9 \xff\xfe"),  # invalid UTF-8
        ("h.txt", b"no image here"),
        ("h.json", b"{}"),
    ])


def test_webdataset_yields_good_samples_and_counts_skips(tmp_path: Path) -> None:
    samples, skips = read_all(mixed_shard(tmp_path / "mixed.tar"))
    assert list(samples) == ["a", "b", "c"]
    assert samples["a"].caption == "a red, wide thing"
    assert samples["b"].caption == "a green one"
    assert samples["c"].caption == "caption from json"
    assert [samples[k].label for k in "abc"] == ["red square", None, "blue circle"]
    assert [samples[k].image.size for k in "abc"] == [(20, 10), (16, 16), (12, 12)]
    assert all(s.image.mode == "RGB" for s in samples.values())
    assert np.abs(mean_rgb(samples["a"].image) - RED).max() == 0  # PNG is lossless
    assert np.abs(mean_rgb(samples["b"].image) - GREEN).max() < 12
    assert np.abs(mean_rgb(samples["c"].image) - BLUE).max() < 12
    assert dict(skips.counts) == {"corrupt_image": 2, "empty_caption": 2, "bad_caption": 1,
                                  "missing_image": 1}
    assert skips.total == 6
    summary = skips.as_dict()
    assert summary["total"] == 6 and len(summary["examples"]) == 6
    assert any(e.startswith("bad_caption: mixed.tar:g") for e in summary["examples"])


def test_webdataset_custom_caption_key(tmp_path: Path) -> None:
    samples, skips = read_all(mixed_shard(tmp_path / "mixed.tar"), caption_key="alt")
    assert list(samples) == ["a", "b", "c", "i"]
    assert samples["i"].caption == "custom key caption"
    assert samples["i"].label is None  # a non-string label is ignored
    assert samples["a"].caption == "a red, wide thing"  # the .txt member still wins when present
    assert skips.counts["empty_caption"] == 1


def test_webdataset_caption_key_as_member_extension(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "s.tar", [
        ("k.png", image_bytes("PNG", (8, 8), RED)),
        ("k.txt", b"the txt caption"),
        ("k.en.txt", b"the english caption"),
    ])
    samples, _ = read_all(shard, caption_key="en.txt")
    assert samples["k"].caption == "the english caption"
    samples, _ = read_all(shard)
    assert samples["k"].caption == "the txt caption"


def test_decompression_bomb_is_counted_not_raised(tmp_path: Path) -> None:
    """A header claiming 400 M pixels makes PIL raise DecompressionBombError (not an OSError); a run must
    count it as a corrupt image and go on, in every reader."""
    good = image_bytes("PNG", (8, 8), RED)
    shard = write_tar(tmp_path / "s.tar", [("bomb.png", bomb_png()), ("bomb.txt", b"huge"),
                                           ("ok.png", good), ("ok.txt", b"fine")])
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    (tmp_path / "ok.png").write_bytes(good)
    (tmp_path / "pairs.csv").write_text("image,caption\nbomb.png,huge\nok.png,fine\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("bomb", "ok"):
        (folder / f"{name}.png").write_bytes(bomb_png() if name == "bomb" else good)
        (folder / f"{name}.txt").write_text(name)
    for path in (shard, tmp_path / "pairs.csv", folder):
        samples, skips = read_all(path)
        assert list(samples) == ["ok"], path
        assert dict(skips.counts) == {"corrupt_image": 1}, path


def truncation_shard(path: Path) -> tuple[bytes, dict[str, tarfile.TarInfo]]:
    members = []
    for i in range(4):
        members += [(f"s{i}.png", noise_png(i)), (f"s{i}.txt", f"caption {i}".encode()),
                    (f"s{i}.json", json.dumps({"label": f"label {i}"}).encode())]
    write_tar(path, members)
    with tarfile.open(path) as tar:
        infos = {m.name: m for m in tar.getmembers()}
    return path.read_bytes(), infos


@pytest.mark.parametrize("cut_in", ["s2.png", "s2.json"])
def test_truncated_tar_keeps_samples_before_the_cut(tmp_path: Path, cut_in: str) -> None:
    data, infos = truncation_shard(tmp_path / "full.tar")
    info = infos[cut_in]
    cut = info.offset_data + info.size // 2  # mid-way through the member's data
    part = tmp_path / "cut.tar"
    part.write_bytes(data[:cut])
    samples, skips = read_all(part)
    # No exception; the complete samples before the cut are read with their labels. The sample being read
    # when the file ended is dropped, not yielded half-read (without its label) nor counted a second time.
    assert list(samples) == ["s0", "s1"]
    assert [s.caption for s in samples.values()] == ["caption 0", "caption 1"]
    assert [s.label for s in samples.values()] == ["label 0", "label 1"]
    assert dict(skips.counts) == {"truncated_shard": 1}
    # the complete file reads fully
    samples, skips = read_all(tmp_path / "full.tar")
    assert list(samples) == ["s0", "s1", "s2", "s3"] and skips.total == 0


def test_folder_of_tars_and_glob(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    red, green = image_bytes("PNG", (8, 8), RED), image_bytes("JPEG", (8, 8), GREEN)
    write_tar(shards / "shard-000000.tar",
              [("x0.png", red), ("x0.txt", b"zero"), ("x1.png", red), ("x1.txt", b"one")])
    write_tar(shards / "shard-000001.tar", [("y0.jpg", green), ("y0.txt", b"two")])
    (shards / "notes.txt").write_text("not a shard")
    assert detect_format(str(shards)) == "wds"
    samples, skips = read_all(shards)
    assert [s.caption for s in samples.values()] == ["zero", "one", "two"]
    assert skips.total == 0

    pattern = str(shards / "shard-*.tar")
    assert detect_format(pattern) == "wds"
    samples, _ = read_all(pattern)
    assert list(samples) == ["x0", "x1", "y0"]
    samples, _ = read_all(str(shards / "shard-*1.tar"))
    assert list(samples) == ["y0"]

    # a garbage .tar beside them is counted, the good shards are still read
    (shards / "shard-000002.tar").write_bytes(np.random.default_rng(3).bytes(5000))
    samples, skips = read_all(shards)
    assert list(samples) == ["x0", "x1", "y0"]
    assert dict(skips.counts) == {"corrupt_shard": 1}
    (shards / "shard-000003.tar").write_bytes(b"")  # an empty file too
    _, skips = read_all(shards)
    assert dict(skips.counts) == {"corrupt_shard": 2}


# ----------------------------------------------------------------------------------------------------------
# CSV / TSV


def csv_fixture(root: Path) -> Path:
    imgs = root / "imgs"
    imgs.mkdir(parents=True)
    (imgs / "a.png").write_bytes(image_bytes("PNG", (20, 10), RED))
    (imgs / "b.jpg").write_bytes(image_bytes("JPEG", (16, 16), GREEN))
    (imgs / "corrupt.jpg").write_bytes(np.random.default_rng(5).bytes(400))
    lines = [
        "image,caption,label",
        'imgs/a.png,"a red, wide thing",red square',
        "imgs/b.jpg,  green one  ,",
        "imgs/missing.png,gone,x",
        "imgs/corrupt.jpg,broken,y",
        "imgs/a.png,,z",
        f"{imgs / 'b.jpg'},absolute path,abs",
    ]
    path = root / "pairs.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_csv_reader(tmp_path: Path) -> None:
    path = csv_fixture(tmp_path / "d")
    assert detect_format(str(path)) == "csv"
    skips = SkipStats()
    samples = list(iter_samples(str(path), skips))
    assert [s.caption for s in samples] == ["a red, wide thing", "green one", "absolute path"]
    assert [s.key for s in samples] == ["a", "b", "b"]
    assert [s.label for s in samples] == ["red square", None, "abs"]
    assert [s.image.size for s in samples] == [(20, 10), (16, 16), (16, 16)]
    assert np.abs(mean_rgb(samples[0].image) - RED).max() == 0
    assert dict(skips.counts) == {"missing_file": 1, "corrupt_image": 1, "empty_caption": 1}
    # a folder holding pairs.csv is read as CSV too
    assert detect_format(str(path.parent)) == "csv"
    assert [s.caption for s in iter_samples(str(path.parent), SkipStats())] == [s.caption for s in samples]


def test_tsv_with_alternative_column_names(tmp_path: Path) -> None:
    (tmp_path / "p.png").write_bytes(image_bytes("PNG", (10, 10), BLUE))
    (tmp_path / "q.png").write_bytes(image_bytes("PNG", (10, 10), RED))
    payload = (b"FilePath\tText\n"
               b"p.png\ta blue square, with a comma\n"
               b"q.png\tbad \xff bytes\n"
               b"nothing.png\tno file\n"
               b"\tno path\n")
    path = tmp_path / "pairs.tsv"
    path.write_bytes(payload)
    assert detect_format(str(path)) == "csv"
    skips = SkipStats()
    samples = list(iter_samples(str(path), skips))
    assert [(s.key, s.caption, s.label) for s in samples] == [("p", "a blue square, with a comma", None)]
    assert dict(skips.counts) == {"bad_caption": 1, "missing_file": 2}


def test_csv_with_byte_order_mark(tmp_path: Path) -> None:
    """Spreadsheet "CSV UTF-8" exports start with a BOM; the first column must still be found."""
    (tmp_path / "a.png").write_bytes(image_bytes("PNG", (8, 8), RED))
    path = tmp_path / "export.csv"
    path.write_text("image,caption\na.png,a red square\n", encoding="utf-8-sig")
    assert [s.caption for s in iter_samples(str(path), SkipStats())] == ["a red square"]


def test_csv_without_caption_column_raises(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(image_bytes("PNG", (8, 8), RED))
    path = tmp_path / "pairs.csv"
    path.write_text("image,label\na.png,red\n")
    with pytest.raises(DataError) as err:
        list(iter_samples(str(path), SkipStats()))
    msg = str(err.value)
    assert "caption" in msg and "image, label" in msg and "pairs.csv" in msg
    path.write_text("picture,caption\na.png,red\n")
    with pytest.raises(DataError, match="picture"):
        list(iter_samples(str(path), SkipStats()))


# ----------------------------------------------------------------------------------------------------------
# Folder


def test_folder_reader(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    (root / "x.png").write_bytes(image_bytes("PNG", (12, 8), RED))
    (root / "x.txt").write_text("caption of x\n")
    (root / "sub" / "y.jpg").write_bytes(image_bytes("JPEG", (9, 9), GREEN))
    (root / "sub" / "y.txt").write_text("caption of y")
    (root / "sub" / "y.json").write_text(json.dumps({"label": "green thing"}))
    (root / "w.webp").write_bytes(image_bytes("WEBP", (10, 10), BLUE))
    (root / "w.json").write_text(json.dumps({"caption": "caption from json", "label": "blue thing"}))
    (root / "z.png").write_bytes(image_bytes("PNG", (8, 8), RED))  # no caption at all
    (root / "bad.png").write_bytes(b"not a png")
    (root / "bad.txt").write_text("broken image")
    (root / "README.md").write_text("ignored")
    assert detect_format(str(root)) == "folder"
    samples, skips = read_all(root)
    assert {k: (s.caption, s.label) for k, s in samples.items()} == {
        "x": ("caption of x", None),
        "y": ("caption of y", "green thing"),
        "w": ("caption from json", "blue thing"),
    }
    assert samples["x"].image.size == (12, 8)
    assert dict(skips.counts) == {"missing_caption": 1, "corrupt_image": 1}
    assert list(samples) == sorted(samples, key=lambda k: {"x": "x.png", "y": "sub/y.jpg", "w": "w.webp"}[k])


# ----------------------------------------------------------------------------------------------------------
# detect_format


def test_detect_format_and_missing_paths(tmp_path: Path) -> None:
    tar = write_tar(tmp_path / "one.tar", [("a.png", image_bytes("PNG", (8, 8), RED)), ("a.txt", b"x")])
    assert detect_format(str(tar)) == "wds"
    (tmp_path / "t.tsv").write_text("image\tcaption\n")
    assert detect_format(str(tmp_path / "t.tsv")) == "csv"
    (tmp_path / "T.CSV").write_text("image,caption\n")
    assert detect_format(str(tmp_path / "T.CSV")) == "csv"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert detect_format(str(empty)) == "folder"
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="expected .tar, .csv or .tsv"):
        detect_format(str(tmp_path / "notes.txt"))
    missing = str(tmp_path / "nowhere" / "train")
    with pytest.raises(DataError, match="counterpoint data make world") as err:
        detect_format(missing)
    assert missing in str(err.value)
    with pytest.raises(DataError, match="counterpoint data make world"):
        next(iter_samples(missing, SkipStats()))
    with pytest.raises(DataError, match="counterpoint data make world"):
        load_pairs(missing, 16)


# ----------------------------------------------------------------------------------------------------------
# to_square_array and load_pairs


def banded(size: tuple[int, int], axis: int) -> Image.Image:
    """Three bands red | green | blue of widths 1/4, 1/2, 1/4 along ``axis`` (0: rows, 1: columns)."""
    w, h = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    n = arr.shape[axis]
    idx = [slice(None)] * 2
    for colour, (lo, hi) in zip((RED, GREEN, BLUE), ((0, n // 4), (n // 4, n - n // 4), (n - n // 4, n))):
        idx[axis] = slice(lo, hi)
        arr[tuple(idx)] = colour
    return Image.fromarray(arr)


def test_to_square_array_centre_crops() -> None:
    # exact crop offsets, no resize: a ramp whose value is the column (or row) index
    ramp = np.tile(np.arange(41, dtype=np.uint8)[None, :, None], (20, 1, 3))  # 41 wide, 20 tall
    out = to_square_array(Image.fromarray(ramp), 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    assert out[0, :, 0].tolist() == list(range(10, 30))  # left = (41 - 20) // 2
    tall = np.ascontiguousarray(ramp.transpose(1, 0, 2))  # 20 wide, 41 tall
    out = to_square_array(Image.fromarray(tall), 20)
    assert out[:, 0, 0].tolist() == list(range(10, 30))
    # wide and tall band images keep only the middle (green) band, also after resizing
    for img in (banded((40, 20), axis=1), banded((20, 40), axis=0)):
        for size in (20, 8, 32):
            out = to_square_array(img, size)
            assert out.shape == (size, size, 3)
            assert np.abs(out.astype(int) - GREEN).max() <= 2, size
    # a square image of the right size is returned unchanged
    arr = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert np.array_equal(to_square_array(Image.fromarray(arr), 16), arr)


def test_load_pairs_resizes_and_crops(tmp_path: Path) -> None:
    root = tmp_path / "f"
    root.mkdir()
    banded((60, 30), axis=1).save(root / "a.png")
    (root / "a.txt").write_text("wide")
    banded((30, 60), axis=0).save(root / "b.png")
    (root / "b.txt").write_text("tall")
    Image.new("RGB", (5, 5), RED).save(root / "c.png")  # upscaled
    (root / "c.txt").write_text("tiny")
    (root / "d.png").write_bytes(b"corrupt")
    (root / "d.txt").write_text("broken")
    pairs = load_pairs(str(root), 12)
    assert len(pairs) == 3
    assert pairs.images.shape == (3, 3, 12, 12) and pairs.images.dtype == torch.uint8
    assert pairs.captions == ["wide", "tall", "tiny"]
    assert pairs.labels == [None, None, None]
    green = torch.tensor(GREEN).view(3, 1, 1)
    assert (pairs.images[:2].int() - green).abs().max() <= 2
    assert (pairs.images[2].int() - torch.tensor(RED).view(3, 1, 1)).abs().max() <= 2
    assert dict(pairs.skips.counts) == {"corrupt_image": 1}
    limited = load_pairs(str(root), 12, limit=2)
    assert len(limited) == 2 and limited.images.shape[0] == 2


def test_load_pairs_raises_when_nothing_is_usable(tmp_path: Path) -> None:
    root = tmp_path / "bad"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    (root / "a.txt").write_text("caption")
    (root / "b.png").write_bytes(image_bytes("PNG", (8, 8), RED))  # no caption
    with pytest.raises(DataError, match="no usable image-text pairs") as err:
        load_pairs(str(root), 16)
    assert "corrupt_image" in str(err.value) and "missing_caption" in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no usable image-text pairs"):
        load_pairs(str(empty), 16)
    shard = write_tar(tmp_path / "bad.tar", [("a.png", image_bytes("PNG", (8, 8), RED)), ("a.txt", b"")])
    with pytest.raises(DataError, match="empty_caption"):
        load_pairs(str(shard), 16)
