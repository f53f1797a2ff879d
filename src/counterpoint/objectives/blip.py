"""BLIP pretraining (Li et al., "BLIP: Bootstrapping Language-Image Pre-training for Unified Vision-Language
Understanding and Generation", ICML 2022): three losses of equal weight in one step, on the model of
``models/blip.py``.

* **ITC**: image and text features against momentum keys of the global batch and the key queues (BriVL's
  machinery: ``objectives/brivl.py``), with momentum distillation: the targets are
  ``alpha * softmax(momentum similarities) + (1 - alpha) * one-hot``, ``alpha`` ramped linearly from 0 over
  the first epoch; the temperature is learned (as its log) and clamped to [0.001, 0.5].
* **ITM**: the image-grounded encoder's 2-way head on the batch's pairs and on one hard negative per image
  (a text) and per text (an image), each drawn from the softmax of the ITC similarities over the global batch
  with the pair itself excluded. Every rank draws for the whole global batch from one generator seeded by the
  step and keeps its rows, so the draws are those of one process.
* **LM**: the decoder captions ``<dec> prompt caption <eot>``; cross-entropy with label smoothing 0.1 on the
  caption and ``<eot>``, the prompt ("a picture of") excluded.

Across processes: momentum keys, ITC features and the hard negatives' images (tokens, with gradients) and
texts are gathered, so 2 processes compute what one does.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from counterpoint.config import ConfigError, ObjectiveConfig
from counterpoint.data.tokenizer import Tokenizer
from counterpoint.models.blip import BLIPModel, BLIPText, BLIPTextBlock
from counterpoint.models.layers import Block
from counterpoint.models.presets import ModelSpec
from counterpoint.models.vit import VisionTransformer
from counterpoint.objectives.base import Task, register
from counterpoint.objectives.brivl import ema_, enqueue_
from counterpoint.objectives.distributed import gather_no_grad, gather_with_grad, global_mean, world_info

MOMENTUM_PARTS = ("visual", "vision_proj", "text", "text_proj")  # what ITC's momentum keys come from


@dataclass
class BLIPConfig(ObjectiveConfig):
    """Options of the BLIP task: queues, momentum distillation, the three losses."""

    name: Literal["blip"] = "blip"  # ITC + ITM + LM (BLIP)
    queue_size: int = 4096  # momentum keys per modality; a multiple of train.batch_size (the global batch)
    momentum: float = 0.995  # EMA rate of the momentum encoders
    alpha: float = 0.4  # weight of the momentum targets in ITC (ramped in over the first epoch)
    init_temperature: float = 0.07  # learned, clamped to [0.001, 0.5]
    label_smoothing: float = 0.1  # of the captioning loss
    prompt: str = "a picture of"  # the decoder's prefix, excluded from the loss
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    lm_weight: float = 1.0

    def __post_init__(self) -> None:
        checks = [(self.queue_size >= 1, "objective.queue_size must be >= 1"),
                  (0 <= self.momentum < 1, "objective.momentum must be in [0, 1)"),
                  (0 <= self.alpha <= 1, "objective.alpha must be in [0, 1]"),
                  (0.001 <= self.init_temperature <= 0.5, "objective.init_temperature must be in [0.001, 0.5]"),
                  (0 <= self.label_smoothing < 1, "objective.label_smoothing must be in [0, 1)"),
                  (min(self.itc_weight, self.itm_weight, self.lm_weight) >= 0,
                   "objective.itc_weight, itm_weight and lm_weight must be >= 0"),
                  (max(self.itc_weight, self.itm_weight, self.lm_weight) > 0,
                   "objective.itc_weight, itm_weight and lm_weight are all 0: nothing would be trained")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def distillation_targets(momentum_logits: torch.Tensor, positive: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * softmax(momentum_logits) + (1 - alpha) * one_hot(positive)`` (rows sum to 1)."""
    one_hot = F.one_hot(positive, momentum_logits.shape[1]).to(momentum_logits.dtype)
    return alpha * momentum_logits.softmax(dim=1) + (1 - alpha) * one_hot


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum(targets * log_softmax(logits))``."""
    return -(targets * logits.float().log_softmax(dim=1)).sum(dim=1).mean()


def hard_negatives(similarity: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each row of the global ``[B, B]`` similarity (row i's positive at column i), one column drawn with
    probability ``softmax(row)`` with the positive excluded."""
    # the diagonal is masked before the softmax: zeroing it after could leave a row of underflowed zeros once
    # the positive dominates (a sharp temperature), which multinomial refuses
    eye = torch.eye(similarity.shape[0], dtype=torch.bool, device=similarity.device)
    weights = similarity.float().masked_fill(eye, float("-inf")).softmax(dim=1)
    return torch.multinomial(weights.cpu(), 1, generator=generator).squeeze(1).to(similarity.device)


@register("blip")
class BLIPTask(Task):
    """The BLIP model, momentum copies of its ITC parts, and the two key queues with their pointer."""

    Config = BLIPConfig
    special_tokens = ("<enc>", "<dec>")

    def __init__(self, model: BLIPModel, cfg: BLIPConfig) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg
        self.momentum = nn.ModuleDict({part: copy.deepcopy(getattr(model, part)) for part in MOMENTUM_PARTS})
        self.momentum.requires_grad_(False)
        dim = model.vision_proj.out_features
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("image_queue", F.normalize(torch.randn(cfg.queue_size, dim, generator=gen), dim=1))
        self.register_buffer("text_queue", F.normalize(torch.randn(cfg.queue_size, dim, generator=gen), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.ramp_steps = 1  # the distillation ramp: one epoch, set by set_schedule
        self._keys: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def build(cls, cfg: BLIPConfig, spec: ModelSpec, tokenizer: Tokenizer) -> BLIPTask:
        if spec.image_tower != "vit":
            raise ConfigError(f"objective.name=blip needs a ViT image tower (the text cross-attends to its "
                              f"tokens); the model is a {spec.image_tower}")
        visual = VisionTransformer(spec.image_size, spec.patch_size, spec.vision_width, spec.vision_layers,
                                   spec.vision_heads, None, pool=spec.vision_pool)
        text = BLIPText(spec.vocab_size, spec.context_length, spec.text_width, spec.text_layers, spec.text_heads,
                        memory_width=spec.vision_width)
        token_ids = {t: tokenizer.token_id(t) for t in ("<pad>", "<sot>", "<eot>", *cls.special_tokens)}
        prompt = tokenizer.encode_ids([cfg.prompt])[0] if cfg.prompt else []
        return cls(BLIPModel(visual, text, spec.embed_dim, token_ids, cfg.init_temperature, prompt), cfg)

    @classmethod
    def check_run(cls, cfg: BLIPConfig, global_batch: int) -> None:
        if global_batch < 2:
            raise ConfigError("objective.name=blip needs train.batch_size >= 2 (ITM draws its hard negatives from "
                              "the other pairs of the batch)")
        if cfg.queue_size % global_batch:
            raise ConfigError(f"objective.queue_size={cfg.queue_size} must be a multiple of the global batch "
                              f"train.batch_size={global_batch} (whole batches enter and leave the queue)")

    def set_schedule(self, steps_per_epoch: int | None, total_steps: int) -> None:
        # over the first epoch, or over the whole run when it is shorter (CapFilt pretrains for a set number
        # of samples on data of any size: the targets then reach alpha whatever the data size)
        self.ramp_steps = max(1, min(steps_per_epoch or total_steps, total_steps))

    def encoder(self) -> BLIPModel:
        return self.model

    def fsdp_units(self) -> list[nn.Module]:
        blocks = [m for m in self.modules() if isinstance(m, (Block, BLIPTextBlock))]
        heads = [self.model.vision_proj, self.model.text_proj, self.model.itm_head]
        return [*blocks, self.model.visual, self.model.text, *heads, *self.momentum.values()]

    def fsdp_methods(self) -> list[tuple[nn.Module, str]]:
        return [(self.model.visual, "forward_tokens"), (self.momentum["visual"], "forward_tokens"),
                (self.model.text, "logits")]

    def unused_parameters(self) -> bool:
        return min(self.cfg.itc_weight, self.cfg.itm_weight, self.cfg.lm_weight) == 0

    def forward(self, batch: dict[str, torch.Tensor], step: int = 0) -> tuple[dict[str, torch.Tensor],
                                                                             dict[str, float]]:
        """The three losses; one whose weight is 0 is not computed (CapFilt's captioner learns captioning
        only), except ITC's similarities when ITM draws its hard negatives from them."""
        m, cfg = self.model, self.cfg
        tokens = batch["text"]
        image_tokens = m.image_tokens(batch["image"])
        losses, metrics = {}, {}
        if cfg.itc_weight > 0 or cfg.itm_weight > 0:
            image_feat = m.image_features(image_tokens)
            text_feat = m.encode_text(tokens)
            itc, sim_i2t, sim_t2i = self._itc(batch, image_feat, text_feat, step)
            if cfg.itc_weight > 0:
                losses["itc"] = cfg.itc_weight * itc
            if cfg.itm_weight > 0:
                losses["itm"] = cfg.itm_weight * self._itm(image_tokens, tokens, sim_i2t, sim_t2i, step, metrics)
        if cfg.lm_weight > 0:
            losses["lm"] = cfg.lm_weight * self._lm(image_tokens, tokens)
        metrics["temperature"] = float(m.temperature.detach())
        return losses, metrics

    def _itc(self, batch: dict[str, torch.Tensor], image_feat: torch.Tensor, text_feat: torch.Tensor,
             step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ITC with momentum distillation; also the global-batch similarities (no grad) ITM samples from."""
        mom = self.momentum
        with torch.no_grad():
            key_img = F.normalize(mom["vision_proj"](mom["visual"].forward_tokens(batch["image"])[:, 0]), dim=-1)
            key_txt = F.normalize(mom["text_proj"](mom["text"](batch["text"], "text",
                                                               key_mask=batch["text"] != self.model.pad_id)[:, 0]),
                                  dim=-1)
            self._keys = (key_img, key_txt)
            all_img = torch.cat([gather_no_grad(key_img), self.image_queue])  # [Bg + K, D]
            all_txt = torch.cat([gather_no_grad(key_txt), self.text_queue])
            temp = self.model.temperature.detach()
            alpha = self.cfg.alpha * min(1.0, step / self.ramp_steps)
            offset = _rank_offset(key_img.shape[0])
            positive = offset + torch.arange(key_img.shape[0], device=key_img.device)
            target_i2t = distillation_targets(key_img @ all_txt.T / temp, positive, alpha)
            target_t2i = distillation_targets(key_txt @ all_img.T / temp, positive, alpha)
        temperature = self.model.temperature
        logits_i2t = image_feat @ all_txt.T / temperature
        logits_t2i = text_feat @ all_img.T / temperature
        itc = (soft_cross_entropy(logits_i2t, target_i2t) + soft_cross_entropy(logits_t2i, target_t2i)) / 2
        with torch.no_grad():  # the global batch's similarities of the trained features
            feats_img, feats_txt = gather_no_grad(image_feat.detach()), gather_no_grad(text_feat.detach())
            sim_i2t = feats_img @ feats_txt.T / temp
        return itc, sim_i2t, sim_i2t.T

    def _itm(self, image_tokens: torch.Tensor, tokens: torch.Tensor, sim_i2t: torch.Tensor,
             sim_t2i: torch.Tensor, step: int, metrics: dict[str, float]) -> torch.Tensor:
        m = self.model
        n = tokens.shape[0]
        offset = _rank_offset(n)
        gen = torch.Generator().manual_seed(1_000_003 * 7 + step)  # the same draws on every rank
        neg_text = hard_negatives(sim_i2t, gen)[offset : offset + n]  # for each image, a text
        neg_image = hard_negatives(sim_t2i, gen)[offset : offset + n]  # for each text, an image
        all_tokens = gather_no_grad(tokens)
        all_images, _ = gather_with_grad(image_tokens)
        images = torch.cat([image_tokens, image_tokens, all_images[neg_image]])
        texts = torch.cat([tokens, all_tokens[neg_text], tokens])
        logits = m.match_logits(images, texts)  # [3n, 2]
        labels = torch.cat([torch.ones(n, dtype=torch.long), torch.zeros(2 * n, dtype=torch.long)]).to(logits.device)
        with torch.no_grad():
            metrics["itm_acc"] = float((logits.argmax(dim=1) == labels).float().mean())
        return F.cross_entropy(logits.float(), labels)

    def _lm(self, image_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``<dec> prompt caption <eot>`` (cut to the context); the caption and ``<eot>`` are the targets."""
        m = self.model
        n, length = tokens.shape
        prompt = torch.tensor(m.prompt_ids, dtype=torch.long, device=tokens.device).expand(n, -1)
        sequence = torch.cat([tokens[:, :1], prompt, tokens[:, 1:]], dim=1)[:, :length]
        logits = m.caption_logits(image_tokens, sequence)[:, :-1]
        targets = sequence[:, 1:].clone()
        targets[:, : len(m.prompt_ids)] = m.pad_id  # the prompt is given, not learned
        scored = targets != m.pad_id  # captions differ in length: the mean is over the global batch's tokens
        total = F.cross_entropy(logits[scored].float(), targets[scored], label_smoothing=self.cfg.label_smoothing,
                                reduction="sum")
        return global_mean(total, scored.sum())

    @torch.no_grad()
    def sync_from_encoder(self) -> None:
        for part in MOMENTUM_PARTS:
            self.momentum[part].load_state_dict(getattr(self.model, part).state_dict())

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Clamp the temperature, enqueue the global batch's momentum keys, move the momentum encoders."""
        self.model.log_temperature.clamp_(math.log(0.001), math.log(0.5))
        if self._keys is not None:
            enqueue_([self.image_queue, self.text_queue], self.queue_ptr, [gather_no_grad(k) for k in self._keys])
            self._keys = None
        for part in MOMENTUM_PARTS:
            ema_([p.data for p in self.momentum[part].parameters()],
                 [p.data for p in getattr(self.model, part).parameters()], self.cfg.momentum)


def _rank_offset(local_rows: int) -> int:
    return world_info()[0] * local_rows

