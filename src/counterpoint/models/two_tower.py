"""Two-tower image-text model (CLIP, Radford et al. 2021): an image tower and a text tower projecting to one
joint space, plus the learnable log logit scale (temperature) and, for SigLIP, a learnable logit bias."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from counterpoint.models.layers import set_grad_checkpointing


class TwoTower(nn.Module):
    def __init__(self, image_tower: nn.Module, text_tower: nn.Module, init_temperature: float = 0.07,
                 init_logit_bias: float | None = None) -> None:
        super().__init__()
        self.visual = image_tower
        self.text = text_tower
        # Stored as log(1/T), so the optimiser moves the temperature multiplicatively (CLIP's choice).
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.logit_bias = nn.Parameter(torch.tensor(init_logit_bias)) if init_logit_bias is not None else None

    @property
    def image_size(self) -> int:
        return self.visual.image_size

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """``[B, 3, S, S]`` normalised pixels -> ``[B, D]`` embeddings (unit length if ``normalize``)."""
        z = self.visual(images)
        return F.normalize(z, dim=-1) if normalize else z

    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The image tower's tokens before pooling, ``[B, T, C]`` (ViT: class and patch tokens; CNN: the last
        feature map's positions): what an attentive probe reads."""
        return self.visual.forward_tokens(images)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """``[B, L]`` token ids -> ``[B, D]`` embeddings (unit length if ``normalize``)."""
        z = self.text(tokens)
        return F.normalize(z, dim=-1) if normalize else z

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"image": self.encode_image(images), "text": self.encode_text(tokens),
                "logit_scale": self.logit_scale}

    def set_grad_checkpointing(self, enabled: bool = True) -> int:
        """See :func:`counterpoint.models.layers.set_grad_checkpointing`; returns how many stacks it applies to."""
        return set_grad_checkpointing(self, enabled)

    @torch.no_grad()
    def clamp_logit_scale(self, max_scale: float) -> None:
        """CLIP clamps the scale to at most 100 after every step so training cannot make the softmax
        arbitrarily sharp."""
        self.logit_scale.clamp_(0.0, math.log(max_scale))
