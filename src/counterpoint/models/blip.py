"""BLIP's multimodal mixture of encoder-decoder (Li et al., "BLIP: Bootstrapping Language-Image Pre-training
for Unified Vision-Language Understanding and Generation", ICML 2022), pre-norm.

One ViT and one text transformer that runs in three modes:

* ``text``: the unimodal text encoder (bidirectional self-attention, no image), pooled at position 0: ITC;
* ``match``: the image-grounded text encoder (bidirectional self-attention + cross-attention to the image
  tokens), ``<enc>`` at position 0, a 2-way head on it: ITM;
* ``caption``: the image-grounded decoder (*causal* self-attention + the same cross-attention and MLP),
  ``<dec>`` at position 0, next-token logits through the tied embedding: LM.

Encoder and decoder share everything but self-attention (each block holds an encoder and a decoder
self-attention), as in the paper: the encoding and decoding tasks pull self-attention apart most. Decoding
keeps a KV cache (:class:`DecoderCache`): the image's cross-attention keys and values are computed once, and
every step appends one position to each layer's self-attention keys and values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from counterpoint.models.layers import MLP, init_transformer
from counterpoint.models.vit import VisionTransformer

MODES = ("text", "match", "caption")


@dataclass
class DecoderCache:
    """Per layer: self-attention keys/values of the positions decoded so far ``[B, H, T, Dh]`` and the
    cross-attention keys/values of the image tokens (computed on the first call)."""

    self_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)
    cross_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)

    @property
    def length(self) -> int:
        first = self.self_kv[0] if self.self_kv else None
        return 0 if first is None else first[0].shape[2]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep (and repeat) the cached rows ``rows`` (beam search follows its surviving beams)."""
        for store in (self.self_kv, self.cross_kv):
            for i, kv in enumerate(store):
                if kv is not None:
                    store[i] = (kv[0].index_select(0, rows), kv[1].index_select(0, rows))


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)  # [B, H, N, Dh]


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None, causal: bool = False,
                cache: DecoderCache | None = None, layer: int = 0) -> torch.Tensor:
        """``key_mask`` ``[B, N]`` True at keys that may be attended to; with ``cache`` the new positions are
        appended to the layer's cached keys and values (causal: a position sees the cache and itself)."""
        q, k, v = (_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        if cache is not None:
            past = cache.self_kv[layer]
            if past is not None:
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
            cache.self_kv[layer] = (k, v)
        mask = key_mask[:, None, None, :] if key_mask is not None else None
        new, total = q.shape[2], k.shape[2]
        if causal and new > 1:  # a prefill, or a whole sequence: position i sees keys up to (total - new) + i
            allowed = torch.ones(new, total, dtype=torch.bool, device=x.device).tril(total - new)
            mask = allowed if mask is None else mask & allowed
        return self.proj(_merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))


class CrossAttention(nn.Module):
    """Text queries over the image tokens (which may be wider than the text)."""

    def __init__(self, width: int, memory_width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(memory_width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, cache: DecoderCache | None = None,
                layer: int = 0) -> torch.Tensor:
        kv = cache.cross_kv[layer] if cache is not None else None
        if kv is None:
            kv = tuple(_heads(t, self.heads) for t in self.kv(memory).chunk(2, dim=-1))
            if cache is not None:
                cache.cross_kv[layer] = kv
        q = _heads(self.q(x), self.heads)
        return self.proj(_merge(F.scaled_dot_product_attention(q, kv[0], kv[1])))


class BLIPTextBlock(nn.Module):
    """Pre-norm block with an encoder and a decoder self-attention, a shared cross-attention and MLP."""

    def __init__(self, width: int, heads: int, memory_width: int) -> None:
        super().__init__()
        self.ln_enc, self.attn_enc = nn.LayerNorm(width), SelfAttention(width, heads)
        self.ln_dec, self.attn_dec = nn.LayerNorm(width), SelfAttention(width, heads)
        self.ln_cross, self.cross = nn.LayerNorm(width), CrossAttention(width, memory_width, heads)
        self.ln_mlp, self.mlp = nn.LayerNorm(width), MLP(width)

    def forward(self, x: torch.Tensor, mode: str, memory: torch.Tensor | None, key_mask: torch.Tensor | None,
                cache: DecoderCache | None = None, layer: int = 0) -> torch.Tensor:
        if mode == "caption":
            x = x + self.attn_dec(self.ln_dec(x), key_mask, causal=True, cache=cache, layer=layer)
        else:
            x = x + self.attn_enc(self.ln_enc(x), key_mask)
        if mode != "text":
            x = x + self.cross(self.ln_cross(x), memory, cache, layer)
        return x + self.mlp(self.ln_mlp(x))


class BLIPText(nn.Module):
    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int, heads: int,
                 memory_width: int) -> None:
        super().__init__()
        self.context_length = context_length
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, context_length, width))
        self.blocks = nn.ModuleList(BLIPTextBlock(width, heads, memory_width) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.grad_checkpointing = False  # see models.layers.set_grad_checkpointing
        init_transformer(self, layers)

    def forward(self, tokens: torch.Tensor, mode: str, memory: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, cache: DecoderCache | None = None) -> torch.Tensor:
        """``[B, L]`` ids -> ``[B, L, width]`` final states. With ``cache`` (caption mode) ``tokens`` are the
        positions after the cached ones."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        start = cache.length if cache is not None else 0
        if cache is not None and not cache.self_kv:
            cache.self_kv = [None] * len(self.blocks)
            cache.cross_kv = [None] * len(self.blocks)
        x = self.token_embed(tokens) + self.pos_embed[:, start : start + tokens.shape[1]]
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, mode, memory, key_mask, use_reentrant=False)
            else:
                x = block(x, mode, memory, key_mask, cache, i)
        return self.ln_final(x)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        return states @ self.token_embed.weight.T


class BLIPModel(nn.Module):
    """ViT + the three-mode text transformer + ITC projections, ITM head and temperature. ``token_ids``
    names ``<pad> <sot> <eot> <enc> <dec>``; ``<sot>`` is the unimodal encoder's first token (BERT's [CLS]);
    ``prompt_ids``: the tokens every caption starts with (given to the decoder, not generated)."""

    def __init__(self, visual: VisionTransformer, text: BLIPText, embed_dim: int, token_ids: Mapping[str, int],
                 init_temperature: float = 0.07, prompt_ids: list[int] | None = None) -> None:
        super().__init__()
        vision_width = visual.ln_post.normalized_shape[0]
        width = text.token_embed.embedding_dim
        self.visual, self.text = visual, text
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(width, embed_dim)
        self.itm_head = nn.Linear(width, 2)
        # The temperature is learned as its log (as CLIP learns its scale), clamped to log [0.001, 0.5] after every
        # step. BLIP learns the temperature itself, but under Adam a parameter moves by about the learning rate
        # per step whatever its size: at lr 1e-3 a raw 0.07 fell to 0.003 within 140 steps on the world, where
        # the ITC loss stalls. In log space a step changes it by ~0.1%.
        self.log_temperature = nn.Parameter(torch.tensor(init_temperature).log())
        self.pad_id, self.sot_id, self.eot_id = token_ids["<pad>"], token_ids["<sot>"], token_ids["<eot>"]
        self.enc_id, self.dec_id = token_ids["<enc>"], token_ids["<dec>"]
        self.prompt_ids = list(prompt_ids or [])  # what captions start with ("a picture of"), tokenised

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    @property
    def image_size(self) -> int:
        return self.visual.image_size

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> the ViT's tokens ``[B, 1 + P, C]`` (what the text cross-attends to)."""
        return self.visual.forward_tokens(images)

    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_tokens(images)

    def image_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Unit ITC features of images from their tokens (the class token, projected)."""
        return F.normalize(self.vision_proj(tokens[:, 0]), dim=-1)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        z = self.vision_proj(self.image_tokens(images)[:, 0])
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """``<sot> text <eot>`` ids -> ITC features (the unimodal encoder's state at ``<sot>``, projected)."""
        z = self.text_proj(self.text(tokens, "text", key_mask=tokens != self.pad_id)[:, 0])
        return F.normalize(z, dim=-1) if normalize else z

    def match_logits(self, image_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, 2]`` ITM logits (column 1: the text matches the image) of aligned image tokens and texts."""
        tokens = torch.cat([torch.full_like(tokens[:, :1], self.enc_id), tokens[:, 1:]], dim=1)
        states = self.text(tokens, "match", image_tokens, key_mask=tokens != self.pad_id)
        return self.itm_head(states[:, 0])

    def caption_logits(self, image_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, L, V]`` next-token logits of the decoder over ``<dec> text <eot>`` (``<sot>`` is replaced)."""
        tokens = torch.cat([torch.full_like(tokens[:, :1], self.dec_id), tokens[:, 1:]], dim=1)
        return self.text.logits(self.text(tokens, "caption", image_tokens))
