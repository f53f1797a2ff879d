"""Two-tower contrastive objectives and their task: CLIP's InfoNCE, SigLIP (losses in ``chunked.py``) and the
pairwise margin (Hadsell et al.) loss.

Both are written in the *local loss* form: this rank's rows score against the columns of the global batch
(all ranks' features, gathered with gradients). In one process the global batch is the local one and this is
the ordinary loss; across ranks it equals the single-process loss on the global batch exactly, at memory
B_local x B_global instead of B^2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from counterpoint.config import ConfigError, ObjectiveConfig
from counterpoint.data.tokenizer import Tokenizer
from counterpoint.models.cnn import BasicBlock
from counterpoint.models.layers import Block
from counterpoint.models.presets import ModelSpec, build_model
from counterpoint.models.two_tower import TwoTower
from counterpoint.objectives.base import Task, register
from counterpoint.objectives.distributed import gather_with_grad


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Softmax and distances in bf16/fp16 lose the small differences that matter; float64 stays float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def infonce_loss(u: torch.Tensor, v: torch.Tensor, u_all: torch.Tensor, v_all: torch.Tensor,
                 logit_scale: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP, Radford et al. 2021).

    ``u``/``v``: this rank's unit image/text embeddings ``[B, D]``; ``u_all``/``v_all``: the global batch
    ``[G, D]`` whose rows ``offset .. offset+B`` are ``u``/``v``; ``logit_scale``: log of the inverse
    temperature. Loss = (CE(s u v_all^T, i) + CE(s v u_all^T, i)) / 2 with targets ``i = arange(B) + offset``.
    """
    scale = logit_scale.exp()
    targets = torch.arange(u.shape[0], device=u.device) + offset
    logits_i2t = scale * u @ v_all.T  # [B, G]
    logits_t2i = scale * v @ u_all.T  # [B, G]
    return (F.cross_entropy(_at_least_fp32(logits_i2t), targets)
            + F.cross_entropy(_at_least_fp32(logits_t2i), targets)) / 2


def margin_contrastive_loss(distance: torch.Tensor, similar: torch.Tensor, margin: float) -> torch.Tensor:
    """Hadsell, Chopra & LeCun (CVPR 2006): ``1/(2N) sum [y d^2 + (1 - y) max(margin - d, 0)^2]`` over N
    pairs with distances ``d`` and labels ``y`` (1 = matching pair)."""
    y = similar.to(distance.dtype)
    per_pair = y * distance.pow(2) + (1 - y) * F.relu(margin - distance).pow(2)
    return per_pair.sum() / (2 * distance.numel())


def in_batch_margin_loss(u: torch.Tensor, v_all: torch.Tensor, margin: float, offset: int = 0) -> torch.Tensor:
    """The margin loss over every (image, text) pair of the batch, positives and negatives weighted equally.

    A batch of B has B positives and B(G-1) negatives; averaging them together would let negatives swamp
    the positives, so each group is averaged on its own: this is the pair formula on a balanced pair set.
    """
    # [B, G] Euclidean distances between unit vectors, in [0, 2]
    d = torch.cdist(_at_least_fp32(u), _at_least_fp32(v_all))
    positive = torch.zeros_like(d, dtype=torch.bool)
    positive[torch.arange(u.shape[0]), torch.arange(u.shape[0]) + offset] = True
    pos = margin_contrastive_loss(d[positive], torch.ones_like(d[positive]), margin)
    neg = margin_contrastive_loss(d[~positive], torch.zeros_like(d[~positive]), margin)
    return pos + neg


@dataclass
class ContrastiveConfig(ObjectiveConfig):
    """Options of the two-tower contrastive tasks (``clip``, ``siglip``, ``margin``)."""

    name: Literal["clip", "siglip", "margin"] = "clip"  # InfoNCE (CLIP), sigmoid (SigLIP) or margin ranking loss
    init_temperature: float = 0.07  # initial temperature of the learnable scale; siglip: 0.1 (the paper's)
    init_logit_bias: float = -10.0  # siglip only: initial learnable logit bias
    max_logit_scale: float = 100.0  # the learnable 1/temperature is clamped to at most this (CLIP: 100)
    margin: float = 1.0  # margin loss only: the required gap between positive and negative similarity
    chunk_size: int = 0  # 0: materialise the logits; >0: stream them in column chunks (big batches)

    def __post_init__(self) -> None:
        checks = [(0 < self.init_temperature < 1, "objective.init_temperature must be in (0, 1)"),
                  (self.max_logit_scale > 1, "objective.max_logit_scale must be > 1"),
                  (self.margin > 0, "objective.margin must be > 0"),
                  (self.chunk_size >= 0, "objective.chunk_size must be >= 0")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@register("clip", "siglip", "margin")
class ContrastiveTask(Task):
    """A :class:`TwoTower` trained with a contrastive loss over the (global) batch of image-text pairs.

    ``loss`` is ``"clip"`` (InfoNCE), ``"siglip"`` (pairwise sigmoid; the model needs a ``logit_bias``) or
    ``"margin"``. ``chunk_size > 0`` streams the InfoNCE logits in tiles so memory grows with B rather than
    B^2; SigLIP is always computed in tiles (``chunk_size`` or 4096), which costs nothing at small B. After
    every step the logit scale is clamped to ``max_logit_scale`` (CLIP's 100). The loss splits into embeddings
    and a loss on them, so GradCache applies exactly.
    """

    Config = ContrastiveConfig
    grad_cache = True

    def __init__(self, model: TwoTower, loss: str = "clip", margin: float = 1.0, chunk_size: int = 0,
                 max_logit_scale: float = 100.0) -> None:
        super().__init__()
        if loss not in ("clip", "siglip", "margin"):
            raise ValueError(f"unknown contrastive loss {loss!r}; use 'clip', 'siglip' or 'margin'")
        if loss == "siglip" and model.logit_bias is None:
            raise ValueError("siglip needs a model built with a logit bias (init_logit_bias=-10)")
        self.model = model
        self.loss, self.margin, self.chunk_size, self.max_logit_scale = loss, margin, chunk_size, max_logit_scale
        if loss == "margin":  # distances of unit vectors have no temperature: a parameter no loss would reach
            model.logit_scale.requires_grad_(False)

    @classmethod
    def build(cls, cfg: ContrastiveConfig, spec: ModelSpec, tokenizer: Tokenizer) -> ContrastiveTask:
        bias = cfg.init_logit_bias if cfg.name == "siglip" else None
        model = build_model(spec, cfg.init_temperature, bias, pad_id=tokenizer.pad_id, eot_id=tokenizer.eot_id)
        return cls(model, cfg.name, cfg.margin, cfg.chunk_size, cfg.max_logit_scale)

    def encoder(self) -> TwoTower:
        return self.model

    def forward(self, batch: dict[str, torch.Tensor], step: int = 0) -> tuple[dict[str, torch.Tensor],
                                                                             dict[str, float]]:
        return self.features_loss(self.embed(batch))

    def embed(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode_image(batch["image"]), self.model.encode_text(batch["text"])

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        self.model.clamp_logit_scale(self.max_logit_scale)

    def fsdp_units(self) -> list[nn.Module]:
        blocks = [m for m in self.model.modules() if isinstance(m, (Block, BasicBlock))]
        return [*blocks, self.model.visual, self.model.text]

    def features_loss(self, features: tuple[torch.Tensor, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                                                 dict[str, float]]:
        """The loss of this rank's unit embeddings ``(u, v)`` ``[B, D]`` against the global batch (what
        GradCache differentiates with respect to the embeddings)."""
        u, v = features
        u_all, offset = gather_with_grad(u)
        v_all, _ = gather_with_grad(v)
        if self.loss == "clip":
            if self.chunk_size > 0:
                from counterpoint.objectives.chunked import chunked_infonce_loss

                loss = chunked_infonce_loss(u, v, u_all, v_all, self.model.logit_scale, offset, self.chunk_size)
            else:
                loss = infonce_loss(u, v, u_all, v_all, self.model.logit_scale, offset)
        elif self.loss == "siglip":
            from counterpoint.objectives.chunked import chunked_siglip_loss

            loss = chunked_siglip_loss(u, v_all, self.model.logit_scale, self.model.logit_bias, offset,
                                       self.chunk_size or 4096)
        else:
            loss = in_batch_margin_loss(u, v_all, self.margin, offset)
        with torch.no_grad():
            sim = u @ v_all.T
            acc = (sim.argmax(dim=1) == torch.arange(u.shape[0], device=u.device) + offset).float().mean()
        metrics = {"batch_acc_i2t": float(acc), "temperature": float(1.0 / self.model.logit_scale.detach().exp())}
        return {"contrastive": loss}, metrics
