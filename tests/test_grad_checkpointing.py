"""``train.grad_checkpointing``: the same gradients as a plain backward, with fewer activations stored."""

from __future__ import annotations

import pytest
import torch

from counterpoint.models.presets import create_model
from counterpoint.objectives.contrastive import ContrastiveTask

pytestmark = pytest.mark.usefixtures("one_thread")


def _grads_and_saved_bytes(checkpointing: bool, name: str = "tiny-vit") -> tuple[dict[str, torch.Tensor], int]:
    torch.manual_seed(0)
    model = create_model(name, embed_dim=16, vocab_size=64, context_length=8).double()
    assert model.set_grad_checkpointing(checkpointing) == (2 if name == "tiny-vit" else 1)
    gen = torch.Generator().manual_seed(1)
    batch = {"image": torch.randn(6, 3, 32, 32, generator=gen, dtype=torch.float64),
             "text": torch.randint(3, 64, (6, 8), generator=gen)}
    batch["text"][:, -1] = 2  # <eot>
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses, _ = ContrastiveTask(model, "clip")(batch)
    losses["contrastive"].backward()
    return {n: p.grad for n, p in model.named_parameters()}, saved


def test_checkpointed_towers_give_the_same_gradients() -> None:
    plain, plain_bytes = _grads_and_saved_bytes(False)
    ckpt, ckpt_bytes = _grads_and_saved_bytes(True)
    for n, g in plain.items():
        torch.testing.assert_close(ckpt[n], g, atol=1e-12, rtol=0, msg=lambda m, n=n: f"{n}: {m}")
    assert sum(float(g.norm()) for g in plain.values()) > 1e-3
    assert ckpt_bytes < plain_bytes / 2  # the blocks' activations were not kept


def test_cnn_tower_is_left_alone() -> None:
    """Only the text transformer of a CNN model is checkpointed (BatchNorm must not run twice)."""
    plain, _ = _grads_and_saved_bytes(False, "tiny-cnn")
    ckpt, _ = _grads_and_saved_bytes(True, "tiny-cnn")
    for n, g in plain.items():
        torch.testing.assert_close(ckpt[n], g, atol=1e-12, rtol=0)
