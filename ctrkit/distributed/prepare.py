"""`prepare` shared by the torchrun ranks: each rank counts and encodes its share of the files of
a split given as many files, rank 0 merges.

Every rank calls `prepare_on_ranks(cfg)`. Rank 0 runs `prepare` (the folder's lock, the
fingerprint check, the vocabularies, schema.json: ctrkit/data/preprocess.py) with `RankTasks` as
its task runner; the other ranks follow its commands until it is done. A `map` of file tasks goes
in rounds of (ranks x data.prepare_workers) files: rank r runs its block of the round (through
its own worker processes when prepare_workers > 1), the results are gathered on rank 0 in file
order, so the folder equals what one process writes with prepare_workers >= 2 (shards per file;
the vocabularies, ids and rows of one process reading the files in one stream). Shards are
written by the rank that encodes them into rank 0's temporary folder inside data.prepared_dir, which every rank must see (as training's ranks already do). Commands
and results travel by torch.distributed object collectives over a gloo group of their own, whose
timeout allows for rank 0 working alone (fitting vocabularies, a held-out carve).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence

import torch.distributed as dist

from ctrkit.config import Config
from ctrkit.data.preprocess import prepare
from ctrkit.data.schema import Schema
from ctrkit.data.tasks import InlineTasks, ProcessTasks
from ctrkit.errors import CtrkitError

PREPARE_TIMEOUT = timedelta(days=1)   # a follower waits this long for rank 0's next command


@dataclass
class _Failed:
    """A task's exception, sent as its parts: a ctrkit error (the user's), an OSError (its errno
    and file: rank 0 reports it as a disk or file error), anything else (a bug)."""
    message: str
    kind: str                              # "ctrkit", "os" or "bug"
    os_error: Optional[tuple] = None       # (errno, strerror, filename)

    @classmethod
    def of(cls, e: Exception) -> "_Failed":
        if isinstance(e, OSError):
            return cls(_first_line(e), "os", (e.errno, e.strerror, e.filename))
        return cls(_first_line(e), "ctrkit" if isinstance(e, CtrkitError) else "bug")

    def throw(self) -> None:
        if self.kind == "os" and self.os_error is not None and self.os_error[0] is not None:
            raise OSError(*self.os_error)
        raise (CtrkitError if self.kind == "ctrkit" else RuntimeError)(self.message)


class RankTasks:
    """The ranks of `group` as prepare's task runner; rank 0 calls `map`, the others `follow`."""

    def __init__(self, group, local_width: int) -> None:
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.local = ProcessTasks(local_width) if local_width > 1 else InlineTasks()
        self.width = self.world * self.local.width
        self.ran = 0   # tasks this rank ran

    def map(self, fn: Callable, argsets: Sequence[tuple]) -> Iterator:
        for start in range(0, len(argsets), self.width):
            round_ = list(argsets[start:start + self.width])
            dist.broadcast_object_list([("map", fn, round_)], src=0, group=self.group)
            gathered: List = [None] * self.world
            dist.gather_object(self._share(fn, round_), gathered, dst=0, group=self.group)
            for results in gathered:
                for r in results:
                    if isinstance(r, _Failed):
                        r.throw()
                    yield r

    def _share(self, fn: Callable, argsets: List[tuple]) -> list:
        """This rank's block of a round's tasks; a failure is returned, not raised, so that
        every rank reaches the gather."""
        w = self.local.width
        mine = argsets[self.rank * w:(self.rank + 1) * w]
        self.ran += len(mine)
        try:
            return list(self.local.map(fn, mine))
        except Exception as e:   # noqa: BLE001  (sent to rank 0, which raises it)
            return [_Failed.of(e)]

    def follow(self) -> Optional[str]:
        """Run rank 0's rounds until it is done; its error message, if it failed."""
        while True:
            box: list = [None]
            dist.broadcast_object_list(box, src=0, group=self.group)
            kind, *rest = box[0]
            if kind == "end":
                return rest[0]
            dist.gather_object(self._share(*rest), None, dst=0, group=self.group)

    def end(self, error: Optional[str]) -> None:
        dist.broadcast_object_list([("end", error)], src=0, group=self.group)

    def close(self) -> None:
        self.local.close()


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e).strip() else type(e).__name__


def prepare_on_ranks(cfg: Config, progress: bool = True) -> Schema:
    """Called by every rank of the default process group: the prepared data of `cfg`, prepared
    (when it is not up to date) by all ranks together. Rank 0's error is every rank's error."""
    group = dist.new_group(backend="gloo", timeout=PREPARE_TIMEOUT)
    tasks = RankTasks(group, cfg.data.prepare_workers)
    try:
        if tasks.rank == 0:
            try:
                schema = prepare(cfg, progress, tasks=tasks)
            except BaseException as e:
                tasks.end(_first_line(e))
                raise
            tasks.end(None)
        else:
            error = tasks.follow()
            if error is not None:
                raise CtrkitError(error)   # (the message rank 0 gives)
            schema = Schema.load(Path(cfg.data.prepared_dir))
        if tasks.ran:
            print(f"ctrkit prepare: rank {tasks.rank} of {tasks.world} ran {tasks.ran} file "
                  "tasks", file=sys.stderr, flush=True)
        return schema
    finally:
        tasks.close()
        dist.destroy_process_group(group)


def prepare_under_torchrun(cfg: Config, progress: bool = True) -> Schema:
    """`torchrun ... -m ctrkit prepare CONFIG`: join torchrun's ranks (gloo) and prepare together."""
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group("gloo", timeout=timedelta(seconds=cfg.distributed.timeout_s))
    try:
        return prepare_on_ranks(cfg, progress)
    finally:
        if joined:
            dist.destroy_process_group()
