"""Kaldi-compatible log-mel filterbanks in pure torch, plus WAV I/O.

Audio towers pretrained on AudioSet (AST, BEATs, ...) consume Kaldi ``compute-fbank-feats`` features
(Povey et al., "The Kaldi Speech Recognition Toolkit", ASRU 2011), usually computed with
``torchaudio.compliance.kaldi.fbank``. torchaudio has no build for the CPU torch this project pins, so the
computation is reimplemented here in torch alone, vectorised over frames and batch items, on whatever device
the waveform lives. On real 16-bit audio it matches kaldi-native-fbank to ~3e-4 (max abs log-mel
difference, float32; see tests/test_audio_fbank.py).

Scale: Kaldi reads WAV files as raw int16 values, so its features are those of samples in [-32768, 32767].
:func:`read_wav` returns samples in [-1, 1]; multiply by 32768 before :func:`kaldi_fbank` to reproduce
Kaldi's (and AST's) numbers. Without the scaling every log-mel value moves by ``-2 ln 32768`` (``-ln 32768``
with ``use_power=False``), except where the epsilon floor bites.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf
import torch

WINDOWS = ("povey", "hanning", "hamming", "rectangular")

# Kaldi floors energies at float32 epsilon whatever the compute precision, so float64 runs match it too.
_EPS = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class FbankConfig:
    """Options of Kaldi's ``compute-fbank-feats``, with Kaldi's defaults except ``num_mel_bins=128`` (AST's
    choice) and ``dither=0`` (Kaldi's 1.0 makes features random; pretrained towers are fed undithered ones).

    ``high_freq <= 0`` means ``nyquist + high_freq`` (Kaldi's convention); ``dither`` is the standard
    deviation of Gaussian noise added to each frame (0 keeps the features deterministic). ``use_energy``
    prepends the raw log-energy (after DC removal, before pre-emphasis) as column 0, floored at
    ``log(energy_floor)`` when ``energy_floor > 0``.
    """

    sample_rate: int = 16000
    num_mel_bins: int = 128
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    preemphasis: float = 0.97
    remove_dc_offset: bool = True
    window: str = "povey"
    dither: float = 0.0
    low_freq: float = 20.0
    high_freq: float = 0.0
    use_energy: bool = False
    use_log_fbank: bool = True
    use_power: bool = True
    snip_edges: bool = True
    round_to_power_of_two: bool = True
    energy_floor: float = 0.0

    def __post_init__(self) -> None:
        if self.sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {self.sample_rate}")
        if self.num_mel_bins < 3:  # Kaldi's MelBanks refuses fewer than 3 bins
            raise ValueError(f"num_mel_bins must be >= 3, got {self.num_mel_bins}")
        if self.frame_length_ms <= 0 or self.frame_length < 2:
            raise ValueError(f"frame_length_ms={self.frame_length_ms} gives fewer than 2 samples per frame")
        if self.frame_shift_ms <= 0 or self.frame_shift < 1:
            raise ValueError(f"frame_shift_ms={self.frame_shift_ms} gives less than 1 sample of shift")
        if not 0.0 <= self.preemphasis <= 1.0:
            raise ValueError(f"preemphasis must be in [0, 1], got {self.preemphasis}")
        if self.window not in WINDOWS:
            raise ValueError(f"window must be one of {WINDOWS}, got {self.window!r}")
        if self.dither < 0:
            raise ValueError(f"dither must be >= 0, got {self.dither}")
        nyquist = 0.5 * self.sample_rate
        if not 0.0 <= self.low_freq < nyquist:
            raise ValueError(f"low_freq must be in [0, nyquist={nyquist}), got {self.low_freq}")
        if not self.low_freq < self.resolved_high_freq <= nyquist:
            raise ValueError(
                f"high_freq={self.high_freq} resolves to {self.resolved_high_freq} Hz, which must lie in "
                f"(low_freq={self.low_freq}, nyquist={nyquist}]"
            )
        if self.energy_floor < 0:
            raise ValueError(f"energy_floor must be >= 0, got {self.energy_floor}")

    @property
    def frame_length(self) -> int:
        """Samples per frame, truncated as Kaldi's ``WindowSize()`` does."""
        return int(self.sample_rate * 0.001 * self.frame_length_ms)

    @property
    def frame_shift(self) -> int:
        """Samples between frame starts, truncated as Kaldi's ``WindowShift()`` does."""
        return int(self.sample_rate * 0.001 * self.frame_shift_ms)

    @property
    def padded_length(self) -> int:
        """FFT size: the frame length, rounded up to a power of two if requested."""
        n = self.frame_length
        return 1 << (n - 1).bit_length() if self.round_to_power_of_two else n

    @property
    def resolved_high_freq(self) -> float:
        """Upper filterbank edge in Hz: ``high_freq`` if positive, else ``nyquist + high_freq``."""
        return self.high_freq if self.high_freq > 0 else 0.5 * self.sample_rate + self.high_freq

    @property
    def num_features(self) -> int:
        """Output columns: the mel bins, plus one for the log-energy when ``use_energy``."""
        return self.num_mel_bins + int(self.use_energy)


def _mel(freq: torch.Tensor) -> torch.Tensor:
    """Kaldi's (HTK's) mel scale, ``1127 ln(1 + f / 700)``, evaluated as Kaldi's ``MelScale`` does."""
    return 1127.0 * torch.log(1.0 + freq / 700.0)


@functools.lru_cache(maxsize=32)
def _mel_banks(config: FbankConfig, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[padded_length // 2, num_mel_bins]`` triangular weights, as Kaldi's ``MelBanks`` builds them.

    Triangles are equally spaced in mel between ``low_freq`` and ``high_freq`` and evaluated at each FFT
    bin's centre frequency, strictly inside the (left, right) edges. Like Kaldi, only bins ``0 .. N/2 - 1``
    are weighted: the Nyquist bin never contributes. The arithmetic is Kaldi's, step by step in float32
    (its ``BaseFloat``): a float64 build moves weights by ~1e-5 where an FFT bin sits near a triangle edge,
    enough to shift a log-mel value by up to ~3e-4 when a strong harmonic falls in that FFT bin.

    Unlike Kaldi, which refuses a configuration with a triangle that covers no FFT bin, such bins are kept
    (all-zero, so ``log(eps)`` after the floor), as torchaudio does: AST-style 128 bins at 16 kHz with a
    512-point FFT leave bin 3 empty, and pretrained audio towers expect exactly those features.
    """
    f32 = torch.float32
    n_fft_bins = config.padded_length // 2
    mel_low = _mel(torch.tensor(config.low_freq, dtype=f32))
    mel_high = _mel(torch.tensor(config.resolved_high_freq, dtype=f32))
    delta = (mel_high - mel_low) / (config.num_mel_bins + 1)
    bins = torch.arange(config.num_mel_bins, dtype=f32)
    left, center, right = mel_low + bins * delta, mel_low + (bins + 1) * delta, mel_low + (bins + 2) * delta
    bin_width = torch.tensor(config.sample_rate, dtype=f32) / config.padded_length
    mel = _mel(bin_width * torch.arange(n_fft_bins, dtype=f32))[:, None]  # [fft_bins, 1]
    weights = torch.where(mel <= center, (mel - left) / (center - left), (right - mel) / (right - center))
    weights = torch.where((mel > left) & (mel < right), weights, 0.0)
    return weights.to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=32)
def _window(config: FbankConfig, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Kaldi's ``FeatureWindowFunction``: symmetric (``N - 1`` denominator) windows; povey = hann ** 0.85."""
    n = config.frame_length
    if config.window == "rectangular":
        w = torch.ones(n, dtype=torch.float64)
    else:
        cos = torch.cos(2.0 * math.pi / (n - 1) * torch.arange(n, dtype=torch.float64))
        w = 0.54 - 0.46 * cos if config.window == "hamming" else 0.5 - 0.5 * cos
        if config.window == "povey":
            w = w.pow(0.85)
    return w.to(device=device, dtype=dtype)


def _frame(waveform: torch.Tensor, config: FbankConfig) -> torch.Tensor:
    """``[B, samples] -> [B, frames, frame_length]`` with Kaldi's frame count and edge handling.

    ``snip_edges=True`` keeps only frames that fit entirely (a strided view, no copy); ``False`` centres
    frame ``i`` on ``i * shift + shift // 2`` and reflects the signal at both ends (Kaldi's
    ``ExtractWindow``), which gives ``round(samples / shift)`` frames.
    """
    n, length, shift = waveform.shape[-1], config.frame_length, config.frame_shift
    if config.snip_edges:
        if n < length:
            return waveform.new_zeros(waveform.shape[0], 0, length)
        return waveform.unfold(-1, length, shift)
    num_frames = (n + shift // 2) // shift
    starts = torch.arange(num_frames, device=waveform.device) * shift + shift // 2 - length // 2
    idx = starts[:, None] + torch.arange(length, device=waveform.device)  # [frames, length]
    # Repeated reflection "... 1 0 | 0 1 ... n-1 | n-1 n-2 ..." is periodic with period 2n.
    idx = idx.remainder(2 * n)
    idx = torch.where(idx >= n, 2 * n - 1 - idx, idx)
    return waveform[:, idx]


def kaldi_fbank(waveform: torch.Tensor, config: FbankConfig = FbankConfig()) -> torch.Tensor:
    """Kaldi ``compute-fbank-feats`` of ``[samples]`` or ``[batch, samples]`` -> ``[(batch,) frames, bins]``.

    Pass int16-scaled samples (``read_wav(...)[0] * 32768``) to reproduce Kaldi's numbers. float64 input is
    computed in float64, anything else in float32. Per frame, in Kaldi's order: dither, DC-offset removal,
    (raw log-energy), pre-emphasis ``x[i] -= a * x[i-1]`` with ``x[-1] := x[0]``, window, zero-pad to the
    FFT size, power (or magnitude) spectrum, mel filterbank, log floored at float32 epsilon. Fully
    vectorised and differentiable; no numpy. A waveform shorter than one frame gives zero frames.
    """
    if waveform.dim() not in (1, 2):
        raise ValueError(f"waveform must be [samples] or [batch, samples], got shape {tuple(waveform.shape)}")
    dtype = torch.float64 if waveform.dtype == torch.float64 else torch.float32
    x = waveform.to(dtype)
    frames = _frame(x if x.dim() == 2 else x[None], config)  # [B, T, L]
    if frames.shape[1] == 0:  # shorter than one frame; MKL's FFT also rejects empty input
        return x.new_zeros(*waveform.shape[:-1], 0, config.num_features)

    if config.dither > 0:
        frames = frames + config.dither * torch.randn_like(frames)
    if config.remove_dc_offset:
        frames = frames - frames.mean(dim=-1, keepdim=True)
    if config.use_energy:
        energy = frames.pow(2).sum(dim=-1).clamp_min(_EPS).log()  # [B, T]
        if config.energy_floor > 0:
            energy = energy.clamp_min(math.log(config.energy_floor))
    if config.preemphasis != 0:
        previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        frames = frames - config.preemphasis * previous
    frames = frames * _window(config, x.device, dtype)

    spectrum = torch.fft.rfft(frames, n=config.padded_length)[..., : config.padded_length // 2]
    # |X|^2 from real and imaginary parts: exact and smooth at 0, unlike abs() ** 2.
    spectrum = torch.view_as_real(spectrum).pow(2).sum(dim=-1) if config.use_power else spectrum.abs()
    feats = spectrum @ _mel_banks(config, x.device, dtype)  # [B, T, bins]
    if config.use_log_fbank:
        feats = feats.clamp_min(_EPS).log()
    if config.use_energy:
        feats = torch.cat([energy[..., None], feats], dim=-1)
    return feats if waveform.dim() == 2 else feats[0]


def normalize_fbank(
    feats: torch.Tensor,
    mean: float | torch.Tensor,
    std: float | torch.Tensor,
    *,
    std_multiplier: float = 2.0,
) -> torch.Tensor:
    """Dataset-level standardisation ``(feats - mean) / (std_multiplier * std)``.

    The default follows AST (Gong et al., Interspeech 2021), which divides by *twice* the dataset std so that
    inputs land roughly in [-1, 1] (its AudioSet statistics: ``mean=-4.2677393, std=4.5689974``); pass
    ``std_multiplier=1.0`` for a plain z-score. ``mean``/``std`` may be scalars or per-bin tensors
    broadcastable to ``feats``.
    """
    return (feats - mean) / (std_multiplier * std)


def read_wav(path: str | Path) -> tuple[torch.Tensor, int]:
    """Read an audio file with soundfile -> (``[samples]`` float32 in [-1, 1], sample rate).

    Multi-channel audio is downmixed by averaging channels. Integer PCM is scaled by ``1 / 2**(bits-1)``
    (soundfile's convention), so ``* 32768`` recovers Kaldi's int16 values exactly for 16-bit files.
    """
    data, sample_rate = sf.read(str(path), dtype="float32", always_2d=True)  # [samples, channels]
    return torch.from_numpy(data).mean(dim=1), int(sample_rate)


def write_wav(path: str | Path, waveform: torch.Tensor, sample_rate: int) -> None:
    """Write ``[samples]`` or ``[channels, samples]`` floats in [-1, 1] as 16-bit PCM (clipped).

    Quantises here with the same ``32768`` scale :func:`read_wav` divides by, so a read/write round trip of
    16-bit audio is lossless whatever float->PCM scaling the installed libsndfile uses (it has changed).
    """
    data = (waveform.detach().to("cpu", torch.float64) * 32768.0).round().clamp(-32768, 32767)
    data = data.to(torch.int16)
    sf.write(str(path), (data.T if data.dim() == 2 else data).numpy(), sample_rate, subtype="PCM_16")
