"""Multimodal classifier for balanced multimodal learning (METHODS.md section 2).

One encoder per modality (any number >= 2), a fusion module with a fused head giving L_mm, and one
unimodal head per modality giving L_k. A unimodal head sees only its own encoder's features, so L_k reaches
exactly encoder k and head k, which is what lets the gradient combiners get every g_u from one backward.

Fusion of the per-modality features ``f_k [B, D]``:

* ``concat``: ``[f_1, ..., f_M]`` -> ``[B, M*D]`` (the usual late fusion);
* ``sum``: ``sum_k f_k`` -> ``[B, D]``;
* ``film``: the first modality modulated by the others, ``gamma(r) * f_1 + beta(r)`` with ``r`` the
  concatenation of the rest (FiLM, Perez et al., AAAI 2018; OGM-GE's ``x_film`` variant for two);
* ``gating``: gated multimodal unit (Arevalo et al., ICLR-W 2017) generalised to M inputs,
  ``sum_k z_k tanh(W_k f_k)`` with ``z = softmax(W_z [f_1..f_M])``;
* ``attention``: one token per modality (plus a learned modality embedding) through a pre-norm transformer
  block, so every modality's token attends to the others (cross-modal attention), then averaged.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Literal, NamedTuple

import torch
from torch import nn

from counterpoint.models.encoders import EncoderConfig, ModalityEncoder, build_encoder
from counterpoint.models.layers import Block

FusionKind = Literal["concat", "sum", "film", "gating", "attention"]
FUSIONS: tuple[str, ...] = typing.get_args(FusionKind)


class ConcatFusion(nn.Module):
    def __init__(self, dim: int, m: int) -> None:
        super().__init__()
        self.out_dim = dim * m

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(feats, dim=-1)  # [B, M*D]


class SumFusion(nn.Module):
    def __init__(self, dim: int, m: int) -> None:
        super().__init__()
        self.out_dim = dim

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(feats).sum(dim=0)  # [B, D]


class FiLMFusion(nn.Module):
    def __init__(self, dim: int, m: int) -> None:
        super().__init__()
        self.out_dim = dim
        self.film = nn.Linear(dim * (m - 1), 2 * dim)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        gamma, beta = self.film(torch.cat(feats[1:], dim=-1)).chunk(2, dim=-1)  # [B, D] each
        return gamma * feats[0] + beta


class GatedFusion(nn.Module):
    def __init__(self, dim: int, m: int) -> None:
        super().__init__()
        self.out_dim = dim
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(m))
        self.gate = nn.Linear(dim * m, m)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        z = torch.softmax(self.gate(torch.cat(feats, dim=-1)), dim=-1)  # [B, M]
        h = torch.stack([torch.tanh(p(f)) for p, f in zip(self.proj, feats)], dim=1)  # [B, M, D]
        return (z.unsqueeze(-1) * h).sum(dim=1)


class AttentionFusion(nn.Module):
    def __init__(self, dim: int, m: int, heads: int = 4) -> None:
        super().__init__()
        self.out_dim = dim
        self.modality_embed = nn.Parameter(torch.zeros(1, m, dim))
        self.block = Block(dim, heads if dim % heads == 0 else 1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        tokens = torch.stack(feats, dim=1) + self.modality_embed  # [B, M, D]
        return self.norm(self.block(tokens)).mean(dim=1)


_FUSION_CLASSES: dict[str, type[nn.Module]] = {
    "concat": ConcatFusion, "sum": SumFusion, "film": FiLMFusion, "gating": GatedFusion,
    "attention": AttentionFusion,
}


class ClassifierOutput(NamedTuple):
    fused: torch.Tensor  # [B, C] logits of the fusion head
    unimodal: dict[str, torch.Tensor]  # modality -> [B, C] logits of its unimodal head
    features: dict[str, torch.Tensor]  # modality -> [B, D] encoder features


class MultimodalClassifier(nn.Module):
    """Encoders, fusion, a fused head and one unimodal head per modality (modalities in a fixed order)."""

    def __init__(self, encoders: Mapping[str, nn.Module], dim: int, num_classes: int,
                 fusion: FusionKind = "concat") -> None:
        super().__init__()
        if len(encoders) < 2:
            raise ValueError(f"a multimodal classifier needs >= 2 modalities, got {list(encoders)}")
        if fusion not in _FUSION_CLASSES:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
        self.modalities = list(encoders)
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = _FUSION_CLASSES[fusion](dim, len(encoders))
        self.fused_head = nn.Linear(self.fusion.out_dim, num_classes)
        self.unimodal_heads = nn.ModuleDict({k: nn.Linear(dim, num_classes) for k in self.modalities})

    def encode(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: self.encoders[k](inputs[k]) for k in self.modalities}

    def classify(self, features: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Fused and unimodal logits from encoder features (the heads only)."""
        fused = self.fused_head(self.fusion([features[k] for k in self.modalities]))
        return fused, {k: self.unimodal_heads[k](features[k]) for k in self.modalities}

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> ClassifierOutput:
        features = self.encode(inputs)
        fused, unimodal = self.classify(features)
        return ClassifierOutput(fused, unimodal, features)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``{modality: encoder parameters, "heads": fusion + fused head + every unimodal head}``, the
        groups of ``counterpoint.optim.combiners``."""
        groups = {k: list(self.encoders[k].parameters()) for k in self.modalities}
        groups["heads"] = [*self.fusion.parameters(), *self.fused_head.parameters(),
                           *self.unimodal_heads.parameters()]
        return groups


def build_classifier(train_inputs: Mapping[str, torch.Tensor], num_classes: int, dim: int = 64,
                     fusion: FusionKind = "concat", encoders: Mapping[str, EncoderConfig] | None = None,
                     pad_id: int = 0) -> MultimodalClassifier:
    """A classifier for the modalities of ``train_inputs`` (``{modality: [N, ...]}``, a ModalSplit's
    inputs); ``encoders`` picks a tower per modality (default: ``EncoderConfig()``)."""
    encoders = encoders or {}
    towers = {k: build_encoder(encoders.get(k, EncoderConfig()), x, dim, pad_id) for k, x in train_inputs.items()}
    return MultimodalClassifier(towers, dim, num_classes, fusion)


__all__ = ["FUSIONS", "ClassifierOutput", "MultimodalClassifier", "ModalityEncoder", "build_classifier"]
