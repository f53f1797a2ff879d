"""Pretraining tasks as plug-ins: the one interface the trainer, torchrun wrapper, checkpoints and evaluation
talk to, so none of them knows which method runs.

A task is an ``nn.Module`` that owns the model it trains (``encoder()``: what evaluation and
``counterpoint.load_checkpoint`` see), its losses, and all state that lives across steps (momentum towers,
queues, pointers) as submodules and buffers, so ``state_dict()``, ``.to()``, DDP and FSDP2 see it. Tasks are
chosen by ``objective.name`` from :data:`TASKS`; each brings its typed options (``Config``, the recipe's
``objective:`` section). The shape follows open_clip's task-as-module and dinov2's ``forward_backward`` +
``update_teacher``, with torchtitan's per-component config and registry instead of sniffing model names.

Adding a method: a ``Task`` subclass in its own objective module, decorated with :func:`register`, its
``Config``, a recipe, and its math tests; the contract test (``tests/test_task_contract.py``) then holds it to
training, exact resume, 2 processes = 1, loading and evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from counterpoint.config import ConfigError, ObjectiveConfig
from counterpoint.data.tokenizer import Tokenizer


class Task(nn.Module):
    """Base class of every pretraining task.

    Class attributes a task sets: ``Config`` (a dataclass subclassing
    :class:`~counterpoint.config.ObjectiveConfig`), ``data`` (``"pairs"``: image-text batches ``{"image",
    "text"}``), ``special_tokens`` (tokens its tokenizer must have beyond ``<pad> <sot> <eot> <unk>``),
    ``evaluations`` (what its encoder supports: ``zeroshot``, ``retrieval``, ``linear_probe``) and
    ``grad_cache`` (whether ``embed`` + ``features_loss`` split its loss exactly, for GradCache).
    """

    Config: ClassVar[type[ObjectiveConfig]]
    data: ClassVar[str] = "pairs"
    special_tokens: ClassVar[tuple[str, ...]] = ()
    evaluations: ClassVar[tuple[str, ...]] = ("zeroshot", "retrieval", "linear_probe")
    grad_cache: ClassVar[bool] = False

    @classmethod
    def build(cls, cfg: ObjectiveConfig, spec: Any, tokenizer: Tokenizer) -> Task:
        """The task for options ``cfg`` (``cfg.name`` is the registered name) around a fresh model of ``spec``
        (a ``ModelSpec``); ``tokenizer`` has the task's ``special_tokens`` (``token_id``) and encodes what the
        task must (BLIP's prompt)."""
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor], step: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """``(losses, metrics)`` of this rank's batch at ``step``: the losses are summed and back-propagated,
        the metrics (floats) logged. Cross-rank terms are the task's own business (gather with gradients)."""
        raise NotImplementedError

    @classmethod
    def check_run(cls, cfg: ObjectiveConfig, global_batch: int) -> None:
        """Refuse (``ConfigError``, before anything runs) options that do not fit the run, e.g. a queue that is
        not a multiple of the global batch."""

    def set_schedule(self, steps_per_epoch: int | None, total_steps: int) -> None:
        """Told before training (and again on resume) how many steps an epoch and the run have, for tasks with
        schedules of their own (BLIP ramps its distillation in over the first epoch)."""

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Runs after every optimizer step (clamps, momentum updates, enqueueing)."""

    def encoder(self) -> nn.Module:
        """The trained model as users and evaluation see it (``encode_image`` and, if supported,
        ``encode_text``); its state dict is a checkpoint's ``model.safetensors``."""
        raise NotImplementedError

    def unused_parameters(self) -> bool:
        """Whether some parameters may get no gradient in a step (a loss switched off by its weight): DDP then
        has to look for them every step, which costs a little; other tasks leave it off."""
        return False

    @torch.no_grad()
    def sync_from_encoder(self) -> None:
        """Called after ``train.init_from`` loaded weights into :meth:`encoder`: make every other copy of them
        (momentum towers) equal to it. Tasks without copies have nothing to do."""

    def fsdp_units(self) -> list[nn.Module]:
        """Submodules FSDP2 shards one by one (blocks, then towers), innermost first."""
        return []

    def fsdp_methods(self) -> list[tuple[nn.Module, str]]:
        """``(unit, method)`` pairs: methods other than ``forward`` through which the task or its encoder
        calls an FSDP unit (FSDP2 gathers a unit's parameters around ``forward`` only, unless told)."""
        return []

    def embed(self, batch: dict[str, torch.Tensor]) -> Any:
        """GradCache: this micro-batch's features (only for tasks with ``grad_cache``)."""
        raise NotImplementedError

    def features_loss(self, features: Any) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """GradCache: the loss of the whole batch's features (only for tasks with ``grad_cache``)."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors beyond the encoder's that a resumed run needs (momentum towers, queues): a checkpoint's
        ``task.safetensors``. Everything in ``state_dict()`` outside ``encoder()``."""
        prefix = self._encoder_prefix()
        return {k: v for k, v in self.state_dict().items() if not k.startswith(prefix)}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Put back what :meth:`extra_state` returned; a ``ValueError`` names what does not fit."""
        expected = self.extra_state()
        if set(tensors) != set(expected):
            missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
            raise ValueError(f"task state: missing {missing[:3]}, not of this task {unexpected[:3]}")
        for k, v in expected.items():
            if tensors[k].shape != v.shape:
                raise ValueError(f"task state: {k} has shape {list(tensors[k].shape)}, this task {list(v.shape)}")
            with torch.no_grad():
                v.copy_(tensors[k])  # state_dict() tensors share storage with the parameters and buffers

    def _encoder_prefix(self) -> str:
        enc = self.encoder()
        for name, module in self.named_children():
            if module is enc:
                return f"{name}."
        raise AssertionError("encoder() must be a direct submodule of the task")


TASKS: dict[str, type[Task]] = {}


def register(*names: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: make the task available as ``objective.name: <name>`` for each of ``names`` (one class
    may serve a family, e.g. CLIP, SigLIP and the margin loss share the two-tower contrastive task)."""
    def add(cls: type[Task]) -> type[Task]:
        for name in names:
            assert name not in TASKS, f"task {name!r} registered twice"
            TASKS[name] = cls
        return cls
    return add


def task_class(name: str) -> type[Task]:
    """The registered task ``name``, or a one-line :class:`ConfigError` listing the registered ones."""
    import counterpoint.objectives.tasks  # noqa: F401  (registers the built-in tasks)

    if name not in TASKS:
        raise ConfigError(f"objective.name: unknown task {name!r}; registered: {', '.join(sorted(TASKS))}")
    return TASKS[name]
