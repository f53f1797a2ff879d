"""Byte-pair-encoding tokenizer for the text tower (Hugging Face ``tokenizers``).

Trained on the training captions (or loaded from a ``tokenizer.json``) and saved with every checkpoint, so a
model is never separated from the vocabulary it was trained with. Sequences are ``<sot> tokens <eot>``
padded with ``<pad>`` (id 0) to the context length; over-long text is truncated but keeps its ``<eot>``,
because the text tower may pool at that position.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from counterpoint.errors import CheckpointError

PAD, SOT, EOT, UNK = "<pad>", "<sot>", "<eot>", "<unk>"
SPECIAL_TOKENS = [PAD, SOT, EOT, UNK]


class Tokenizer:
    """Text -> ``[N, context_length]`` token ids with a fixed ``<sot> ... <eot> <pad>...`` layout."""

    def __init__(self, hf: HFTokenizer, context_length: int) -> None:
        self.hf = hf
        self.context_length = context_length
        self.pad_id, self.sot_id, self.eot_id = (hf.token_to_id(t) for t in (PAD, SOT, EOT))
        if None in (self.pad_id, self.sot_id, self.eot_id):
            raise CheckpointError("tokenizer file lacks the <pad>/<sot>/<eot> special tokens")

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 2048, context_length: int = 32,
              extra_special: Sequence[str] = ()) -> Tokenizer:
        """A byte-level BPE vocabulary of ``texts``; ``extra_special``: a task's own special tokens (LCL's
        ``<boi>``, ``<eoi>``, ``<img>``), given ids right after ``<pad> <sot> <eot> <unk>``."""
        hf = HFTokenizer(models.BPE(unk_token=UNK))
        hf.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + list(extra_special),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf, context_length)

    @classmethod
    def from_file(cls, path: str | Path, context_length: int) -> Tokenizer:
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises a bare Exception on bad files
            raise CheckpointError(f"cannot read tokenizer '{path}': {exc}") from None
        return cls(hf, context_length)

    @classmethod
    def from_json(cls, text: str, context_length: int) -> Tokenizer:
        """From the JSON a checkpoint stores (``tokenizer.hf.to_str()``)."""
        return cls(HFTokenizer.from_str(text), context_length)

    def save(self, path: str | Path) -> None:
        self.hf.save(str(path))

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        body = self.context_length - 2
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for i, enc in enumerate(self.hf.encode_batch(texts, add_special_tokens=False)):
            ids = enc.ids[:body]
            out[i, 0] = self.sot_id
            out[i, 1 : 1 + len(ids)] = torch.tensor(ids, dtype=torch.long)
            out[i, 1 + len(ids)] = self.eot_id
        return out

    def token_id(self, token: str) -> int:
        """The id of special token ``token``; :class:`CheckpointError` if this vocabulary lacks it."""
        tid = self.hf.token_to_id(token)
        if tid is None:
            raise CheckpointError(f"the tokenizer has no {token} token (it was not trained for this task)")
        return tid

    def encode_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text without ``<sot>``/``<eot>`` or truncation (to assemble longer sequences)."""
        return [enc.ids for enc in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: torch.Tensor) -> str:
        keep = [int(t) for t in ids if int(t) not in (self.pad_id, self.sot_id, self.eot_id)]
        return self.hf.decode(keep).strip()
