"""GradCache: the gradient of a contrastive loss over a large batch, computed micro-batch by micro-batch.

Gao, Zhang, Han & Callan, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"
(RepL4NLP 2021). A contrastive loss couples every pair of the batch, so a naive accumulation loop (one loss
per micro-batch) shrinks the negative set and changes the gradient. GradCache keeps the full-batch loss and
splits only the towers' activations:

1. embed every micro-batch under ``torch.no_grad()`` (no activations kept);
2. concatenate the embeddings, make them leaves, evaluate the loss on the whole set and backward: this gives
   ``dL/du``, ``dL/dv`` (the cache) and the gradients of parameters used by the loss itself (logit scale,
   bias);
3. re-forward each micro-batch with gradients and backward the cached ``dL/du``, ``dL/dv`` slices through
   it; parameter gradients accumulate. By the chain rule the sum is exactly the full-batch gradient.

Peak activation memory is that of one micro-batch; the price is a second forward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from counterpoint.models.two_tower import TwoTower

__all__ = ["grad_cache_backward"]


def _split(batch: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    sizes = {v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"batch tensors disagree on the batch size: {sorted(sizes)}")
    size = sizes.pop()
    if not 1 <= n <= size:
        raise ValueError(f"micro_batches must lie in [1, {size}], got {n}")
    parts = {k: torch.tensor_split(v, n) if isinstance(v, torch.Tensor) and v.dim() > 0 else [v] * n
             for k, v in batch.items()}
    return [{k: p[i] for k, p in parts.items()} for i in range(n)]


def _rng_state(devices: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _embed(model: TwoTower, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return model.encode_image(mb["image"]), model.encode_text(mb["text"])


def grad_cache_backward(model: nn.Module, batch: dict[str, torch.Tensor], micro_batches: int,
                        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        embed: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]] | None = None,
                        ) -> dict[str, torch.Tensor]:
    """Accumulate into ``.grad`` the gradient of ``loss_fn(u, v)`` over the whole ``batch``, holding the
    towers' activations for only one of ``micro_batches`` slices at a time.

    ``batch``: ``{"image": [B, 3, S, S], "text": [B, L]}`` (other tensors with a batch dimension are split
    too); ``loss_fn(u, v)``: the scalar loss of all ``B`` unit embeddings, e.g.
    ``lambda u, v: infonce_loss(u, v, u, v, model.logit_scale)`` (gather across ranks inside it, with
    gradients, for the multi-process local loss). Gradients *add* to existing ``.grad`` like ``backward``.
    Returns ``{"loss": loss.detach()}``. ``model``: the module whose parameters and buffers the towers use (a
    :class:`TwoTower`, or a task holding one); ``embed(micro_batch) -> (u, v)``: its embedding pass
    (default: ``model.encode_image`` / ``model.encode_text``).

    Exactness: for a deterministic model (the ViT and text towers: LayerNorm, no dropout) the result equals
    one full-batch backward up to float rounding. The CPU/CUDA RNG state is saved before each no-grad forward
    and replayed for its re-forward, so dropout draws the same masks in both passes (as the paper's
    implementation does); the masks then differ from those of one full-batch forward, which is an equally
    valid sample. BatchNorm (the CNN tower) normalises with *micro-batch* statistics, so its gradient is not
    the full-batch one; its running statistics are updated once per micro-batch (the no-grad pass's update
    is undone).

    Under DDP, call this on ``ddp.module`` inside ``ddp.no_sync()`` and average the gradients over ranks
    afterwards (all_reduce / world size): the re-forwards bypass ``DDP.forward``, so DDP would not reduce.
    """
    embed = embed or (lambda mb: _embed(model, mb))
    parts = _split(batch, micro_batches)
    tensors = [*model.parameters(), *(t for t in batch.values() if isinstance(t, torch.Tensor))]
    devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    buffers = [b.detach().clone() for b in model.buffers()]

    # 1. embed without a graph, remembering the RNG state each micro-batch started from
    states, us, vs = [], [], []
    with torch.no_grad():
        for mb in parts:
            states.append(_rng_state(devices))
            u, v = embed(mb)
            us.append(u)
            vs.append(v)
    with torch.no_grad():
        for b, saved in zip(model.buffers(), buffers):
            b.copy_(saved)  # running statistics move in the re-forward only

    # 2. the loss of the whole batch; its gradient w.r.t. the embeddings is the cache
    u_all = torch.cat(us).requires_grad_()
    v_all = torch.cat(vs).requires_grad_()
    loss = loss_fn(u_all, v_all)
    loss.backward()
    gu = (u_all.grad if u_all.grad is not None else torch.zeros_like(u_all)).split([u.shape[0] for u in us])
    gv = (v_all.grad if v_all.grad is not None else torch.zeros_like(v_all)).split([v.shape[0] for v in vs])

    # 3. re-forward each micro-batch with a graph and push the cached gradients through it
    for mb, (cpu_state, cuda_states), gu_i, gv_i in zip(parts, states, gu, gv):
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(cpu_state)
            for d, s in zip(devices, cuda_states):
                torch.cuda.set_rng_state(s, d)
            u, v = embed(mb)
        torch.autograd.backward([u, v], [gu_i, gv_i])
    return {"loss": loss.detach()}
