"""kaldi_fbank against kaldi-native-fbank (a C++ port of Kaldi's compute-fbank-feats) on 16-bit WAV audio."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from counterpoint.data.audio import FbankConfig, kaldi_fbank, normalize_fbank, read_wav, write_wav

knf = pytest.importorskip("kaldi_native_fbank")

SR = 16000
LOG_EPS = math.log(torch.finfo(torch.float32).eps)


def _signal(seed: int = 0, seconds: float = 1.3) -> torch.Tensor:
    """A plausible recording in [-0.9, 0.9]: a 220 Hz note with vibrato, a chirp, and pink room noise.

    The pink (1/f) noise matters: it puts energy in the lowest mel bins, as any real microphone does. With
    only white noise, pre-emphasis leaves the bins below ~60 Hz some 25 nats under the frame's peak, where
    float32 FFT rounding alone (in kaldi-native-fbank as much as here) reaches ~1e-3.
    """
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * SR)
    t = torch.arange(n, dtype=torch.float64) / SR
    f0 = 220.0 * (1.0 + 0.01 * torch.sin(2 * math.pi * 5.0 * t))  # 5 Hz vibrato, +-1 %
    phase = 2 * math.pi * torch.cumsum(f0, 0) / SR
    envelope = (t / 0.05).clamp(max=1.0) * torch.exp(-1.5 * t)  # 50 ms attack, slow decay
    note = envelope * sum(0.3 / k * torch.sin(k * phase) for k in range(1, 9))
    chirp = 0.15 * torch.sin(2 * math.pi * (100.0 * t + 0.5 * (6000.0 - 100.0) / seconds * t**2))
    white = torch.randn(n, generator=g, dtype=torch.float64)
    freqs = torch.fft.rfftfreq(n, 1.0 / SR, dtype=torch.float64)
    pink = torch.fft.irfft(torch.fft.rfft(white) / freqs.clamp_min(20.0).sqrt(), n)
    x = note + chirp + 0.02 * pink / pink.std() + 0.005 * white
    return (0.9 * x / x.abs().max()).float()


@pytest.fixture(scope="module")
def wav_int16(tmp_path_factory: pytest.TempPathFactory) -> torch.Tensor:
    """The test signal after a 16-bit WAV round trip, scaled to int16 values as Kaldi reads it."""
    path = tmp_path_factory.mktemp("audio") / "mix.wav"
    write_wav(path, _signal(), SR)
    audio, sr = read_wav(path)
    assert sr == SR and audio.dtype == torch.float32 and audio.dim() == 1
    return audio * 32768.0


def _knf_fbank(samples: torch.Tensor, config: FbankConfig) -> torch.Tensor:
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = config.sample_rate
    opts.frame_opts.dither = 0.0
    opts.frame_opts.frame_length_ms = config.frame_length_ms
    opts.frame_opts.frame_shift_ms = config.frame_shift_ms
    opts.frame_opts.window_type = config.window
    opts.frame_opts.snip_edges = config.snip_edges
    opts.mel_opts.num_bins = config.num_mel_bins
    opts.use_energy = config.use_energy
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(config.sample_rate, samples.tolist())
    fbank.input_finished()
    return torch.tensor(np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)]))


# Kaldi refuses 128 bins with the 512-point FFT of 25 ms frames at 16 kHz (some low triangles fall between
# FFT bins), so the 128-bin comparison uses 50 ms frames (1024-point FFT).
@pytest.mark.parametrize("window", ["povey", "hanning"])
@pytest.mark.parametrize(
    "options",
    [
        {"num_mel_bins": 80},
        {"num_mel_bins": 128, "frame_length_ms": 50.0},
        {"num_mel_bins": 80, "snip_edges": False, "use_energy": True},
    ],
    ids=["80bins", "128bins", "80bins-nosnip-energy"],
)
def test_matches_kaldi_native_fbank(wav_int16: torch.Tensor, window: str, options: dict) -> None:
    config = FbankConfig(window=window, **options)
    ours = kaldi_fbank(wav_int16, config)
    ref = _knf_fbank(wav_int16, config)
    assert ours.shape == ref.shape == (ref.shape[0], config.num_features)
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() <= 1e-3


def test_float64_input_computes_in_float64(wav_int16: torch.Tensor) -> None:
    config = FbankConfig(num_mel_bins=80)
    ours = kaldi_fbank(wav_int16.double(), config)
    assert ours.dtype == torch.float64
    assert (ours - _knf_fbank(wav_int16, config).double()).abs().max().item() <= 1e-3


def test_default_128_bins_keep_empty_triangle_at_floor(wav_int16: torch.Tensor) -> None:
    # torchaudio (hence AST) semantics: the triangle between FFT bins 2 and 3 sees nothing -> log(eps).
    feats = kaldi_fbank(wav_int16)
    assert feats.shape == (1 + (len(wav_int16) - 400) // 160, 128)
    assert torch.all(feats[:, 3] == LOG_EPS)
    assert torch.all(torch.cat([feats[:, :3], feats[:, 4:]], dim=1) > 0)


@pytest.mark.parametrize("snip_edges", [True, False])
def test_batch_matches_per_item(snip_edges: bool) -> None:
    batch = torch.stack([_signal(seed, 0.4) * gain for seed, gain in [(1, 32768.0), (2, 1000.0), (3, 1.0)]])
    config = FbankConfig(num_mel_bins=80, snip_edges=snip_edges)
    feats = kaldi_fbank(batch, config)
    assert feats.shape[0] == 3
    for item, expected in zip(batch, feats):
        torch.testing.assert_close(kaldi_fbank(item, config), expected, rtol=0, atol=1e-5)


def test_short_input_and_gradients() -> None:
    assert kaldi_fbank(torch.zeros(399)).shape == (0, 128)
    assert kaldi_fbank(torch.zeros(2, 399), FbankConfig(use_energy=True)).shape == (2, 0, 129)
    x = (_signal(seconds=0.1) * 32768.0).requires_grad_()
    kaldi_fbank(x, FbankConfig(dither=1.0)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sample_rate": 0}, "sample_rate"),
        ({"num_mel_bins": 2}, "num_mel_bins"),
        ({"frame_length_ms": 0.0}, "frame_length_ms"),
        ({"frame_shift_ms": -1.0}, "frame_shift_ms"),
        ({"preemphasis": 1.5}, "preemphasis"),
        ({"window": "blackmann"}, "window"),
        ({"dither": -0.1}, "dither"),
        ({"low_freq": 8000.0}, "low_freq"),
        ({"high_freq": 9000.0}, "high_freq"),
        ({"high_freq": -7990.0}, "high_freq"),
        ({"energy_floor": -1.0}, "energy_floor"),
    ],
)
def test_config_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        FbankConfig(**kwargs)


def test_bad_waveform_rank() -> None:
    with pytest.raises(ValueError, match="waveform"):
        kaldi_fbank(torch.zeros(1, 2, 16000))


def test_read_wav_downmixes_stereo_and_round_trips(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    pcm = torch.randint(-32768, 32768, (2, 1000), generator=g, dtype=torch.int16)
    sf.write(tmp_path / "stereo.wav", pcm.T.numpy(), 8000, subtype="PCM_16")
    audio, sr = read_wav(tmp_path / "stereo.wav")
    assert sr == 8000 and audio.shape == (1000,) and audio.dtype == torch.float32
    torch.testing.assert_close(audio, pcm.float().mean(dim=0) / 32768.0, rtol=0, atol=0)

    write_wav(tmp_path / "mono.wav", audio, sr)
    again, _ = read_wav(tmp_path / "mono.wav")
    assert again.abs().max() <= 1.0
    # Averaging two int16 channels can land on a half step; everything else survives unchanged.
    assert (again - audio).abs().max() <= 0.5 / 32768.0


def test_normalize_fbank() -> None:
    feats = torch.tensor([[-4.0, 5.0]])
    torch.testing.assert_close(normalize_fbank(feats, -4.0, 4.5), torch.tensor([[0.0, 1.0]]))
    plain = normalize_fbank(feats, 1.0, 5.0, std_multiplier=1.0)
    torch.testing.assert_close(plain, torch.tensor([[-1.0, 0.8]]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(wav_int16: torch.Tensor) -> None:
    config = FbankConfig()
    cpu = kaldi_fbank(wav_int16, config)
    gpu = kaldi_fbank(wav_int16.cuda(), config)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-3)
