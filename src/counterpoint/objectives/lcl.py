"""Latent Compression Learning (Yang et al., "Vision Model Pre-training on Interleaved Image-Text Data via
Latent Compression Learning", NeurIPS 2024): pretrain a vision encoder on interleaved documents by maximising
the mutual information between a causal model's inputs and outputs.

Two terms (the model is ``models/lcl.py``):

* **generation**: next-token cross-entropy over the document's text. Targets that are image slots, ``<eoi>``
  or padding are left out, so the model learns to predict text and ``<boi>`` (when an image comes). Text after
  an image attends to its tokens, so this term trains the vision encoder too.
* **contrastive**: symmetric InfoNCE between each image's latent ``norm(z_k)`` and the projected causal state
  at its ``<boi>`` (which has seen only what precedes the image), over every image of the global batch, with
  a learnable temperature. An image with nothing before it in its document (``<boi>`` right after ``<sot>``)
  has no context to be predicted from and is left out.

Total ``1.0 x generation + 0.1 x contrastive`` (the paper's weights, both options). The ablations of the
paper's Table 1 are options too: ``contrastive_weight: 0`` (generation only) and ``regression_weight > 0``
(generation plus MSE of the ``<boi>`` state onto the latent, Emu-style), which lets the latents collapse:
the regression target moves with the encoder, and a constant latent is a perfect prediction.

Across processes ranks hold different numbers of images and text tokens. Image features are padded to the
global maximum and gathered with gradients (padding masked out), and every term is a sum over this rank's
items divided by the global count times the number of ranks, so DDP's gradient average is exactly the
gradient of the global-batch mean: 2 processes equal 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from counterpoint.config import ConfigError, ObjectiveConfig
from counterpoint.data.tokenizer import Tokenizer
from counterpoint.models.layers import Block
from counterpoint.models.lcl import CausalLM, LCLModel
from counterpoint.models.presets import ModelSpec
from counterpoint.models.vit import VisionTransformer
from counterpoint.objectives.base import Task, register
from counterpoint.objectives.distributed import gather_padded_with_grad, global_mean


@dataclass
class LCLConfig(ObjectiveConfig):
    """Options of the LCL task: the weights of its terms and the contrastive temperature."""

    name: Literal["lcl"] = "lcl"  # latent compression learning on interleaved documents
    generation_weight: float = 1.0  # next-token cross-entropy on text
    contrastive_weight: float = 0.1  # InfoNCE of image latents against the causal state at <boi> (0: ablation)
    regression_weight: float = 0.0  # >0: MSE of the <boi> state onto the latent (the collapsing ablation)
    init_temperature: float = 0.07  # of the contrastive term (learnable)
    max_logit_scale: float = 100.0  # 1/temperature is clamped to at most this

    def __post_init__(self) -> None:
        weights = {"generation_weight": self.generation_weight, "contrastive_weight": self.contrastive_weight,
                   "regression_weight": self.regression_weight}
        for key, value in weights.items():
            if value < 0:
                raise ConfigError(f"objective.{key} must be >= 0, got {value}")
        if not any(weights.values()):
            raise ConfigError("objective: at least one of generation_weight, contrastive_weight and "
                              "regression_weight must be > 0")
        if not 0 < self.init_temperature < 1:
            raise ConfigError(f"objective.init_temperature must be in (0, 1), got {self.init_temperature}")
        if self.max_logit_scale <= 1:
            raise ConfigError(f"objective.max_logit_scale must be > 1, got {self.max_logit_scale}")


def latent_infonce(z: torch.Tensor, c: torch.Tensor, logit_scale: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Symmetric InfoNCE between this rank's unit latents ``z`` and unit contexts ``c`` (``[m, D]``, row i a
    pair) against every rank's, whatever each rank's ``m``. Returns this rank's share of the global mean and
    the local retrieval accuracy (context -> latent)."""
    all_z, valid, offset = gather_padded_with_grad(z)
    all_c, _, _ = gather_padded_with_grad(c)
    scale = logit_scale.exp()
    target = offset + torch.arange(z.shape[0], device=z.device)
    c_to_z = (scale * c @ all_z.T).masked_fill(~valid, float("-inf"))
    z_to_c = (scale * z @ all_c.T).masked_fill(~valid, float("-inf"))
    total = (F.cross_entropy(c_to_z, target, reduction="sum") + F.cross_entropy(z_to_c, target, reduction="sum")) / 2
    accuracy = float((c_to_z.argmax(dim=1) == target).float().mean()) if z.shape[0] else 0.0
    return global_mean(total, torch.tensor(z.shape[0], device=z.device)), accuracy


@register("lcl")
class LCLTask(Task):
    """LCL on interleaved documents; batches ``{"tokens", "images", "boi", "context"}`` (see
    ``counterpoint.data.interleaved``)."""

    Config = LCLConfig
    data = "documents"
    special_tokens = ("<boi>", "<eoi>", "<img>")

    def __init__(self, model: LCLModel, cfg: LCLConfig) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg

    @classmethod
    def build(cls, cfg: LCLConfig, spec: ModelSpec, tokenizer: Tokenizer) -> LCLTask:
        if spec.image_tower != "vit":
            raise ConfigError(f"objective.name=lcl needs a ViT image tower (its patch tokens enter the causal "
                              f"model); the model is a {spec.image_tower}")
        if spec.embed_dim != spec.text_width:
            raise ConfigError(f"objective.name=lcl: image latents live in the causal model's width "
                              f"({spec.text_width}); model.embed_dim={spec.embed_dim} must equal it")
        visual = VisionTransformer(spec.image_size, spec.patch_size, spec.vision_width, spec.vision_layers,
                                   spec.vision_heads, None, pool=spec.vision_pool)
        causal = CausalLM(spec.vocab_size, spec.context_length, spec.text_width, spec.text_layers, spec.text_heads)
        token_ids = {t: tokenizer.token_id(t) for t in ("<pad>", "<eot>", *cls.special_tokens)}
        model = LCLModel(visual, causal, spec.text_heads, token_ids, contrastive=cfg.contrastive_weight > 0,
                         regression=cfg.regression_weight > 0, init_temperature=cfg.init_temperature)
        return cls(model, cfg)

    def encoder(self) -> LCLModel:
        return self.model

    def fsdp_units(self) -> list[nn.Module]:
        """Blocks, then every module that holds parameters, so no parameter is left to the root (evaluation
        calls the model's methods, not the task's forward, and would meet it sharded)."""
        m = self.model
        heads = [h for h in (m.context_proj, m.regression_head) if h is not None]
        return [*(b for b in m.modules() if isinstance(b, Block)), m.visual, m.pool, m.causal, *heads]

    def fsdp_methods(self) -> list[tuple[nn.Module, str]]:
        return [(self.model.visual, "forward_tokens"), (self.model.causal, "logits")]

    def forward(self, batch: dict[str, torch.Tensor], step: int = 0) -> tuple[dict[str, torch.Tensor],
                                                                             dict[str, float]]:
        m, cfg = self.model, self.cfg
        tokens = batch["tokens"]
        states, z = m.sequence_states(tokens, batch["images"], batch["boi"])
        losses: dict[str, torch.Tensor] = {}
        metrics: dict[str, float] = {}
        if cfg.generation_weight > 0:
            targets = tokens[:, 1:]
            scored = (targets != m.pad_id) & (targets != m.img_id) & (targets != m.eoi_id)
            total = F.cross_entropy(m.causal.logits(states[:, :-1][scored]), targets[scored], reduction="sum")
            generation = global_mean(total, scored.sum())
            losses["generation"] = cfg.generation_weight * generation
            metrics["generation_ce"] = float(generation.detach())
        # the state at each image's <boi>; an image with nothing before it has no context to be predicted from
        at_boi = states.flatten(0, 1).index_select(0, batch["boi"])[batch["context"]]
        latents = z[batch["context"]]
        if cfg.contrastive_weight > 0:
            contrastive, accuracy = latent_infonce(F.normalize(latents, dim=-1),
                                                   F.normalize(m.context_proj(at_boi), dim=-1), m.logit_scale)
            losses["contrastive"] = cfg.contrastive_weight * contrastive
            metrics |= {"context_to_image_acc": accuracy, "temperature": float(1 / m.logit_scale.detach().exp())}
        if cfg.regression_weight > 0:
            total = (m.regression_head(at_boi) - latents).pow(2).mean(dim=1).sum()
            losses["regression"] = cfg.regression_weight * global_mean(total, torch.tensor(len(latents),
                                                                                       device=z.device))
        if "generation" in losses and len(losses) == 1:
            # Generation only: the pooling query and keys reach no loss; a zero term gives them a (zero)
            # gradient, as DDP requires of every parameter.
            losses["generation"] = losses["generation"] + 0.0 * z.sum()
        return losses, metrics

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        self.model.clamp_logit_scale(self.cfg.max_logit_scale)
