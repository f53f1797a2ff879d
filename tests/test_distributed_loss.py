"""The multi-process local loss against one process, with real processes (gloo, 2 ranks, CPU).

Why the gradient check divides by the world size
------------------------------------------------
``W`` ranks hold ``B`` rows each of a global batch of ``G = W B``; ``R_r`` are rank ``r``'s rows. The global
loss is a mean of per-row terms, ``L = (1/G) sum_i l_i`` (for InfoNCE both directions, ``l_i`` = row ``i``
against all ``G`` columns). Rank ``r`` computes the *local loss* ``L_r = (1/B) sum_{i in R_r} l_i`` on
gathered columns, so ``(1/W) sum_r L_r = L``: the mean of the local losses is the global loss.

Every ``L_k`` depends on rank ``r``'s features ``x_r`` through the gathered columns. The backward of
``all_gather`` sums, over ranks, the gradient each rank's loss sends to a block, so after ``backward`` rank
``r``'s features hold ``g_r = sum_k dL_k/dx_r = d(sum_k L_k)/dx_r = W dL/dx_r``. DDP all-reduces parameter
gradients with a *mean*: ``(1/W) sum_r dL_r/dtheta``, and ``theta`` reaches the losses only through the
features, so (chain rule) rank ``r``'s features contribute ``(1/W) g_r`` to the averaged gradient. Equality
with one process is therefore ``g_r / W == dL/dx[R_r]``. The logit scale and bias are not gathered: rank
``r`` gets ``dL_r/ds`` and their mean over ranks (what DDP does) is ``dL/ds``.

The wrong variant gathers *without* gradients and re-inserts the local block: ``x_r`` then receives only
the gradient of rank ``r``'s own loss. With OpenCLIP's non-local form (every rank computes the full ``G x G``
loss ``L`` on the re-inserted batch) that is ``dL/dx_r``, and after DDP's mean the effective gradient is
``dL/dx_r / W``, exactly ``1/W`` too small. With the local form it lacks the other ranks' cross terms.

Float64 throughout, so the equality checks are tight.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from counterpoint.models.presets import create_model
from counterpoint.models.two_tower import TwoTower
from counterpoint.objectives.chunked import chunked_infonce_loss, chunked_siglip_loss
from counterpoint.objectives.contrastive import ContrastiveTask, infonce_loss
from counterpoint.objectives.distributed import gather_with_grad
from tests.dist_utils import run_distributed

WORLD = 2
G, D = 8, 6  # global batch, feature dim
CHUNK = 3  # smaller than the local batch (4) and not dividing it
FEATURE_LOSSES = ["infonce", "chunked_infonce", "siglip", "wrong_local_no_grad", "wrong_global_no_grad"]
DDP_CASES = [("clip", 0), ("clip", CHUNK), ("siglip", 0)]


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------
# Shared by the parent and the workers (module level, so spawn can pickle them)
# ---------------------------------------------------------------------------------------------------------


def global_features() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"u": F.normalize(torch.randn(G, D, generator=gen, dtype=torch.float64), dim=-1),
            "v": F.normalize(torch.randn(G, D, generator=gen, dtype=torch.float64), dim=-1),
            "logit_scale": torch.tensor(math.log(1 / 0.07), dtype=torch.float64),
            "siglip_scale": torch.tensor(math.log(10.0), dtype=torch.float64),
            "logit_bias": torch.tensor(-10.0, dtype=torch.float64)}


def global_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(G, 3, 32, 32, generator=gen, dtype=torch.float64)
    text = torch.randint(3, 64, (G, 8), generator=gen)
    ends = torch.randint(2, 8, (G,), generator=gen)
    for i, e in enumerate(ends.tolist()):
        text[i, e] = 2  # <eot>
        text[i, e + 1:] = 0  # padding
    return {"image": images, "text": text}


def make_model(loss: str) -> TwoTower:
    torch.manual_seed(0)
    model = create_model("tiny-vit", embed_dim=16, vocab_size=64, context_length=8)
    if loss == "siglip":
        model.logit_bias = nn.Parameter(torch.tensor(-10.0))
    return model.double()


def _gather_no_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The shortcut that is wrong: other ranks' blocks as constants, our own block re-inserted."""
    rank, world = dist.get_rank(), dist.get_world_size()
    blocks = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(blocks, x.detach())
    blocks[rank] = x
    return torch.cat(blocks), rank * x.shape[0]


def _local_loss(name: str, u: torch.Tensor, v: torch.Tensor, ls: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """``name``'s loss for this rank, computed as :class:`ContrastiveTask` does."""
    if name.startswith("wrong"):
        u_all, offset = _gather_no_grad(u)
        v_all, _ = _gather_no_grad(v)
        if name == "wrong_global_no_grad":
            return infonce_loss(u_all, v_all, u_all, v_all, ls, 0)
        return infonce_loss(u, v, u_all, v_all, ls, offset)
    u_all, offset = gather_with_grad(u)
    v_all, _ = gather_with_grad(v)
    if name == "infonce":
        return infonce_loss(u, v, u_all, v_all, ls, offset)
    if name == "chunked_infonce":
        return chunked_infonce_loss(u, v, u_all, v_all, ls, offset, CHUNK)
    return chunked_siglip_loss(u, v_all, ls, lb, offset, CHUNK)


def _average_over_ranks(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t / dist.get_world_size()


class _TaskModule(nn.Module):
    """The task inside ``forward``, so that DDP sees the forward pass (``ContrastiveTask`` calls
    ``encode_image``/``encode_text`` directly, which would bypass ``DDP.forward`` and its gradient sync)."""

    def __init__(self, model: TwoTower, loss: str, chunk_size: int) -> None:
        super().__init__()
        self.model = model
        self.task = ContrastiveTask(model, loss, chunk_size=chunk_size)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.task(batch)[0]["contrastive"]


def _worker(rank: int, world: int, state_dir: str) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    feats = global_features()
    b = G // world
    rows = slice(rank * b, (rank + 1) * b)
    for name in FEATURE_LOSSES:
        u = feats["u"][rows].clone().requires_grad_()
        v = feats["v"][rows].clone().requires_grad_()
        ls = feats["siglip_scale" if name == "siglip" else "logit_scale"].clone().requires_grad_()
        lb = feats["logit_bias"].clone().requires_grad_()
        loss = _local_loss(name, u, v, ls, lb)
        loss.backward()
        out[name] = {"loss": loss.detach(), "u": u.grad, "v": v.grad,
                     "logit_scale": _average_over_ranks(ls.grad),
                     "logit_bias": _average_over_ranks(lb.grad if lb.grad is not None else torch.zeros_like(lb))}

    batch = {k: t[rows] for k, t in global_batch().items()}
    for loss_name, chunk in DDP_CASES:
        model = make_model(loss_name)
        model.load_state_dict(torch.load(Path(state_dir) / f"{loss_name}.pt"))
        ddp = DistributedDataParallel(_TaskModule(model, loss_name, chunk))
        loss = ddp(batch)
        loss.backward()
        out[f"ddp_{loss_name}_{chunk}"] = {"loss": loss.detach(),
                                           **{n: p.grad for n, p in model.named_parameters()}}
    return out


# ---------------------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, torch.Tensor]]]:
    """All the per-rank results of one 2-process run (one spawn keeps the module fast)."""
    state_dir = tmp_path_factory.mktemp("ddp_state")
    for loss in ("clip", "siglip"):
        torch.save(make_model(loss).state_dict(), state_dir / f"{loss}.pt")
    return run_distributed(_worker, WORLD, str(state_dir), timeout=120)


def _dense_siglip(u: torch.Tensor, v: torch.Tensor, ls: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    z = 2 * torch.eye(u.shape[0], dtype=u.dtype) - 1
    return -F.logsigmoid(z * (ls.exp() * u @ v.T + lb)).sum() / u.shape[0]


def single_process(name: str) -> dict[str, torch.Tensor]:
    """Loss and gradients of the global batch in one process (the independent dense formulas)."""
    feats = global_features()
    u, v = feats["u"].clone().requires_grad_(), feats["v"].clone().requires_grad_()
    ls = feats["siglip_scale" if name == "siglip" else "logit_scale"].clone().requires_grad_()
    lb = feats["logit_bias"].clone().requires_grad_()
    loss = _dense_siglip(u, v, ls, lb) if name == "siglip" else infonce_loss(u, v, u, v, ls)
    loss.backward()
    return {"loss": loss.detach(), "u": u.grad, "v": v.grad, "logit_scale": ls.grad,
            "logit_bias": lb.grad if lb.grad is not None else torch.zeros_like(lb)}


def effective_feature_grad(ranks: list[dict], name: str, key: str) -> torch.Tensor:
    """What DDP's mean makes of the features' gradients: ``concat_r(g_r) / W`` (see the module docstring)."""
    return torch.cat([r[name][key] for r in ranks]) / len(ranks)


@pytest.mark.parametrize("name", ["infonce", "chunked_infonce", "siglip"])
def test_local_loss_equals_single_process(ranks: list[dict], name: str) -> None:
    ref = single_process(name)
    mean_loss = torch.stack([r[name]["loss"] for r in ranks]).mean()
    torch.testing.assert_close(mean_loss, ref["loss"], atol=1e-10, rtol=0)
    for key in ("u", "v"):
        torch.testing.assert_close(effective_feature_grad(ranks, name, key), ref[key], atol=1e-10, rtol=0)
        assert ref[key].abs().max() > 1e-3  # not a vacuous comparison
    for key in ("logit_scale", "logit_bias"):
        for r in ranks:
            torch.testing.assert_close(r[name][key], ref[key], atol=1e-10, rtol=0)
    if name == "siglip":
        assert ref["logit_bias"].abs() > 1e-3


def test_gather_without_grad_is_one_over_world_size(ranks: list[dict]) -> None:
    """OpenCLIP's non-local loss on a batch gathered without gradients: every rank gets ``dL/dx_r``, DDP
    divides by ``W``: the update is exactly ``1/W`` of the correct one (and the loss value looks right)."""
    ref = single_process("infonce")
    name = "wrong_global_no_grad"
    for r in ranks:
        torch.testing.assert_close(r[name]["loss"], ref["loss"], atol=1e-10, rtol=0)
    for key in ("u", "v"):
        got = effective_feature_grad(ranks, name, key)
        torch.testing.assert_close(got, ref[key] / WORLD, atol=1e-10, rtol=0)
        assert not torch.allclose(got, ref[key], atol=1e-5, rtol=0)


def test_local_loss_without_grad_gather_differs(ranks: list[dict]) -> None:
    """The local loss on a batch gathered without gradients loses the other ranks' terms: wrong gradients,
    although the mean loss value is still the global one."""
    ref = single_process("infonce")
    name = "wrong_local_no_grad"
    torch.testing.assert_close(torch.stack([r[name]["loss"] for r in ranks]).mean(), ref["loss"], atol=1e-10,
                               rtol=0)
    for key in ("u", "v"):
        got = effective_feature_grad(ranks, name, key)
        assert (got - ref[key]).norm() > 0.1 * ref[key].norm()


@pytest.mark.parametrize(("loss", "chunk"), DDP_CASES)
def test_ddp_parameter_grads_equal_single_process(ranks: list[dict], loss: str, chunk: int) -> None:
    """A real model under DDP, each rank half of the batch: every ``.grad`` equals the one-process gradient of
    the same loss on the whole batch."""
    model = make_model(loss)
    losses, _ = ContrastiveTask(model, loss, chunk_size=chunk)(global_batch())
    losses["contrastive"].backward()
    key = f"ddp_{loss}_{chunk}"
    mean_loss = torch.stack([r[key]["loss"] for r in ranks]).mean()
    torch.testing.assert_close(mean_loss, losses["contrastive"].detach(), atol=1e-10, rtol=0)
    names = [n for n, _ in model.named_parameters()]
    assert ("logit_bias" in names) == (loss == "siglip")
    total = 0.0
    for n, p in model.named_parameters():
        for r in ranks:
            torch.testing.assert_close(r[key][n], p.grad, atol=1e-9, rtol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
        total += float(p.grad.norm() ** 2)
    assert total > 1e-4
