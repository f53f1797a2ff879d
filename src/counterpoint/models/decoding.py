"""Caption decoding for BLIP's image-grounded decoder: greedy, beam search and nucleus sampling (Holtzman et
al., ICLR 2020), with a KV cache (one new position per step) or without (the whole prefix again every step,
for tests and the benchmark).

Every method starts from ``<dec> prompt`` and stops at ``<eot>`` or after ``max_tokens`` new tokens; the
result is the new tokens only (no prompt, no ``<eot>``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from counterpoint.models.blip import BLIPModel, DecoderCache


class _Decoder:
    """Next-token logits for a batch of prefixes, with or without a cache."""

    def __init__(self, model: BLIPModel, memory: torch.Tensor, use_cache: bool) -> None:
        self.model, self.memory = model, memory
        self.cache = DecoderCache() if use_cache else None

    def next_logits(self, prefix: torch.Tensor) -> torch.Tensor:
        """``[R, T]`` prefixes (each row's whole sequence so far) -> ``[R, V]`` logits of the next token."""
        text = self.model.text
        if self.cache is None:
            return text.logits(text(prefix, "caption", self.memory)[:, -1])
        new = prefix[:, self.cache.length :]  # the prompt on the first call, then the last token
        return text.logits(text(new, "caption", self.memory, cache=self.cache)[:, -1])

    def reorder(self, rows: torch.Tensor) -> None:
        self.memory = self.memory.index_select(0, rows)
        if self.cache is not None:
            self.cache.reorder(rows)


def _start(model: BLIPModel, batch: int, prompt: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([[model.dec_id, *prompt]] * batch, dtype=torch.long, device=device)


def _strip(rows: torch.Tensor, start: int, eot: int) -> list[list[int]]:
    out = []
    for row in rows.tolist():
        new = row[start:]
        out.append(new[: new.index(eot)] if eot in new else new)
    return out


def _room(model: BLIPModel, prefix_length: int, max_tokens: int) -> int:
    return min(max_tokens, model.text.context_length - prefix_length)


def _token_by_token(model: BLIPModel, images: torch.Tensor, prompt: list[int], max_tokens: int, use_cache: bool,
                    choose: Callable[[torch.Tensor], torch.Tensor]) -> list[list[int]]:
    """One token per image per step, picked by ``choose`` from the next-token logits, until every caption has
    ended or ``max_tokens`` are written."""
    seq = _start(model, len(images), prompt, images.device)
    decoder = _Decoder(model, model.image_tokens(images), use_cache)
    done = torch.zeros(len(images), dtype=torch.bool, device=images.device)
    for _ in range(_room(model, seq.shape[1], max_tokens)):
        nxt = torch.where(done, model.eot_id, choose(decoder.next_logits(seq)))
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        done |= nxt == model.eot_id
        if bool(done.all()):
            break
    return _strip(seq, 1 + len(prompt), model.eot_id)


@torch.no_grad()
def greedy(model: BLIPModel, images: torch.Tensor, prompt: list[int], max_tokens: int = 30,
           use_cache: bool = True) -> list[list[int]]:
    """The most likely next token at every step."""
    return _token_by_token(model, images, prompt, max_tokens, use_cache, lambda logits: logits.argmax(dim=-1))


@torch.no_grad()
def nucleus(model: BLIPModel, images: torch.Tensor, prompt: list[int], top_p: float = 0.9,
            max_tokens: int = 30, generator: torch.Generator | None = None,
            use_cache: bool = True) -> list[list[int]]:
    """Sample each token from the smallest set of most likely tokens whose probability reaches ``top_p``."""
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")

    def sample(logits: torch.Tensor) -> torch.Tensor:
        sorted_p, order = logits.float().softmax(dim=-1).sort(dim=-1, descending=True)
        # keep a token while the mass before it is below top_p (the first token always stays)
        sorted_p = sorted_p * ((sorted_p.cumsum(dim=-1) - sorted_p) < top_p)
        choice = torch.multinomial(sorted_p.cpu(), 1, generator=generator).to(order.device)
        return order.gather(1, choice).squeeze(1)

    return _token_by_token(model, images, prompt, max_tokens, use_cache, sample)


@torch.no_grad()
def beam_search(model: BLIPModel, images: torch.Tensor, prompt: list[int], beams: int = 3, max_tokens: int = 30,
                length_penalty: float = 1.0, use_cache: bool = True) -> list[list[int]]:
    """Keep the ``beams`` most likely prefixes per image; a hypothesis ends at ``<eot>``, the search when
    every image has ``beams`` finished ones (or ``max_tokens`` run out, and the live beams compete too), and
    the best by log-probability / length ** ``length_penalty`` wins."""
    if beams < 1:
        raise ValueError(f"beams must be >= 1, got {beams}")
    n, start = len(images), 1 + len(prompt)
    memory = model.image_tokens(images).repeat_interleave(beams, dim=0)
    decoder = _Decoder(model, memory, use_cache)
    seq = _start(model, n * beams, prompt, images.device)
    scores = torch.zeros(n, beams, device=images.device)
    scores[:, 1:] = float("-inf")  # all beams start as the same prefix: only one may expand at first
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(n)]
    for _ in range(_room(model, seq.shape[1], max_tokens)):
        logp = decoder.next_logits(seq).float().log_softmax(dim=-1)  # [n * beams, V]
        vocab = logp.shape[-1]
        total = (scores.view(-1, 1) + logp).view(n, beams * vocab)
        top, idx = total.topk(2 * beams, dim=1)  # twice as many: some may end here
        new_scores = torch.full((n, beams), float("-inf"), device=images.device)
        origin = torch.zeros(n, beams, dtype=torch.long, device=images.device)
        token = torch.full((n, beams), model.eot_id, dtype=torch.long, device=images.device)
        for i in range(n):
            kept = 0
            for s, j in zip(top[i].tolist(), idx[i].tolist()):
                if s == float("-inf") or len(finished[i]) >= beams:  # nothing live, or the image is done
                    break
                beam, tok = divmod(j, vocab)
                if tok == model.eot_id:
                    words = seq[i * beams + beam, start:].tolist()
                    finished[i].append((s / max(len(words) + 1, 1) ** length_penalty, words))
                    continue
                new_scores[i, kept], origin[i, kept], token[i, kept] = s, beam, tok
                kept += 1
                if kept == beams:
                    break
        rows = (torch.arange(n, device=images.device)[:, None] * beams + origin).flatten()
        decoder.reorder(rows)
        seq = torch.cat([seq.index_select(0, rows), token.view(-1, 1)], dim=1)
        scores = new_scores
        if all(len(f) >= beams for f in finished):  # every image has as many endings as beams (HF's early stop)
            break
    out = []
    for i in range(n):
        # an image with `beams` endings is done; one cut off by max_tokens lets its live beams compete
        live = [] if len(finished[i]) >= beams else [
            (scores[i, b].item() / (seq.shape[1] - start) ** length_penalty, seq[i * beams + b, start:].tolist())
            for b in range(beams) if scores[i, b] > float("-inf")]
        out.append(max(finished[i] + live, key=lambda h: h[0])[1])
    return out
