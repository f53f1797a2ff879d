"""The text tower runs its blocks on packed real tokens; outputs and gradients must equal the padded
computation (reference: the same blocks on the full ``[B, L, C]`` tensor)."""

import pytest
import torch

from counterpoint.models.text import TextTransformer


def _padded_reference(model: TextTransformer, tokens: torch.Tensor) -> torch.Tensor:
    x = model.token_embed(tokens) + model.pos_embed[:, : tokens.shape[1]]
    keep = tokens != model.pad_id
    mask = None if model.pool == "eot" else keep[:, None, None, :]
    x = model.ln_final(model.transformer(x, mask=mask, causal=model.pool == "eot"))
    if model.pool == "eot":
        pooled = x[torch.arange(x.shape[0]), (tokens == model.eot_id).int().argmax(dim=1)]
    else:
        k = keep.unsqueeze(-1).to(x.dtype)
        pooled = (x * k).sum(1) / k.sum(1)
    return model.proj(pooled)


@pytest.mark.parametrize("pool", ["eot", "mean"])
def test_packed_equals_padded(pool, one_thread):
    torch.manual_seed(0)
    model = TextTransformer(vocab_size=50, context_length=12, width=32, layers=2, heads=4, embed_dim=16,
                            pool=pool).double()
    lengths = [12, 3, 7, 1, 9]
    tokens = torch.zeros(len(lengths), 12, dtype=torch.long)
    for i, n in enumerate(lengths):  # <sot> words... <eot>, then padding
        tokens[i, :n] = torch.randint(3, 50, (n,))
        tokens[i, 0], tokens[i, n - 1] = 1, 2
    out = model(tokens)
    ref = _padded_reference(model, tokens)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)

    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    ref_grads = torch.autograd.grad(ref.square().sum(), list(model.parameters()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)
    # A caption's embedding does not depend on how much padding its batch carries.
    torch.testing.assert_close(model(tokens[1:2, :3]), out[1:2], rtol=0, atol=1e-12)
