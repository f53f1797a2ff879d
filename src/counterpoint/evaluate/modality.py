"""Per-modality evaluation of a multimodal classifier: accuracy of the fused head and of every unimodal head,
and each modality's contribution to the fused accuracy as an exact Shapley value.

Shapley value (Shapley 1953) of modality i for the value function v(S) = fused accuracy when only the
modalities in S are present:

    phi_i = sum_{S subset of N without i} |S|! (M - |S| - 1)! / M! * (v(S + {i}) - v(S))

over all 2^M subsets (exact; M is small). A missing modality's input is replaced by a *baseline*: zeros,
or the training split's mean input. The phi_i sum to v(N) - v(empty) (efficiency), v(empty) being the
accuracy of the constant prediction made from all-baseline inputs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from counterpoint.data.multimodal import ModalSplit
from counterpoint.models.fusion import MultimodalClassifier

Baseline = Literal["zero", "mean"]


def shapley_values(players: Sequence[str], value: Callable[[frozenset[str]], float]) -> dict[str, float]:
    """Exact Shapley values of ``value`` (called once per subset of ``players``)."""
    m = len(players)
    v = {frozenset(s): value(frozenset(s)) for r in range(m + 1) for s in itertools.combinations(players, r)}
    out = {}
    for i in players:
        total = 0.0
        for s, vs in v.items():
            if i in s:
                continue
            weight = math.factorial(len(s)) * math.factorial(m - len(s) - 1) / math.factorial(m)
            total += weight * (v[s | {i}] - vs)
        out[i] = total
    return out


def baseline_inputs(train: ModalSplit, kind: Baseline) -> dict[str, Tensor]:
    """One ``[...]`` input per modality standing in for a missing one: zeros or the training mean (token
    ids have no mean: they always get zeros, the usual pad id)."""
    out = {}
    for k, x in train.inputs.items():
        if kind == "mean" and (x.is_floating_point() or x.dtype == torch.uint8):
            out[k] = x.float().mean(dim=0)
        else:
            out[k] = torch.zeros_like(x[0])
    return out


@torch.no_grad()
def recalibrate_batchnorm(model: MultimodalClassifier, train: ModalSplit, batches: int, batch_size: int,
                          generator: torch.Generator) -> None:
    """Recompute every batch-norm running mean/var as the plain average over ``batches`` random training
    batches at the current weights ("precise BN", Wu & Johnson 2021, "Rethinking Batch in BatchNorm").

    The exponential running averages lag behind weights that move fast (a constant-lr SGD run on a small
    benchmark): eval-mode accuracy then swings by tens of points between epochs while training accuracy does
    not, and model selection on val would pick by noise. Only normalisation statistics change."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms or batches < 1:
        return
    device = next(model.parameters()).device
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: equal weight for every batch
    model.train()
    perm = torch.randperm(len(train), generator=generator)
    for b in range(min(batches, len(train) // batch_size)):
        idx = perm[b * batch_size:(b + 1) * batch_size]
        model.encode({k: train.inputs[k][idx].to(device) for k in model.modalities})
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


@torch.no_grad()
def _features(model: MultimodalClassifier, split: ModalSplit, batch_size: int,
              device: torch.device) -> dict[str, Tensor]:
    parts: dict[str, list[Tensor]] = {k: [] for k in model.modalities}
    for start in range(0, len(split), batch_size):
        batch = {k: split.inputs[k][start:start + batch_size].to(device) for k in model.modalities}
        for k, f in model.encode(batch).items():
            parts[k].append(f)
    return {k: torch.cat(v) for k, v in parts.items()}  # modality -> [N, D]


@torch.no_grad()
def evaluate_split(model: MultimodalClassifier, split: ModalSplit, batch_size: int = 512,
                   baselines: Mapping[str, Tensor] | None = None) -> dict[str, object]:
    """``{"acc": {"fused": a, modality: a_k}, "n": N}``, plus ``"shapley"`` (modality -> phi) and
    ``"subsets"`` (v(S) per subset, keyed by the sorted modality names joined with '+', '' for none) when
    ``baselines`` is given. The model is put in eval mode. Encoders are independent, so a missing modality's
    features are its encoder's output on the baseline input, shared by every sample: 2^M subsets cost one
    encoder pass over the split plus 2^M passes of the heads."""
    model.eval()
    device = next(model.parameters()).device
    labels = split.labels.to(device)
    feats = _features(model, split, batch_size, device)
    fused, unimodal = model.classify(feats)
    acc = {"fused": _acc(fused, labels), **{k: _acc(v, labels) for k, v in unimodal.items()}}
    result: dict[str, object] = {"acc": acc, "n": len(split)}
    if baselines is None:
        return result
    missing = {k: model.encoders[k](baselines[k].unsqueeze(0).to(device)) for k in model.modalities}  # [1, D]
    n = len(split)

    def value(present: frozenset[str]) -> float:
        mixed = {k: feats[k] if k in present else missing[k].expand(n, -1) for k in model.modalities}
        return _acc(model.classify(mixed)[0], labels)

    subsets: dict[str, float] = {}

    def recorded(present: frozenset[str]) -> float:
        subsets["+".join(sorted(present))] = v = value(present)
        return v

    result["shapley"] = shapley_values(model.modalities, recorded)
    result["subsets"] = subsets
    return result


def _acc(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())
