"""The built-in audio-visual imbalance benchmark, generated from the world in seconds.

Each sample is one object of the world (random shape, colour, size and grid cell) seen and heard:

* ``visual``: the rendered image ``[3, S, S]`` uint8 (or ``[K, 3, S, S]`` frames, each a fresh render of the
  same object), with pixel noise of std ``image_noise``;
* ``audio``: the object's tone (``synthesize_audio``: shape -> pitch, colour -> timbre, i.e. the relative
  amplitudes of its harmonics) with white noise at ``audio_snr_db``, as Kaldi log-mel fbank ``[T, F]``.

The class is the object's **colour** by default (``label="colour"``). Both modalities carry it, at very
different difficulty (METHODS.md section 2, "audio-visual style"): colour is the mean of a few pixels, which
a small CNN picks up within an epoch or two even through heavy noise, while timbre has to be read off the
harmonic envelope at a random pitch in low SNR, which takes several times longer. Trained jointly on the
fused loss, the network fits the label from vision first and the audio encoder stays under-trained: the
imbalance of CREMA-D / Kinetics-Sounds in the balanced-learning papers (with the roles of the modalities
swapped), at a size that trains in seconds on one CPU core. ``label="shape"`` turns it around (audio pitch
is then the easy cue and small noisy shapes the hard one). Every sample is a pure function of
``(seed, split, index)``; labels cycle through the classes, so every split is class-balanced.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from counterpoint.data.audio import FbankConfig, kaldi_fbank
from counterpoint.data.multimodal import SPLITS, ModalDataset, ModalSplit
from counterpoint.data.world import (
    COLOUR_NAMES,
    SHAPES,
    SIZES,
    Scene,
    WorldConfig,
    WorldObject,
    render_scene,
    synthesize_audio,
)

_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class AVWorldConfig:
    """Knobs of the audio-visual benchmark; lower ``audio_snr_db`` makes audio harder, higher ``image_noise``
    (std on the 0..255 scale), a smaller ``image_size`` or ``size="small"`` make vision harder. The defaults
    are the tuned benchmark of ``configs/balance_av.yaml`` (README, "Balanced multimodal learning")."""

    seed: int = 0  # the generated samples follow from it
    label: str = "colour"  # "colour" | "shape": what the class is
    train: int = 2000  # training samples
    val: int = 500  # validation samples (model selection)
    test: int = 1000  # test samples (evaluated once, for the selected epoch)
    image_size: int = 16  # pixels per side of the visual modality
    frames: int = 1  # >1: visual is [K, 3, S, S], K independent renders of the object
    image_noise: float = 70.0  # std of pixel noise (0..255 scale): higher makes vision harder
    size: str = "small"  # "small" | "large" | "any"
    position: str = "grid"  # "grid": any of the 9 cells; "center": the middle cell (easier to see)
    audio_snr_db: float = -4.0  # signal-to-noise ratio of the audio: lower makes audio harder
    audio_seconds: float = 0.3  # clip length
    mel_bins: int = 32  # log-mel filterbank bins of the audio features

    def __post_init__(self) -> None:
        for name in SPLITS:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 samples, got {getattr(self, name)}")
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")
        if self.size not in ("small", "large", "any"):
            raise ValueError(f"size must be 'small', 'large' or 'any', got {self.size!r}")
        if self.label not in ("shape", "colour"):
            raise ValueError(f"label must be 'shape' or 'colour', got {self.label!r}")
        if self.position not in ("grid", "center"):
            raise ValueError(f"position must be 'grid' or 'center', got {self.position!r}")
        if self.image_noise < 0:
            raise ValueError(f"image_noise must be >= 0, got {self.image_noise}")
        if not 0.05 <= self.audio_seconds <= 5:
            raise ValueError(f"audio_seconds must be in [0.05, 5], got {self.audio_seconds}")
        if self.mel_bins < 3:
            raise ValueError(f"mel_bins must be >= 3, got {self.mel_bins}")
        WorldConfig(image_size=self.image_size)  # the world validates the image size


def _classes(cfg: AVWorldConfig) -> tuple[str, ...]:
    return SHAPES if cfg.label == "shape" else COLOUR_NAMES


def _world(cfg: AVWorldConfig) -> WorldConfig:
    return WorldConfig(seed=cfg.seed, image_size=cfg.image_size, image_noise=cfg.image_noise,
                       audio_seconds=cfg.audio_seconds, audio_snr_db=cfg.audio_snr_db)


def _split(cfg: AVWorldConfig, split: str, n: int, fbank_cfg: FbankConfig) -> ModalSplit:
    wcfg = _world(cfg)
    images, clips, labels = [], [], []
    for i in range(n):
        rng = np.random.default_rng([cfg.seed, _SPLIT_IDS[split], i])
        label = i % len(_classes(cfg))
        size = SIZES[rng.integers(2)] if cfg.size == "any" else cfg.size
        cell = int(rng.integers(9)) if cfg.position == "grid" else 4
        other = int(rng.integers(8))  # the attribute that is not the label is random
        shape, colour = (label, other) if cfg.label == "shape" else (other, label)
        obj = WorldObject(SHAPES[shape], COLOUR_NAMES[colour], size, cell)
        scene = Scene((obj,))
        frames = [render_scene(scene, rng, wcfg) for _ in range(cfg.frames)]  # [S, S, 3] uint8 each
        images.append(np.stack(frames).transpose(0, 3, 1, 2))  # [K, 3, S, S]
        clips.append(synthesize_audio(scene, rng, wcfg))
        labels.append(label)
    visual = torch.from_numpy(np.stack(images))  # [N, K, 3, S, S]
    if cfg.frames == 1:
        visual = visual[:, 0]  # [N, 3, S, S]
    # Kaldi reads int16 samples: scale [-1, 1] floats as read_wav's callers do.
    audio = kaldi_fbank(torch.from_numpy(np.stack(clips)) * 32768.0, fbank_cfg)  # [N, T, F]
    return ModalSplit({"audio": audio.float().contiguous(), "visual": visual.contiguous()},
                      torch.tensor(labels, dtype=torch.int64))


def make_av_world(cfg: AVWorldConfig = AVWorldConfig()) -> ModalDataset:
    """The benchmark as a :class:`ModalDataset` with ``train``, ``val`` and ``test`` splits (audio, visual)."""
    fbank_cfg = FbankConfig(sample_rate=_world(cfg).audio_sample_rate, num_mel_bins=cfg.mel_bins)
    splits = {s: _split(cfg, s, getattr(cfg, s), fbank_cfg) for s in SPLITS}
    return ModalDataset("av_world", list(_classes(cfg)), splits, {"generator": "av_world", **asdict(cfg)})
