"""BriVL's math against brute force: the queue logits and loss, the false-negative guard, the momentum update
and the queue's first-in-first-out order; and its refusals (queue size, GradCache). The contract test
(``test_task_contract.py``) covers training, exact resume with the queues, 2 processes = 1 and evaluation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from counterpoint.config import ConfigError, load_config
from counterpoint.errors import UserError
from counterpoint.models.presets import resolve_spec
from counterpoint.objectives.brivl import BriVLConfig, BriVLTask, ema_, multi_positive_ce, neighbour_positives
from counterpoint.train.loop import check_data_paths, train
from tests.conftest import task_tokenizer, tiny_config


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def test_loss_equals_the_brute_force_sum_over_queries() -> None:
    """L_i2t = mean_i -log(exp(u_i.k_i/tau) / (exp(u_i.k_i/tau) + sum_j exp(u_i.q_j/tau))), written out."""
    u, k, queue = _unit(5, 8, seed=0), _unit(5, 8, seed=1), _unit(12, 8, seed=2)
    tau = 0.07
    logits = torch.cat([(u * k).sum(1, keepdim=True), u @ queue.T], dim=1) / tau
    positives = torch.zeros_like(logits, dtype=torch.bool)
    positives[:, 0] = True
    brute = 0.0
    for i in range(5):
        pos = math.exp(float(u[i] @ k[i]) / tau)
        neg = sum(math.exp(float(u[i] @ queue[j]) / tau) for j in range(12))
        brute += -math.log(pos / (pos + neg)) / 5
    assert float(multi_positive_ce(logits, positives)) == pytest.approx(brute, rel=1e-10)
    assert float(multi_positive_ce(logits, positives)) == pytest.approx(float(F.cross_entropy(
        logits, torch.zeros(5, dtype=torch.long))), rel=1e-12)


def test_false_negative_guard_marks_entries_near_both_keys() -> None:
    """An entry is a further positive iff it is among the top-k neighbours of the image key and of the text key."""
    key_img, key_txt, queue = _unit(4, 6, seed=3), _unit(4, 6, seed=4), _unit(20, 6, seed=5)
    mask = neighbour_positives(key_img, key_txt, queue, k=5)
    for i in range(4):
        top_img = set((key_img[i] @ queue.T).topk(5).indices.tolist())
        top_txt = set((key_txt[i] @ queue.T).topk(5).indices.tolist())
        assert set(torch.nonzero(mask[i]).flatten().tolist()) == top_img & top_txt
    # a pair whose keys agree, and a queue entry equal to them: the nearest neighbour of both, so a positive
    key_txt[0] = key_img[0]
    queue[7] = key_img[0]
    assert neighbour_positives(key_img, key_txt, queue, k=1)[0].nonzero().flatten().tolist() == [7]


def test_multi_positive_loss_sums_the_positives() -> None:
    """With two positives the loss is -log((e^a + e^b) / sum e^l)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]], dtype=torch.float64)
    positives = torch.tensor([[True, False, True, False]])
    expected = -math.log((math.exp(2.0) + math.exp(0.5)) / sum(math.exp(x) for x in (2.0, 1.0, 0.5, -1.0)))
    assert float(multi_positive_ce(logits, positives)) == pytest.approx(expected, rel=1e-12)


def test_momentum_update_is_the_ema() -> None:
    """theta' <- m theta' + (1 - m) theta, tensor by tensor."""
    target = [torch.ones(3), torch.full((2, 2), 4.0)]
    source = [torch.zeros(3), torch.full((2, 2), 2.0)]
    ema_(target, source, 0.9)
    torch.testing.assert_close(target[0], torch.full((3,), 0.9))
    torch.testing.assert_close(target[1], torch.full((2, 2), 3.8))


def _task(queue_size: int = 8, **options: object) -> BriVLTask:
    spec = resolve_spec("tiny-vit", embed_dim=16, vocab_size=300, context_length=8)
    return BriVLTask.build(BriVLConfig(queue_size=queue_size, **options), spec, task_tokenizer())


def _batch(n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 32, 32, generator=gen), "text": torch.randint(4, 300, (n, 8), generator=gen)}


def test_keys_enter_the_queue_first_in_first_out_and_towers_follow() -> None:
    """After each step the batch's momentum keys replace the oldest entries; the pointer wraps around; the
    momentum towers move towards the query towers by (1 - m)."""
    task = _task(queue_size=6, momentum=0.5)
    start = task.image_queue.clone()
    keys = []
    for step in range(4):  # 4 batches of 3 into a queue of 6: wraps twice
        batch = _batch(3, seed=step)
        task(batch, step)
        keys.append(task._keys)
        with torch.no_grad():
            for p in task.model.parameters():
                p.add_(0.01)  # a stand-in for the optimizer step
        before = [p.clone() for p in task.momentum_model.parameters()]
        task.after_step(step)
        for b, p, q in zip(before, task.momentum_model.parameters(), task.model.parameters()):
            torch.testing.assert_close(p, 0.5 * b + 0.5 * q)
    assert int(task.queue_ptr) == 0
    torch.testing.assert_close(task.image_queue[:3], keys[2][0])
    torch.testing.assert_close(task.image_queue[3:], keys[3][0])
    torch.testing.assert_close(task.text_queue[:3], keys[2][1])
    assert not torch.equal(task.image_queue, start)


def test_fixed_temperature_is_not_trained() -> None:
    """By default tau stays 0.07 (the scale is not a trained parameter); learn_temperature trains it."""
    task = _task()
    assert not task.model.logit_scale.requires_grad
    assert float(task.model.logit_scale.exp()) == pytest.approx(1 / 0.07)
    losses, metrics = task(_batch(4, seed=9), 0)
    assert metrics["temperature"] == pytest.approx(0.07)
    assert _task(learn_temperature=True).model.logit_scale.requires_grad


def test_queue_must_hold_whole_global_batches(small_world: Path, tmp_path: Path) -> None:
    """objective.queue_size not a multiple of train.batch_size is a one-line config error before training."""
    cfg = load_config(None, ["objective.name=brivl", "objective.queue_size=100", "train.batch_size=64",
                             f"data.train={small_world / 'train'}", f"out_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="objective.queue_size=100 must be a multiple"):
        check_data_paths(cfg)


@pytest.mark.slow
def test_grad_cache_is_refused_with_one_line(small_world: Path, tmp_path: Path) -> None:
    """BriVL's loss needs the batch's momentum keys: GradCache cannot split it, so accum_steps > 1 is refused."""
    cfg = tiny_config(small_world, tmp_path / "run", accum_steps=2, max_steps=1)
    cfg.objective = BriVLConfig(queue_size=128)
    with pytest.raises(UserError, match="GradCache"):
        train(cfg)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_sigkill_at_random_moments_then_resume_is_bit_exact(small_world: Path, tmp_path: Path) -> None:
    """A BriVL run is SIGKILLed twice at random moments while it trains (inside a step, while writing a
    checkpoint every step, while rotating old ones) and resumed each time; it ends with the weights, momentum
    towers, queues and per-step losses of the run that was never interrupted."""
    import random
    import signal
    import time

    from counterpoint.config import save_config
    from tests.dist_utils import start_cli
    from tests.test_task_contract import _losses, _state

    def config(out: str):
        cfg = tiny_config(small_world, tmp_path / out, evaluate=False, batch_size=32, max_steps=12,
                          checkpoint_every=1, keep_checkpoints=2, threads=1)
        cfg.objective = BriVLConfig(queue_size=128)
        return cfg

    reference = train(config("reference"))
    run = tmp_path / "killed"
    save_config(config("killed"), tmp_path / "recipe.yaml")
    rng = random.Random(7)
    kills = 0
    for attempt in range(10):
        started = (run / "checkpoints" / "latest").exists()
        proc = start_cli(["train", str(tmp_path / "recipe.yaml"), "--resume" if started else "--overwrite"],
                         tmp_path / "logs", name=f"attempt{attempt}")
        if kills < 2:
            logged = (run / "metrics.jsonl").read_text().count("\n") if (run / "metrics.jsonl").exists() else 0
            deadline = time.monotonic() + 120
            while proc.is_alive() and time.monotonic() < deadline:  # wait until it trains a new step
                if (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") > logged:
                    break
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.3))  # then a random moment within the next few steps
            if proc.is_alive():
                proc.kill()  # SIGKILL
                kills += 1
        proc.join(300)
        err = (tmp_path / "logs" / f"attempt{attempt}.err").read_text()
        if proc.exitcode == 0:
            break
        assert proc.exitcode == -signal.SIGKILL, err[-2000:]
    assert kills == 2 and proc.exitcode == 0, err[-2000:]
    assert _losses(run) == _losses(reference)
    a, b = _state(reference), _state(run)
    assert a.keys() == b.keys() and any(k.startswith("task/") and "queue" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
