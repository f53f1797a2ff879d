"""Run a test function, or the CLI, in N real processes (forked; gloo on CPU, localhost TCP).

``run_distributed(fn, world_size, *args)`` starts ``world_size`` processes, joins them into one gloo
process group via ``init_method="tcp://127.0.0.1:<free port>"``, calls ``fn(rank, world_size, *args)`` in each
and returns the list of their return values, ordered by rank.

``launch_ranks(argv)`` runs ``counterpoint ARGV`` in 2 processes with the environment torchrun gives its
workers (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...), so the code under test takes exactly its torchrun
path. The processes are forked from the test process rather than started as new interpreters by torchrun's
launcher: a fresh interpreter spends seconds importing torch, and three of them per test (launcher and two
ranks) were a third of the suite's time. Tests of torchrun itself (restarts, the README's commands) still use
the real launcher. Forking is safe here: each child sets one intra-op thread before it computes, so it never
enters the thread pool it inherited (no other thread of the parent is needed in the child).
``run_distributed``'s results travel as ``torch.save`` files in a temporary directory (tensors, dicts,
numbers). A worker exception fails the caller with the worker's traceback; a worker that hangs (e.g. a
collective its peer never joins) is killed after ``timeout`` seconds and the call raises ``TimeoutError``.
``fn`` and ``args`` must be picklable: define ``fn`` at module level.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessContext, ProcessException

__all__ = ["free_port", "launch_ranks", "run_cli", "run_distributed", "start_cli"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, fn: Callable[..., Any], world_size: int, port: int, out_dir: str, timeout: float,
            args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout + 10))  # the parent's deadline fires first
    try:
        try:
            result = fn(rank, world_size, *args)
        except BaseException:
            (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
            raise
        tmp = Path(out_dir) / f"rank{rank}.pt.tmp"
        torch.save(result, tmp)
        os.replace(tmp, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # nobody tears the group down while a peer still needs it
    finally:
        dist.destroy_process_group()


def _kill(ctx: ProcessContext) -> None:
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    for p in ctx.processes:
        p.join(5)


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]``, each in its own process.

    Raises ``RuntimeError`` (with the worker's traceback) if a worker raised or died, ``TimeoutError`` if they
    did not all finish within ``timeout`` seconds. The port is retried if another program grabbed it first.
    """
    for attempt in range(3):
        with tempfile.TemporaryDirectory(prefix="cp-dist-") as out_dir:
            ctx = mp.start_processes(_worker, args=(fn, world_size, free_port(), out_dir, timeout, args),
                                     nprocs=world_size, join=False, start_method="fork")
            deadline = time.monotonic() + timeout
            try:
                while not ctx.join(timeout=max(0.0, deadline - time.monotonic()), grace_period=2.0):
                    if time.monotonic() >= deadline:
                        _kill(ctx)
                        raise TimeoutError(f"{world_size} workers running {fn.__name__} did not finish within "
                                           f"{timeout:.0f} s")
            except ProcessException as e:
                _kill(ctx)
                if "Address already in use" in str(e) and attempt < 2:
                    continue
                errors = "".join(f"\n-- rank {p.stem[4:]} raised:\n{p.read_text()}"
                                 for p in sorted(Path(out_dir).glob("rank*.err")))
                raise RuntimeError(f"a worker running {fn.__name__} failed:{errors or e}") from None
            return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
    raise AssertionError("unreachable")


def _cli_main(argv: list[str], env: dict[str, str], out_path: Path, err_path: Path) -> None:
    os.environ.update(env)
    out, err = open(out_path, "w"), open(err_path, "w")  # noqa: SIM115  (closed by the process's exit)
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    sys.stdout, sys.stderr = out, err
    code = 1
    try:
        torch.set_num_threads(1)
        from counterpoint.cli import main

        code = main(argv)
    except BaseException:  # noqa: BLE001  (reported in the log, then the process exits with 1)
        traceback.print_exc()
    finally:
        out.flush()
        err.flush()
        os._exit(code)


def start_cli(argv: list[str], logs: Path, env: dict[str, str] | None = None,
              name: str = "cli") -> multiprocessing.Process:
    """``counterpoint ARGV`` in a process forked from this one (started, not waited for); its stdout and
    stderr go to ``logs/NAME.out`` and ``logs/NAME.err``. ``kill()`` is a SIGKILL, as for any process."""
    logs.mkdir(parents=True, exist_ok=True)
    proc = multiprocessing.get_context("fork").Process(
        target=_cli_main, args=(list(argv), dict(env or {}), logs / f"{name}.out", logs / f"{name}.err"))
    proc.start()
    return proc


def run_cli(argv: list[str], logs: Path, env: dict[str, str] | None = None, name: str = "cli",
            timeout: float = 300.0) -> subprocess.CompletedProcess:
    """``counterpoint ARGV`` in a forked process, waited for: its exit code, stdout and stderr."""
    proc = start_cli(argv, logs, env, name)
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
    return subprocess.CompletedProcess(["counterpoint", *argv], proc.exitcode, (logs / f"{name}.out").read_text(),
                                       (logs / f"{name}.err").read_text())


def launch_ranks(argv: list[str], logs: Path, env: dict[str, str] | None = None, world_size: int = 2,
                 timeout: float = 300.0, check: bool = True) -> subprocess.CompletedProcess:
    """``counterpoint ARGV`` in ``world_size`` forked processes with torchrun's worker environment; returns
    their stdout and stderr, rank after rank, and the first non-zero exit code (0 if none). With ``check``, fails
    the test with the ranks' output if one of them exits non-zero or they do not finish within ``timeout``
    seconds. ``env`` may set ``TORCHELASTIC_RESTART_COUNT`` to run what torchrun runs when it restarts a job."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        worker_env = {"TORCHELASTIC_RESTART_COUNT": "0", **(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank),
                      "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size), "GROUP_RANK": "0",
                      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(start_cli(argv, logs, worker_env, name=f"rank{rank}"))
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join(5)
    out = "".join((logs / f"rank{r}.out").read_text() for r in range(world_size))
    err = "".join(f"-- rank {r}:\n" + (logs / f"rank{r}.err").read_text() for r in range(world_size))
    codes = [p.exitcode for p in procs]
    assert not check or (not hung and codes == [0] * world_size), \
        f"ranks exited {codes}{' (timed out)' if hung else ''}:\n{out[-3000:]}\n{err[-6000:]}"
    return subprocess.CompletedProcess(["counterpoint", *argv], next((c for c in codes if c), 0), out, err)
