"""Multi-process training under torchrun: the process group, DDP / FSDP2 wrapping, full-state checkpoints.

``counterpoint train`` runs unchanged under ``torchrun --nproc-per-node N``: torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``) says how to join the group, gloo on CPU and NCCL on
GPU. ``train.batch_size`` is the *global* batch: every rank draws the same global batch order and takes its
contiguous ``batch_size / N`` rows; the contrastive task gathers features with gradients and uses the local
loss (``objectives/contrastive.py``), so N processes compute the gradient of the one-process loss.

Checkpoints hold full (unsharded) tensors in the one-process layout whatever the parallelism, so a run saved
under FSDP2 resumes under DDP, in one process, or with a different number of ranks.

BatchNorm (the CNN towers) is converted to SyncBatchNorm on GPU, so its statistics span the global batch;
torch's SyncBatchNorm has no CPU kernel, so on CPU each rank normalises with its local batch's statistics and
an N-process CNN run is close to, not equal to, the one-process run. Transformer towers (LayerNorm) are exact.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from counterpoint.errors import UserError
from counterpoint.objectives.base import Task
from counterpoint.objectives.grad_cache import grad_cache_backward

# Test hook for the fault-tolerance test: "RANK:STEP:MARKER" makes process RANK exit abruptly when it reaches
# STEP, once (the MARKER file records that it happened, so the restarted job runs through).
FAULT_ENV = "COUNTERPOINT_TEST_FAULT"


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job; ``world_size == 1`` without a process group."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over ranks of each value (every rank gets the result)."""
        if self.world_size == 1 or not values:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(values, (t / self.world_size).tolist()))

    def min_int(self, value: int) -> int:
        """The smallest ``value`` over ranks."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t)

    def any_rank(self, *flags: bool) -> tuple[bool, ...]:
        """For each flag, whether it is set on any rank (one collective for all of them)."""
        if self.world_size == 1:
            return flags
        t = torch.tensor([int(f) for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"``: CUDA if available; a bare ``cuda`` (or ``auto``) becomes this process's ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but CUDA is not available; use train.device=cpu")
    return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain process: the one that prints."""
    return int(os.environ.get("RANK", "0")) == 0


def restarted_by_torchrun() -> bool:
    """True in a job torchrun restarted after a failure (``--max-restarts``): the run must resume, not start."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


@contextmanager
def distributed_session(device_name: str) -> Iterator[DistContext]:
    """Join torchrun's process group (or use one the caller already set up) for the duration of a run.

    A group created here is destroyed on the way out after a barrier (a rank tearing down while a peer is
    still in a collective aborts the peer). On an exception there is no barrier: the process exits and
    torchrun stops or restarts the job.
    """
    created = False
    if not dist.is_initialized() and launched_by_torchrun():
        device = pick_device(device_name, int(os.environ.get("LOCAL_RANK", "0")))
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store, _, _ = next(dist.rendezvous("env://", rank, world_size))
        # torchrun's store outlives a restart; without a per-attempt prefix the restarted ranks read the dead
        # ranks' gloo addresses and fail to connect ("Connection refused").
        store = dist.PrefixStore(f"counterpoint/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                                world_size=world_size, device_id=device if device.type == "cuda" else None)
        created = True
    if dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        ctx = DistContext(dist.get_rank(), dist.get_world_size(), pick_device(device_name, local_rank))
    else:
        ctx = DistContext(0, 1, pick_device(device_name))
    yield ctx
    if created:
        dist.barrier()
        dist.destroy_process_group()


def maybe_inject_fault(step: int, rank: int) -> None:
    """The fault-tolerance test's crash (see ``FAULT_ENV``); does nothing unless that variable is set."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    fault_rank, fault_step, marker = spec.split(":", 2)
    if int(fault_rank) == rank and int(fault_step) == step and not Path(marker).exists():
        Path(marker).touch()
        os._exit(1)


def _average_grads(params: list[nn.Parameter], world_size: int) -> None:
    """All-reduce the mean of ``params``' gradients in one flat buffer (one collective, not one per tensor)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # [total elements]
    dist.all_reduce(flat)
    flat /= world_size
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def _shard(task: Task) -> list[nn.Parameter]:
    """FSDP2 over the task's units (blocks, then towers) and the task itself; returns the parameters left
    replicated.

    ``fully_shard`` cannot shard 0-dim parameters (the logit scale and bias), so they stay plain replicated
    tensors whose gradients the caller averages itself.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    with torch.no_grad():  # FSDP2 shards dense parameters only: channels-last conv kernels go back to NCHW
        for p in task.parameters():
            if not p.is_contiguous():
                p.data = p.data.contiguous()
    for unit in task.fsdp_units():
        fully_shard(unit)
    scalars = [p for p in task.parameters() if p.dim() == 0]
    fully_shard(task, ignored_params=set(scalars))
    for unit, method in task.fsdp_methods():
        register_fsdp_forward_method(unit, method)
    return scalars


def as_float(t: torch.Tensor) -> float:
    """A scalar, also from a DTensor (FSDP2's gradient norm)."""
    full = getattr(t, "full_tensor", None)
    return float(full() if full is not None else t)


class ParallelTask:
    """A :class:`~counterpoint.objectives.base.Task` run over the ranks: plain in one process, DDP (default)
    or FSDP2. The task is an ``nn.Module`` whose ``forward`` is the whole loss, so DDP and FSDP2 see every
    forward pass and every parameter and buffer the task owns (momentum towers, queues).

    Build it *before* the optimiser (FSDP2 replaces the parameters with sharded ones) and after loading
    resumed state into the task (every rank loads the same full tensors; FSDP2 then keeps its shard).
    """

    def __init__(self, task: Task, ctx: DistContext, parallel: str = "ddp") -> None:
        self.ctx = ctx
        self.task = task  # full parameters, or DTensor shards under FSDP2
        self.fsdp = ctx.world_size > 1 and parallel == "fsdp"
        self.replicated: list[nn.Parameter] = []  # parameters whose gradients step() must average itself
        if ctx.world_size == 1:
            self.module: nn.Module = task
        elif self.fsdp:
            self.replicated = _shard(task)
            self.module = task
        else:
            root: nn.Module = task
            if ctx.device.type == "cuda":  # BatchNorm statistics over the global batch (no CPU kernel)
                root = nn.SyncBatchNorm.convert_sync_batchnorm(task)
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.module = nn.parallel.DistributedDataParallel(root, device_ids=ids,
                                                              find_unused_parameters=task.unused_parameters())

    def forward_backward(self, batch: dict[str, torch.Tensor], step: int, accum_steps: int,
                         autocast: Any) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Gradients of this rank's local loss at ``step``, averaged over ranks into ``.grad``; returns losses
        and metrics.

        ``accum_steps > 1``: GradCache over that many micro-batches of the local batch (the full negative
        set is kept, see ``objectives/grad_cache.py``); only for tasks whose loss splits into embeddings and
        a loss on them (``Task.grad_cache``).
        """
        if accum_steps == 1:
            with autocast:
                losses, metrics = self.module(batch, step)
            sum(losses.values()).backward()
        else:
            losses, metrics = self._grad_cache(batch, accum_steps, autocast)
        if self.ctx.world_size > 1 and self.replicated:
            _average_grads(self.replicated, self.ctx.world_size)
        return losses, metrics

    def _grad_cache(self, batch: dict[str, torch.Tensor], accum_steps: int,
                    autocast: Any) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        if not self.task.grad_cache:
            raise UserError(f"train.accum_steps > 1 (GradCache) is not exact for the {type(self.task).__name__} "
                            f"task; use train.accum_steps=1 (and train.grad_checkpointing=true for memory)")
        if self.fsdp:
            raise UserError("train.accum_steps > 1 works with train.parallel: ddp only (GradCache re-forwards the "
                            "towers outside the FSDP2 root's forward)")
        out: dict[str, Any] = {}

        def loss_fn(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out["losses"], out["metrics"] = self.task.features_loss((u, v))
            return sum(out["losses"].values())

        no_sync = self.module.no_sync() if self.ctx.world_size > 1 else nullcontext()
        with no_sync, autocast:
            grad_cache_backward(self.task, batch, accum_steps, loss_fn, embed=self.task.embed)
        if self.ctx.world_size > 1:  # the re-forwards bypassed DDP.forward, so average here
            _average_grads(list(self.task.parameters()), self.ctx.world_size)
        return out["losses"], out["metrics"]

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm (across shards under FSDP2) and return it before clipping, as a
        tensor: ``as_float`` it on logging steps only (it synchronises with the device)."""
        return torch.nn.utils.clip_grad_norm_(self.task.parameters(), max_norm)

    # ------------------------------------------------------------------------------------------------------
    # Full-state checkpoints in the one-process layout

    def _options(self, cpu_offload: bool) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)

    def state_dicts(self, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                                     dict[str, Any]]:
        """Full encoder state, the task's other state (:meth:`Task.extra_state`) and the optimiser state, the
        optimiser's keyed by parameter index as in one process.

        Under FSDP2 this gathers the shards (a collective: every rank must call it) and only rank 0 receives
        the tensors; other ranks get empty dicts.
        """
        prefix = self.task._encoder_prefix()
        if not self.fsdp:
            full = self.task.state_dict()
            encoder = {k.removeprefix(prefix): v for k, v in full.items() if k.startswith(prefix)}
            return encoder, self.task.extra_state(), optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        options = self._options(cpu_offload=True)
        full = get_model_state_dict(self.module, options=options)
        optim_sd = get_optimizer_state_dict(self.module, optimizer, options=options)
        if not self.ctx.is_main:
            return {}, {}, {}
        encoder = {k.removeprefix(prefix): v for k, v in full.items() if k.startswith(prefix)}
        extra = {k: v for k, v in full.items() if not k.startswith(prefix)}
        names = [n for g in optim_sd["param_groups"] for n in g["params"]]
        index = {n: i for i, n in enumerate(names)}
        groups, start = [], 0
        for g in optim_sd["param_groups"]:
            groups.append({**g, "params": list(range(start, start + len(g["params"])))})
            start += len(g["params"])
        return encoder, extra, {"state": {index[n]: s for n, s in optim_sd["state"].items()}, "param_groups": groups}

    def load_optimizer(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load a one-process (index-keyed) optimiser state dict; under FSDP2 every rank keeps its shard."""
        if not self.fsdp:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        name_of = {id(p): n for n, p in self.module.named_parameters()}
        names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
        fqn_state = {"state": {names[i]: s for i, s in state["state"].items()},
                     "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                      for g in state["param_groups"]]}
        set_optimizer_state_dict(self.module, optimizer, fqn_state, options=self._options(cpu_offload=False))

