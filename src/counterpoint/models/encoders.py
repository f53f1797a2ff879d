"""One encoder per modality for multimodal classifiers, built from what a sample of the modality looks like.

The layout is read from one example of the ``ModalDataset`` contract (``counterpoint.data.multimodal``):

* int64 ``[L]``            -> ``tokens``:      a text transformer (mean-pooled over non-pad tokens);
* float ``[T, F]``         -> ``spectrogram``: a 1-channel image for a ResNet-style CNN or a ViT on patches
  (the AST recipe, Gong et al., Interspeech 2021);
* ``[C, H, W]``, C 1 or 3  -> ``image``;
* ``[K, C, H, W]``         -> ``frames``: every frame through the same image tower, features averaged over
  the K frames (the late temporal pooling of OGM-GE's visual encoder, Peng et al., CVPR 2022).

Inputs are standardised inside the encoder with dataset statistics held as buffers, so a saved model needs
nothing else to run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from counterpoint.models.cnn import ResNetTower
from counterpoint.models.text import TextTransformer
from counterpoint.models.vit import VisionTransformer

Layout = Literal["tokens", "spectrogram", "image", "frames"]


@dataclass
class EncoderConfig:
    """One modality's tower. ``kind="auto"``: ``text`` for token ids, ``cnn`` otherwise."""

    kind: Literal["auto", "cnn", "vit", "text"] = "auto"
    widths: tuple[int, ...] = field(default=(16, 32))  # cnn: channels per stage
    depths: tuple[int, ...] = field(default=(1, 1))  # cnn: residual blocks per stage
    stem_stride: int = 1  # cnn: 2 halves the resolution losslessly at the stem (a quarter of the cost)
    patch: int = 4  # vit: square patch side (spectrograms: time x mel bins)
    width: int = 64  # vit / text: transformer width
    layers: int = 2  # vit / text
    heads: int = 2  # vit / text

    def validate(self, key: str) -> None:
        """Raise ValueError naming ``key`` (the config path of this encoder) on a bad value."""
        if len(self.widths) != len(self.depths) or not self.widths:
            raise ValueError(f"{key}.widths and {key}.depths must be non-empty and of the same length")
        if min(self.widths + self.depths) < 1:
            raise ValueError(f"{key}.widths and {key}.depths must be >= 1")
        if min(self.patch, self.width, self.layers, self.heads, self.stem_stride) < 1:
            raise ValueError(f"{key}.patch, width, layers, heads and stem_stride must be >= 1")
        if self.width % self.heads:
            raise ValueError(f"{key}.width {self.width} is not divisible by {key}.heads {self.heads}")


def input_layout(example: torch.Tensor) -> Layout:
    """The layout of one sample (no batch dimension)."""
    if not example.is_floating_point() and example.dtype != torch.uint8:
        if example.dim() != 1:
            raise ValueError(f"integer inputs must be token ids [L], got a sample of shape {tuple(example.shape)}")
        return "tokens"
    if example.dim() == 2:
        return "spectrogram"
    if example.dim() == 3 and example.shape[0] in (1, 3):
        return "image"
    if example.dim() == 4 and example.shape[1] in (1, 3):
        return "frames"
    raise ValueError(f"cannot encode a sample of shape {tuple(example.shape)} ({example.dtype}); expected token "
                     "ids [L], a spectrogram [T, F], an image [C, H, W] or frames [K, C, H, W] with C = 1 or 3")


class ModalityEncoder(nn.Module):
    """Standardise, fold frames into the batch, run the tower, average frames: ``[B, ...]`` -> ``[B, dim]``."""

    def __init__(self, tower: nn.Module, layout: Layout, mean: float = 0.0, std: float = 1.0) -> None:
        super().__init__()
        self.tower = tower
        self.layout = layout
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "tokens":
            return self.tower(x)
        x = (x.float() - self.mean) / self.std
        if self.layout == "spectrogram":
            return self.tower(x.unsqueeze(1))  # [B, 1, T, F]
        if self.layout == "frames":
            b, k = x.shape[:2]
            return self.tower(x.flatten(0, 1)).view(b, k, -1).mean(dim=1)  # [B*K, D] -> [B, D]
        return self.tower(x)


def build_encoder(cfg: EncoderConfig, train_inputs: torch.Tensor, dim: int, pad_id: int = 0) -> ModalityEncoder:
    """An encoder with output ``[B, dim]`` for a modality whose training inputs are ``train_inputs [N, ...]``
    (used for the layout, the standardisation statistics and, for text, the vocabulary size)."""
    layout = input_layout(train_inputs[0])
    kind = cfg.kind if cfg.kind != "auto" else ("text" if layout == "tokens" else "cnn")
    if (kind == "text") != (layout == "tokens"):
        raise ValueError(f"encoder kind {kind!r} cannot encode {layout} inputs")
    if kind == "text":
        tower = TextTransformer(int(train_inputs.max()) + 1, train_inputs.shape[1], cfg.width, cfg.layers, cfg.heads,
                                dim, pool="mean", pad_id=pad_id)
        return ModalityEncoder(tower, layout)
    channels = 1 if layout == "spectrogram" else int(train_inputs.shape[-3])
    size = tuple(train_inputs.shape[-2:])  # [T, F] or [H, W]
    if kind == "cnn":
        tower = ResNetTower(cfg.widths, cfg.depths, dim, size[0], in_channels=channels, stem_stride=cfg.stem_stride)
    else:
        tower = VisionTransformer(size, cfg.patch, cfg.width, cfg.layers, cfg.heads, dim, pool="mean",
                                  in_channels=channels)
    x = train_inputs.float()
    return ModalityEncoder(tower, layout, x.mean().item(), x.std().clamp_min(1e-6).item())
