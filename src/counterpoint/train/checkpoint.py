"""Atomic, exactly resumable checkpoints with no pickles.

A checkpoint is a folder ``checkpoints/step-00000500/`` holding

* ``model.safetensors`` - the encoder's weights and buffers (what evaluation and ``load_checkpoint`` read),
* ``task.safetensors`` - the task's other state (momentum towers, queues), for tasks that have any,
* ``optimizer.safetensors`` - the optimiser's per-parameter tensors (Adam moments, step counts),
* ``state.json`` - step, model spec, the task and its options, optimiser hyper-parameters, data position,
* ``tokenizer.json`` - the vocabulary the text tower was trained with.

Writing: the folder is written under a temporary name (``.tmp-step-...-PID``), its files are fsynced, and it is
renamed into place; ``checkpoints/latest`` (a one-line text file naming the folder) is then replaced
atomically. Re-saving a step that exists renames the old folder aside (``.old-step-...-PID``) before the new
one takes its name and deletes it only afterwards, so at every moment one complete copy of the step exists
under a name :func:`checkpoint_candidates` recognises. Temporaries of crashed processes are removed by the next
save. Rotation keeps the folder just written and the newest older ones, never anything by name order alone.

Reading: ``latest`` must name a step folder *inside* ``checkpoints/`` (a path, ``..`` or a symlink leading
elsewhere is refused, so a run never silently loads another run's weights); without a usable ``latest`` the
newest complete step folder is used. ``state.json`` is validated field by field before anything acts on it.
Nothing is ever unpickled: tensors come from safetensors and the rest from JSON, so loading a checkpoint from
an untrusted source cannot execute code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from counterpoint.errors import CheckpointError

FORMAT = "counterpoint-checkpoint-v1"
TASK_FILE = "task.safetensors"
_STEP = re.compile(r"^step-(\d{8,})$")
_OLD = re.compile(r"^\.old-(step-\d{8,})-\d+$")
_TMP = re.compile(r"^\.tmp-step-\d{8,}-(\d+)$")


def _optimizer_tensors(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if not torch.is_tensor(value):
                value = torch.tensor(value)
            tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(ckpt_root: Path) -> None:
    """Delete half-written ``.tmp-step-*`` folders of processes that no longer run, and put back a
    ``.old-step-*`` folder whose replacement never arrived (a crash between the two renames of a re-save)."""
    if not ckpt_root.is_dir():
        return
    for p in ckpt_root.iterdir():
        tmp, old = _TMP.match(p.name), _OLD.match(p.name)
        if tmp and int(tmp.group(1)) != os.getpid() and not _pid_alive(int(tmp.group(1))):
            shutil.rmtree(p, ignore_errors=True)
        elif old:
            final = ckpt_root / old.group(1)
            if final.is_dir():
                shutil.rmtree(p, ignore_errors=True)  # the re-save completed; only the deletion was cut off
            else:
                os.replace(p, final)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint_state(ckpt_root: Path, step: int, model_state: dict[str, torch.Tensor],
                          optimizer_state: dict[str, Any] | None, tokenizer_json: str | None, extra: dict[str, Any],
                          keep: int = 2, task_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it and keep it plus the ``keep - 1`` newest
    older ones.

    ``model_state``/``optimizer_state``: full (unsharded) state dicts, the optimiser's keyed by parameter index
    as ``Optimizer.state_dict()`` returns it.
    """
    ckpt_root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(ckpt_root)
    name = f"step-{step:08d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        state = {k: v.detach().cpu().contiguous() for k, v in model_state.items()}
        save_file(state, tmp / "model.safetensors", metadata={"format": FORMAT})
        if task_state:  # momentum towers, queues: what a resumed run needs beyond the encoder
            save_file({k: v.detach().cpu().contiguous() for k, v in task_state.items()}, tmp / TASK_FILE)
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write (disk full, Ctrl-C) leaves nothing behind
        raise
    aside = ckpt_root / f".old-{name}-{os.getpid()}"
    try:
        if final.exists():
            os.replace(final, aside)
        os.replace(tmp, final)
    except BaseException:  # put things back as they were; a killed process is put back by the next save
        shutil.rmtree(tmp, ignore_errors=True)
        if aside.exists() and not final.exists():
            os.replace(aside, final)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    latest_tmp = ckpt_root / ".latest.tmp"
    latest_tmp.write_text(name + "\n")
    os.replace(latest_tmp, ckpt_root / "latest")
    _fsync_dir(ckpt_root)
    older = sorted(s for s in checkpoint_candidates(ckpt_root) if s < step)
    for s in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(ckpt_root / f"step-{s:08d}", ignore_errors=True)
    return final


def checkpoint_candidates(ckpt_root: Path) -> dict[int, Path]:
    """``{step: folder}`` of the complete checkpoints in ``ckpt_root`` (a folder with ``state.json`` and
    ``model.safetensors``); an ``.old-step-*`` folder stands in for a missing ``step-*`` of the same step."""
    found: dict[int, Path] = {}
    if not ckpt_root.is_dir():
        return found
    root = ckpt_root.resolve()
    for p in sorted(ckpt_root.iterdir()):
        step_match, old_match = _STEP.match(p.name), _OLD.match(p.name)
        match = step_match or (old_match and _STEP.match(old_match.group(1)))
        if not match or not p.is_dir() or p.resolve().parent != root:
            continue
        if not ((p / "state.json").is_file() and (p / "model.safetensors").is_file()):
            continue
        step = int(match.group(1))
        if step_match or step not in found:
            found[step] = p
    return found


def _follow_latest(ckpt_root: Path) -> Path | None:
    """The folder ``ckpt_root/latest`` names, or ``None`` when it names a folder that is gone. Refuses a
    ``latest`` that leads outside ``ckpt_root``."""
    latest = ckpt_root / "latest"
    try:
        name = latest.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read '{latest}' ({exc}); delete it to resume from the newest step "
                              f"folder") from None
    if not _STEP.match(name):
        raise CheckpointError(f"'{latest}' names {name[:80]!r}, which is not a step folder inside "
                              f"'{ckpt_root}'; a run only loads its own checkpoints (delete the file to use the "
                              f"newest step folder)")
    target = ckpt_root / name
    if target.is_symlink() or (target.exists() and target.resolve().parent != ckpt_root.resolve()):
        raise CheckpointError(f"'{target}' leads outside '{ckpt_root}'; a run only loads its own checkpoints")
    candidates = checkpoint_candidates(ckpt_root)
    step = int(_STEP.match(name).group(1))
    return candidates.get(step)


def newest_checkpoint(ckpt_root: Path) -> Path | None:
    """The checkpoint a run continues from: the one ``latest`` names, else (``latest`` missing, or naming a
    folder that is gone) the complete step folder with the highest step; ``None`` if there is none."""
    if (ckpt_root / "latest").exists():
        target = _follow_latest(ckpt_root)
        if target is not None:
            return target
    candidates = checkpoint_candidates(ckpt_root)
    if not candidates:
        return None
    if (ckpt_root / "latest").exists():
        warnings.warn(f"'{ckpt_root / 'latest'}' names a checkpoint that is gone; using the newest complete one, "
                      f"{candidates[max(candidates)].name}", stacklevel=2)
    return candidates[max(candidates)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a run directory, a ``checkpoints/`` folder, or the folder itself."""
    p = Path(path)
    if (p / "state.json").is_file() and not (p / "checkpoints").exists():
        return p
    for root in (p / "checkpoints", p):
        if root.is_dir() and ((root / "latest").exists() or checkpoint_candidates(root)):
            found = newest_checkpoint(root)
            if found is not None:
                return found
    raise CheckpointError(f"no checkpoint found at '{path}'; pass a run directory or a checkpoint folder "
                          f"(one with state.json and model.safetensors)")


# ----------------------------------------------------------------------------------------------------------
# state.json: validated before anything acts on it


def _field(meta: dict[str, Any], key: str, types: tuple[type, ...], where: Path, required: bool = True) -> Any:
    if key not in meta:
        if required:
            raise CheckpointError(f"checkpoint '{where}': state.json lacks '{key}'; it is damaged")
        return None
    value = meta[key]
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        names = " or ".join(t.__name__ for t in types)
        raise CheckpointError(f"checkpoint '{where}': state.json field '{key}' must be {names}, got "
                              f"{str(value)[:60]!r}; it is damaged")
    return value


def read_state(ckpt: Path) -> dict[str, Any]:
    """``state.json`` of checkpoint folder ``ckpt``, with every field the trainer uses checked for type and
    range (a :class:`CheckpointError` names the first bad one)."""
    try:
        meta = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint '{ckpt}' has an unreadable state.json ({exc}); "
                              f"it is damaged or not a counterpoint checkpoint") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint '{ckpt}': state.json must hold a JSON object, got "
                              f"{type(meta).__name__}; it is damaged or not a counterpoint checkpoint")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint '{ckpt}' has format {meta.get('format')!r}, expected {FORMAT!r}")
    if _field(meta, "step", (int,), ckpt) < 0:
        raise CheckpointError(f"checkpoint '{ckpt}': state.json step must be >= 0, got {meta['step']}")
    _field(meta, "model_spec", (dict,), ckpt)
    _field(meta, "model_name", (str,), ckpt, required=False)
    total = _field(meta, "total_steps", (int,), ckpt, required=False)
    if total is not None and total < 1:
        raise CheckpointError(f"checkpoint '{ckpt}': state.json total_steps must be >= 1, got {total}")
    _field(meta, "logit_bias", (bool,), ckpt, required=False)
    objective = _field(meta, "objective", (dict,), ckpt, required=False)
    if objective is not None and not isinstance(objective.get("name"), str):
        raise CheckpointError(f"checkpoint '{ckpt}': state.json objective.name must be a task name; it is damaged")
    _field(meta, "data", (dict, type(None)), ckpt, required=False)
    _field(meta, "data_skipped", (dict,), ckpt, required=False)
    _field(meta, "nonfinite_steps", (int,), ckpt, required=False)
    opt = _field(meta, "optimizer", (dict,), ckpt, required=False)
    if opt is not None:
        groups = opt.get("param_groups")
        if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                                   for g in groups):
            raise CheckpointError(f"checkpoint '{ckpt}': state.json optimizer.param_groups is malformed; "
                                  f"it is damaged")
    return meta


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read '{file}': {exc}; the checkpoint is damaged") from None


def _describe_mismatch(model: nn.Module, tensors: dict[str, torch.Tensor]) -> str:
    """What differs between a model's state dict and a checkpoint's tensors, in a few words."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    shapes = [f"{k} {list(tensors[k].shape)} vs {list(s)}" for k, s in expected.items()
              if k in tensors and tuple(tensors[k].shape) != s]

    def few(items: list[str]) -> str:
        return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")

    parts = []
    if shapes:
        parts.append(f"{len(shapes)} tensor(s) differ in shape (checkpoint vs model: {few(shapes)})")
    if missing:
        parts.append(f"{len(missing)} missing from the checkpoint ({few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} not in the model ({few(unexpected)})")
    return "; ".join(parts) or "the tensors do not fit"


def load_model_weights(ckpt: Path, model: nn.Module) -> None:
    """Load ``ckpt``'s weights into ``model`` (strict); a mismatch says which tensors differ and how."""
    tensors = _load_tensors(ckpt / "model.safetensors")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError:
        raise CheckpointError(f"checkpoint '{ckpt}' does not match the model: "
                              f"{_describe_mismatch(model, tensors)}") from None


def read_task_state(ckpt: Path, expected: bool) -> dict[str, torch.Tensor]:
    """The task's state beyond the encoder (``{}`` for tasks without any); ``expected``: the task has some,
    so a checkpoint without the file cannot be resumed exactly."""
    file = ckpt / TASK_FILE
    if not file.is_file():
        if expected:
            raise CheckpointError(f"checkpoint '{ckpt}' lacks {TASK_FILE} (the task's momentum towers and queues); "
                                  f"it cannot be resumed")
        return {}
    return _load_tensors(file)


def read_optimizer_state(ckpt: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The optimiser state dict of checkpoint ``ckpt`` (keyed by parameter index, as ``state_dict()``)."""
    if "optimizer" not in meta:
        raise CheckpointError(f"checkpoint '{ckpt}' holds no optimiser state; it cannot be resumed")
    tensors = _load_tensors(ckpt / "optimizer.safetensors")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, _, name = key.partition(".")
        if not idx.isdigit() or not name:
            raise CheckpointError(f"checkpoint '{ckpt}': optimizer.safetensors holds an unexpected tensor "
                                  f"{key!r}; it is damaged")
        state.setdefault(int(idx), {})[name] = value
    groups = meta["optimizer"]["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def check_optimizer_state(state: dict[str, Any], params: list[nn.Parameter], ckpt: Path) -> None:
    """Refuse (one line) a saved optimiser state that does not fit ``params`` (the model's parameters in
    optimiser order): a different count, or a moment of another shape."""
    saved = sum(len(g["params"]) for g in state["param_groups"])
    if saved != len(params) or any(i not in range(len(params)) for i in state["state"]):
        raise CheckpointError(f"checkpoint '{ckpt}': the optimiser state is for {saved} parameters, the model has "
                              f"{len(params)}; it belongs to another model")
    for i, tensors in state["state"].items():
        for name, value in tensors.items():
            if value.dim() > 0 and tuple(value.shape) != tuple(params[i].shape):
                raise CheckpointError(f"checkpoint '{ckpt}': optimiser tensor {i}.{name} has shape "
                                      f"{list(value.shape)}, its parameter {list(params[i].shape)}")
