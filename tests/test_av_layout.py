"""The audio-visual research layout reader and ``counterpoint data av-features``, on real WAV and JPEG files.

The fixture writes a tiny CREMA-D-style tree with good clips (mono and stereo, short and long, with frame
names that sort wrongly as plain strings) and one clip per failure: corrupt WAV, WAV at another sample rate,
missing WAV, missing frame folder, undecodable frame, unknown label, a clip listed in two splits, a short row.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from counterpoint.cli import main
from counterpoint.data.audio import FbankConfig, kaldi_fbank, read_wav, write_wav
from counterpoint.data.av_layout import AVLayoutConfig, clip_frames, natural_key, read_av_layout
from counterpoint.data.multimodal import ModalDataset
from counterpoint.data.resample import resample
from counterpoint.errors import DataError

pytestmark = pytest.mark.usefixtures("one_thread")

SR = 16000
T, K, S = 60, 3, 16  # fbank frames, video frames, image side
SILENCE = math.log(torch.finfo(torch.float32).eps)
CFG = AVLayoutConfig(audio_frames=T, frames=K, image_size=S, num_mel_bins=40, val_fraction=0.25)
# clip -> (label, seconds, channels, number of frame files); every one of these is usable.
GOOD = {
    "1001_ANG": ("ANG", 0.4, 1, 10),  # shorter than T frames: padded
    "1002_ANG": ("ANG", 1.0, 2, 4),  # stereo, longer than T frames: cropped
    "1003_HAP": ("HAP", 0.7, 1, 1),  # one frame file, repeated K times
    "1004_HAP": ("HAP", 0.6, 1, 5),
    "1005_SAD": ("SAD", 0.65, 2, 3),
    "1006_SAD": ("SAD", 0.8, 1, 12),
    "1007_ANG": ("ANG", 0.5, 1, 3),
    "1008_SAD": ("SAD", 0.9, 1, 6),
}
TEST_GOOD = {"2001_HAP": ("HAP", 0.5, 1, 4), "2002_SAD": ("SAD", 0.75, 2, 3)}
EXPECTED_SKIPS = {"corrupt_audio": 1, "wrong_sample_rate": 1, "missing_audio": 1, "missing_frames": 1,
                  "corrupt_frame": 1, "unknown_label": 1, "duplicate_clip": 1, "bad_row": 1}


def _waveform(seed: int, seconds: float, channels: int) -> torch.Tensor:
    """``[channels, samples]`` harmonic tone plus noise in [-0.8, 0.8]; channels differ."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SR)) / SR
    tone = sum(torch.sin(2 * math.pi * 150 * (seed + 1) * k * t) / k for k in range(1, 5))
    x = torch.stack([tone * (c + 1) + 0.1 * torch.randn(t.shape, generator=g) for c in range(channels)])
    return 0.8 * x / x.abs().max()


def _frame_level(index: int) -> int:
    return 10 + 20 * index  # frame `index` (natural order) is a flat image of this grey level


def _write_clip(root: Path, clip: str, seed: int, seconds: float, channels: int, n_frames: int,
                rate: int = SR) -> None:
    wave = _waveform(seed, seconds, channels)
    write_wav(root / "audio" / f"{clip}.wav", wave[0] if channels == 1 else wave, rate)
    folder = root / "visual" / clip
    folder.mkdir(parents=True)
    for i in range(n_frames):  # names f1 .. fN: plain string order would put f10 before f2
        level = _frame_level(i)
        Image.new("RGB", (24, 18), (level, level, level)).save(folder / f"f{i + 1}.jpg", quality=95)


@pytest.fixture(scope="module")
def av_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cremad")
    (root / "audio").mkdir()
    (root / "visual").mkdir()
    for seed, (clip, (_, seconds, channels, n_frames)) in enumerate({**GOOD, **TEST_GOOD}.items()):
        _write_clip(root, clip, seed, seconds, channels, n_frames)
    _write_clip(root, "3001_ANG", 50, 0.5, 1, 3)
    (root / "audio" / "3001_ANG.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage, not audio")
    _write_clip(root, "3002_HAP", 51, 0.5, 1, 3, rate=8000)
    _write_clip(root, "3003_SAD", 52, 0.5, 1, 3)
    (root / "audio" / "3003_SAD.wav").unlink()
    _write_clip(root, "3004_ANG", 53, 0.5, 1, 3)
    for f in (root / "visual" / "3004_ANG").iterdir():
        f.unlink()
    (root / "visual" / "3004_ANG").rmdir()
    _write_clip(root, "3005_HAP", 54, 0.5, 1, 3)
    (root / "visual" / "3005_HAP" / "f2.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    train = ["clip,label"] + [f"{c},{v[0]}" for c, v in GOOD.items()]
    train += ["3001_ANG,ANG", "3002_HAP,HAP", "3003_SAD,SAD", "3004_ANG,ANG", "3005_HAP,HAP"]
    (root / "train.csv").write_text("\n".join(train) + "\n")
    test = [f"{c},{v[0]}" for c, v in TEST_GOOD.items()] + ["2003_XYZ,XYZ", "1001_ANG,ANG", "2004_short", ""]
    (root / "test.csv").write_text("\n".join(test) + "\n")
    return root


@pytest.fixture(scope="module")
def dataset(av_root: Path, one_thread: None) -> ModalDataset:
    return read_av_layout(av_root, CFG)


def _row(ds: ModalDataset, clip: str) -> tuple[str, int]:
    for split, clips in ds.info["clips"].items():
        if clip in clips:
            return split, clips.index(clip)
    raise AssertionError(f"{clip} not in the dataset")


def test_skips_are_counted_by_reason(dataset: ModalDataset) -> None:
    skipped = dataset.info["skipped"]
    assert skipped["by_reason"] == EXPECTED_SKIPS
    assert skipped["total"] == 8 and len(skipped["examples"]) == 8
    assert any("wrong_sample_rate" in e and "8000 Hz" in e for e in skipped["examples"])
    assert any("missing_frames" in e and "3004_ANG" in e for e in skipped["examples"])


def test_splits_shapes_and_labels(dataset: ModalDataset) -> None:
    assert dataset.classes == ["ANG", "HAP", "SAD"]  # sorted training labels; XYZ only occurs in test
    clips = dataset.info["clips"]
    # 13 training rows, a quarter (3) carved out as val before loading; 5 bad rows skipped among both.
    assert dataset.info["splits"]["train"]["rows"] == 10 and dataset.info["splits"]["val"]["rows"] == 3
    assert sorted(clips["train"] + clips["val"]) == sorted(GOOD)
    assert clips["test"] == list(TEST_GOOD)  # the duplicate of a training clip was dropped from test
    for split, data in dataset.splits.items():
        n = len(clips[split])
        assert data.inputs["audio"].shape == (n, T, 40) and data.inputs["audio"].dtype == torch.float32
        assert data.inputs["visual"].shape == (n, K, 3, S, S) and data.inputs["visual"].dtype == torch.uint8
        expected = [dataset.classes.index({**GOOD, **TEST_GOOD}[c][0]) for c in clips[split]]
        assert data.labels.tolist() == expected


def test_fbank_matches_audio_module(dataset: ModalDataset, av_root: Path) -> None:
    # Kaldi frame counts 1 + (samples - 400) // 160: 0.4 s -> 38 (padded to T), 1.0 s -> 98 (cropped).
    for clip, frames in (("1001_ANG", 38), ("1002_ANG", 98), ("2002_SAD", 73)):
        split, i = _row(dataset, clip)
        got = dataset.splits[split].inputs["audio"][i]  # [T, 40]
        wave, rate = read_wav(av_root / "audio" / f"{clip}.wav")
        ref = kaldi_fbank(wave * 32768.0, FbankConfig(num_mel_bins=40))  # [frames, 40]
        assert rate == SR and ref.shape[0] == frames
        n = min(T, frames)
        assert torch.equal(got[:n], ref[:n])
        assert (got[n:] == SILENCE).all()


def test_stereo_is_averaged_to_mono(dataset: ModalDataset, av_root: Path) -> None:
    split, i = _row(dataset, "1002_ANG")
    stereo = _waveform(list(GOOD).index("1002_ANG"), 1.0, 2)  # [2, samples], what the file holds
    pcm = (stereo.double() * 32768.0).round().clamp(-32768, 32767)  # the 16-bit values written
    ref = kaldi_fbank(pcm.mean(dim=0).float(), FbankConfig(num_mel_bins=40))[:T]
    assert torch.equal(dataset.splits[split].inputs["audio"][i], ref)
    left_only = kaldi_fbank(pcm[0].float(), FbankConfig(num_mel_bins=40))[:T]
    assert not torch.allclose(ref, left_only, atol=1e-2)  # the channels differ, so averaging is visible


@pytest.mark.parametrize("clip", ["1001_ANG", "1003_HAP", "1006_SAD", "2002_SAD"])
def test_frames_are_sampled_evenly_in_natural_order(dataset: ModalDataset, clip: str) -> None:
    n_files = {**GOOD, **TEST_GOOD}[clip][3]
    split, i = _row(dataset, clip)
    frames = dataset.splits[split].inputs["visual"][i].float()  # [K, 3, S, S]
    picked = [int((k + 0.5) * n_files / K) for k in range(K)]  # centres of K equal segments
    expected = torch.tensor([_frame_level(j) for j in picked], dtype=torch.float32)
    assert (frames.mean(dim=(1, 2, 3)) - expected).abs().max() < 2.0  # flat JPEGs decode within +-2


def test_natural_key() -> None:
    names = ["f10.jpg", "f2.jpg", "f1.jpg", "img_003.png", "img_02.png", "²"]
    assert sorted(names, key=natural_key) == ["f1.jpg", "f2.jpg", "f10.jpg", "img_02.png", "img_003.png", "²"]


def test_val_split_file_and_classes_file(av_root: Path, tmp_path: Path, one_thread: None) -> None:
    root = tmp_path / "copy"
    root.mkdir()
    for name in ("audio", "visual"):
        (root / name).symlink_to(av_root / name)
    (root / "train.csv").write_text("1001_ANG,ANG\n1003_HAP,HAP\n")
    (root / "val.csv").write_text("id,emotion\n1005_SAD,SAD\n1004_HAP,HAP\n")
    (root / "test.csv").write_text("2001_HAP,HAP\n2002_SAD,NEU\n")
    (root / "classes.txt").write_text("SAD\nHAP\nANG\nNEU\n")
    ds = read_av_layout(root, CFG)
    assert ds.classes == ["SAD", "HAP", "ANG", "NEU"]
    assert ds.info["clips"] == {"train": ["1001_ANG", "1003_HAP"], "val": ["1005_SAD", "1004_HAP"],
                                "test": ["2001_HAP", "2002_SAD"]}
    assert ds.splits["val"].labels.tolist() == [0, 1] and ds.splits["test"].labels.tolist() == [1, 3]
    assert ds.info["skipped"]["total"] == 0


def test_missing_pieces_are_data_errors(av_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is not a folder"):
        read_av_layout(tmp_path / "nowhere", CFG)
    (tmp_path / "train.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="no test split file"):
        read_av_layout(tmp_path, CFG)
    (tmp_path / "test.csv").write_text("c,b\n")
    with pytest.raises(DataError, match=r"no usable training clip .*1 skipped: \{'missing_audio': 1\}"):
        read_av_layout(tmp_path, dataclasses.replace(CFG, val_fraction=0.0))
    with pytest.raises(ValueError, match="frames must be >= 1"):
        AVLayoutConfig(frames=0)
    with pytest.raises(ValueError, match="sample_rate must be positive"):
        AVLayoutConfig(sample_rate=0)


def test_resample_keeps_clips_at_other_rates(av_root: Path, dataset: ModalDataset) -> None:
    ds = read_av_layout(av_root, dataclasses.replace(CFG, resample=True))
    assert ds.info["skipped"]["by_reason"] == {k: v for k, v in EXPECTED_SKIPS.items() if k != "wrong_sample_rate"}
    split, i = _row(ds, "3002_HAP")  # 8,000 samples written at 8 kHz: 1 s, 16,000 samples after resampling
    wave, rate = read_wav(av_root / "audio" / "3002_HAP.wav")
    ref = kaldi_fbank(resample(wave, rate, SR) * 32768.0, FbankConfig(num_mel_bins=40))  # [98, 40]
    assert rate == 8000 and ref.shape[0] == 98
    assert torch.equal(ds.splits[split].inputs["audio"][i], ref[:T])
    # Clips already at the configured rate are read exactly as without resampling.
    assert ds.info["clips"]["train"][:3] == dataset.info["clips"]["train"][:3]
    assert torch.equal(ds.splits["train"].inputs["audio"][:3], dataset.splits["train"].inputs["audio"][:3])


def test_cli_writes_the_dataset_and_reports_skips(dataset: ModalDataset, av_root: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cremad"
    code = main(["data", "av-features", str(av_root), "--out", str(out), "--audio-frames", str(T), "--frames",
                 str(K), "--image-size", str(S), "--num-mel-bins", "40", "--val-fraction", "0.25"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "skipped 8 clips: bad_row 1, corrupt_audio 1, corrupt_frame 1," in printed
    back = ModalDataset.load(out)
    assert back.classes == dataset.classes and back.info["clips"] == dataset.info["clips"]
    for split, data in dataset.splits.items():
        assert torch.equal(back.splits[split].labels, data.labels)
        for m in ("audio", "visual"):
            assert torch.equal(back.splits[split].inputs[m], data.inputs[m])


def test_cli_bad_option_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "av-features", str(tmp_path), "--out", str(tmp_path / "x"), "--frames", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "counterpoint: error: data av-features: frames must be >= 1, got 0\n"


def test_cli_missing_root_exits_2_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from counterpoint.cli import main

    missing = tmp_path / "no_such_dataset"
    assert main(["data", "av-features", str(missing), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("counterpoint: error: audio-visual data root")
    assert str(missing) in lines[0] and "Traceback" not in err
    assert not (tmp_path / "out.safetensors").exists()


def test_large_frames_are_centre_cropped_and_resized(tmp_path: Path) -> None:
    # 160x120, left half red, right half blue: the 120x120 centre crop is split at its middle column.
    # (At 16 px the JPEG is decoded at a reduced scale; the geometry must not change.)
    arr = np.zeros((120, 160, 3), dtype=np.uint8)
    arr[:, :80] = (230, 20, 20)
    arr[:, 80:] = (20, 20, 230)
    (tmp_path / "clip").mkdir()
    Image.fromarray(arr).save(tmp_path / "clip" / "0.jpg", quality=95)
    frames = clip_frames(tmp_path / "clip", AVLayoutConfig(frames=2, image_size=16)).int()  # [2, 3, 16, 16]
    assert frames.shape == (2, 3, 16, 16) and torch.equal(frames[0], frames[1])
    assert (frames[0, 0, :, :7] > 200).all() and (frames[0, 2, :, :7] < 50).all()
    assert (frames[0, 2, :, 9:] > 200).all() and (frames[0, 0, :, 9:] < 50).all()
