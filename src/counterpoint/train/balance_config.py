"""Typed, validated configuration of balanced multimodal training runs and method comparisons.

Same mechanics as :mod:`counterpoint.config`: a YAML recipe (``configs/balance_av.yaml``) over the defaults,
``key=value`` overrides over that, every key and value checked, one-line :class:`ConfigError` on a mistake.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from counterpoint.config import ConfigError, check_device, load_config
from counterpoint.data.av_world import AVWorldConfig
from counterpoint.data.shortcut import ShortcutConfig
from counterpoint.models.encoders import EncoderConfig
from counterpoint.models.fusion import FusionKind
from counterpoint.optim.combiners import COMBINERS, GradientCombiner, build_combiner


@dataclass
class BalanceDataConfig:
    """``benchmark: av_world`` generates the built-in audio-visual benchmark (knobs in ``av_world``),
    ``shortcut`` the coloured-and-grey shortcut benchmark (knobs in ``shortcut``); ``benchmark: file`` loads a
    saved ModalDataset (``path``, the ``.safetensors`` next to its ``.json``, e.g. ``data av-features``)."""

    benchmark: Literal["av_world", "shortcut", "file"] = "av_world"  # generated benchmark, or a saved file
    path: str = ""  # benchmark=file: the ModalDataset .safetensors (e.g. from data av-features)
    av_world: AVWorldConfig = field(default_factory=AVWorldConfig)
    shortcut: ShortcutConfig = field(default_factory=ShortcutConfig)
    modalities: tuple[str, ...] = ()  # use only these (in this order); empty: all of the dataset's


@dataclass
class ClassifierConfig:
    """Encoders (one per modality; a modality not listed in ``encoders`` gets the defaults), feature size
    and fusion (``counterpoint.models.fusion``)."""

    dim: int = 64  # feature size of every encoder
    fusion: FusionKind = "concat"  # concat, sum, film, gating or attention
    encoders: dict[str, EncoderConfig] = field(default_factory=dict)  # per modality: kind and shape of its encoder


@dataclass
class MethodConfig:
    """A gradient combiner and its options; an option left unset takes the combiner's default, an option
    the combiner does not have is an error. ``label`` names the method in tables (default: ``name``)."""

    OPTIONS_FOLLOW_NAME: ClassVar[bool] = True  # switching `name` by an override drops the recipe's options

    name: str = "mmpareto"  # joint, uniform, unimodal, mgda, ogm_ge, mmpareto, pcgrad
    label: str = ""  # the method's name in tables (default: name)
    gamma: float | None = None  # mmpareto
    rescale: str | None = None  # mmpareto: per_tensor | per_encoder
    blocks: str | None = None  # mgda: per_encoder | all
    scale: float | None = None  # mgda
    alpha: float | None = None  # ogm_ge
    noise: bool | None = None  # ogm_ge
    base: str | None = None  # ogm_ge: fused | uniform

    @property
    def display(self) -> str:
        return self.label or self.name

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("name", "label") and getattr(self, f.name) is not None}


@dataclass
class BalanceTrainConfig:
    """Optimisation. SGD with momentum and a constant learning rate is the published MMPareto / OGM-GE
    recipe (there: lr 2e-3, batch 64, ResNet-18 from scratch for ~100 epochs); the built-in benchmark's
    recipe raises the learning rate so that a run takes seconds (configs/balance_av.yaml)."""

    epochs: int = 20  # passes over the training split
    batch_size: int = 64  # samples per SGD step
    lr: float = 2e-3  # constant SGD learning rate
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # SGD weight decay
    diagnostics: bool = True  # log cos(g_m, g_u) also for joint / uniform / ogm_ge (a second backward pass)
    log_every: int = 1  # steps between metrics.jsonl rows
    # Model selection on val: "fused" accuracy, "unimodal" (mean of the unimodal heads), "auto": unimodal for
    # the unimodal-alone method (whose fused head is only a probe), fused for every other.
    select_on: Literal["auto", "fused", "unimodal"] = "auto"
    precise_bn_batches: int = 8  # before each validation, batch-norm statistics from this many train batches
    eval_batch_size: int = 500  # samples per evaluation batch
    device: str = "cpu"  # "auto", "cpu", "cuda", ...
    threads: int = 1  # 0: let torch decide
    progress: bool = True  # progress bars with rate and ETA


@dataclass
class BalanceEvalConfig:
    shapley: bool = True  # exact Shapley contribution of each modality to the fused accuracy
    baseline: Literal["zero", "mean"] = "mean"  # what stands in for a missing modality


@dataclass
class CompareConfig:
    """``counterpoint balance compare``: every method in ``methods`` once per seed in ``seeds``."""

    methods: tuple[MethodConfig, ...] = ()  # list of {name, label, options}; empty: method alone
    seeds: tuple[int, ...] = (0, 1, 2)  # every method runs once per seed; mean ± std over them


@dataclass
class BalanceConfig:
    out_dir: str = "runs/balance"  # the run directory (compare: one folder per method and seed inside)
    seed: int = 0  # initialisation and batch order follow from it
    data: BalanceDataConfig = field(default_factory=BalanceDataConfig)
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: BalanceTrainConfig = field(default_factory=BalanceTrainConfig)
    eval: BalanceEvalConfig = field(default_factory=BalanceEvalConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)


def build_method(method: MethodConfig, diagnostics: bool, key: str = "method",
                 generator: torch.Generator | None = None) -> GradientCombiner:
    """The combiner of ``method``; ``diagnostics`` is passed to the combiners that can skip the
    cos(g_m, g_u) statistics (the others always compute them), ``generator`` to those that draw noise."""
    options = method.options()
    accepted = inspect.signature(COMBINERS[method.name].__init__).parameters if method.name in COMBINERS else {}
    if "diagnostics" in accepted:
        options["diagnostics"] = diagnostics
    if "generator" in accepted and generator is not None:
        options["generator"] = generator
    try:
        return build_combiner(method.name, key, **options)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def validate(cfg: BalanceConfig) -> None:
    t = cfg.train
    checks = [
        (t.epochs >= 1, "train.epochs must be >= 1"),
        (t.batch_size >= 2, "train.batch_size must be >= 2 (batch norm needs two samples)"),
        (t.lr > 0, "train.lr must be > 0"),
        (0 <= t.momentum < 1, "train.momentum must be in [0, 1)"),
        (t.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (t.log_every >= 1, "train.log_every must be >= 1"),
        (t.precise_bn_batches >= 0, "train.precise_bn_batches must be >= 0"),
        (t.eval_batch_size >= 1, "train.eval_batch_size must be >= 1"),
        (0 <= t.threads <= 4096, "train.threads must be in [0, 4096]"),
        (cfg.model.dim >= 1, "model.dim must be >= 1"),
        (cfg.data.benchmark != "file" or cfg.data.path, "data.path must name a dataset when data.benchmark=file"),
        (len(set(cfg.data.modalities)) == len(cfg.data.modalities), "data.modalities has a duplicate"),
        (cfg.data.modalities == () or len(cfg.data.modalities) >= 2, "data.modalities needs >= 2 modalities"),
        (len(cfg.compare.seeds) >= 1, "compare.seeds must list at least one seed"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    check_device(t.device, "train.device")
    for name, enc in cfg.model.encoders.items():
        try:
            enc.validate(f"model.encoders.{name}")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    build_method(cfg.method, t.diagnostics)
    for i, m in enumerate(cfg.compare.methods):
        build_method(m, t.diagnostics, f"compare.methods[{i}]")
    labels = [m.display for m in cfg.compare.methods]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ConfigError(f"compare.methods: label {dupes[0]!r} is used twice; give each method a distinct label")


def load_balance_config(path: str | Path | None = None, overrides: list[str] = ()) -> BalanceConfig:
    """Defaults, merged with the YAML recipe at ``path``, merged with ``key=value`` overrides; validated."""
    cfg = load_config(path, overrides, BalanceConfig)
    validate(cfg)
    return cfg
