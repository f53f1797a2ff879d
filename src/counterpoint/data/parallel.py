"""A process pool for data work that needs only numpy and PIL (writing and decoding image shards)."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor


def process_pool(workers: int) -> ProcessPoolExecutor:
    """``workers`` processes, forked where the platform can: the jobs need no fresh interpreter, which would
    spend seconds importing torch before its first image."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))
