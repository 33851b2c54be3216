"""SIGINT/SIGTERM while training: finish the current step, save `last`, exit 130.

While a `StopSignals` block is active the two signals only set `requested`; the training loop
looks at it after each step (a distributed run agrees on it every few steps, so that every rank
stops after the same step). A process started by torch's launcher gets each signal twice (the
terminal's, and the one the launcher forwards), so only a single process stops at once on the
second signal (KeyboardInterrupt); the launcher kills ranks that do not finish within 30 s.
"""
from __future__ import annotations

import signal
import threading
from typing import Dict


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
