"""Image transforms on batched uint8 tensors (torch only: torchvision has no build for this CPU torch).

Flips and colour jitter are deliberately absent: in the built-in world (and in much real data) captions say
"on the left" and "red", so those augmentations would teach the model to ignore what the text says.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# CLIP's pixel statistics; any fixed normalisation works for from-scratch training, these make a later
# switch to pretrained CLIP-style towers painless.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` uint8 -> float32, scaled to [0, 1] and standardised per channel."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def random_translate(images: torch.Tensor, max_shift: int, generator: torch.Generator, offset: int = 0,
                     total: int | None = None) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y (edge padding), one offset per image.

    ``images`` may be rows ``offset .. offset + B`` of a batch of ``total`` images whose shifts ``generator``
    draws: a rank's share of the global batch then gets the very shifts one process gives those rows.
    """
    if max_shift <= 0:
        return images
    b, _, h, w = images.shape
    shifts = torch.randint(0, 2 * max_shift + 1, (total or b, 2), generator=generator)[offset : offset + b]
    padded = F.pad(images.float(), (max_shift,) * 4, mode="replicate")
    rows = torch.arange(h).view(1, h, 1) + shifts[:, 0].view(b, 1, 1)  # [B, H, 1]
    cols = torch.arange(w).view(1, 1, w) + shifts[:, 1].view(b, 1, 1)  # [B, 1, W]
    batch = torch.arange(b).view(b, 1, 1)
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols]  # [B, H, W, 3]
    return out.permute(0, 3, 1, 2).to(images.dtype)
