"""Cross-rank helpers for losses that need every rank's features."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_info() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' ``x`` concatenated along dim 0, *with* gradients flowing back to the owning rank, and the
    row offset of this rank's block.

    Gathering without gradients and re-inserting the local block (a common shortcut) is not equivalent: it
    drops the gradient other ranks' losses send to our features and so scales it by 1/world_size. With
    ``torch.distributed.nn.functional.all_gather`` the backward sums every rank's contribution, and DDP's
    gradient averaging then yields exactly the single-process gradient of the global-batch loss.
    Assumes equal local batch sizes (the loader drops ragged batches).
    """
    rank, world = world_info()
    if world == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0), rank * x.shape[0]
