"""The stable value hash (FNV-1a 64 over UTF-8 bytes) and the vocabulary index built on it."""
import numpy as np
import pyarrow as pa

import ctrkit.data.hashing as hashing
from ctrkit.data.hashing import VocabIndex, fnv1a64


def _fnv_reference(s: str) -> int:
    h = 0xCBF29CE484222325
    for b in s.encode("utf-8"):
        h = ((h ^ b) * 0x100000001B3) % 2 ** 64
    return h


def test_fnv1a64_matches_the_byte_by_byte_definition():
    values = ["", "a", "foobar", "68fd1e64", "ünïcödé", "x" * 300, "05db9164", "1"]
    arr = pa.array(values)
    assert fnv1a64(arr).tolist() == [_fnv_reference(v) for v in values]
    assert fnv1a64(arr.slice(2, 3)).tolist() == [_fnv_reference(v) for v in values[2:5]]
    assert _fnv_reference("a") == 0xAF63DC4C8601EC8C          # the published FNV-1a test vector
    assert fnv1a64(pa.array([5, 12])).tolist() == [_fnv_reference("5"), _fnv_reference("12")]
    hexes = ["68fd1e64", "05db9164", "ae82ea21", "8cf07265"]     # one length: the byte-matrix path
    assert fnv1a64(pa.array(hexes)).tolist() == [_fnv_reference(v) for v in hexes]
    assert fnv1a64(pa.array(hexes).slice(1, 2)).tolist() == [_fnv_reference(v) for v in hexes[1:3]]


def test_vocab_index_finds_positions_and_never_confuses_values():
    ix = VocabIndex(pa.array(["b", "a", "cc"]))
    assert ix.positions(pa.array(["a", "zz", "cc", "b", ""])).tolist() == [1, -1, 2, 0, -1]


def test_a_shared_hash_is_resolved_by_comparing_the_values(monkeypatch):
    """With a weak hash (the first byte), a query that hashes like a vocabulary value but is
    another value is absent; a vocabulary whose values share hashes falls back to the values."""
    def first_byte(values):
        s = hashing.as_strings(values).to_pylist()
        return np.array([ord(v[0]) if v else 0 for v in s], np.uint64)
    monkeypatch.setattr(hashing, "fnv1a64", first_byte)
    ix = VocabIndex(pa.array(["apple", "banana"]))
    assert ix.positions(pa.array(["avocado", "banana", "apple", "blue"])).tolist() == [-1, 1, 0, -1]
    shared = VocabIndex(pa.array(["apple", "avocado"]))
    assert shared.positions(pa.array(["avocado", "apple", "axe"])).tolist() == [1, 0, -1]
