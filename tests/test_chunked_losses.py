"""The tiled (chunked) InfoNCE and SigLIP losses against plain, materialising references: values and every
gradient, chunk sizes that do and do not divide the batch, the multi-rank local-loss form, gradcheck, bf16."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from counterpoint.objectives.chunked import (
    chunked_cross_entropy_rows,
    chunked_infonce_loss,
    chunked_siglip_loss,
)
from counterpoint.objectives.contrastive import infonce_loss

# ----------------------------------------------------------------------------------------------------
# Plain references (they build the whole logit matrix)
# ----------------------------------------------------------------------------------------------------


def infonce_loss_naive(u: torch.Tensor, v: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP: (CE(s U V^T, arange) + CE(s V U^T, arange)) / 2, s = exp(logit_scale)."""
    if u.dtype in (torch.bfloat16, torch.float16):
        u, v = u.float(), v.float()
    logits = logit_scale.exp() * u @ v.T
    targets = torch.arange(u.shape[0])
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def siglip_loss_naive(u: torch.Tensor, v: torch.Tensor, logit_scale: torch.Tensor,
                      logit_bias: torch.Tensor) -> torch.Tensor:
    """SigLIP: -(1/B) sum_ij log sigmoid(z_ij (s u_i.v_j + b)), z = 2 I - 1."""
    if u.dtype in (torch.bfloat16, torch.float16):
        u, v = u.float(), v.float()
    x = logit_scale.exp() * u @ v.T + logit_bias
    z = 2 * torch.eye(u.shape[0], dtype=x.dtype) - 1
    return -F.logsigmoid(z * x).sum() / u.shape[0]


# ----------------------------------------------------------------------------------------------------


def feats(n: int, d: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).to(dtype).requires_grad_()


def param(x: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype, requires_grad=True)


def tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}


def assert_same(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...], dtype: torch.dtype) -> None:
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tol(dtype))


CASES = [  # (B, d, chunk): chunks that divide B, that do not, larger than B, of one row
    (1, 3, 4), (8, 4, 4), (10, 5, 3), (17, 8, 5), (33, 16, 64), (12, 6, 1), (64, 32, 7),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("b", "d", "chunk"), CASES)
def test_infonce_single_process_matches_naive(b: int, d: int, chunk: int, dtype: torch.dtype) -> None:
    u, v = feats(b, d, 0, dtype), feats(b, d, 1, dtype)
    s = param(math.log(1 / 0.07), dtype)
    want = infonce_loss_naive(u, v, s)
    g_want = torch.autograd.grad(want, (u, v, s))
    got = chunked_infonce_loss(u, v, u, v, s, 0, chunk)  # fused path (u_all is u)
    g_got = torch.autograd.grad(got, (u, v, s))
    assert_same((got, *g_got), (want, *g_want), dtype)
    # The general two-direction path (u_all is a different tensor object holding the same values).
    got2 = chunked_infonce_loss(u, v, u[:], v[:], s, 0, chunk)
    assert_same((got2, *torch.autograd.grad(got2, (u, v, s))), (want, *g_want), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("b", "d", "chunk"), CASES)
def test_siglip_single_process_matches_naive(b: int, d: int, chunk: int, dtype: torch.dtype) -> None:
    u, v = feats(b, d, 2, dtype), feats(b, d, 3, dtype)
    s, bias = param(math.log(10.0), dtype), param(-10.0, dtype)
    want = siglip_loss_naive(u, v, s, bias)
    g_want = torch.autograd.grad(want, (u, v, s, bias))
    got = chunked_siglip_loss(u, v, s, bias, 0, chunk)
    g_got = torch.autograd.grad(got, (u, v, s, bias))
    assert_same((got, *g_got), (want, *g_want), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("world", "b", "d", "chunk"),
                         [(2, 8, 4, 3), (3, 5, 6, 4), (4, 6, 8, 6), (3, 7, 5, 100)])
def test_local_loss_over_ranks_equals_global_loss(world: int, b: int, d: int, chunk: int,
                                                   dtype: torch.dtype) -> None:
    """Each simulated rank scores its slice (offset r*b, global batch longer than the local one) against the
    global columns; the mean over ranks and its gradients, which flow through u_all / v_all as well, equal the
    single-process loss on the global batch."""
    u_all, v_all = feats(world * b, d, 4, dtype), feats(world * b, d, 5, dtype)
    s, bias = param(2.5, dtype), param(-5.0, dtype)

    want = infonce_loss_naive(u_all, v_all, s)
    g_want = torch.autograd.grad(want, (u_all, v_all, s))
    got = sum(chunked_infonce_loss(u_all[r * b:(r + 1) * b], v_all[r * b:(r + 1) * b], u_all, v_all, s,
                                   offset=r * b, chunk_size=chunk) for r in range(world)) / world
    assert_same((got, *torch.autograd.grad(got, (u_all, v_all, s))), (want, *g_want), dtype)

    want = siglip_loss_naive(u_all, v_all, s, bias)
    g_want = torch.autograd.grad(want, (u_all, v_all, s, bias))
    got = sum(chunked_siglip_loss(u_all[r * b:(r + 1) * b], v_all, s, bias, offset=r * b, chunk_size=chunk)
              for r in range(world)) / world
    assert_same((got, *torch.autograd.grad(got, (u_all, v_all, s, bias))), (want, *g_want), dtype)


def test_local_loss_matches_package_infonce_per_rank() -> None:
    """One rank's loss alone (offset != 0) against the package's materialising local-loss InfoNCE."""
    u_all, v_all = feats(20, 8, 6, torch.float64), feats(20, 8, 7, torch.float64)
    s = param(math.log(30.0), torch.float64)
    u, v = u_all[5:10], v_all[5:10]
    want = infonce_loss(u, v, u_all, v_all, s, offset=5)
    got = chunked_infonce_loss(u, v, u_all, v_all, s, offset=5, chunk_size=3)
    g_want = torch.autograd.grad(want, (u_all, v_all, s))
    assert_same((got, *torch.autograd.grad(got, (u_all, v_all, s))), (want, *g_want), torch.float64)


def test_cross_entropy_rows_arbitrary_targets() -> None:
    q, k = feats(9, 4, 8, torch.float64), feats(13, 4, 9, torch.float64)
    scale = param(7.0, torch.float64)
    targets = torch.tensor([12, 0, 5, 5, 3, 11, 7, 1, 12])
    want = F.cross_entropy(scale * q @ k.T, targets)
    got = chunked_cross_entropy_rows(q, k, scale, targets, chunk_size=4)
    grads = (q, k, scale)
    assert_same((got, *torch.autograd.grad(got, grads)),
                (want, *torch.autograd.grad(want, grads)), torch.float64)


def test_gradcheck_tiny_float64() -> None:
    u, v = feats(5, 3, 10, torch.float64), feats(5, 3, 11, torch.float64)
    u_all, v_all = feats(7, 3, 12, torch.float64), feats(7, 3, 13, torch.float64)
    s, bias = param(1.3, torch.float64), param(-2.0, torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, c: chunked_infonce_loss(a, b, a, b, c, 0, 2), (u, v, s))
    assert torch.autograd.gradcheck(
        lambda a, b, ua, va, c: chunked_infonce_loss(a, b, ua, va, c, 2, 3), (u, v, u_all, v_all, s))
    assert torch.autograd.gradcheck(
        lambda a, vb, c, bb: chunked_siglip_loss(a, vb, c, bb, 1, 2), (u, v_all, s, bias))
    targets = torch.tensor([6, 0, 2, 2, 4])
    assert torch.autograd.gradcheck(
        lambda a, b, c: chunked_cross_entropy_rows(a, b, c, targets, 3), (u, v_all, s))


def test_bf16_inputs_upcast_and_close() -> None:
    u, v = feats(40, 16, 14, torch.bfloat16), feats(40, 16, 15, torch.bfloat16)
    s, bias = param(math.log(20.0)), param(-5.0)
    for naive, chunked, params in (
        (lambda: infonce_loss_naive(u, v, s), lambda: chunked_infonce_loss(u, v, u, v, s, 0, 16), (u, v, s)),
        (lambda: infonce_loss_naive(u, v, s), lambda: chunked_infonce_loss(u, v, u[:], v[:], s, 0, 16),
         (u, v, s)),
        (lambda: siglip_loss_naive(u, v, s, bias), lambda: chunked_siglip_loss(u, v, s, bias, 0, 16),
         (u, v, s, bias)),
    ):
        want, got = naive(), chunked()
        assert got.dtype == torch.float32  # computed in float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params), strict=True):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-3)


def test_extreme_logits_are_stable() -> None:
    """Scale 1e4 (logits far beyond exp's float32 range); a well-separated SigLIP batch with a tiny loss."""
    u, v = feats(12, 4, 16, torch.float64), feats(12, 4, 17, torch.float64)
    s = param(math.log(1e4), torch.float64)
    got = chunked_infonce_loss(u.float(), v.float(), None, None, s.float(), 0, 5)
    want = infonce_loss_naive(u, v, s)
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)
    eye = torch.eye(12, dtype=torch.float64)  # orthonormal rows: positives 1, negatives 0
    sig = chunked_siglip_loss(eye.float(), eye.float(), param(math.log(40.0)), param(-20.0), 0, 5)
    ref = siglip_loss_naive(eye, eye, param(math.log(40.0), torch.float64), param(-20.0, torch.float64))
    assert 0 < ref.item() < 1e-6
    torch.testing.assert_close(sig.double(), ref, rtol=1e-5, atol=0)


def test_bad_arguments() -> None:
    u = feats(4, 3, 19)
    with pytest.raises(ValueError, match="outside"):
        chunked_infonce_loss(u, u, feats(6, 3, 20), feats(6, 3, 21), param(1.0), offset=3)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_siglip_loss(u, u, param(1.0), param(0.0), 0, 0)
    with pytest.raises(ValueError, match="targets"):
        chunked_cross_entropy_rows(u, u, param(1.0), torch.tensor([0, 1, 2, 4]))
