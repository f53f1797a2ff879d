"""Windowed-sinc resampling: the strided polyphase computation equals the textbook sum, tones survive,
content above the new Nyquist frequency does not."""

from __future__ import annotations

import math

import pytest
import torch

from counterpoint.data.resample import resample

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_force(x: torch.Tensor, orig_rate: int, new_rate: int, zeros: int = 6, rolloff: float = 0.99) -> torch.Tensor:
    """``y[m] = sum_i x[i] (c / p) sinc(c (i / p - m / q)) hann(...)`` with ``p : q`` the reduced rates."""
    g = math.gcd(orig_rate, new_rate)
    p, q = orig_rate // g, new_rate // g
    c = min(p, q) * rolloff
    i = torch.arange(x.numel(), dtype=torch.float64)
    out = []
    for m in range(math.ceil(x.numel() * q / p)):
        u = c * (i / p - m / q)
        inside = u.abs() <= zeros
        sinc = torch.where(u == 0, torch.ones_like(u), torch.sin(math.pi * u) / (math.pi * u))
        w = torch.cos(math.pi * u / (2 * zeros)) ** 2
        out.append((x * sinc * w * inside).sum() * c / p)
    return torch.stack(out)


@pytest.mark.parametrize(("orig", "new"), [(44100, 16000), (48000, 16000), (8000, 16000), (16000, 22050)])
def test_equals_the_textbook_sum(orig: int, new: int) -> None:
    x = torch.randn(300, generator=torch.Generator().manual_seed(orig), dtype=torch.float64)
    y = resample(x, orig, new)
    assert y.shape == (math.ceil(300 * new / orig),)
    torch.testing.assert_close(y, brute_force(x, orig, new), rtol=0, atol=1e-12)


def _tones(rate: int, seconds: float, freqs: tuple[float, ...], n: int | None = None) -> torch.Tensor:
    t = torch.arange(n or int(seconds * rate), dtype=torch.float64) / rate
    return sum(torch.sin(2 * math.pi * f * t + 0.3 * k) for k, f in enumerate(freqs))


@pytest.mark.parametrize(("orig", "freqs"), [(44100, (440.0, 1000.0, 3100.0)), (48000, (440.0, 1000.0, 3100.0)),
                                             (22050, (440.0, 1000.0, 3100.0)), (8000, (300.0, 1200.0))])
def test_tones_below_the_cutoff_survive(orig: int, freqs: tuple[float, ...]) -> None:
    y = resample(_tones(orig, 0.5, freqs), orig, 16000)
    ref = _tones(16000, 0.5, freqs, n=y.numel())
    inner = slice(800, -800)  # 50 ms from each end, where the zero padding no longer reaches
    assert (y - ref)[inner].abs().max() < 5e-3  # out of an amplitude of up to 3


def test_content_above_the_new_nyquist_is_removed() -> None:
    tone = _tones(44100, 0.5, (9500.0,))  # above 8 kHz: would alias to 6.5 kHz
    y = resample(tone, 44100, 16000)[800:-800]
    assert y.pow(2).mean().sqrt() < 0.1 * tone.pow(2).mean().sqrt()  # at least 20 dB down


def test_shapes_dtypes_and_identity() -> None:
    x = torch.randn(2, 3, 441, generator=torch.Generator().manual_seed(0))
    y = resample(x, 44100, 16000)
    assert y.shape == (2, 3, 160) and y.dtype == torch.float32
    torch.testing.assert_close(y[1, 2], resample(x[1, 2], 44100, 16000))
    assert resample(x, 16000, 16000) is x
    with pytest.raises(ValueError, match="must be positive"):
        resample(x, 0, 16000)
