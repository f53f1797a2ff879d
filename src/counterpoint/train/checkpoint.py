"""Atomic, exactly resumable checkpoints with no pickles.

A checkpoint is a folder ``checkpoints/step-00000500/`` holding

* ``model.safetensors`` - weights and buffers,
* ``optimizer.safetensors`` - the optimiser's per-parameter tensors (Adam moments, step counts),
* ``state.json`` - step, model spec, optimiser hyper-parameters, the run config,
* ``tokenizer.json`` - the vocabulary the text tower was trained with.

It is written under a temporary name and renamed into place, and ``checkpoints/latest`` (a one-line text file)
is replaced atomically afterwards, so a crash at any moment leaves the previous checkpoint intact and
``latest`` pointing at a complete folder. Nothing is ever unpickled: tensors come from safetensors and the
rest from JSON, so loading a checkpoint from an untrusted source cannot execute code.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from counterpoint.errors import CheckpointError

FORMAT = "counterpoint-checkpoint-v1"


def _optimizer_tensors(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if not torch.is_tensor(value):
                value = torch.tensor(value)
            tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def save_checkpoint_state(ckpt_root: Path, step: int, model_state: dict[str, torch.Tensor],
                          optimizer_state: dict[str, Any] | None, tokenizer_json: str | None, extra: dict[str, Any],
                          keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it and keep only the ``keep`` newest.

    ``model_state``/``optimizer_state``: full (unsharded) state dicts, the optimiser's keyed by parameter index
    as ``Optimizer.state_dict()`` returns it.
    """
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    state = {k: v.detach().cpu().contiguous() for k, v in model_state.items()}
    save_file(state, tmp / "model.safetensors", metadata={"format": FORMAT})
    meta: dict[str, Any] = {"format": FORMAT, "step": step, **extra}
    if optimizer_state is not None:
        tensors, opt_meta = _optimizer_tensors(optimizer_state)
        save_file(tensors, tmp / "optimizer.safetensors")
        meta["optimizer"] = opt_meta
    if tokenizer_json is not None:
        (tmp / "tokenizer.json").write_text(tokenizer_json)
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = ckpt_root / ".latest.tmp"
    latest_tmp.write_text(name + "\n")
    os.replace(latest_tmp, ckpt_root / "latest")
    steps = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a run directory, a ``checkpoints/`` folder, or the folder itself."""
    p = Path(path)
    for root in (p, p / "checkpoints"):
        latest = root / "latest"
        if latest.is_file():
            target = root / latest.read_text().strip()
            if target.is_dir():
                return target
    if (p / "state.json").is_file():
        return p
    raise CheckpointError(f"no checkpoint found at '{path}'; pass a run directory or a checkpoint folder "
                          f"(one with state.json and model.safetensors)")


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        meta = json.loads((ckpt / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint '{ckpt}' has an unreadable state.json ({exc}); "
                              f"it is damaged or not a counterpoint checkpoint") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint '{ckpt}' has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read '{file}': {exc}; the checkpoint is damaged") from None


def load_model_weights(ckpt: Path, model: nn.Module) -> None:
    tensors = _load_tensors(ckpt / "model.safetensors")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"checkpoint '{ckpt}' does not match the model: {first}") from None


def read_optimizer_state(ckpt: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The optimiser state dict of checkpoint ``ckpt`` (keyed by parameter index, as ``state_dict()``)."""
    tensors = _load_tensors(ckpt / "optimizer.safetensors")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = meta["optimizer"]["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}
