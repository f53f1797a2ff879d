"""Retrieval re-ranked by an image-text matching head (BLIP's protocol, Li et al. 2022): ITC similarities pick
each query's top ``k`` candidates, and the image-grounded encoder scores every such pair again; a candidate's
final score is its ITM match logit plus its ITC similarity (as BLIP's evaluation adds them), and keys outside
the top ``k`` rank below all of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from counterpoint.data.transforms import normalize


@torch.no_grad()
def _ranks(sim: torch.Tensor, score_pairs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
           k: int) -> torch.Tensor:
    """Rank of each query's own key (index = query index) after re-ranking its top ``k`` by ``score_pairs``
    (``(query rows, key rows) -> [n] scores``); a key outside the top ``k`` keeps its ITC rank (>= k)."""
    sim = sim.cpu()
    n = sim.shape[0]
    top = sim.topk(min(k, sim.shape[1]), dim=1).indices  # [N, k]
    queries = torch.arange(n)[:, None].expand_as(top)
    scores = score_pairs(queries.flatten(), top.flatten()).cpu().view_as(top) + sim.gather(1, top)
    found = top == torch.arange(n)[:, None]
    true = (scores * found).sum(dim=1, keepdim=True)
    higher = (scores > true).sum(dim=1)
    itc_rank = (sim > sim.diagonal()[:, None]).sum(dim=1)
    return torch.where(found.any(dim=1), higher, itc_rank)


@torch.no_grad()
def itm_reranked_retrieval(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor,
                           image_emb: torch.Tensor, text_emb: torch.Tensor, k: int = 16,
                           ks: tuple[int, ...] = (1, 5, 10), batch_size: int = 256,
                           device: torch.device | str = "cpu") -> dict[str, dict[str, float]]:
    """Recall@K in both directions of paired ``images`` (uint8) and ``tokens`` (row i matches row i), the top
    ``k`` ITC candidates (from the unit embeddings) re-ranked by ``model.match_logits``."""
    was_training = model.training
    model.eval()
    image_tokens = torch.cat([model.image_tokens(normalize(images[i : i + batch_size].to(device))).cpu()
                              for i in range(0, len(images), batch_size)])

    def match(image_rows: torch.Tensor, text_rows: torch.Tensor) -> torch.Tensor:
        out = [model.match_logits(image_tokens[image_rows[i : i + batch_size]].to(device),
                                  tokens[text_rows[i : i + batch_size]].to(device))[:, 1].float().cpu()
               for i in range(0, len(image_rows), batch_size)]
        return torch.cat(out)

    sim = image_emb @ text_emb.T
    i2t = _ranks(sim, match, k)
    t2i = _ranks(sim.T.contiguous(), lambda t, i: match(i, t), k)
    model.train(was_training)
    return {"k": k, "image_to_text": {f"R@{r}": float((i2t < r).float().mean()) for r in ks},
            "text_to_image": {f"R@{r}": float((t2i < r).float().mean()) for r in ks}}
