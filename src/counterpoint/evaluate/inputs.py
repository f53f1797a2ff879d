"""Which data a run is evaluated on, decided and checked before training starts.

``data.test``, ``data.zeroshot`` and ``data.classes`` default to ``auto``: the evaluation sets that belong to the
training data, never anything else. ``auto`` finds:

* for a world written by ``counterpoint data make world`` (a ``world.json`` beside the training split): its
  ``test`` and ``zeroshot`` splits and its ``world.json``;
* otherwise, for ``test`` only, the training path with its last ``train`` replaced by ``test``
  (``mydata/train.csv`` -> ``mydata/test.csv``) when that exists;
* for ``classes`` of an explicit ``data.zeroshot``: the ``world.json`` beside it, else the sorted labels of the
  zero-shot data themselves with the prompt ``a photo of a {c}.``.

What ``auto`` does not find is skipped and said (``EvalInputs.skipped``, in ``eval.json`` and the report), so
a run on one's own data is never silently evaluated on the built-in world. ``""`` skips explicitly.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from counterpoint.config import RunConfig
from counterpoint.data.readers import SkipStats, detect_format, iter_samples
from counterpoint.errors import DataError

AUTO = "auto"
DEFAULT_TEMPLATE = "a photo of a {c}."
_PEEK = 64  # zero-shot samples read before training to check that they carry labels


@dataclass
class EvalInputs:
    """Resolved evaluation inputs (``""``: not evaluated) and why each missing one is skipped."""

    test: str
    zeroshot: str
    classes: str  # a class file, or "" to take the classes from the zero-shot labels
    skipped: dict[str, str] = field(default_factory=dict)


def training_path(cfg: RunConfig) -> str:
    """Where the training data is: ``data.train``, or the first streamed source's shards."""
    if cfg.data.stream.sources:
        shards = cfg.data.stream.sources[0].shards
        return shards if isinstance(shards, str) else shards[0]
    return cfg.data.train


def _world_root(train: str) -> Path | None:
    """The folder of a world written by ``data make world`` that ``train`` is a split of, if any."""
    p = Path(train)
    for root in (p.parent, p):
        if (root / "world.json").is_file():
            return root
    return None


def _sibling_test(train: str) -> str:
    p = Path(train)
    name = p.name
    i = name.rfind("train")
    if i < 0:
        return ""
    candidate = p.with_name(name[:i] + "test" + name[i + 5 :])
    return str(candidate) if candidate.exists() else ""


def resolve_eval_inputs(cfg: RunConfig) -> EvalInputs:
    """The test, zero-shot and class inputs ``cfg`` names, with ``auto`` resolved (see the module doc); the
    evaluations ``cfg.eval`` turns on that have no input are listed in ``skipped`` with the reason."""
    data = cfg.data
    train = training_path(cfg)
    root = _world_root(train) if train else None
    test, zeroshot, classes = data.test, data.zeroshot, data.classes
    if test == AUTO:
        test = str(root / "test") if root and (root / "test").exists() else _sibling_test(train)
    if zeroshot == AUTO:
        zeroshot = str(root / "zeroshot") if root and (root / "zeroshot").exists() else ""
    if classes == AUTO:
        zroot = _world_root(zeroshot) if zeroshot else None
        classes = str(zroot / "world.json") if zroot else ""

    def why(setting: str, what: str) -> str:
        return (f"{setting} is empty" if getattr(data, setting.split(".")[1]) == "" else
                f"no {what} found beside the training data (set {setting})")

    skipped: dict[str, str] = {}
    if cfg.eval.retrieval and not test:
        skipped["retrieval"] = why("data.test", "test pairs")
    for what in ("zeroshot", "linear_probe", "attentive_probe"):
        if getattr(cfg.eval, what) and not zeroshot:
            skipped[what] = why("data.zeroshot", "labelled zero-shot images")
    return EvalInputs(test, zeroshot, classes, skipped)


def with_resolved_inputs(cfg: RunConfig, inputs: EvalInputs) -> RunConfig:
    """``cfg`` with its evaluation paths replaced by ``inputs`` (what a run saves in its config.yaml)."""
    data = dataclasses.replace(cfg.data, test=inputs.test, zeroshot=inputs.zeroshot, classes=inputs.classes)
    return dataclasses.replace(cfg, data=data)


def load_classes(path: str) -> tuple[list[str], list[str], set[str]]:
    """``(classes, templates, heldout)`` from a JSON file such as the world's ``world.json``. Every template
    must hold ``{c}`` (a template without it gives every class the same prompt: chance accuracy)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"class file '{path}' not found; set data.classes to a JSON file with \"classes\" and "
                        f"\"templates\", or data.zeroshot='' to skip zero-shot evaluation")
    try:
        info = json.loads(p.read_text(encoding="utf-8"))
        classes, templates = list(info["classes"]), list(info.get("templates") or [DEFAULT_TEMPLATE])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"class file '{path}' must be JSON with a \"classes\" list ({exc})") from None
    if not classes or not all(isinstance(c, str) and c for c in classes):
        raise DataError(f"class file '{path}': \"classes\" must be a non-empty list of names")
    bad = [t for t in templates if not isinstance(t, str) or "{c}" not in t]
    if bad:
        raise DataError(f"class file '{path}': template {bad[0]!r} has no {{c}} where the class name goes")
    return classes, templates, set(info.get("heldout", []))


def _peek_labels(path: str) -> int:
    """How many of the first few decodable samples of ``path`` carry a label (the readers give ``None`` for
    a CSV without a ``label`` column or a sample without one in its json)."""
    labelled = 0
    for i, sample in enumerate(iter_samples(path, SkipStats())):
        labelled += sample.label is not None
        if i + 1 >= _PEEK:
            break
    return labelled


def check_eval_inputs(cfg: RunConfig, inputs: EvalInputs) -> None:
    """Everything the final evaluation will read, checked before training: a mistake found after an hour of
    training costs the hour."""
    if inputs.test and cfg.eval.retrieval:
        detect_format(inputs.test)
    if inputs.zeroshot and (cfg.eval.zeroshot or cfg.eval.linear_probe or cfg.eval.attentive_probe
                            or cfg.eval.every_steps):
        detect_format(inputs.zeroshot)
        if _peek_labels(inputs.zeroshot) == 0:
            raise DataError(f"data.zeroshot '{inputs.zeroshot}' has no labels (a 'label' column, or a 'label' in "
                            f"each sample's json); zero-shot and the linear probe need labelled images")
        if inputs.classes:
            load_classes(inputs.classes)
