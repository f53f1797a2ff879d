"""Imagination: what a text (or a direction of the embedding space) means to a trained model, as a picture.

BriVL's network visualisation (Fei et al., Nature Communications 2022) in the form the feature-visualisation
literature settled on (Olah et al., "Feature Visualization", Distill 2017; the lucid / lucent libraries):
freeze the model, embed the text, and optimise an image so that the image tower's embedding of it has
maximal cosine similarity with the text's. Two things keep the result a picture rather than adversarial
noise:

* **Parameterisation**: the image is a Fourier spectrum, each frequency scaled by ``1 / f**decay`` (so
  optimisation moves low frequencies first), turned into pixels by an orthonormal inverse real FFT, with
  colours drawn from a decorrelated basis (the square root of ImageNet's colour covariance), then a sigmoid.
* **Robustness**: every step scores several randomly transformed copies (pad, jitter, scale, rotate, jitter),
  so only features that survive small geometric changes are rewarded.

Deterministic from a seed (initial spectrum and every transform come from one generator).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from counterpoint.data.transforms import MEAN, STD

# lucid's colour correlation matrix (the square root of ImageNet's colour covariance), normalised by its
# largest column norm: unit steps in this basis are natural colour changes.
_COLOR_CORRELATION = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
COLOR = _COLOR_CORRELATION / _COLOR_CORRELATION.norm(dim=0).max()


class FourierImage(nn.Module):
    """``n`` images of ``size x size`` pixels in [0, 1], parameterised by a scaled, decorrelated spectrum."""

    def __init__(self, n: int, size: int, generator: torch.Generator, decay: float = 1.0, sd: float = 0.01,
                 fourier: bool = True) -> None:
        super().__init__()
        self.size, self.fourier = size, fourier
        if fourier:
            fy = torch.fft.fftfreq(size).view(-1, 1)
            fx = torch.fft.rfftfreq(size).view(1, -1)
            freq = torch.sqrt(fx**2 + fy**2)  # [size, size // 2 + 1]
            self.register_buffer("scale", 1.0 / torch.clamp(freq, min=1.0 / size) ** decay)
            shape = (n, 3, size, size // 2 + 1, 2)  # real and imaginary parts
        else:  # the ablation: raw (pre-sigmoid) pixels
            shape = (n, 3, size, size)
        self.spectrum = nn.Parameter(torch.randn(shape, generator=generator) * sd)

    def forward(self) -> torch.Tensor:
        """``[n, 3, size, size]`` in [0, 1]."""
        if self.fourier:
            spectrum = torch.view_as_complex(self.spectrum) * self.scale
            x = torch.fft.irfft2(spectrum, s=(self.size, self.size), norm="ortho") / 4.0
        else:
            x = self.spectrum
        x = torch.einsum("nchw,dc->ndhw", x, COLOR.to(x))  # decorrelated -> RGB
        return torch.sigmoid(x)


def robust_copies(images: torch.Tensor, copies: int, generator: torch.Generator, pad: int = 12,
                  jitter: int = 8, scales: Sequence[float] = tuple(0.9 + 0.02 * i for i in range(11)),
                  angles: Sequence[float] = (*range(-10, 11), 0, 0, 0, 0, 0), jitter_after: int = 4) -> torch.Tensor:
    """``copies`` transformed versions of each image, ``[copies * n, 3, H, W]``: pad (grey 0.5), jitter, random
    scale and rotation (0 degrees over-weighted), jitter again, crop back to ``H x W`` (lucid's standard
    transforms, sized for 32-64 px by the caller)."""
    n, c, h, w = images.shape
    x = images.repeat(copies, 1, 1, 1)
    b = x.shape[0]
    x = F.pad(x, (pad, pad, pad, pad), value=0.5)
    size = x.shape[-1]

    def draw(options: Sequence[float]) -> torch.Tensor:
        return torch.tensor(options)[torch.randint(len(options), (b,), generator=generator)]

    scale = draw(list(scales))
    angle = draw([float(a) for a in angles]) * math.pi / 180
    shift = (torch.randint(-jitter, jitter + 1, (b, 2), generator=generator)
             + torch.randint(-jitter_after, jitter_after + 1, (b, 2), generator=generator)).float()
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    theta[:, :, 2] = 2 * shift / size  # pixels -> normalised coordinates
    grid = F.affine_grid(theta.to(x), (b, c, size, size), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    top, left = (size - h) // 2, (size - w) // 2
    return x[:, :, top : top + h, left : left + w]


def transform_sizes(size: int) -> dict[str, int]:
    """The published pad / jitter (12 / 8 / 4 px, set for 128-224 px images) scaled to ``size``: at 32 px a
    jitter of 8 would move a 4-pixel object off itself."""
    ratio = size / 96
    return {"pad": max(1, round(12 * ratio)), "jitter": max(1, round(8 * ratio)),
            "jitter_after": max(1, round(4 * ratio))}


def _normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def imagine(model: nn.Module, targets: torch.Tensor, steps: int = 500, lr: float = 0.05, copies: int = 4,
            seed: int = 0, fourier: bool = True, decay: float = 1.0, progress: bool = False,
            desc: str = "imagine") -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose embedding points along each row of ``targets`` ``[P, D]`` (unit text embeddings, a
    direction, or a unit vector ``e_k`` for one embedding unit).

    Returns ``(images, cosine)``: ``[P, 3, S, S]`` uint8 (``S`` = the model's image size) and the final cosine
    of each image's (untransformed) embedding with its target. The model is used frozen in eval mode; its
    ``encode_image`` takes normalised pixels.
    """
    was_training = model.training
    model.eval()
    device = targets.device
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    size = int(model.image_size)
    image = FourierImage(targets.shape[0], size, gen, decay=decay, fourier=fourier).to(device)
    target = F.normalize(targets.float(), dim=-1).repeat(copies, 1)  # [copies * P, D]
    optimizer = torch.optim.Adam(image.parameters(), lr=lr)
    try:
        for _ in tqdm(range(steps), desc=desc, unit=" step", disable=not progress, leave=False):
            optimizer.zero_grad(set_to_none=True)
            views = robust_copies(image(), copies, gen, **transform_sizes(size))
            emb = model.encode_image(_normalise(views))
            loss = -F.cosine_similarity(emb, target, dim=-1).mean()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            final = image()
            cosine = F.cosine_similarity(model.encode_image(_normalise(final)), target[: targets.shape[0]], dim=-1)
    finally:
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)
    return (final * 255).round().clamp(0, 255).to(torch.uint8).cpu(), cosine.cpu()


@torch.no_grad()
def text_targets(model: nn.Module, tokenizer: object, texts: Sequence[str]) -> torch.Tensor:
    """Unit text embeddings ``[P, D]`` of ``texts`` (the targets of :func:`imagine`)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    emb = model.encode_text(tokenizer(list(texts)).to(device))
    model.train(was_training)
    return emb
