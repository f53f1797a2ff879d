"""Labelled multimodal datasets held in memory: the data contract of balanced multimodal learning.

Every imbalance benchmark (generated audio-visual, shortcut) and every real dataset read from disk (the
audio-visual research layout, precomputed feature shards) becomes a :class:`ModalDataset`, so models,
trainers and evaluation never know where the data came from.

Input conventions per modality (the key is the modality's name, free to choose; these are the usual ones):

* ``audio``:  float32 ``[N, T, F]`` log-mel filterbank frames (``counterpoint.data.audio.kaldi_fbank``);
* ``visual``: uint8 ``[N, 3, H, W]`` one image, or ``[N, K, 3, H, W]`` K frames per clip;
* ``text``:   int64 ``[N, L]`` token ids.

A dataset is saved as one ``safetensors`` file (tensors named ``{split}/{modality}`` and ``{split}/labels``)
next to a JSON file (classes, modalities, generator parameters): no pickles, fast to load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from counterpoint.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass
class ModalSplit:
    """``inputs[m]``: ``[N, ...]`` tensor of modality ``m``; ``labels``: ``[N]`` int64 class indices."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor

    def __post_init__(self) -> None:
        n = self.labels.shape[0]
        for name, x in self.inputs.items():
            if x.shape[0] != n:
                raise ValueError(f"modality '{name}' has {x.shape[0]} samples but there are {n} labels")

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class ModalDataset:
    """Named splits (``train``, ``val``, ``test``) over the same modalities and classes."""

    name: str
    classes: list[str]
    splits: dict[str, ModalSplit]
    info: dict[str, Any] = field(default_factory=dict)  # generator parameters, skip counts, source paths

    def __post_init__(self) -> None:
        names = {tuple(sorted(s.inputs)) for s in self.splits.values()}
        if len(names) > 1:
            raise ValueError(f"splits disagree on modalities: {sorted(names)}")

    @property
    def modalities(self) -> list[str]:
        first = next(iter(self.splits.values()))
        return list(first.inputs)

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (``.safetensors``) and ``path`` with suffix ``.json``; returns the tensor file."""
        path = Path(path).with_suffix(".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for split, data in self.splits.items():
            tensors[f"{split}/labels"] = data.labels.contiguous()
            tensors.update({f"{split}/{m}": x.contiguous() for m, x in data.inputs.items()})
        meta = {"format": "counterpoint-modal-v1", "name": self.name, "classes": self.classes,
                "modalities": self.modalities, "splits": list(self.splits), "info": self.info}
        tmp = path.with_suffix(".safetensors.tmp")
        save_file(tensors, tmp)
        tmp.replace(path)
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> ModalDataset:
        path = Path(path).with_suffix(".safetensors")
        meta_path = path.with_suffix(".json")
        if not path.exists() or not meta_path.exists():
            raise DataError(f"no dataset at '{path}' (expected {path.name} and {meta_path.name})")
        try:
            meta = json.loads(meta_path.read_text())
            tensors = load_file(path)
            splits = {s: ModalSplit({m: tensors[f"{s}/{m}"] for m in meta["modalities"]}, tensors[f"{s}/labels"])
                      for s in meta["splits"]}
        except (SafetensorError, json.JSONDecodeError, KeyError, ValueError) as e:
            raise DataError(f"dataset '{path}' is unreadable ({type(e).__name__}: {e}); write it again") from e
        return cls(meta["name"], meta["classes"], splits, meta.get("info", {}))
