"""Cross-rank helpers for losses that need every rank's features."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

# torch 2.13 renamed the single-tensor collectives (the old names warn on every call); older releases have
# only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def world_info() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: every rank's ``[b, ...]`` block stacked into ``[world * b, ...]``. Backward: the gradient of
    the stacked tensor summed over ranks, this rank's block returned: every rank's loss sends gradient to
    our features. NCCL does the sum and the split in one reduce-scatter; gloo (CPU) has no reduce-scatter,
    so it all-reduces and keeps its slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = world_info()
        ctx.rank, ctx.rows = rank, x.shape[0]
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            out = grad.new_empty((ctx.rows, *grad.shape[1:]))
            _reduce_scatter_single(out, grad)
            return out
        grad = grad.clone()  # all_reduce works in place; autograd may still hold this buffer
        dist.all_reduce(grad)
        return grad.narrow(0, ctx.rank * ctx.rows, ctx.rows)


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' ``x`` concatenated along dim 0, *with* gradients flowing back to the owning rank, and the
    row offset of this rank's block.

    Gathering without gradients and re-inserting the local block (a common shortcut) is not equivalent: it
    drops the gradient other ranks' losses send to our features and so scales it by 1/world_size. Here the
    backward sums every rank's contribution (``_AllGatherWithGrad``), and DDP's gradient averaging then
    yields exactly the single-process gradient of the global-batch loss. Assumes equal local batch sizes
    (ranks cut their batches to the shortest).
    """
    rank, world = world_info()
    if world == 1:
        return x, 0
    return _AllGatherWithGrad.apply(x), rank * x.shape[0]


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' ``x`` stacked along dim 0 in rank order, without gradients (e.g. momentum keys to enqueue);
    ``x`` itself outside a process group."""
    _, world = world_info()
    if world == 1:
        return x
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    _all_gather_single(out, x.contiguous())
    return out


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` over ranks (no gradient); ``value`` itself outside a process group."""
    _, world = world_info()
    if world == 1:
        return value
    out = value.detach().clone()
    dist.all_reduce(out)
    return out


def global_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """This rank's share of a global mean: its ``total`` over the global ``count``, times the number of ranks
    (DDP averages the ranks' gradients), so the ranks' losses average to the global mean however the items
    are spread over them."""
    return total * world_info()[1] / all_reduce_sum(count).clamp_min(1)


def gather_padded_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All ranks' ``x`` when ranks hold different numbers of rows (LCL: images per rank vary): every block
    padded to the largest, gathered *with* gradients (see :func:`gather_with_grad`). Returns the gathered
    ``[world * max_rows, ...]``, the ``[world * max_rows]`` mask of real rows, and this rank's row offset."""
    rank, world = world_info()
    if world == 1:
        return x, torch.ones(x.shape[0], dtype=torch.bool, device=x.device), 0
    counts = torch.empty(world, dtype=torch.long, device=x.device)
    _all_gather_single(counts, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
    rows = int(counts.max())
    padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, rows - x.shape[0]))
    valid = (torch.arange(rows, device=x.device)[None, :] < counts[:, None]).flatten()
    return _AllGatherWithGrad.apply(padded), valid, rank * rows
