"""Who runs prepare's per-file tasks (counting one file's values, encoding one file's rows).

A task runner has one method, `map(fn, argsets)`: `fn(*args)` for each tuple of `argsets`,
results yielded in the order of `argsets` (so counts merge in file order whoever ran them).
- `ProcessTasks(P)`: a pool of P spawned worker processes on this machine
  (`data.prepare_workers`). Spawned, not forked: a fresh interpreter imports only the data layer,
  not what this process holds.
- Under torchrun the ranks are the runner (ctrkit/distributed/prepare.py: each rank takes its
  share of the files and rank 0 merges).
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, wait
from typing import Callable, Iterator, List, Optional, Protocol, Sequence


class TaskRunner(Protocol):
    width: int   # tasks run at once

    def map(self, fn: Callable, argsets: Sequence[tuple]) -> Iterator:
        ...


class ProcessTasks:
    """`width` spawned processes, started on first use; `close()` stops them."""

    def __init__(self, width: int) -> None:
        self.width = width
        self._pool: Optional[ProcessPoolExecutor] = None

    def map(self, fn: Callable, argsets: Sequence[tuple]) -> Iterator:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.width,
                                             mp_context=multiprocessing.get_context("spawn"))
        futures: List = [self._pool.submit(fn, *args) for args in argsets]
        try:
            for f in futures:
                yield f.result()
        finally:   # (a task still running would write into a folder the caller may remove)
            for f in futures:
                f.cancel()
            wait(futures)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


class InlineTasks:
    """This process, one task after another (a rank of prepare_workers=1)."""

    width = 1

    def map(self, fn: Callable, argsets: Sequence[tuple]) -> Iterator:
        for args in argsets:
            yield fn(*args)

    def close(self) -> None:
        pass
