"""BLIP's three-mode text transformer (``models/blip.py``) and caption decoding (``models/decoding.py``):
masking per mode, and decoding with the KV cache equal to decoding without it."""

from __future__ import annotations

import pytest
import torch

from counterpoint.models.blip import BLIPModel, BLIPText
from counterpoint.models.decoding import beam_search, greedy, nucleus
from counterpoint.models.vit import VisionTransformer

IDS = {"<pad>": 0, "<sot>": 1, "<eot>": 2, "<enc>": 4, "<dec>": 5}
VOCAB = 24


def _model(seed: int = 0) -> BLIPModel:
    torch.manual_seed(seed)
    visual = VisionTransformer(8, 4, 16, 1, 2, None)
    text = BLIPText(VOCAB, 12, 16, 2, 2, memory_width=16)
    model = BLIPModel(visual, text, 8, IDS).eval()
    with torch.no_grad():  # larger weights than the 0.02 init: sharp logits that depend on image and prefix
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(std=0.4)
    return model


def test_the_decoder_is_causal_and_the_encoders_are_not() -> None:
    model = _model()
    memory = model.image_tokens(torch.randn(1, 3, 8, 8))
    a = torch.tensor([[1, 7, 8, 9, 2]])
    b = torch.tensor([[1, 7, 8, 13, 2]])  # differs from position 3 on
    with torch.no_grad():
        la, lb = model.caption_logits(memory, a), model.caption_logits(memory, b)
        torch.testing.assert_close(la[:, :3], lb[:, :3])  # positions before 3 cannot see it
        assert not torch.allclose(la[:, 3], lb[:, 3])
        assert not torch.allclose(model.encode_text(a), model.encode_text(b))  # position 0 sees everything
        assert not torch.allclose(model.match_logits(memory, a), model.match_logits(memory, b))


def test_padding_does_not_change_the_encoders() -> None:
    model = _model()
    memory = model.image_tokens(torch.randn(1, 3, 8, 8))
    short, padded = torch.tensor([[1, 7, 8, 2]]), torch.tensor([[1, 7, 8, 2, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(short), model.encode_text(padded))
        torch.testing.assert_close(model.match_logits(memory, short), model.match_logits(memory, padded))


def test_only_the_image_grounded_modes_see_the_image() -> None:
    model = _model()
    tokens = torch.tensor([[1, 7, 8, 2]])
    m1, m2 = (model.image_tokens(torch.randn(1, 3, 8, 8)) for _ in range(2))
    with torch.no_grad():
        assert not torch.allclose(model.match_logits(m1, tokens), model.match_logits(m2, tokens))
        assert not torch.allclose(model.caption_logits(m1, tokens), model.caption_logits(m2, tokens))
        torch.testing.assert_close(model.text(tokens, "text", m1), model.text(tokens, "text", m2))


@pytest.mark.parametrize("prompt", [[], [9, 10]])
def test_kv_cache_decoding_equals_decoding_without_it(prompt: list[int]) -> None:
    model = _model(1)
    images = torch.randn(4, 3, 8, 8)
    assert greedy(model, images, prompt, 8) == greedy(model, images, prompt, 8, use_cache=False)
    assert (beam_search(model, images, prompt, beams=3, max_tokens=8)
            == beam_search(model, images, prompt, beams=3, max_tokens=8, use_cache=False))
    sampled = [nucleus(model, images, prompt, 0.9, 8, torch.Generator().manual_seed(5), use_cache=c)
               for c in (True, False)]
    assert sampled[0] == sampled[1]
    assert len({tuple(c) for c in greedy(model, images, prompt, 8)}) > 1  # the captions depend on the image


def test_greedy_output_is_the_argmax_chain() -> None:
    """Brute force: feed the greedy caption back; each token is the argmax after its prefix, and decoding
    stops at <eot> or the token budget."""
    model = _model(2)
    image = torch.randn(1, 3, 8, 8)
    (caption,) = greedy(model, image, [9], max_tokens=6)
    memory = model.image_tokens(image)
    seq = [5, 9]
    with torch.no_grad():
        for token in caption:
            logits = model.text.logits(model.text(torch.tensor([seq]), "caption", memory))[0, -1]
            assert int(logits.argmax()) == token
            seq.append(token)
        last = int(model.text.logits(model.text(torch.tensor([seq]), "caption", memory))[0, -1].argmax())
    assert len(caption) == 6 or last == 2


def test_one_beam_is_greedy_and_more_beams_score_at_least_as_well() -> None:
    model = _model(3)
    images = torch.randn(3, 3, 8, 8)
    assert beam_search(model, images, [], beams=1, max_tokens=6, length_penalty=0.0) == greedy(model, images, [], 6)

    def logprob(image: torch.Tensor, caption: list[int]) -> float:
        tokens = torch.tensor([[1, *caption, 2]])
        with torch.no_grad():
            logp = model.caption_logits(model.image_tokens(image[None]), tokens).log_softmax(-1)[0]
        return float(logp[torch.arange(len(caption) + 1), tokens[0, 1:]].sum())

    for i, (g, b) in enumerate(zip(greedy(model, images, [], 6),
                                   beam_search(model, images, [], beams=4, max_tokens=6, length_penalty=0.0))):
        if len(g) < 6 and len(b) < 6:  # both finished: the beam's sequence is at least as likely
            assert logprob(images[i], b) >= logprob(images[i], g) - 1e-4


def test_nucleus_with_a_tiny_top_p_is_greedy() -> None:
    model = _model(4)
    images = torch.randn(3, 3, 8, 8)
    assert nucleus(model, images, [], 1e-6, 6, torch.Generator().manual_seed(0)) == greedy(model, images, [], 6)


def test_beam_search_of_an_image_does_not_depend_on_its_batch() -> None:
    """An image is done once it has as many endings as beams, whatever the others in the batch still do."""
    model = _model(5)
    images = torch.randn(5, 3, 8, 8)
    together = beam_search(model, images, [], beams=3, max_tokens=8)
    alone = [beam_search(model, images[i : i + 1], [], beams=3, max_tokens=8)[0] for i in range(5)]
    assert together == alone
