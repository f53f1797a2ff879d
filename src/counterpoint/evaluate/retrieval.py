"""Image-text retrieval Recall@K on paired data (row i of the images matches row i of the texts)."""

from __future__ import annotations

import torch


def recall_at_k(queries: torch.Tensor, keys: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10),
                chunk: int = 1024) -> dict[str, float]:
    """Fraction of queries whose own key (same index) ranks in the top K by cosine similarity.

    The rank is the number of keys scoring *strictly* higher than the true one, so ties do not count
    against the model. Computed in query chunks to keep memory at ``chunk x N``.
    """
    n = queries.shape[0]
    ranks = torch.empty(n, dtype=torch.long)
    for start in range(0, n, chunk):
        sim = queries[start : start + chunk] @ keys.T  # [c, N]
        idx = torch.arange(start, min(start + chunk, n))
        true = sim[torch.arange(len(idx)), idx].unsqueeze(1)
        ranks[idx] = (sim > true).sum(dim=1)
    return {f"R@{k}": float((ranks < k).float().mean()) for k in ks}


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor,
                      ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, dict[str, float]]:
    return {"image_to_text": recall_at_k(image_emb, text_emb, ks),
            "text_to_image": recall_at_k(text_emb, image_emb, ks)}
