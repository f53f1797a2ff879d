"""The BPE tokenizer: ``<sot> tokens <eot> <pad>...`` layout, truncation, decoding, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from counterpoint.data.tokenizer import Tokenizer
from counterpoint.data.world import World, WorldConfig
from counterpoint.errors import CheckpointError

CONTEXT = 32


@pytest.fixture(scope="module")
def captions() -> list[str]:
    literal, weak = World(WorldConfig(seed=0)), World(WorldConfig(seed=0, caption_mode="weak"))
    return [literal.pair("train", i).caption for i in range(300)] + [weak.pair("train", i).caption
                                                                     for i in range(100)]


@pytest.fixture(scope="module")
def tok(captions: list[str]) -> Tokenizer:
    return Tokenizer.train(captions, vocab_size=400, context_length=CONTEXT)


def check_layout(tok: Tokenizer, row: torch.Tensor) -> int:
    """Assert ``<sot> body <eot> <pad>...``; returns the body length."""
    assert row[0] == tok.sot_id
    eots = (row == tok.eot_id).nonzero().flatten().tolist()
    assert len(eots) == 1
    end = eots[0]
    assert (row[end + 1 :] == tok.pad_id).all()
    body = row[1:end]
    assert not any(int(t) in (tok.pad_id, tok.sot_id, tok.eot_id) for t in body)
    return len(body)


def test_special_ids_and_vocab(tok: Tokenizer) -> None:
    assert tok.pad_id == 0  # padding is id 0, as the text tower's masks assume
    assert len({tok.pad_id, tok.sot_id, tok.eot_id}) == 3
    assert 100 < tok.vocab_size <= 400
    assert tok.context_length == CONTEXT


def test_encode_layout(tok: Tokenizer, captions: list[str]) -> None:
    ids = tok(captions[:50])
    assert ids.shape == (50, CONTEXT) and ids.dtype == torch.long
    lengths = [check_layout(tok, row) for row in ids]
    assert min(lengths) > 0
    assert any(n < CONTEXT - 2 for n in lengths)  # really padded
    assert (ids >= 0).all() and (ids < tok.vocab_size).all()
    single = tok(captions[0])
    assert single.shape == (1, CONTEXT)
    assert torch.equal(single[0], ids[0])
    empty = tok("")
    assert empty[0, :2].tolist() == [tok.sot_id, tok.eot_id] and (empty[0, 2:] == tok.pad_id).all()
    # a tokenizer trained on the world compresses its captions: far fewer tokens than characters
    assert sum(lengths) < 0.5 * sum(len(c) for c in captions[:50])


def test_overlong_text_is_truncated_keeping_eot(tok: Tokenizer, captions: list[str]) -> None:
    text = " ".join(captions[:12])
    ids = tok([text, captions[0]])
    row = ids[0]
    assert check_layout(tok, row) == CONTEXT - 2
    assert row[-1] == tok.eot_id and row[0] == tok.sot_id
    assert tok.decode(row) and text.lower().startswith(tok.decode(row))
    assert len(tok.decode(row)) < len(text)
    check_layout(tok, ids[1])  # the short neighbour in the same batch is unaffected
    assert torch.equal(ids[1], tok(captions[0])[0])


def test_decode_round_trips(tok: Tokenizer, captions: list[str]) -> None:
    fitting = [c for c in captions if check_layout(tok, tok(c)[0]) < CONTEXT - 2]
    assert len(fitting) > 100
    assert any(c != c.lower() for c in fitting)  # some templates start with a capital letter
    for c in fitting:
        assert tok.decode(tok(c)[0]) == c.lower()
    # characters never seen in training still round-trip (byte-level alphabet), lowercased
    for odd in ("Émile's CAFÉ, naïve!", "a — 😀 sign"):
        assert check_layout(tok, tok(odd)[0]) < CONTEXT - 2
        assert tok.decode(tok(odd)[0]) == odd.lower()


def test_save_and_load(tok: Tokenizer, captions: list[str], tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    json.loads(path.read_text())  # a plain JSON file
    loaded = Tokenizer.from_file(path, CONTEXT)
    assert loaded.vocab_size == tok.vocab_size
    assert (loaded.pad_id, loaded.sot_id, loaded.eot_id) == (tok.pad_id, tok.sot_id, tok.eot_id)
    assert torch.equal(loaded(captions), tok(captions))
    short = min(captions, key=len)
    assert loaded.decode(loaded(short)[0]) == short.lower()
    shorter = Tokenizer.from_file(str(path), 8)
    ids = shorter(captions[:5])
    assert ids.shape == (5, 8)
    assert torch.equal(ids[:, :7], tok(captions[:5])[:, :7]) and (ids[:, 7] == tok.eot_id).all()


def test_from_file_rejects_bad_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\x00\x01 this is not a tokenizer {")
    with pytest.raises(CheckpointError, match="garbage.json"):
        Tokenizer.from_file(garbage, CONTEXT)
    with pytest.raises(CheckpointError):
        Tokenizer.from_file(tmp_path / "missing.json", CONTEXT)
    (tmp_path / "other.json").write_text(json.dumps({"model": "nope"}))
    with pytest.raises(CheckpointError):
        Tokenizer.from_file(tmp_path / "other.json", CONTEXT)
    # a valid tokenizers file that lacks our special tokens is not one of ours either
    hf = HFTokenizer(models.BPE(unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=50, special_tokens=["[UNK]"], show_progress=False)
    hf.train_from_iterator(["a red circle", "a blue square"], trainer=trainer)
    foreign = tmp_path / "foreign.json"
    hf.save(str(foreign))
    with pytest.raises(CheckpointError, match="special tokens"):
        Tokenizer.from_file(foreign, CONTEXT)
