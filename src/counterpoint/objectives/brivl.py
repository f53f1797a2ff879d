"""BriVL: two towers trained with momentum encoders and cross-modal negative queues (Fei et al., "Towards
artificial general intelligence via a multimodal foundation model", Nature Communications 2022; the
queue mechanism is MoCo's, He et al. CVPR 2020, made cross-modal).

Built for *weakly correlated* image-text pairs and small per-device batches: each image query ``u_i`` is
scored against the momentum key of its own text ``k^t_i`` (the positive) and the ``K`` text keys of earlier
batches in the text queue (negatives); symmetrically for text queries against the image queue:

    L = CE([u_i . k^t_i | u_i . Q_t^T] / tau, 0) + CE([v_i . k^i_i | v_i . Q_i^T] / tau, 0)

Keys come from momentum copies of both towers, ``theta' <- m theta' + (1 - m) theta`` after every step, so the
queue holds keys from a slowly moving encoder and stays consistent. After the step the (all-gathered) keys of
the global batch replace the oldest queue entries.

Under torchrun the loss needs no gather: each query's logits involve only its own keys and the queue, which
every rank holds identically, so the mean of the ranks' local losses is the one-process loss and DDP's
gradient average is exact. Only the enqueue gathers keys (no gradient).

False-negative guard (optional, ``false_negative_k > 0``): weak correlation makes many queue entries true
matches; an entry among the top-k neighbours of *both* keys of a pair (the image key and the text key) is
treated as a further positive (multi-positive InfoNCE) rather than pushed away.
"""

from __future__ import annotations

import copy
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
from counterpoint.objectives.distributed import gather_no_grad


@dataclass
class BriVLConfig(ObjectiveConfig):
    """Options of the BriVL task: momentum towers and cross-modal key queues."""

    name: Literal["brivl"] = "brivl"  # momentum towers + cross-modal negative queues (BriVL)
    queue_size: int = 4096  # K momentum keys per modality; a multiple of train.batch_size (the global batch)
    momentum: float = 0.99  # EMA rate of the momentum towers (BriVL: 0.99)
    temperature: float = 0.07  # tau of the logits (fixed unless learn_temperature)
    learn_temperature: bool = False  # learn tau (the model's logit scale, clamped like CLIP's) instead
    max_logit_scale: float = 100.0  # learnable 1/tau is clamped to at most this
    false_negative_k: int = 0  # >0: a queue entry among the top-k neighbours of both keys is a positive too
    eval_towers: Literal["query", "momentum"] = "query"  # which towers evaluation and load_checkpoint use

    def __post_init__(self) -> None:
        checks = [(self.queue_size >= 1, "objective.queue_size must be >= 1"),
                  (0 <= self.momentum < 1, "objective.momentum must be in [0, 1)"),
                  (0 < self.temperature < 1, "objective.temperature must be in (0, 1)"),
                  (self.max_logit_scale > 1, "objective.max_logit_scale must be > 1"),
                  (self.false_negative_k >= 0, "objective.false_negative_k must be >= 0")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@torch.no_grad()
def ema_(target: list[torch.Tensor], source: list[torch.Tensor], momentum: float) -> None:
    """``target <- m target + (1 - m) source`` for every pair, in two fused foreach kernels (dinov2's
    ``update_teacher``)."""
    torch._foreach_mul_(target, momentum)
    torch._foreach_add_(target, source, alpha=1.0 - momentum)


@torch.no_grad()
def enqueue_(queues: list[torch.Tensor], pointer: torch.Tensor, keys: list[torch.Tensor]) -> None:
    """Write ``keys[i]`` (all ``[n, D]``) over the oldest entries of ``queues[i]`` (ring buffers sharing one
    write ``pointer``), and advance the pointer."""
    size = queues[0].shape[0]
    rows = (pointer + torch.arange(keys[0].shape[0], device=pointer.device)) % size
    for queue, key in zip(queues, keys):
        queue.index_copy_(0, rows, key.to(queue.dtype))
    pointer.copy_((pointer + keys[0].shape[0]) % size)


def queue_logits(query: torch.Tensor, positive_key: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
    """``[B, 1 + K]``: each query's similarity to its own key (column 0), then to every queue entry."""
    return torch.cat([(query * positive_key).sum(dim=1, keepdim=True), query @ queue.T], dim=1)


def neighbour_positives(key_a: torch.Tensor, key_b: torch.Tensor, queue: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, K]`` boolean: queue entries among the top-``k`` neighbours of both ``key_a`` and ``key_b`` (the two
    keys of a pair), the false-negative guard."""
    k = min(k, queue.shape[0])
    top_a = torch.zeros(key_a.shape[0], queue.shape[0], dtype=torch.bool, device=queue.device)
    top_b = torch.zeros_like(top_a)
    top_a.scatter_(1, (key_a @ queue.T).topk(k, dim=1).indices, True)
    top_b.scatter_(1, (key_b @ queue.T).topk(k, dim=1).indices, True)
    return top_a & top_b


def multi_positive_ce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """``-log(sum_pos exp(l) / sum_all exp(l))`` per row, averaged; ``positives`` ``[B, C]`` boolean (column 0,
    the pair's own key, always set). With one positive per row this is the ordinary cross-entropy."""
    logits = logits.float() if logits.dtype not in (torch.float32, torch.float64) else logits
    log_all = torch.logsumexp(logits, dim=1)
    log_pos = torch.logsumexp(logits.masked_fill(~positives, float("-inf")), dim=1)
    return (log_all - log_pos).mean()


@register("brivl")
class BriVLTask(Task):
    """Query towers (``model``, trained by gradient) and momentum towers (``momentum_model``, an EMA of them)
    with an image-key queue and a text-key queue of ``queue_size`` unit keys each (buffers, with the write
    pointer: checkpoints, device moves and DDP see them).

    The loss needs momentum keys of the very batch, so it does not split into per-micro-batch embeddings and a
    loss on them: GradCache is refused (``grad_cache = False``).
    """

    Config = BriVLConfig

    def __init__(self, model: TwoTower, cfg: BriVLConfig, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.momentum_model = copy.deepcopy(model).requires_grad_(False)
        if not cfg.learn_temperature:  # a fixed tau: the model's scale is not trained (nor seen by DDP)
            with torch.no_grad():
                model.logit_scale.fill_(-torch.log(torch.tensor(cfg.temperature)).item())
            model.logit_scale.requires_grad_(False)
        gen = torch.Generator().manual_seed(0)  # the queues start as random unit vectors, as MoCo's
        shape = (cfg.queue_size, embed_dim)
        self.register_buffer("image_queue", F.normalize(torch.randn(shape, generator=gen), dim=1))
        self.register_buffer("text_queue", F.normalize(torch.randn(shape, generator=gen), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._keys: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's keys, enqueued after it

    @classmethod
    def build(cls, cfg: BriVLConfig, spec: ModelSpec, tokenizer: Tokenizer) -> BriVLTask:
        model = build_model(spec, cfg.temperature, None, pad_id=tokenizer.pad_id, eot_id=tokenizer.eot_id)
        return cls(model, cfg, spec.embed_dim)

    @classmethod
    def check_run(cls, cfg: BriVLConfig, global_batch: int) -> None:
        if cfg.queue_size % global_batch:
            raise ConfigError(f"objective.queue_size={cfg.queue_size} must be a multiple of the global batch "
                              f"train.batch_size={global_batch} (whole batches enter and leave the queue)")

    def encoder(self) -> TwoTower:
        return self.momentum_model if self.cfg.eval_towers == "momentum" else self.model

    def fsdp_units(self) -> list[nn.Module]:
        units = []
        for towers in (self.model, self.momentum_model):
            units += [m for m in towers.modules() if isinstance(m, (Block, BasicBlock))]
            units += [towers.visual, towers.text]
        return units

    def forward(self, batch: dict[str, torch.Tensor], step: int = 0) -> tuple[dict[str, torch.Tensor],
                                                                             dict[str, float]]:
        u = self.model.encode_image(batch["image"])  # [B, D] unit image queries
        v = self.model.encode_text(batch["text"])  # [B, D] unit text queries
        with torch.no_grad():
            key_img = self.momentum_model.encode_image(batch["image"])  # [B, D]
            key_txt = self.momentum_model.encode_text(batch["text"])  # [B, D]
        self._keys = (key_img.detach(), key_txt.detach())
        scale = self.model.logit_scale.exp()
        logits_i2t = scale * queue_logits(u, key_txt, self.text_queue)  # [B, 1 + K]
        logits_t2i = scale * queue_logits(v, key_img, self.image_queue)  # [B, 1 + K]
        metrics: dict[str, float] = {}
        if self.cfg.false_negative_k > 0:
            with torch.no_grad():
                pos_i2t = torch.zeros_like(logits_i2t, dtype=torch.bool)
                pos_i2t[:, 0] = True
                pos_t2i = pos_i2t.clone()
                pos_i2t[:, 1:] = neighbour_positives(key_img, key_txt, self.text_queue, self.cfg.false_negative_k)
                pos_t2i[:, 1:] = neighbour_positives(key_img, key_txt, self.image_queue, self.cfg.false_negative_k)
            loss_i2t = multi_positive_ce(logits_i2t, pos_i2t)
            loss_t2i = multi_positive_ce(logits_t2i, pos_t2i)
            # queue entries per query taken as further positives
            metrics["extra_positives"] = float((pos_i2t[:, 1:].sum() + pos_t2i[:, 1:].sum()) / (2 * u.shape[0]))
        else:  # one positive per row (column 0): the ordinary cross-entropy, without building a mask
            target = torch.zeros(u.shape[0], dtype=torch.long, device=u.device)
            loss_i2t = F.cross_entropy(logits_i2t.float(), target)
            loss_t2i = F.cross_entropy(logits_t2i.float(), target)
        with torch.no_grad():
            acc = (logits_i2t.argmax(dim=1) == 0).float().mean()
        metrics.update(batch_acc_i2t=float(acc), temperature=float(1.0 / scale.detach()))
        return {"i2t": loss_i2t, "t2i": loss_t2i}, metrics

    @torch.no_grad()
    def sync_from_encoder(self) -> None:
        source = self.encoder()
        for towers in (self.model, self.momentum_model):
            if towers is not source:
                towers.load_state_dict(source.state_dict())

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Enqueue the global batch's keys (oldest out), then move the momentum towers towards the queries."""
        if self.cfg.learn_temperature:
            self.model.clamp_logit_scale(self.cfg.max_logit_scale)
        if self._keys is not None:
            enqueue_([self.image_queue, self.text_queue], self.queue_ptr, [gather_no_grad(k) for k in self._keys])
            self._keys = None
        ema_([p.data for p in self.momentum_model.parameters()], [p.data for p in self.model.parameters()],
             self.cfg.momentum)
        for target, source in zip(self.momentum_model.buffers(), self.model.buffers()):
            target.copy_(source)  # BatchNorm statistics: the query towers' (keys are computed in train mode)
