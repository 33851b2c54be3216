"""Work done ahead in a thread: the loader's batches, predict's and prepare's record batches."""
from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def prefetch(items: Iterable[T], depth: int, name: str = "ctrkit-prefetch") -> Iterator[T]:
    """`items`, made `depth` ahead in a thread of their own (numpy, pyarrow and most torch work
    release the GIL, so making the next ones overlaps using this one). An error raised while
    making them is raised here, in order; closing the iterator early stops the thread."""
    q: "queue.Queue[tuple]" = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put((True, item))
        except BaseException as e:  # surfaced in the consumer
            q.put((False, e))
            return
        q.put((False, None))

    t = threading.Thread(target=work, daemon=True, name=name)
    t.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(timeout=0.01)
