"""CUDA paths: bf16 autocast training, flash attention through SDPA, fused AdamW, channels-last convolutions.
Skipped without a GPU (CI has none); run on a GPU machine with ``pytest tests/test_cuda.py``."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from counterpoint.models.presets import create_model
from counterpoint.objectives.contrastive import ContrastiveTask
from counterpoint.train.loop import train
from counterpoint.train.optim import build_optimizer
from tests.conftest import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _batch(spec_name: str, batch: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    model = create_model(spec_name)
    size = model.visual.image_size
    tokens = torch.randint(3, 500, (batch, 32), generator=g)
    lengths = torch.randint(4, 32, (batch,), generator=g)
    pos = torch.arange(32)[None]
    tokens = torch.where(pos == lengths[:, None] - 1, 2, torch.where(pos >= lengths[:, None], 0, tokens))
    return {"image": torch.randn(batch, 3, size, size, generator=g), "text": tokens}


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-cnn"])
def test_bf16_autocast_matches_fp32(name):
    torch.manual_seed(0)
    model = create_model(name).cuda()
    task = ContrastiveTask(model, "clip")
    batch = {k: v.cuda() for k, v in _batch(name).items()}
    fp32, _ = task(batch)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16, _ = task(batch)
    loss32, loss16 = fp32["contrastive"], bf16["contrastive"]
    assert torch.isfinite(loss16)
    assert abs(loss16.item() - loss32.item()) < 0.05 * loss32.item()
    loss16.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_attention_runs_on_flash_kernel():
    """Restricting SDPA to the flash backend raises if our attention call does not qualify for it."""
    torch.manual_seed(0)
    model = create_model("tiny-vit").cuda()
    task = ContrastiveTask(model, "clip")
    batch = {k: v.cuda() for k, v in _batch("tiny-vit").items()}
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        losses, _ = task(batch)
        losses["contrastive"].backward()


def test_fused_adamw_and_channels_last_on_cuda():
    model = create_model("tiny-cnn").cuda()
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.98), 1e-6)
    assert opt.defaults["fused"] is True
    conv = model.visual.stem[1].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)


def test_gpu_matches_cpu_forward():
    torch.manual_seed(0)
    model = create_model("tiny-cnn").eval()
    batch = _batch("tiny-cnn")
    with torch.no_grad():
        cpu = model.encode_text(batch["text"]), model.encode_image(batch["image"])
        model.cuda()
        gpu = model.encode_text(batch["text"].cuda()), model.encode_image(batch["image"].cuda())
    for c, g in zip(cpu, gpu):
        torch.testing.assert_close(g.cpu(), c, atol=2e-3, rtol=2e-3)


def test_train_end_to_end_bf16_on_cuda(small_world, tmp_path):
    cfg = tiny_config(small_world, tmp_path / "run", device="cuda", precision="bf16")
    run = train(cfg)
    result = json.loads((run / "eval.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert result["zeroshot"]["all"]["top1"] > 1 / 64
