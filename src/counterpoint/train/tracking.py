"""Where a run's numbers go besides ``metrics.jsonl`` (``train.loggers``): TensorBoard event files and
Weights & Biases.

``metrics.jsonl`` is always written: the report, ``--resume`` and ``counterpoint eval`` read it. The other
loggers get the same scalars at the same steps, then the evaluation (every number of ``eval.json`` as
``eval/<path>``) and the report's pictures. Their packages are optional extras, imported only when a run asks
for them; a missing one is a one-line error before training starts.

* ``tensorboard``: ``RUN_DIR/tensorboard/`` (``tensorboard --logdir runs``). A resumed run purges the steps
  after its checkpoint, as ``metrics.jsonl`` does.
* ``wandb``: offline unless the environment says otherwise (``WANDB_MODE=online`` and a login), so nothing
  leaves the machine by default; the run folder is ``RUN_DIR/wandb/``. A resumed run continues the same W&B
  run (its id is kept in ``RUN_DIR/wandb_id``).
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from counterpoint.config import ConfigError, RunConfig, to_dict

EXTRA = {"tensorboard": "tensorboard", "wandb": "wandb"}  # logger -> the package (and extra) it needs


def check_logger_packages(names: tuple[str, ...]) -> None:
    """Refuse (before training) loggers whose package is not installed."""
    for name in names:
        package = EXTRA.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(f"train.loggers includes {name}, which needs the {package} package: "
                              f"pip install 'counterpoint[{package}]'")


def scalars(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Every finite number (not a bool) in a nested dict, keyed ``a/b/c``."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(scalars(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
            out[name] = float(value)
    return out


def _pictures(run_dir: Path, result: Mapping[str, Any]) -> dict[str, Path]:
    """The report's pictures that exist: curves, evaluation summary, and grids named in ``result``."""
    found = {p.stem: p for p in sorted(run_dir.glob("*.png"))}
    for key, entry in (("imagine", result.get("imagine")), ("captions", result.get("captioning"))):
        grid = entry.get("grid") if isinstance(entry, Mapping) else None
        if isinstance(grid, str) and (run_dir / grid).is_file():
            found[key] = run_dir / grid
    return found


def _image_array(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


class TensorBoardLogger:
    def __init__(self, run_dir: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events logged after the checkpoint a resumed run starts from
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step or None)

    def log(self, row: Mapping[str, Any], step: int) -> None:
        for key, value in scalars(row).items():
            if key != "step":
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_eval(self, result: Mapping[str, Any], step: int, pictures: dict[str, Path]) -> None:
        for key, value in scalars(result, "eval/").items():
            self.writer.add_scalar(key, value, step)
        for name, path in pictures.items():
            self.writer.add_image(f"report/{name}", _image_array(path), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, run_dir: Path, cfg: RunConfig) -> None:
        import wandb

        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "counterpoint"), name=run_dir.name, id=run_id,
                              dir=str(run_dir), config=to_dict(cfg), resume="allow",
                              mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, row: Mapping[str, Any], step: int) -> None:
        self.run.log({k: v for k, v in scalars(row).items() if k != "step"}, step=step)

    def log_eval(self, result: Mapping[str, Any], step: int, pictures: dict[str, Path]) -> None:
        self.run.log({**scalars(result, "eval/"),
                      **{f"report/{name}": self.wandb.Image(str(path)) for name, path in pictures.items()}}, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The loggers ``train.loggers`` names beyond ``jsonl``, fed together."""

    def __init__(self, loggers: list[TensorBoardLogger | WandbLogger]) -> None:
        self.loggers = loggers

    def log(self, row: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(row, int(row["step"]))

    def log_eval(self, result: Mapping[str, Any], step: int, run_dir: Path) -> None:
        pictures = _pictures(run_dir, result)
        for logger in self.loggers:
            logger.log_eval(result, step, pictures)


@contextmanager
def open_trackers(cfg: RunConfig, run_dir: Path, start_step: int, enabled: bool = True) -> Iterator[Trackers]:
    """The run's extra loggers (none on ranks other than 0: ``enabled=False``), closed on the way out."""
    loggers: list[TensorBoardLogger | WandbLogger] = []
    try:
        if enabled and "tensorboard" in cfg.train.loggers:
            loggers.append(TensorBoardLogger(run_dir, start_step))
        if enabled and "wandb" in cfg.train.loggers:
            loggers.append(WandbLogger(run_dir, cfg))
        yield Trackers(loggers)
    finally:
        for logger in loggers:
            logger.close()
