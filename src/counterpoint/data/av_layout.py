"""Reader for the common audio-visual research layout (CREMA-D, Kinetics-Sounds, AVE after the usual
preprocessing: audio extracted to WAV, frames extracted to images), into a :class:`ModalDataset`.

Expected tree under ``ROOT`` (every name is a field of :class:`AVLayoutConfig`)::

    ROOT/
      train.csv          one row per clip: clip id, label (more columns are ignored; a header row is
      val.csv            recognised by its column names and skipped). val.csv is optional: without it a
      test.csv           seeded ``val_fraction`` of the training clips becomes the validation split.
      classes.txt        optional, one label per line: fixes the class order (else: train labels, sorted)
      audio/<clip>.wav   any format soundfile reads; several channels are averaged to mono
      visual/<clip>/     the clip's frames, *.jpg / *.jpeg / *.png, ordered by name (numbers numerically)

CREMA-D as OGM-GE and MMPareto prepare it, for example, is ``audio_dir="AudioWAV"`` and
``visual_dir="Image-01-FPS"`` with ``train.csv`` / ``test.csv`` rows such as ``1001_DFA_ANG_XX,ANG``.

Per clip the dataset holds

* ``audio``: float32 ``[T, F]`` Kaldi log-mel filterbank (``counterpoint.data.audio.kaldi_fbank``) of the
  samples scaled to int16 values, as Kaldi and AST read WAV files. ``T = audio_frames`` (10 ms each): longer
  clips keep their first ``T`` frames; shorter ones are padded with ``log(float32 eps)``, the value Kaldi
  gives digital silence, i.e. as if silence followed the clip. Features are stored raw; the training split's
  mean and std are in ``info`` for the usual dataset normalisation (``normalize_fbank``).
* ``visual``: uint8 ``[K, 3, S, S]``, ``K = frames`` images sampled evenly (the centre of each of ``K``
  equal segments of the frame list; fewer files than ``K`` repeat), centre-cropped to a square and resized.

A bad clip never stops the run: a missing or corrupt WAV, a WAV at another sample rate (unless ``resample``
is set: then it is resampled with ``counterpoint.data.resample``), a missing or empty frame folder, an
undecodable frame, an unknown label, a malformed row or a clip already seen (in this or an earlier split, so
test never overlaps train) is skipped and counted by reason in a :class:`SkipStats`.

``info`` of the result holds ``skipped`` (counts by reason, examples), ``clips`` (the clip id of every row,
per split), ``splits`` (rows read and clips kept), ``audio_mean`` / ``audio_std`` (training features) and
``config``.

Everything goes into one in-memory :class:`ModalDataset` file rather than shards: the balanced-learning
trainers index whole splits in memory, and at the defaults a clip costs 153 KB of fbank and 113 KB of
frames, so CREMA-D (7,442 clips) is about 2 GB. Each split's tensors are allocated once and filled in
place, so reading needs no more memory than the result.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from counterpoint.data.audio import _EPS, FbankConfig, kaldi_fbank, read_wav
from counterpoint.data.multimodal import SPLITS, ModalDataset, ModalSplit
from counterpoint.data.readers import IMAGE_ERRORS, SkipStats, to_square_array
from counterpoint.data.resample import resample
from counterpoint.errors import DataError

# A first row whose clip or label cell is one of these names is a header.
_CLIP_HEADERS = {"clip", "clip_id", "id", "name", "file", "filename", "path", "video", "video_id", "youtube_id"}
_LABEL_HEADERS = {"label", "labels", "class", "class_name", "category", "emotion", "target"}
_SILENCE = math.log(_EPS)  # Kaldi's log-mel of an all-zero frame (log of its float32 floor)


@dataclass(frozen=True)
class AVLayoutConfig:
    """Names in the tree and the features computed; saved with the dataset (``info["config"]``)."""

    split_file: str = "{split}.csv"  # relative to ROOT; ``{split}`` is train, val or test
    audio_dir: str = "audio"
    audio_file: str = "{clip}.wav"  # inside audio_dir
    visual_dir: str = "visual"  # holds one folder of frames per clip
    frame_exts: tuple[str, ...] = ("jpg", "jpeg", "png")
    classes_file: str = "classes.txt"  # optional, relative to ROOT
    sample_rate: int = 16000
    resample: bool = False  # resample WAVs at another rate; if False, skip them (reason wrong_sample_rate)
    num_mel_bins: int = 128
    audio_frames: int = 300  # T: 3 s at Kaldi's 10 ms shift
    frames: int = 3  # K
    image_size: int = 112
    val_fraction: float = 0.1  # used only without a val split file
    seed: int = 0  # picks the validation clips when they come from train

    def __post_init__(self) -> None:
        if "{split}" not in self.split_file:
            raise ValueError(f"split_file must contain '{{split}}', got {self.split_file!r}")
        if "{clip}" not in self.audio_file:
            raise ValueError(f"audio_file must contain '{{clip}}', got {self.audio_file!r}")
        if not self.frame_exts:
            raise ValueError("frame_exts must name at least one image extension")
        if self.audio_frames < 1:
            raise ValueError(f"audio_frames must be >= 1, got {self.audio_frames}")
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")
        if not 8 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be in [8, 1024], got {self.image_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        _ = self.fbank  # FbankConfig checks sample_rate and num_mel_bins, with its own messages

    @property
    def fbank(self) -> FbankConfig:
        return FbankConfig(sample_rate=self.sample_rate, num_mel_bins=self.num_mel_bins)


class SkipClip(Exception):
    """A clip that cannot be used; ``reason`` is its :class:`SkipStats` key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def natural_key(name: str) -> list:
    """Sort key that orders ``frame_2`` before ``frame_10`` (digit runs compare as numbers)."""
    # re.split with a group puts the digit runs at the odd positions (str.isdigit would also take "²").
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", name))]


def read_split_file(path: Path, skips: SkipStats) -> list[tuple[str, str, str]]:
    """``(clip, label, where)`` per data row of a split CSV; blank lines are ignored, short rows counted."""
    rows = []
    # -sig: spreadsheet exports start with a byte-order mark; undecodable bytes become U+FFFD, so such a clip
    # is then skipped as missing instead of stopping the run.
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as fh:
        for row_no, row in enumerate(csv.reader(fh), start=1):
            cells = [c.strip() for c in row]
            if not any(cells):
                continue
            where = f"{path.name}:{row_no}"
            if len(cells) < 2 or not cells[0] or not cells[1]:
                skips.skip("bad_row", where)
                continue
            if not rows and (cells[0].lower() in _CLIP_HEADERS or cells[1].lower() in _LABEL_HEADERS):
                continue
            rows.append((cells[0], cells[1], f"{where} ({cells[0]})"))
    return rows


def clip_fbank(path: Path, cfg: AVLayoutConfig) -> torch.Tensor:
    """``[T, F]`` log-mel features of one WAV, cropped or padded to ``cfg.audio_frames``."""
    if not path.is_file():
        raise SkipClip("missing_audio")
    try:
        waveform, rate = read_wav(path)  # [samples], mono
    except (RuntimeError, ValueError) as e:  # soundfile's LibsndfileError is a RuntimeError
        raise SkipClip("corrupt_audio", str(e).splitlines()[0]) from None
    if rate != cfg.sample_rate and not cfg.resample:
        raise SkipClip("wrong_sample_rate", f"{rate} Hz, expected {cfg.sample_rate} (or pass resample)")
    waveform = resample(waveform, rate, cfg.sample_rate)
    fb = cfg.fbank
    if fb.snip_edges and fb.dither == 0:  # frame t reads samples [t*shift, t*shift + length): skip the rest
        waveform = waveform[: (cfg.audio_frames - 1) * fb.frame_shift + fb.frame_length]
    feats = kaldi_fbank(waveform * 32768.0, fb)[: cfg.audio_frames]  # [<=T, F]
    if feats.shape[0] == 0:
        raise SkipClip("short_audio", f"{waveform.numel()} samples, less than one frame")
    pad = cfg.audio_frames - feats.shape[0]
    return torch.cat([feats, feats.new_full((pad, feats.shape[1]), _SILENCE)]) if pad else feats


def clip_frames(folder: Path, cfg: AVLayoutConfig) -> torch.Tensor:
    """``[K, 3, S, S]`` uint8: ``cfg.frames`` evenly spaced frames of one clip, square and resized."""
    exts = {"." + e.lower().lstrip(".") for e in cfg.frame_exts}
    files = sorted((f for f in folder.glob("*") if f.suffix.lower() in exts), key=lambda f: natural_key(f.name))
    if not files:
        raise SkipClip("missing_frames", "no folder" if not folder.is_dir() else "no frame files")
    pick = ((np.arange(cfg.frames) + 0.5) * len(files) / cfg.frames).astype(int)  # segment centres
    images = []
    for i in pick:
        try:
            with Image.open(files[i]) as img:
                # JPEG only: decode at the smallest 1/2^k scale still >= the target (DCT-domain scaling),
                # about 2x faster for video-sized frames; the resize below then does less work too.
                img.draft("RGB", (cfg.image_size, cfg.image_size))
                images.append(to_square_array(img.convert("RGB"), cfg.image_size))  # [S, S, 3]
        except IMAGE_ERRORS:
            raise SkipClip("corrupt_frame", files[i].name) from None
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # [K, 3, S, S]


def _classes(root: Path, cfg: AVLayoutConfig, train_rows: list[tuple[str, str, str]]) -> list[str]:
    file = root / cfg.classes_file
    if file.is_file():
        classes = [line.strip() for line in file.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        if len(set(classes)) != len(classes) or not classes:
            raise DataError(f"{file}: class names must be unique and at least one; fix or delete the file")
        return classes
    return sorted({label for _, label, _ in train_rows}, key=natural_key)


def _split_rows(root: Path, cfg: AVLayoutConfig, skips: SkipStats) -> dict[str, list[tuple[str, str, str]]]:
    files = {s: root / cfg.split_file.format(split=s) for s in SPLITS}
    for split in ("train", "test"):
        if not files[split].is_file():
            raise DataError(f"no {split} split file '{files[split]}'; write one (rows: clip id, label) or "
                            f"set split_file (now {cfg.split_file!r})")
    rows = {s: read_split_file(files[s], skips) for s in SPLITS if files[s].is_file()}
    if "val" not in rows:  # carve a seeded validation split out of train: never select models on test
        order = np.random.default_rng(cfg.seed).permutation(len(rows["train"]))
        n_val = int(round(cfg.val_fraction * len(order)))
        rows["val"] = [rows["train"][i] for i in sorted(order[:n_val])]
        rows["train"] = [rows["train"][i] for i in sorted(order[n_val:])]
    return {s: rows[s] for s in SPLITS}


def read_av_layout(root: str | Path, cfg: AVLayoutConfig = AVLayoutConfig(), progress: bool = False) -> ModalDataset:
    """Read every split of the layout at ``root``; bad clips are skipped and counted (``info["skipped"]``)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"audio-visual data root '{root}' is not a folder; pass the folder holding "
                        f"{cfg.split_file.format(split='train')}, {cfg.audio_dir}/ and {cfg.visual_dir}/")
    skips = SkipStats()
    rows = _split_rows(root, cfg, skips)
    classes = _classes(root, cfg, rows["train"])
    index = {c: i for i, c in enumerate(classes)}
    seen: set[str] = set()
    splits, counts, clips = {}, {}, {}
    for split, split_rows in rows.items():
        audio = torch.empty(len(split_rows), cfg.audio_frames, cfg.num_mel_bins)  # filled up to n, then cut
        visual = torch.empty(len(split_rows), cfg.frames, 3, cfg.image_size, cfg.image_size, dtype=torch.uint8)
        labels, kept = [], []
        for clip, label, where in tqdm(split_rows, desc=f"av/{split}", unit=" clips", disable=not progress,
                                       leave=False):
            try:
                if label not in index:
                    raise SkipClip("unknown_label", label)
                if clip in seen:
                    raise SkipClip("duplicate_clip")
                seen.add(clip)
                audio[len(kept)] = clip_fbank(root / cfg.audio_dir / cfg.audio_file.format(clip=clip), cfg)
                visual[len(kept)] = clip_frames(root / cfg.visual_dir / clip, cfg)
            except SkipClip as e:
                skips.skip(e.reason, f"{split} {where}" + (f": {e.detail}" if e.detail else ""))
                continue
            labels.append(index[label])
            kept.append(clip)
        n = len(kept)
        splits[split] = ModalSplit({"audio": audio[:n], "visual": visual[:n]}, torch.tensor(labels, dtype=torch.long))
        counts[split] = {"rows": len(split_rows), "clips": n}
        clips[split] = kept
        if split == "train" and n == 0:  # before spending time on the other splits
            raise DataError(f"no usable training clip under '{root}' ({skips.total} skipped: "
                            f"{dict(skips.counts)}); check the folder names and the sample rate")
    train_audio = splits["train"].inputs["audio"]
    info = {"source": str(root.resolve()), "config": asdict(cfg), "splits": counts, "skipped": skips.as_dict(),
            "audio_mean": float(train_audio.mean()), "audio_std": float(train_audio.std()), "clips": clips}
    return ModalDataset(root.resolve().name, classes, splits, info)
