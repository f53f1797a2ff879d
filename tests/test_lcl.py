"""LCL's math (``objectives/lcl.py``, ``models/lcl.py``) and sequence layout (``data/interleaved.py``),
against hand-laid sequences and brute-force losses."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from counterpoint.config import ConfigError
from counterpoint.data.interleaved import SequenceLayout, collate_rows, layout_document
from counterpoint.models.lcl import AttentivePool
from counterpoint.models.presets import resolve_spec
from counterpoint.objectives.lcl import LCLConfig, LCLTask, latent_infonce
from tests.conftest import task_tokenizer

TOKENIZER = task_tokenizer("<boi>", "<eoi>", "<img>")  # <pad> 0, <sot> 1, <eot> 2, <boi> 4, <eoi> 5, <img> 6
LAYOUT = SequenceLayout(sot=1, eot=2, pad=0, boi=4, eoi=5, img=6, image_tokens=3, length=16)


def _task(**options: object) -> LCLTask:
    torch.manual_seed(0)
    spec = dataclasses.replace(resolve_spec("tiny-vit", image_size=8, context_length=24, vocab_size=40),
                               patch_size=4, vision_width=16, vision_layers=1, vision_heads=2, text_width=16,
                               text_layers=2, text_heads=2, embed_dim=16)
    return LCLTask.build(LCLConfig(**options), spec, TOKENIZER)


# ------------------------------------------------------------------------------------------------- layout


def test_a_document_becomes_one_row_with_image_slots() -> None:
    """[text, image 7, text, image 9] -> <sot> t t <boi> <img>x3 <eoi> t <boi> <img>x3 <eoi> <eot>."""
    row = layout_document(["a", 7, "b", 9], {0: [10, 11], 2: [12]}, LAYOUT)
    assert row.ids.tolist() == [1, 10, 11, 4, 6, 6, 6, 5, 12, 4, 6, 6, 6, 5, 2]
    assert row.images == [7, 9] and row.boi == [3, 9]


def test_a_long_document_is_cut_and_an_image_enters_whole_or_not_at_all() -> None:
    """The second image needs 5 positions and only 4 are left: it is dropped, no <eot> (the document did not
    end); text that does not fit is cut at the context."""
    row = layout_document(["a", 7, "b", 9], {0: [10, 11], 2: [12, 13, 14, 15, 16]}, LAYOUT)
    assert row.ids.tolist() == [1, 10, 11, 4, 6, 6, 6, 5, 12, 13, 14, 15, 16] and row.images == [7]
    cut = layout_document(["a"], {0: list(range(10, 30))}, LAYOUT)
    assert cut.ids.tolist() == [1, *range(10, 25)] and len(cut.ids) == LAYOUT.length


def test_an_image_without_anything_before_it_has_no_context() -> None:
    rows = [layout_document([3, "a"], {1: [10]}, LAYOUT), layout_document(["a", 4, 5], {0: [10]}, LAYOUT)]
    batch = collate_rows(rows, LAYOUT)
    # rows padded to the longer one (13 tokens), not to the context
    assert batch["tokens"].shape == (2, 13) and batch["tokens"][0, 6].item() == 10
    assert batch["boi"].tolist() == [1, 13 + 2, 13 + 7]  # flat positions row * L' + column
    assert batch["context"].tolist() == [False, True, True]  # an earlier image is context as well


# ------------------------------------------------------------------------------------------------- model


def test_the_latent_is_the_attention_weighted_mean_of_the_image_tokens() -> None:
    """With one head, out(sum_i a_i v_i) = sum_i a_i out(v_i): the latent is a convex combination of exactly
    what the causal model reads (the weights sum to 1, so the bias passes through)."""
    torch.manual_seed(0)
    pool = AttentivePool(6, 8, heads=1)
    x = torch.randn(3, 5, 6)
    z, tokens = pool(x)
    scores = (pool.key(x) @ pool.query / 8**0.5).softmax(dim=1)  # [3, 5]
    torch.testing.assert_close(z, (scores[..., None] * tokens).sum(dim=1))


def _pair_batch(task: LCLTask, text: list[int], image: torch.Tensor) -> dict[str, torch.Tensor]:
    n = task.model.image_tokens
    layout = SequenceLayout(1, 2, 0, 4, 5, 6, image_tokens=n, length=24)
    row = layout_document(["t", 0], {0: text}, layout)
    return {**collate_rows([row], layout), "images": image}


def test_text_encoding_is_the_training_context_at_boi() -> None:
    """encode_text(caption) is the very state the contrastive term pairs with the image of a [caption, image]
    document: zero-shot and retrieval ask the model what it was trained to answer."""
    task = _task().eval()
    image = torch.randn(1, 3, 8, 8)
    batch = _pair_batch(task, [10, 11, 12], image)
    states, _ = task.model.sequence_states(batch["tokens"], batch["images"], batch["boi"])
    trained = task.model.context_proj(states.flatten(0, 1)[batch["boi"]])
    caption = torch.tensor([[1, 10, 11, 12, 2, 0, 0]])
    torch.testing.assert_close(task.model.encode_text(caption, normalize=False), trained, atol=1e-5, rtol=1e-5)


def test_the_state_at_boi_does_not_see_its_image() -> None:
    """Causality: the context that predicts an image is computed before the image enters; the text after it
    does see it."""
    task = _task().eval()
    a = _pair_batch(task, [10, 11], torch.randn(1, 3, 8, 8))
    b = {**a, "images": torch.randn(1, 3, 8, 8)}
    sa, _ = task.model.sequence_states(a["tokens"], a["images"], a["boi"])
    sb, _ = task.model.sequence_states(b["tokens"], b["images"], b["boi"])
    boi = int(a["boi"])
    torch.testing.assert_close(sa[0, : boi + 1], sb[0, : boi + 1])
    assert not torch.allclose(sa[0, boi + 1], sb[0, boi + 1])


# ------------------------------------------------------------------------------------------------- losses


def test_generation_loss_scores_text_and_boi_but_not_image_slots_eoi_or_padding() -> None:
    """Brute force: the mean cross-entropy over exactly the positions whose next token is text, <boi> or <eot>."""
    task = _task(contrastive_weight=0.0)
    n = task.model.image_tokens
    layout = SequenceLayout(1, 2, 0, 4, 5, 6, image_tokens=n, length=24)
    rows = [layout_document(["a", 0, "b"], {0: [10, 11], 2: [12]}, layout),
            layout_document([1, "c"], {1: [13]}, layout)]
    batch = {**collate_rows(rows, layout), "images": torch.randn(2, 3, 8, 8)}
    losses, _ = task(batch)
    states, _ = task.model.sequence_states(batch["tokens"], batch["images"], batch["boi"])
    terms = []
    for r, row in enumerate(rows):
        ids = row.ids.tolist()
        for t in range(len(ids) - 1):
            if ids[t + 1] not in (5, 6):  # <eoi>, <img>
                terms.append(F.cross_entropy(task.model.causal.logits(states[r, t]), torch.tensor(ids[t + 1])))
    expected = torch.stack(terms).mean()
    assert len(terms) == 5 + 3  # 10 11 <boi> 12 <eot> | <boi> 13 <eot>
    torch.testing.assert_close(losses["generation"], expected)


def test_latent_infonce_is_the_symmetric_cross_entropy_of_the_similarity_matrix() -> None:
    torch.manual_seed(1)
    z, c = F.normalize(torch.randn(5, 4), dim=1), F.normalize(torch.randn(5, 4), dim=1)
    scale = torch.tensor(2.0)
    loss, _ = latent_infonce(z, c, scale)
    logits = scale.exp() * c @ z.T
    expected = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))) / 2
    torch.testing.assert_close(loss, expected)


def test_contrastive_term_leaves_out_images_without_context() -> None:
    """An image first in its document does not enter the InfoNCE: the loss equals the one over the others."""
    task = _task()
    n = task.model.image_tokens
    layout = SequenceLayout(1, 2, 0, 4, 5, 6, image_tokens=n, length=24)
    rows = [layout_document(["a", 0], {0: [10]}, layout), layout_document([1, "b"], {1: [11]}, layout),
            layout_document(["c", 2], {0: [12]}, layout)]
    batch = {**collate_rows(rows, layout), "images": torch.randn(3, 3, 8, 8)}
    losses, _ = task(batch)
    states, z = task.model.sequence_states(batch["tokens"], batch["images"], batch["boi"])
    keep = torch.tensor([0, 2])
    c = F.normalize(task.model.context_proj(states.flatten(0, 1)[batch["boi"][keep]]), dim=1)
    expected, _ = latent_infonce(F.normalize(z[keep], dim=1), c, task.model.logit_scale)
    torch.testing.assert_close(losses["contrastive"], 0.1 * expected)


def test_ablations_build_only_the_heads_their_losses_use() -> None:
    generation_only = _task(contrastive_weight=0.0)
    assert generation_only.model.context_proj is None and generation_only.model.logit_scale is None
    regression = _task(contrastive_weight=0.0, regression_weight=1.0)
    assert regression.model.regression_head is not None and regression.model.context_proj is None


@pytest.mark.parametrize("options, needle", [
    ({"contrastive_weight": -1.0}, "objective.contrastive_weight"),
    ({"generation_weight": 0.0, "contrastive_weight": 0.0}, "at least one"),
    ({"init_temperature": 0.0}, "objective.init_temperature"),
])
def test_bad_options_are_one_line_errors(options: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        LCLConfig(**options)


def test_lcl_needs_a_vit_and_latents_in_the_causal_width() -> None:
    with pytest.raises(ConfigError, match="needs a ViT"):
        LCLTask.build(LCLConfig(), resolve_spec("tiny-cnn"), TOKENIZER)
    with pytest.raises(ConfigError, match="model.embed_dim=32 must equal"):
        LCLTask.build(LCLConfig(), resolve_spec("tiny-vit", embed_dim=32), TOKENIZER)
