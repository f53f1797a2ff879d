"""Typed, validated run configuration.

A run is described by nested dataclasses. A YAML recipe (``configs/*.yaml``) is merged over the defaults and
``key=value`` overrides from the command line are merged over that (dinov2-style: default + experiment diff +
overrides). Every key is checked: an unknown key or a value of the wrong type or range raises
:class:`ConfigError` with one line naming the key and what would be accepted. The fully resolved config is
written next to the results of every run (``config.yaml``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from counterpoint.errors import UserError

LOGGERS = ("jsonl", "tensorboard", "wandb")  # train.loggers


class ConfigError(UserError, ValueError):
    """A user mistake in a config file or override; the message names the key and the fix."""


@dataclass
class ModelConfig:
    """Which two-tower model to build; ``name`` picks a preset from ``counterpoint.models.MODEL_PRESETS``.

    Any field left at ``None`` takes the preset's value, so a recipe can say ``name: small-vit`` and override
    only ``embed_dim``.
    """

    name: str = "tiny-cnn"  # preset: tiny-cnn, tiny-vit, small-cnn, small-vit, vit-b-32, vit-b-16
    embed_dim: int | None = None  # joint embedding size (null: the preset's)
    image_size: int | None = None  # input pixels per side (null: the preset's)
    context_length: int | None = None  # text tokens incl. <sot>/<eot>; longer captions are cut (null: preset's)
    vocab_size: int | None = None  # BPE vocabulary trained on the training captions (null: the preset's)


@dataclass
class SourceConfig:
    """One source of WebDataset shards to stream, and its share of the mix (weights are relative)."""

    shards: str | tuple[str, ...] = ""  # a brace pattern, glob or folder, or a list of them
    weight: float = 1.0  # share of the mix, relative to the other sources

    def __post_init__(self) -> None:
        if not self.shards:
            raise ConfigError("data.stream.sources: every source needs shards (a pattern, folder or list of .tar)")
        if not self.weight > 0:
            raise ConfigError(f"data.stream.sources: weight must be > 0, got {self.weight}")


@dataclass
class StreamConfig:
    """Training batches streamed from WebDataset shards by ``counterpoint.data.streaming`` (decoded in
    ``num_workers`` processes, resumable mid-epoch) instead of ``data.train`` read into memory; off while
    ``sources`` is empty. One source runs in epochs unless ``resampled``; several are mixed by weight."""

    sources: tuple[SourceConfig, ...] = ()  # list of {shards, weight}; empty: read data.train into memory
    resampled: bool = False  # draw shards with replacement: an endless stream
    remainder: Literal["drop", "wrap"] = "drop"  # an epoch's samples beyond whole global batches
    num_workers: int = 2  # decoding processes per rank (0: decode in the training process)
    prefetch_factor: int = 2  # batches each worker decodes ahead

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"data.stream.num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor < 1:
            raise ConfigError(f"data.stream.prefetch_factor must be >= 1, got {self.prefetch_factor}")


@dataclass
class DataConfig:
    """Where training and evaluation data come from.

    ``train`` / ``test`` are paths to a WebDataset shard folder (or a single ``.tar``), a CSV/TSV file, or a
    folder of images with same-name ``.txt`` captions; the reader is picked from what the path is. The evaluation
    inputs default to ``auto``: the ones that belong to the training data (the world's splits beside it, or a
    test file named like the training one), never anything else (``counterpoint/evaluate/inputs.py``); ``""``
    skips.
    """

    train: str = "data/world/train"  # training pairs: shard folder or .tar, CSV/TSV, or image+caption folder
    test: str = "auto"  # paired test set for retrieval ("auto": the training data's own; "": skip)
    zeroshot: str = "auto"  # labelled images for zero-shot and the linear probe ("auto" / "" as test)
    classes: str = "auto"  # JSON with "classes", "templates" ({c} = class name), optionally "heldout"
    max_train_samples: int | None = None  # read at most this many training pairs (null: all)
    caption_key: str = "txt"  # the shard member or json field holding the caption
    stream: StreamConfig = field(default_factory=StreamConfig)  # stream shards instead of reading data.train


@dataclass
class ObjectiveConfig:
    """The pretraining task (``counterpoint.objectives``): ``name`` picks a registered task and the rest of the
    section is that task's own typed options (its ``Config``, a subclass of this one). Switching ``name`` by an
    override drops the recipe's options of the previous task."""

    OPTIONS_FOLLOW_NAME: ClassVar[bool] = True

    name: str = "clip"  # the registered task: clip, siglip, margin


def _default_objective() -> ObjectiveConfig:
    from counterpoint.objectives.base import task_class

    return from_dict(task_class("clip").Config, {"name": "clip"}, prefix="objective.")


@dataclass
class TrainConfig:
    """Optimisation and run-length settings."""

    epochs: float = 10.0  # passes over the training data (fractions allowed)
    batch_size: int = 256  # global batch (split over processes under torchrun); the contrastive negatives
    lr: float = 1e-3  # peak AdamW learning rate, after linear warmup, then cosine decay
    weight_decay: float = 0.1  # AdamW decoupled weight decay (not on biases, norms, position tables, the scale)
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW moment decay rates
    eps: float = 1e-6  # AdamW denominator epsilon
    warmup_steps: int = 100  # linear warmup from 0 to lr
    min_lr_ratio: float = 0.0  # the cosine decay ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    translate: int = 2  # random-shift augmentation in pixels (0 disables)
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast the forward pass (GPUs; slow on most CPUs)
    log_every: int = 20  # steps between metrics.jsonl rows
    checkpoint_every: int = 500  # steps between checkpoints (also saved at the end and on Ctrl-C)
    keep_checkpoints: int = 2  # newest checkpoints kept
    threads: int = 0  # CPU threads per process (0: let torch decide)
    progress: bool = True  # progress bars with rate and ETA
    max_steps: int | None = None  # stop early (tests, smoke runs); the schedule still follows `epochs`
    # Training length in samples seen, instead of epochs: stays the same run when the batch size or the
    # number of GPUs changes, and gives endless (resampled, mixed) streams their schedule length.
    samples: int | None = None
    # Under torchrun: "ddp" replicates the model, "fsdp" shards it (FSDP2). batch_size is the global batch,
    # split evenly over the processes.
    parallel: Literal["ddp", "fsdp"] = "ddp"
    accum_steps: int = 1  # >1: GradCache over this many micro-batches per process (same gradient, less memory)
    grad_checkpointing: bool = False  # recompute transformer blocks in backward (less activation memory)
    # A loss or gradient that is not finite: "stop" the run with one line (the weights before that step are
    # kept), or "skip" the update and go on (counted as nonfinite_steps in the log).
    on_nonfinite: Literal["stop", "skip"] = "stop"
    # Start from the weights and tokenizer of this run directory or checkpoint (fine-tuning, CapFilt's stages)
    # instead of a fresh model; the optimizer, schedule, data order and task state (queues) start fresh.
    init_from: str | None = None
    # Where the scalars go: metrics.jsonl always (the report and --resume read it), TensorBoard event files in
    # RUN_DIR/tensorboard, Weights & Biases (offline unless WANDB_MODE says otherwise); train/tracking.py.
    loggers: tuple[str, ...] = ("jsonl",)


@dataclass
class EvalConfig:
    """What to evaluate at the end of training (and with ``counterpoint eval``)."""

    zeroshot: bool = True  # zero-shot classification of data.zeroshot with the class prompts
    retrieval: bool = True  # image-text retrieval Recall@K on data.test
    linear_probe: bool = True  # logistic regression on frozen image features of data.zeroshot
    attentive_probe: bool = False  # a learned attention pooling + linear layer on the frozen image tokens
    recall_at: tuple[int, ...] = (1, 5, 10)  # the K of Recall@K
    rerank_k: int = 16  # models with a matching head (BLIP): re-rank each query's top-k by it (0: off)
    captions: int = 256  # models with a decoder (BLIP): caption this many test images and score them (0: off)
    batch_size: int = 512  # images or texts embedded at once
    max_retrieval_samples: int | None = None  # use at most this many test pairs (null: all)
    imagine: int = 8  # class prompts imagined for the report's picture grid (0: none)
    imagine_steps: int = 300  # optimisation steps per imagined picture
    # Zero-shot top-1 on data.zeroshot every this many training steps (0: only at the end), logged in
    # metrics.jsonl as zeroshot/heldout, zeroshot/seen, zeroshot/all and plotted in the report.
    every_steps: int = 0


@dataclass
class RunConfig:
    """Everything a training run needs. ``out_dir`` receives the run directory contract."""

    out_dir: str = "runs/clip-world"  # the run directory (config, log, checkpoints, eval.json, report)
    seed: int = 0  # initialisation, batch order and augmentation all follow from it
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=_default_objective)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _check_ranges(self)


def _check_ranges(cfg: RunConfig) -> None:
    """Value checks that types alone cannot express."""
    m, t = cfg.model, cfg.train
    checks: list[tuple[bool, str]] = [
        (bool(cfg.out_dir.strip()), "out_dir must name a folder"),
        (0 <= cfg.seed < 2**32, f"seed must be in [0, 2**32), got {cfg.seed}"),
        *[(v is None or 1 <= v <= hi, f"model.{k} must be in [1, {hi}], got {v}")
          for k, v, hi in (("embed_dim", m.embed_dim, 2**16), ("image_size", m.image_size, 2**14),
                           ("context_length", m.context_length, 2**16), ("vocab_size", m.vocab_size, 2**24))],
        (cfg.data.max_train_samples is None or cfg.data.max_train_samples >= 1, "data.max_train_samples must be >= 1"),
        (t.eps > 0, f"train.eps must be > 0, got {t.eps}"),
        (all(0 <= b < 1 for b in t.betas), f"train.betas must both be in [0, 1), got {list(t.betas)}"),
        (0 <= t.threads <= 4096, "train.threads must be in [0, 4096] (0: let torch decide)"),
        (cfg.eval.max_retrieval_samples is None or cfg.eval.max_retrieval_samples >= 2,
         "eval.max_retrieval_samples must be >= 2"),
        (len(cfg.eval.recall_at) >= 1, "eval.recall_at must list at least one K"),
        (0 <= cfg.eval.imagine <= 64, "eval.imagine must be in [0, 64]"),
        (cfg.eval.imagine_steps >= 1, "eval.imagine_steps must be >= 1"),
        (cfg.eval.every_steps >= 0, "eval.every_steps must be >= 0 (0: evaluate only at the end)"),
        (cfg.eval.rerank_k >= 0, "eval.rerank_k must be >= 0 (0: no re-ranking)"),
        (cfg.eval.captions >= 0, "eval.captions must be >= 0 (0: no captioning evaluation)"),
        (cfg.train.epochs > 0, "train.epochs must be > 0"),
        (cfg.train.batch_size >= 2, "train.batch_size must be >= 2 (contrastive losses need negatives)"),
        (cfg.train.lr > 0, "train.lr must be > 0"),
        (set(cfg.train.loggers) <= set(LOGGERS), f"train.loggers: choose from {', '.join(LOGGERS)}, got "
                                                 f"{list(cfg.train.loggers)}"),
        ("jsonl" in cfg.train.loggers, "train.loggers must include jsonl: metrics.jsonl is what the report, "
                                       "--resume and counterpoint eval read"),
        (cfg.train.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (cfg.train.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (0 <= cfg.train.min_lr_ratio <= 1, "train.min_lr_ratio must be in [0, 1]"),
        (cfg.train.grad_clip >= 0, "train.grad_clip must be >= 0 (0 disables clipping)"),
        (cfg.train.log_every >= 1, "train.log_every must be >= 1"),
        (cfg.train.checkpoint_every >= 1, "train.checkpoint_every must be >= 1"),
        (cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1"),
        (cfg.train.max_steps is None or cfg.train.max_steps >= 1, "train.max_steps must be >= 1"),
        (cfg.train.samples is None or cfg.train.samples >= 1, "train.samples must be >= 1"),
        (cfg.eval.batch_size >= 1, "eval.batch_size must be >= 1"),
        (all(k >= 1 for k in cfg.eval.recall_at), "eval.recall_at values must be >= 1"),
        (cfg.train.translate >= 0, "train.translate must be >= 0"),
        (cfg.train.accum_steps >= 1, "train.accum_steps must be >= 1"),
        (cfg.train.accum_steps < 1 or cfg.train.batch_size % cfg.train.accum_steps == 0,
         "train.batch_size must be divisible by train.accum_steps"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    check_device(cfg.train.device, "train.device")


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device(name: str, key: str) -> None:
    """A device setting torch understands: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    if not _DEVICE.match(name):
        raise ConfigError(f"{key}={name!r} is not a device; use auto, cpu, cuda, cuda:N or mps")


# ----------------------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts with type checking


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "list"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:  # string keys only (e.g. one sub-config per modality)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        value_type = typing.get_args(tp)[1]
        return {str(k): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if not -(2**63) <= value < 2**63:  # what torch and numpy can hold
            raise ConfigError(f"{key}: {value} is out of range")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        # No setting means anything at infinity or NaN; accepting one only postpones the failure to NaN weights.
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if tp is ObjectiveConfig:  # the task's own options: dispatch on its name
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping with a task name, got {value!r}")
        from counterpoint.objectives.base import task_class

        name = value.get("name", ObjectiveConfig.name)
        if not isinstance(name, str):
            raise ConfigError(f"{key}.name: expected a task name, got {name!r}")
        return from_dict(task_class(name).Config, {**value, "name": name}, prefix=f"{key}.")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # internal: a field we declared badly


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad values raise :class:`ConfigError`."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid: {', '.join(names)})"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing config key '{prefix}{missing[0]}'")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as exc:  # a dataclass's own check (e.g. a generator config's __post_init__)
        raise ConfigError(f"{prefix}{exc}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-friendly dict (tuples become lists)."""

    def plain(x: Any) -> Any:
        if dataclasses.is_dataclass(x):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(cfg)


def _deep_merge(base: dict[str, Any], diff: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in diff.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``train.lr=3e-4`` -> ``{"train": {"lr": 3e-4}}``; the value is parsed as YAML (numbers, lists, bools)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value, e.g. train.lr=3e-4")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': cannot parse value ({_yaml_problem(exc)})") from None
    node: dict[str, Any] = {}
    cursor = node
    parts = key.split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return node


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own message spans several)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem}{where}"


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found; pass a YAML recipe such as configs/clip_world.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections, got {type(data).__name__}")
    return data


def _drop_switched_sections(recipe: dict[str, Any], diff: dict[str, Any], cls: type) -> dict[str, Any]:
    """``recipe`` without the sections whose ``name`` ``diff`` switches, where the section's options belong to
    its name (a dataclass with ``OPTIONS_FOLLOW_NAME``): ``method.name=uniform`` over a recipe's
    ``method: {name: mmpareto, gamma: 1.5}`` must not carry ``gamma`` over to a method that has none."""
    if not dataclasses.is_dataclass(cls) or not isinstance(recipe, dict):
        return recipe
    hints = typing.get_type_hints(cls)
    out = dict(recipe)
    for key, sub in diff.items():
        tp = hints.get(key)
        if not isinstance(sub, dict) or not dataclasses.is_dataclass(tp) or not isinstance(out.get(key), dict):
            continue
        if getattr(tp, "OPTIONS_FOLLOW_NAME", False) and "name" in sub and sub["name"] != out[key].get("name"):
            del out[key]
        else:
            out[key] = _drop_switched_sections(out[key], sub, tp)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = (), cls: type = RunConfig) -> Any:
    """Defaults of ``cls``, merged with the YAML recipe at ``path``, merged with ``key=value`` overrides.
    An override that switches the ``name`` of a section whose options depend on it drops the recipe's options
    of that section (the overrides' own are kept)."""
    data: dict[str, Any] = load_yaml(path) if path is not None else {}
    diffs = [parse_override(text) for text in overrides]
    for diff in diffs:
        data = _drop_switched_sections(data, diff, cls)
    for diff in diffs:
        data = _deep_merge(data, diff)
    return from_dict(cls, data)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------------------------------------
# What every setting means: `counterpoint config show`


def field_descriptions(cls: type) -> dict[str, str]:
    """``{field: description}`` of a config dataclass, read from the comments beside (or right above) each
    field in its source, so the explanation lives once, next to the default it explains; a nested section is
    described by the first sentence of its class docstring."""
    import inspect

    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").strip())
            continue
        match = re.match(r"(\w+)\s*:", stripped)
        if match and match.group(1) in names:
            name = match.group(1)
            beside = stripped.split("  # ", 1)[1].strip() if "  # " in stripped else ""
            text = " ".join([*above, beside]).strip()
            if not text and dataclasses.is_dataclass(hints[name]):
                text = (hints[name].__doc__ or "").strip().split(". ")[0].replace("\n", " ")
            out[name] = " ".join(text.split())
        above = []
    return out


def describe(cfg: Any, prefix: str = "") -> list[tuple[str, Any, Any, str]]:
    """``(key, value, default, description)`` of every setting of ``cfg`` (a config dataclass), in order."""
    rows: list[tuple[str, Any, Any, str]] = []
    defaults = type(cfg)()
    docs = field_descriptions(type(cfg))
    for f in dataclasses.fields(cfg):
        value, default = getattr(cfg, f.name), getattr(defaults, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            rows += describe(value, f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", to_dict(value), to_dict(default), docs.get(f.name, "")))
    return rows
