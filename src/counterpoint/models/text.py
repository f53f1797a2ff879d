"""Transformer text tower (CLIP layout, Radford et al. 2021): token + position embeddings, pre-norm blocks,
final norm, pooled at ``<eot>`` (causal mask, as CLIP) or by the mean over non-pad tokens (bidirectional),
then a linear projection."""

from __future__ import annotations

import torch
from torch import nn

from counterpoint.models.layers import Packing, Transformer, init_transformer


class TextTransformer(nn.Module):
    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int, heads: int,
                 embed_dim: int, pool: str = "eot", pad_id: int = 0, eot_id: int = 2) -> None:
        super().__init__()
        if pool not in ("eot", "mean"):
            raise ValueError(f"pool must be 'eot' or 'mean', got {pool!r}")
        self.pool = pool
        self.pad_id = pad_id
        self.eot_id = eot_id
        self.context_length = context_length
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, context_length, width))
        self.transformer = Transformer(width, layers, heads)
        self.ln_final = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        init_transformer(self, layers)

    def _packed_states(self, tokens: torch.Tensor) -> tuple[torch.Tensor, Packing]:
        """The blocks' output at the real tokens, ``[T, width]`` (before the final norm), and their packing.

        Padding never influences a real token (causal: it comes after ``<eot>``; mean pool: it is masked out
        as a key), so the blocks run on the packed real tokens only (see ``Packing``)."""
        keep = tokens != self.pad_id  # [B, L]
        packing = Packing.from_mask(keep)
        # Embed the padded batch, then pack: embedding only the packed ids (and indexing pos_embed by position)
        # made the backward's scatter-add differ run to run on CPU, which breaks bit-exact resume.
        x = packing.pack(self.token_embed(tokens) + self.pos_embed[:, : tokens.shape[1]])  # [T, width]
        if self.pool == "eot":
            # Causal: position t sees only <= t, so the <eot> token summarises the whole text (as CLIP).
            return self.transformer(x, causal=True, packing=packing), packing
        return self.transformer(x, mask=keep[:, None, None, :], packing=packing), packing

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` ids -> ``[B, L, width]`` after the final norm (zeros at padding)."""
        x, packing = self._packed_states(tokens)
        return packing.pad(self.ln_final(x))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pool == "eot":
            # Only the <eot> rows are needed: pick them from the packed states and normalise just those (the
            # final norm is per token), rather than normalising and padding every token first.
            x, packing = self._packed_states(tokens)
            flat = (torch.arange(tokens.shape[0], device=tokens.device) * tokens.shape[1]
                    + (tokens == self.eot_id).int().argmax(dim=1))  # [B] flat position of each <eot>
            real = (tokens != self.pad_id).flatten()[flat]  # False only for a text with no <eot> and a pad there
            rows = torch.searchsorted(packing.index, flat).clamp_max(packing.index.shape[0] - 1)
            pooled = self.ln_final(x.index_select(0, rows)) * real.unsqueeze(1).to(x.dtype)
        else:
            x = self.forward_tokens(tokens)
            keep = (tokens != self.pad_id).unsqueeze(-1).to(x.dtype)
            pooled = (x * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        return self.proj(pooled)
