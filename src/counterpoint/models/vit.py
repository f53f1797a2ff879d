"""Vision Transformer image tower (Dosovitskiy et al., ICLR 2021), CLIP layout: patch embedding, class token,
pre-norm blocks, final norm, linear projection to the joint embedding space."""

from __future__ import annotations

import torch
from torch import nn

from counterpoint.models.layers import Transformer, init_transformer


class VisionTransformer(nn.Module):
    """``image_size`` may be ``(H, W)`` and ``in_channels`` 1, so the same tower encodes spectrograms
    (AST-style patches of a ``[T, F]`` fbank). ``embed_dim=None`` builds the trunk without the projection, for
    methods that read the tokens (``forward_tokens``, LCL) and would leave a projection unused."""

    def __init__(self, image_size: int | tuple[int, int], patch_size: int, width: int, layers: int, heads: int,
                 embed_dim: int | None, mlp_ratio: float = 4.0, pool: str = "cls", in_channels: int = 3) -> None:
        super().__init__()
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if hw[0] % patch_size or hw[1] % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.image_size = image_size
        self.pool = pool
        patches = (hw[0] // patch_size) * (hw[1] // patch_size)
        self.patch_embed = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, patches + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False) if embed_dim is not None else nn.Identity()
        init_transformer(self, layers)

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, 1 + patches, width]`` after the final norm (patch tokens for LCL etc.)."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, P, W]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.ln_post(self.transformer(self.ln_pre(x)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.forward_tokens(images)
        pooled = x[:, 0] if self.pool == "cls" else x[:, 1:].mean(dim=1)
        return self.proj(pooled)
