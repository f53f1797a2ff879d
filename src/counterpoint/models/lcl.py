"""The model of Latent Compression Learning (Yang et al., "Vision Model Pre-training on Interleaved Image-Text
Data via Latent Compression Learning", NeurIPS 2024): a ViT, an attentive-pooling head and a causal
transformer that reads interleaved documents.

* The ViT (without a projection) gives ``1 + P`` tokens per image (class token and patches).
* :class:`AttentivePool`: one learnable query attends over them and gives the image's latent ``z``; the same
  value and output projections applied to each token alone give the image tokens the causal model reads, so
  the latent is, per head, an attention-weighted mean of what the causal model sees.
* :class:`CausalLM`: a decoder-only transformer over ``<sot> text <boi> <img>... <eoi> text ... <eot>``; the
  ``<img>`` slots are replaced by the image tokens.

The vision tower (``visual`` + ``pool``) is separable: the causal model is only needed in pretraining and for
the evaluations that go through it (zero-shot and retrieval read the causal state at ``<boi>`` after a text:
"which image comes next").
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from counterpoint.models.layers import Packing, Transformer, init_transformer
from counterpoint.models.vit import VisionTransformer


class AttentivePool(nn.Module):
    """Multi-head attention of one learnable query over ``[M, T, C_in]`` tokens: returns the pooled latent
    ``[M, D]`` and the per-token values through the output projection ``[M, T, D]`` (LCL's image tokens)."""

    def __init__(self, in_width: int, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.query = nn.Parameter(torch.randn(width) * 0.02)
        self.key = nn.Linear(in_width, width)
        self.value = nn.Linear(in_width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, t, _ = x.shape
        dh = self.query.shape[0] // self.heads
        k = self.key(x).view(m, t, self.heads, dh)
        v = self.value(x)
        scores = torch.einsum("mthd,hd->mht", k, self.query.view(self.heads, dh)) / math.sqrt(dh)
        pooled = torch.einsum("mht,mthd->mhd", scores.softmax(dim=-1), v.view(m, t, self.heads, dh))
        return self.out(pooled.reshape(m, -1)), self.out(v)


class CausalLM(nn.Module):
    """Decoder-only transformer (GPT-2 layout) whose output head shares the token embedding."""

    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.context_length = context_length
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, context_length, width))
        self.transformer = Transformer(width, layers, heads)
        self.ln_final = nn.LayerNorm(width)
        init_transformer(self, layers)

    def forward(self, tokens: torch.Tensor, pad_id: int, image_tokens: torch.Tensor | None = None,
                slots: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, L]`` ids -> ``[B, L, D]`` final states (zeros at padding). ``image_tokens`` ``[M, N, D]`` replace
        the embeddings at the flat positions ``slots`` ``[M * N]``. Causal, so padding at the end never reaches
        a real token, and the blocks run on the real tokens only (``Packing``)."""
        b, length = tokens.shape
        embeds = self.token_embed(tokens)
        if image_tokens is not None:
            flat = embeds.reshape(b * length, -1).index_copy(0, slots, image_tokens.flatten(0, 1).to(embeds.dtype))
            embeds = flat.view(b, length, -1)
        packing = Packing.from_mask(tokens != pad_id)
        x = packing.pack(embeds + self.pos_embed[:, :length])
        return packing.pad(self.ln_final(self.transformer(x, causal=True, packing=packing)))

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        return states @ self.token_embed.weight.T


class LCLModel(nn.Module):
    """Vision tower, pooling head and causal model; ``token_ids`` names ``<pad> <eot> <boi> <eoi> <img>``.

    ``contrastive`` / ``regression`` add the heads those losses need (a head no loss reaches would be a
    parameter without gradient, which DDP refuses)."""

    def __init__(self, visual: VisionTransformer, causal: CausalLM, heads: int, token_ids: Mapping[str, int],
                 contrastive: bool = True, regression: bool = False, init_temperature: float = 0.07) -> None:
        super().__init__()
        width = causal.token_embed.embedding_dim
        self.visual = visual
        self.pool = AttentivePool(visual.ln_post.normalized_shape[0], width, heads)
        self.causal = causal
        self.pad_id, self.eot_id = token_ids["<pad>"], token_ids["<eot>"]
        self.boi_id, self.eoi_id, self.img_id = token_ids["<boi>"], token_ids["<eoi>"], token_ids["<img>"]
        self.context_proj = nn.Linear(width, width, bias=False) if contrastive else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature))) if contrastive else None
        self.regression_head = nn.Linear(width, width) if regression else None

    @property
    def image_size(self) -> int:
        return self.visual.image_size

    @property
    def image_tokens(self) -> int:
        """Slots one image takes in a sequence (class token + patches)."""
        return self.visual.pos_embed.shape[1]

    def image_latents(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[M, 3, S, S]`` normalised pixels -> latents ``[M, D]`` and image tokens ``[M, 1 + P, D]``."""
        return self.pool(self.visual.forward_tokens(images))

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        z, _ = self.image_latents(images)
        return F.normalize(z, dim=-1) if normalize else z

    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The ViT's tokens ``[M, 1 + P, C]`` before LCL's pooling: what an attentive probe reads."""
        return self.visual.forward_tokens(images)

    def context_embedding(self, states: torch.Tensor) -> torch.Tensor:
        """The contrastive side of the causal state at ``<boi>`` (projected when the model has the head)."""
        return self.context_proj(states) if self.context_proj is not None else states

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """``<sot> text <eot>`` ids -> the causal state at a ``<boi>`` put where ``<eot>`` was: what the model
        expects the next image to be, in the latent space."""
        tokens = tokens[:, : int((tokens != self.pad_id).sum(dim=1).max())]  # causal: trailing pads change nothing
        tokens = torch.where(tokens == self.eot_id, self.boi_id, tokens)
        states = self.causal(tokens, self.pad_id)
        at = (tokens == self.boi_id).int().argmax(dim=1)
        c = self.context_embedding(states[torch.arange(len(tokens), device=tokens.device), at])
        return F.normalize(c, dim=-1) if normalize else c

    def sequence_states(self, tokens: torch.Tensor, images: torch.Tensor,
                        boi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final states ``[B, L, D]`` of interleaved sequences and the latents ``[M, D]`` of their images.
        ``boi``: flat position (``row * L + column``) of each image's ``<boi>``; its tokens fill the slots after."""
        z, image_tokens = self.image_latents(images)
        slots = (boi[:, None] + 1 + torch.arange(image_tokens.shape[1], device=boi.device)).flatten()
        return self.causal(tokens, self.pad_id, image_tokens, slots), z

    @torch.no_grad()
    def clamp_logit_scale(self, max_scale: float) -> None:
        if self.logit_scale is not None:
            self.logit_scale.clamp_(0.0, math.log(max_scale))
