"""Fusion classifier: every fusion type with 3 modalities (spectrogram, frames, tokens), CNN and ViT
encoders; unimodal heads see only their own encoder; parameter groups partition the model; the probe
heads of joint training learn without moving the encoders; exact Shapley values."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from counterpoint.data.multimodal import ModalSplit
from counterpoint.evaluate.modality import baseline_inputs, evaluate_split, shapley_values
from counterpoint.models.encoders import EncoderConfig, input_layout
from counterpoint.models.fusion import FUSIONS, MultimodalClassifier, build_classifier
from counterpoint.objectives.balance import BalanceTask, classification_losses
from counterpoint.optim import build_combiner

pytestmark = pytest.mark.usefixtures("one_thread")


def three_modal_inputs(n: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "audio": torch.randn(n, 12, 8, generator=gen),  # [N, T, F] fbank
        "visual": torch.randint(0, 256, (n, 2, 3, 8, 8), generator=gen, dtype=torch.uint8),  # [N, K, 3, H, W]
        "text": torch.randint(1, 20, (n, 5), generator=gen),  # [N, L] token ids
    }


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_fusion_with_three_modalities(fusion: str) -> None:
    torch.manual_seed(0)
    x = three_modal_inputs()
    model = build_classifier(x, num_classes=4, dim=16, fusion=fusion,
                             encoders={"visual": EncoderConfig(widths=(4,), depths=(1,)),
                                       "audio": EncoderConfig(widths=(4,), depths=(1,)),
                                       "text": EncoderConfig(width=16, layers=1, heads=2)})
    out = model(x)
    assert out.fused.shape == (6, 4)
    assert set(out.unimodal) == {"audio", "visual", "text"} and all(v.shape == (6, 4) for v in out.unimodal.values())
    groups = model.parameter_groups()
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # a partition of the parameters
    # The fused loss reaches every encoder (every fusion type actually fuses).
    grads = torch.autograd.grad(F.cross_entropy(out.fused, torch.zeros(6, dtype=torch.long)),
                                [groups[k][0] for k in ("audio", "visual", "text")], allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_unimodal_head_sees_only_its_encoder() -> None:
    torch.manual_seed(0)
    x = three_modal_inputs()
    model = build_classifier(x, num_classes=3, dim=8, encoders={k: EncoderConfig(widths=(4,), depths=(1,), width=8)
                                                                for k in x})
    out = model(x)
    groups = model.parameter_groups()
    for k in x:
        others = [p for j in x if j != k for p in groups[j]]
        grads = torch.autograd.grad(out.unimodal[k].sum(), others + groups[k], allow_unused=True, retain_graph=True)
        assert all(g is None for g in grads[:len(others)])
        assert any(g is not None for g in grads[len(others):])


def test_vit_encodes_spectrograms_and_layouts_are_read_from_samples() -> None:
    x = {"audio": torch.randn(4, 16, 12), "visual": torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)}
    model = build_classifier(x, 5, dim=16, encoders={"audio": EncoderConfig(kind="vit", patch=4, width=16, layers=1),
                                                     "visual": EncoderConfig(kind="vit", patch=4, width=16, layers=1)})
    assert model(x).fused.shape == (4, 5)
    samples = (torch.zeros(3, dtype=torch.long), torch.zeros(4, 5), torch.zeros(3, 4, 4, dtype=torch.uint8),
               torch.zeros(2, 3, 4, 4))
    assert [input_layout(t) for t in samples] == ["tokens", "spectrogram", "image", "frames"]
    with pytest.raises(ValueError, match="cannot encode"):
        input_layout(torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="needs >= 2 modalities"):
        build_classifier({"audio": x["audio"]}, 5)


class Flat(nn.Module):
    """A linear encoder (no batch norm), so single-sample batches and exact gradients are easy."""

    def __init__(self, d_in: int, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1).float())


def linear_model(dims: dict[str, int], classes: int = 3, fusion: str = "concat", seed: int = 0):
    torch.manual_seed(seed)
    return MultimodalClassifier({k: Flat(d, 4) for k, d in dims.items()}, 4, classes, fusion)


def test_joint_probes_train_heads_on_detached_features_only() -> None:
    model = linear_model({"a": 5, "b": 3})
    gen = torch.Generator().manual_seed(1)
    batch = {"a": torch.randn(8, 5, generator=gen), "b": torch.randn(8, 3, generator=gen),
             "label": torch.randint(0, 3, (8,), generator=gen)}
    task = BalanceTask(model, build_combiner("joint"))
    task.step(batch)
    losses = classification_losses(model(batch), batch["label"])
    groups = model.parameter_groups()
    enc = groups["a"] + groups["b"]
    # Encoders: the gradient of L_mm alone (the probes never reach them).
    for p, g in zip(enc, torch.autograd.grad(losses["fused"], enc, retain_graph=True)):
        torch.testing.assert_close(p.grad, g)
    # Unimodal heads: the gradient of their own L_k (identical with or without detaching the features).
    for k in ("a", "b"):
        head = list(model.unimodal_heads[k].parameters())
        for p, g in zip(head, torch.autograd.grad(losses[k], head, retain_graph=True)):
            torch.testing.assert_close(p.grad, g)
    # Unimodal-alone training leaves the fusion head to a probe the same way.
    task = BalanceTask(model, build_combiner("unimodal"))
    task.step(batch)
    fused_head = list(model.fused_head.parameters())
    for p, g in zip(fused_head, torch.autograd.grad(losses["fused"], fused_head, retain_graph=True)):
        torch.testing.assert_close(p.grad, g)


def test_logged_cosine_matches_autograd_and_flags_a_forced_conflict() -> None:
    model = linear_model({"a": 5, "b": 3}, classes=2)
    with torch.no_grad():  # fused logits = -(unimodal logits of a): L_mm and L_a pull encoder a apart
        model.fused_head.weight.zero_()
        model.fused_head.bias.zero_()
        model.fused_head.weight[:, :4] = -model.unimodal_heads["a"].weight
        model.unimodal_heads["a"].bias.zero_()
    batch = {"a": torch.randn(1, 5), "b": torch.randn(1, 3), "label": torch.tensor([1])}
    stats = BalanceTask(model, build_combiner("uniform", diagnostics=True)).step(batch)
    losses = classification_losses(model(batch), batch["label"])
    for k in ("a", "b"):
        params = model.parameter_groups()[k]
        gm = torch.cat([g.flatten() for g in torch.autograd.grad(losses["fused"], params, retain_graph=True)])
        gu = torch.cat([g.flatten() for g in torch.autograd.grad(losses[k], params, retain_graph=True)])
        assert stats[f"cos/{k}"] == pytest.approx(F.cosine_similarity(gm, gu, dim=0).item(), abs=1e-5)
        assert stats[f"conflict/{k}"] == float(stats[f"cos/{k}"] < 0)
    assert stats["cos/a"] == pytest.approx(-1.0, abs=1e-5) and stats["conflict/a"] == 1.0


def test_shapley_two_modalities_by_hand() -> None:
    v = {"": 0.1, "a": 0.5, "b": 0.3, "ab": 0.9}
    phi = shapley_values(["a", "b"], lambda s: v["".join(sorted(s))])
    # phi_a = 1/2 (v(a) - v()) + 1/2 (v(ab) - v(b)) = 0.2 + 0.3
    assert phi == pytest.approx({"a": 0.5, "b": 0.3})


def test_shapley_three_modalities_by_hand() -> None:
    v = {"": 0.0, "1": 0.2, "2": 0.1, "3": 0.0, "12": 0.6, "13": 0.3, "23": 0.2, "123": 0.9}
    phi = shapley_values(["1", "2", "3"], lambda s: v["".join(sorted(s))])
    # Weights 1/3 (empty and full coalitions of the others) and 1/6 (one other), worked out on paper.
    assert phi == pytest.approx({"1": 0.2 / 3 + 0.5 / 6 + 0.3 / 6 + 0.7 / 3,
                                 "2": 0.1 / 3 + 0.4 / 6 + 0.2 / 6 + 0.6 / 3,
                                 "3": 0.0 / 3 + 0.1 / 6 + 0.1 / 6 + 0.3 / 3})
    assert sum(phi.values()) == pytest.approx(0.9)  # efficiency: v(all) - v(none)


@pytest.mark.parametrize("baseline", ["zero", "mean"])
def test_model_shapley_equals_brute_force_substitution(baseline: str) -> None:
    """The shortcut (encode each modality once, mix features per subset) equals substituting inputs and
    running the whole model for all 2^3 subsets."""
    x = three_modal_inputs(n=40, seed=2)
    labels = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(3))
    model = build_classifier(x, 3, dim=8, fusion="attention",
                             encoders={k: EncoderConfig(widths=(4,), depths=(1,), width=8, layers=1) for k in x})
    model.eval()
    split = ModalSplit(x, labels)
    base = baseline_inputs(split, baseline)
    result = evaluate_split(model, split, batch_size=16, baselines=base)

    def brute(present: frozenset[str]) -> float:
        # The encoders convert to float themselves, so a float mean image stands in for uint8 frames.
        inputs = {k: x[k] if k in present else base[k].expand(40, *base[k].shape) for k in x}
        with torch.no_grad():
            return float((model(inputs).fused.argmax(-1) == labels).float().mean())

    expected = shapley_values(list(x), brute)
    assert result["shapley"] == pytest.approx(expected, abs=1e-6)
    assert result["subsets"]["audio+text+visual"] == pytest.approx(result["acc"]["fused"])


def test_published_mmpareto_restatement_writes_our_gradients() -> None:
    """The benchmark's restated official step (1 forward + 4 backward) and MMPareto (2 backward) agree."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    try:
        import bench_mmpareto
    finally:
        sys.path.pop(0)
    x = three_modal_inputs(n=8)
    del x["text"]
    labels = torch.arange(8) % 3
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_classifier(x, 3, dim=8, encoders={k: EncoderConfig(widths=(4,), depths=(1,)) for k in x}))
    opt = torch.optim.SGD(models[0].parameters(), lr=0.0)  # lr 0: step() leaves the weights to compare
    bench_mmpareto.published_step(models[0], {**x, "label": labels}, opt, gamma=1.5)
    losses = classification_losses(models[1]({**x, "label": labels}), labels)
    build_combiner("mmpareto", gamma=1.5).combine(losses, models[1].parameter_groups())
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
