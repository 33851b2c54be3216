"""`prefetch`: items in order, a producer's error raised in its place, an early close stops it."""
import threading

import pytest

from ctrkit.data.loader import prefetch


def test_items_come_in_order_and_an_error_in_its_place():
    def items():
        yield from range(5)
        raise ValueError("bad row 5")
    got = []
    with pytest.raises(ValueError, match="bad row 5"):
        for x in prefetch(items(), 2):
            got.append(x)
    assert got == [0, 1, 2, 3, 4]


def test_closing_early_stops_the_producer():
    made = []

    def items():
        for i in range(10_000):
            made.append(i)
            yield i
    it = prefetch(items(), 2, name="test-prefetch")
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    assert not any(t.name == "test-prefetch" for t in threading.enumerate())
    assert len(made) <= 3 + 2 + 2
