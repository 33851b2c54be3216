"""SIGINT/SIGTERM while training: finish the current step, save `last`, exit 130.

While a `StopSignals` block is active the two signals only set `requested`; the training loop
looks at it after each step (a distributed run agrees on it every few steps, so that every rank
stops after the same step). A process started by torch's launcher gets each signal twice (the
terminal's, and the one the launcher forwards), so only a single process stops at once on the
second signal (KeyboardInterrupt); the launcher kills ranks that do not finish within 30 s.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Dict

import torch
import torch.distributed as dist

from ctrkit.distributed.runtime import DistEnv, comm_device

POLL = 10   # steps between the ranks' agreement on a stop signal


class StopSignals:
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, hard_after: int = 2) -> None:
        self.hard_after = hard_after
        self.count = 0
        self._old: Dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.count > 0

    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self.count >= self.hard_after:
            raise KeyboardInterrupt

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


def stop_agreed(signals: StopSignals, env: DistEnv, step: int) -> bool:
    """Whether a signal asked to stop after this step; the ranks of a distributed run agree on
    it every POLL steps (one tiny all-reduce)."""
    if not env.active:
        return signals.requested
    if step % POLL:
        return False
    t = torch.tensor([float(signals.requested)], device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def injected_fault(step: int, rank: int, where: str = "step") -> None:
    """Test hook for torchrun restarts: CTRKIT_TEST_KILL="RANK:STEP" hard-kills that rank at that
    step of the first attempt (no cleanup, like a lost machine); "RANK:STEP:save" as it starts to
    save its checkpoint of that step, "RANK:STEP:saved" right after it wrote it. CTRKIT_TEST_HANG
    makes the rank stop answering instead (until the launcher's SIGTERM)."""
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    for var in ("CTRKIT_TEST_KILL", "CTRKIT_TEST_HANG"):   # HANG: SIGSTOP, a rank that hangs
        spec = os.environ.get(var)
        if spec:
            r, s, *at = spec.split(":")
            if (int(r), int(s), at[0] if at else "step") == (rank, step, where):
                if var == "CTRKIT_TEST_HANG":   # answers nobody; dies when the launcher says so
                    signal.signal(signal.SIGTERM, lambda *_: os._exit(17))
                    time.sleep(3600)
                os._exit(17)
