"""Band-limited resampling of audio in torch: windowed-sinc interpolation over the rate ratio's polyphase
structure (Smith, "Digital Audio Resampling", CCRMA; the algorithm of ``torchaudio.functional.resample`` with
its default Hann window, which torchaudio's missing CPU build keeps us from calling).

For rates ``orig = g * p`` and ``new = g * q`` (``g`` their gcd) the output repeats every ``q`` samples
against every ``p`` input samples, so ``q`` fixed filters, applied as one strided ``conv1d``, compute it all.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=16)
def _kernels(orig: int, new: int, width: int, lowpass_filter_width: int, rolloff: float,
             dtype: torch.dtype) -> torch.Tensor:
    """``[new, 1, 2 * width + orig]``: output phase ``j``'s filter taps over the padded input window."""
    cutoff = min(orig, new) * rolloff  # in units where the output rate is `new`: below both Nyquists
    taps = torch.arange(-width, width + orig, dtype=torch.float64) / orig  # input times, in output periods
    t = (-torch.arange(new, dtype=torch.float64)[:, None] / new + taps) * cutoff  # [new, 2w + orig]
    t = t.clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2  # Hann, zero at +-lowpass_filter_width
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    return (sinc * window * cutoff / orig)[:, None].to(dtype)


def resample(waveform: torch.Tensor, orig_rate: int, new_rate: int, *, lowpass_filter_width: int = 6,
             rolloff: float = 0.99) -> torch.Tensor:
    """``[..., samples]`` at ``orig_rate`` -> ``[..., ceil(samples * new_rate / orig_rate)]`` at ``new_rate``.

    A low-pass at ``rolloff`` times the lower Nyquist frequency removes what the new rate cannot hold
    (no aliasing when downsampling); ``lowpass_filter_width`` zero crossings of the sinc on each side trade
    sharpness for cost. The signal is taken as zero outside its ends.
    """
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} and {new_rate}")
    if orig_rate == new_rate:
        return waveform
    g = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // g, new_rate // g
    width = math.ceil(lowpass_filter_width * orig / (min(orig, new) * rolloff))
    dtype = torch.float64 if waveform.dtype == torch.float64 else torch.float32
    kernels = _kernels(orig, new, width, lowpass_filter_width, rolloff, dtype).to(waveform.device)
    shape, length = waveform.shape[:-1], waveform.shape[-1]
    x = F.pad(waveform.to(dtype).reshape(-1, 1, length), (width, width + orig))  # [B, 1, L + 2w + orig]
    y = F.conv1d(x, kernels, stride=orig)  # [B, new, blocks]: phase j of block b is output b * new + j
    y = y.transpose(1, 2).reshape(-1, y.shape[1] * y.shape[2])  # [B, new * blocks]
    return y[:, : math.ceil(new * length / orig)].reshape(*shape, -1)
