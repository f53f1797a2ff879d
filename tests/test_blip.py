"""BLIP's losses (``objectives/blip.py``) against brute force: momentum-distillation targets, the hard-negative
distribution, ITC against the queues, captioning with the prompt left out, and the after-step updates."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from counterpoint.config import ConfigError
from counterpoint.models.presets import resolve_spec
from counterpoint.objectives.blip import BLIPConfig, BLIPTask, distillation_targets, hard_negatives
from tests.conftest import task_tokenizer

TOKENIZER = task_tokenizer("<enc>", "<dec>")  # <pad> 0, <sot> 1, <eot> 2, <enc> 4, <dec> 5


def _task(**options: object) -> BLIPTask:
    torch.manual_seed(0)
    spec = dataclasses.replace(resolve_spec("tiny-vit", image_size=8, context_length=12, vocab_size=300),
                               patch_size=4, vision_width=16, vision_layers=1, vision_heads=2, text_width=16,
                               text_layers=1, text_heads=2, embed_dim=8)
    return BLIPTask.build(BLIPConfig(**{"queue_size": 8, **options}), spec, TOKENIZER)


def _batch(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    text = torch.zeros(n, 12, dtype=torch.long)
    for i in range(n):
        length = 3 + i % 4
        text[i, 0], text[i, 1 : 1 + length], text[i, 1 + length] = 1, torch.randint(8, 300, (length,), generator=gen), 2
    return {"image": torch.randn(n, 3, 8, 8, generator=gen), "text": text}


def test_distillation_targets_mix_the_momentum_softmax_and_the_one_hot() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    positive = torch.tensor([0, 2])
    soft = logits.softmax(dim=1)
    torch.testing.assert_close(distillation_targets(logits, positive, 0.0), F.one_hot(positive, 3).float())
    torch.testing.assert_close(distillation_targets(logits, positive, 1.0), soft)
    mixed = distillation_targets(logits, positive, 0.4)
    torch.testing.assert_close(mixed[0, 1], 0.4 * soft[0, 1])
    torch.testing.assert_close(mixed[1, 2], 0.4 * soft[1, 2] + 0.6)
    torch.testing.assert_close(mixed.sum(dim=1), torch.ones(2))


def test_hard_negatives_follow_the_softmax_without_the_pair_itself() -> None:
    sim = torch.tensor([[5.0, 1.0, 2.0], [0.0, 9.0, 0.0], [1.0, 3.0, 4.0]])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([hard_negatives(sim, gen) for _ in range(6000)])  # [draws, 3]
    weights = sim.softmax(dim=1)
    weights.fill_diagonal_(0)
    expected = weights / weights.sum(dim=1, keepdim=True)
    for row in range(3):
        counts = torch.bincount(draws[:, row], minlength=3).float() / len(draws)
        assert counts[row] == 0  # never the positive
        torch.testing.assert_close(counts, expected[row], atol=0.02, rtol=0)


def test_itc_is_soft_cross_entropy_against_batch_keys_and_queue() -> None:
    """With alpha = 0 (the first step of the ramp) the targets are one-hot at the pair's own momentum key;
    brute force over [batch keys; queue] with the learned temperature."""
    task = _task()
    batch = _batch()
    image_feat = task.model.encode_image(batch["image"])
    text_feat = task.model.encode_text(batch["text"])
    itc, sim_i2t, _ = task._itc(batch, image_feat, text_feat, step=0)
    key_img, key_txt = task._keys
    # right after build the momentum encoders are copies: keys = features
    torch.testing.assert_close(key_img, image_feat.detach())
    t = task.model.temperature
    logits_i2t = image_feat @ torch.cat([key_txt, task.text_queue]).T / t
    logits_t2i = text_feat @ torch.cat([key_img, task.image_queue]).T / t
    target = torch.arange(4)
    expected = (F.cross_entropy(logits_i2t, target) + F.cross_entropy(logits_t2i, target)) / 2
    torch.testing.assert_close(itc, expected)
    torch.testing.assert_close(sim_i2t, (image_feat @ text_feat.T / t).detach())


def test_distillation_ramps_in_over_the_first_epoch() -> None:
    task = _task()
    task.set_schedule(steps_per_epoch=10, total_steps=100)
    batch = _batch()
    feats = task.model.encode_image(batch["image"]), task.model.encode_text(batch["text"])
    losses = [float(task._itc(batch, *feats, step=s)[0].detach()) for s in (0, 5, 10, 50)]
    assert losses[0] != losses[1] != losses[2] and losses[2] == losses[3]  # alpha = 0, 0.2, 0.4, 0.4
    task.set_schedule(steps_per_epoch=500, total_steps=10)  # a run shorter than an epoch: ramped over the run
    assert float(task._itc(batch, *feats, step=10)[0].detach()) == losses[2]


def test_captioning_loss_leaves_the_prompt_out() -> None:
    """Brute force: label-smoothed cross-entropy over the caption tokens and <eot> after <dec> prompt."""
    task = _task(prompt="a picture of")
    prompt = task.model.prompt_ids
    assert prompt == TOKENIZER.encode_ids(["a picture of"])[0] and len(prompt) >= 3
    batch = _batch(2)
    memory = task.model.image_tokens(batch["image"])
    loss = task._lm(memory, batch["text"])
    terms = []
    for i in range(2):
        caption = [t for t in batch["text"][i, 1:].tolist() if t != 0]  # words and <eot>
        sequence = torch.tensor([[5, *prompt, *caption]])[:, :12]
        logits = task.model.text.logits(task.model.text(sequence, "caption", memory[i : i + 1]))[0]
        for pos in range(len(prompt), sequence.shape[1] - 1):  # predicting each caption token and <eot>
            terms.append(F.cross_entropy(logits[pos], sequence[0, pos + 1], label_smoothing=0.1))
    torch.testing.assert_close(loss, torch.stack(terms).mean())


def test_after_step_enqueues_keys_moves_the_momentum_encoders_and_clamps_the_temperature() -> None:
    task = _task(momentum=0.5)
    batch = _batch()
    losses, metrics = task(batch)
    assert set(losses) == {"itc", "itm", "lm"} and 0 <= metrics["itm_acc"] <= 1
    key_img, key_txt = task._keys
    with torch.no_grad():
        for p in task.model.visual.parameters():
            p.add_(1.0)
        task.model.log_temperature.fill_(math.log(0.9))
    before = [p.clone() for p in task.momentum["visual"].parameters()]
    task.after_step(0)
    torch.testing.assert_close(task.image_queue[:4], key_img)
    torch.testing.assert_close(task.text_queue[:4], key_txt)
    assert int(task.queue_ptr) == 4 and float(task.model.temperature.detach()) == 0.5
    for old, new, online in zip(before, task.momentum["visual"].parameters(), task.model.visual.parameters()):
        torch.testing.assert_close(new, 0.5 * old + 0.5 * online)


def test_queue_must_hold_whole_global_batches_and_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="multiple of the global batch"):
        BLIPTask.check_run(BLIPConfig(queue_size=100), 32)
    with pytest.raises(ConfigError, match="objective.init_temperature"):
        BLIPConfig(init_temperature=0.9)
    with pytest.raises(ConfigError, match="needs a ViT"):
        BLIPTask.build(BLIPConfig(), resolve_spec("tiny-cnn"), TOKENIZER)


def test_reranking_reorders_only_the_itc_top_k() -> None:
    """A matching head that recognises the true pair lifts it to rank 0 whenever ITC put it in the top k, and
    cannot help otherwise; a head that scores every pair alike leaves the ITC ranking as it was."""
    from counterpoint.evaluate.itm_rerank import _ranks
    from counterpoint.evaluate.retrieval import recall_at_k

    gen = torch.Generator().manual_seed(0)
    a, b = F.normalize(torch.randn(50, 6, generator=gen), dim=1), F.normalize(torch.randn(50, 6, generator=gen), dim=1)
    sim = a @ b.T
    k = 5
    oracle = _ranks(sim, lambda q, key: 100.0 * (q == key).float(), k)
    in_top_k = (sim.topk(k, dim=1).indices == torch.arange(50)[:, None]).any(dim=1)
    itc_rank = (sim > sim.diagonal()[:, None]).sum(dim=1)
    assert torch.equal(oracle == 0, in_top_k) and torch.equal(oracle[~in_top_k], itc_rank[~in_top_k])
    assert bool((itc_rank[~in_top_k] >= k).all())
    flat = _ranks(sim, lambda q, key: torch.zeros(len(q)), k)
    plain = recall_at_k(a, b, (1, 3, 5))
    assert {f"R@{r}": float((flat < r).float().mean()) for r in (1, 3, 5)} == plain


def test_hard_negatives_survive_a_dominant_positive() -> None:
    """At a sharp temperature the positive's softmax weight is 1.0 in float32 and the rest underflow; the
    draw must still pick among the others (the diagonal is masked before the softmax)."""
    sim = (torch.full((4, 4), -0.2) + 1.2 * torch.eye(4)) / 0.001
    draws = hard_negatives(sim, torch.Generator().manual_seed(0))
    assert bool((draws != torch.arange(4)).all())


def test_grad_checkpointing_covers_the_text_blocks_and_keeps_the_gradients() -> None:
    from counterpoint.models.layers import set_grad_checkpointing

    batch = _batch()
    grads = []
    for enabled in (False, True):
        task = _task()
        assert set_grad_checkpointing(task.model, enabled) == 2  # the ViT's stack and the text blocks
        losses, _ = task(batch)
        sum(losses.values()).backward()
        grads.append({n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_a_loss_weighted_zero_is_not_computed() -> None:
    """CapFilt's captioner (captioning only) runs no contrastive or matching pass and leaves the queues alone;
    its filter (no captioning) runs no decoder. ITM alone still gets ITC's similarities for its negatives."""
    batch = _batch()
    captioner = _task(itc_weight=0.0, itm_weight=0.0)
    losses, metrics = captioner(batch)
    assert set(losses) == {"lm"} and "itm_acc" not in metrics and captioner._keys is None
    assert captioner.unused_parameters()
    assert set(_task(lm_weight=0.0)(batch)[0]) == {"itc", "itm"}
    matching_only = _task(itc_weight=0.0, lm_weight=0.0)
    assert set(matching_only(batch)[0]) == {"itm"} and matching_only._keys is not None
    assert not _task().unused_parameters()
    with pytest.raises(ConfigError, match="all 0"):
        BLIPConfig(itc_weight=0.0, itm_weight=0.0, lm_weight=0.0)
