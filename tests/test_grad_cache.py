"""GradCache (Gao et al. 2021) against one full-batch backward of the same loss, in float64."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from counterpoint.models.presets import create_model
from counterpoint.models.two_tower import TwoTower
from counterpoint.objectives.chunked import chunked_infonce_loss, chunked_siglip_loss
from counterpoint.objectives.contrastive import infonce_loss
from counterpoint.objectives.distributed import gather_with_grad
from counterpoint.objectives.grad_cache import grad_cache_backward
from tests.dist_utils import run_distributed

B = 8
LOSSES = ["infonce", "chunked_infonce", "siglip"]
Grads = dict[str, torch.Tensor]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(loss: str = "infonce") -> TwoTower:
    torch.manual_seed(0)
    model = create_model("tiny-vit", embed_dim=16, vocab_size=64, context_length=8)
    if loss == "siglip":
        model.logit_bias = nn.Parameter(torch.tensor(-10.0))
        model.logit_scale.data.fill_(math.log(10.0))
    return model.double()


def make_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    text = torch.randint(3, 64, (B, 8), generator=gen)
    for i, e in enumerate(torch.randint(2, 8, (B,), generator=gen).tolist()):
        text[i, e] = 2  # <eot>
        text[i, e + 1:] = 0
    return {"image": torch.randn(B, 3, 32, 32, generator=gen, dtype=torch.float64), "text": text}


def loss_fn(model: TwoTower, name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name == "infonce":
        return lambda u, v: infonce_loss(u, v, u, v, model.logit_scale)
    if name == "chunked_infonce":
        return lambda u, v: chunked_infonce_loss(u, v, None, None, model.logit_scale, 0, 3)
    return lambda u, v: chunked_siglip_loss(u, v, model.logit_scale, model.logit_bias, 0, 3)


def grads_of(model: nn.Module) -> Grads:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@functools.cache
def full_batch(name: str) -> tuple[torch.Tensor, Grads]:
    """The reference: one backward of the loss of the whole batch (cached; callers must not modify it)."""
    model = make_model(name)
    batch = make_batch()
    loss = loss_fn(model, name)(model.encode_image(batch["image"]), model.encode_text(batch["text"]))
    loss.backward()
    return loss.detach(), grads_of(model)


def assert_grads_close(got: Grads, ref: Grads, atol: float) -> None:
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=atol, rtol=0, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize(("name", "micro"), [("infonce", 4), ("infonce", 3), ("chunked_infonce", 4),
                                             ("siglip", 4)])
def test_grad_cache_equals_full_batch(name: str, micro: int) -> None:
    ref_loss, ref = full_batch(name)
    model = make_model(name)
    out = grad_cache_backward(model, make_batch(), micro, loss_fn(model, name))
    torch.testing.assert_close(out["loss"], ref_loss, atol=1e-12, rtol=0)
    assert not out["loss"].requires_grad
    assert_grads_close(grads_of(model), ref, atol=1e-10)
    assert ref["logit_scale"].abs() > 1e-4
    if name == "siglip":
        assert ref["logit_bias"].abs() > 1e-4


@pytest.mark.parametrize("name", ["infonce", "siglip"])
def test_naive_micro_batch_loop_differs(name: str) -> None:
    """Accumulating one loss per micro-batch sees 2 negatives instead of 8: another gradient. (At SigLIP's
    init, bias -10, a negative pair's sigmoid is ~1e-4 so the gap is smaller than for InfoNCE, yet still
    ~10^7 times GradCache's error.)"""
    _, ref = full_batch(name)
    model = make_model(name)
    batch = make_batch()
    for image, text in zip(batch["image"].chunk(4), batch["text"].chunk(4)):
        (loss_fn(model, name)(model.encode_image(image), model.encode_text(text)) / 4).backward()
    got = grads_of(model)
    flat = torch.cat([got[n].flatten() - ref[n].flatten() for n in ref])
    rel = flat.norm() / torch.cat([r.flatten() for r in ref.values()]).norm()
    assert rel > (0.05 if name == "infonce" else 1e-3)
    assert not torch.allclose(got["logit_scale"], ref["logit_scale"], atol=1e-6)


def test_grad_cache_accumulates_into_existing_grads() -> None:
    _, ref = full_batch("infonce")
    model = make_model()
    for _ in range(2):
        grad_cache_backward(model, make_batch(), 2, loss_fn(model, "infonce"))
    assert_grads_close(grads_of(model), {n: 2 * g for n, g in ref.items()}, atol=1e-10)


def test_bad_micro_batch_count() -> None:
    model = make_model()
    for n in (0, B + 1):
        with pytest.raises(ValueError, match="micro_batches"):
            grad_cache_backward(model, make_batch(), n, loss_fn(model, "infonce"))


# ---------------------------------------------------------------------------------------------------------
# Dropout (RNG replay) and BatchNorm (running statistics) on a toy two-tower
# ---------------------------------------------------------------------------------------------------------


class ToyTowers(nn.Module):
    """Duck-typed two-tower with dropout and BatchNorm: ``image`` and ``text`` are feature vectors."""

    def __init__(self) -> None:
        super().__init__()
        self.visual = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5),
                                    nn.Linear(16, 6))
        self.text = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.3), nn.Tanh(), nn.Linear(16, 6))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(x), dim=-1)

    def encode_text(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(x), dim=-1)


def test_dropout_masks_replayed_and_batchnorm_stats_updated_once() -> None:
    """GradCache equals "forward every micro-batch with a graph, one loss, one backward" from the same seed:
    the re-forward replays the no-grad pass's dropout masks, the global RNG ends where that loop's does, and
    BatchNorm's running statistics see each micro-batch once."""
    gen = torch.Generator().manual_seed(2)
    batch = {"image": torch.randn(B, 12, generator=gen, dtype=torch.float64),
             "text": torch.randn(B, 5, generator=gen, dtype=torch.float64)}

    def run(use_grad_cache: bool) -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(0)
        model = ToyTowers().double()
        torch.manual_seed(5)
        fn = loss_fn(model, "infonce")  # type: ignore[arg-type]
        if use_grad_cache:
            grad_cache_backward(model, batch, 4, fn)  # type: ignore[arg-type]
        else:
            pairs = [(model.encode_image(i), model.encode_text(t))
                     for i, t in zip(batch["image"].chunk(4), batch["text"].chunk(4))]
            fn(torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])).backward()
        return model, torch.rand(3)

    ref, ref_next = run(False)
    got, got_next = run(True)
    assert_grads_close(grads_of(got), grads_of(ref), atol=1e-10)
    torch.testing.assert_close(got_next, ref_next, atol=0, rtol=0)
    for (n, a), (_, b) in zip(got.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=lambda m, n=n: f"{n}: {m}")
    assert int(got.visual[1].num_batches_tracked) == 4


# ---------------------------------------------------------------------------------------------------------
# Two processes: GradCache per rank + the local loss on gathered embeddings == one process, full batch
# ---------------------------------------------------------------------------------------------------------


def _dist_worker(rank: int, world: int, state: str) -> Grads:
    model = make_model()
    model.load_state_dict(torch.load(state))
    b = B // world
    batch = {k: t[rank * b:(rank + 1) * b] for k, t in make_batch().items()}

    def local_loss(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        u_all, offset = gather_with_grad(u)
        v_all, _ = gather_with_grad(v)
        return infonce_loss(u, v, u_all, v_all, model.logit_scale, offset)

    out = grad_cache_backward(model, batch, 2, local_loss)
    grads = grads_of(model)
    for g in grads.values():  # what DDP does: the mean over ranks
        dist.all_reduce(g)
        g /= world
    return {"loss": out["loss"], **grads}


def test_grad_cache_two_processes_equals_single_process(tmp_path: Path) -> None:
    torch.save(make_model().state_dict(), tmp_path / "model.pt")
    ranks = run_distributed(_dist_worker, 2, str(tmp_path / "model.pt"), timeout=120)
    ref_loss, ref = full_batch("infonce")
    torch.testing.assert_close(torch.stack([r.pop("loss") for r in ranks]).mean(), ref_loss, atol=1e-12, rtol=0)
    for r in ranks:
        assert_grads_close(r, ref, atol=1e-10)
