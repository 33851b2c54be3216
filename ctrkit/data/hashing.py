"""A stable 64-bit hash of categorical values, and a vocabulary index built on it.

`fnv1a64(values)` is FNV-1a (64 bit) over each value's UTF-8 bytes, computed for a whole Arrow
string array at once: offset basis 0xcbf29ce484222325, for each byte `h = (h ^ byte) * 0x100000001b3`
modulo 2^64. Any language reproduces it in a few lines (`preprocess.json` names it), so a hashed
vocabulary (`vocab: hash`) gives a server the same ids, and it does not depend on the process
(Python's `hash` of a str does).

`VocabIndex(values)` finds values' positions in a vocabulary through their hashes (an int64 hash
table lookup) and then compares the strings themselves, so a hash collision can never map a value
to another value's id.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3


def as_strings(values: pa.Array) -> pa.Array:
    """The values as an Arrow string array (how vocabularies store them: 5 -> "5", True -> "true")."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    if not pa.types.is_string(values.type):
        values = values.cast(pa.string())
    return values


def fnv1a64(values: pa.Array) -> np.ndarray:
    """uint64 FNV-1a of each value's UTF-8 bytes (a null hashes as the empty string)."""
    values = as_strings(values)
    n = len(values)
    _, offsets_buf, data_buf = values.buffers()
    offsets = np.frombuffer(offsets_buf, np.int32)[values.offset:values.offset + n + 1]
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    starts = offsets[:-1].astype(np.int64)
    lengths = (offsets[1:] - offsets[:-1]).astype(np.int64)
    h = np.full(n, FNV_OFFSET, np.uint64)
    prime = np.uint64(FNV_PRIME)
    width = int(lengths[0]) if n else 0
    if n and width and (lengths == width).all():   # one length (hex ids): a [n, width] byte matrix
        block = data[int(starts[0]):int(starts[0]) + n * width].reshape(n, width)
        with np.errstate(over="ignore"):
            for j in range(width):
                h ^= block[:, j]
                h *= prime
        return h
    active = np.flatnonzero(lengths > 0)
    j = 0
    with np.errstate(over="ignore"):
        while active.size:
            b = data[starts[active] + j].astype(np.uint64)
            h[active] = (h[active] ^ b) * prime
            j += 1
            active = active[lengths[active] > j]
    return h


class VocabIndex:
    """Positions of values in a vocabulary (a string array of distinct values), -1 when absent."""

    def __init__(self, vocab: pa.Array) -> None:
        self.vocab = as_strings(vocab)
        hashes = fnv1a64(self.vocab).view(np.int64)
        self._by_hash = pd.Index(hashes)
        if not self._by_hash.is_unique:   # two vocabulary values share a 64-bit hash: compare all
            self._by_hash = None
            self._objects = pd.Index(self.vocab.to_numpy(zero_copy_only=False), dtype=object)

    def __len__(self) -> int:
        return len(self.vocab)

    def positions(self, values: pa.Array) -> np.ndarray:
        """int64 position of each of `values` (no nulls) in the vocabulary, -1 when absent."""
        values = as_strings(values)
        if self._by_hash is None:
            return self._objects.get_indexer(values.to_numpy(zero_copy_only=False))
        pos = self._by_hash.get_indexer(fnv1a64(values).view(np.int64))
        hit = np.flatnonzero(pos >= 0)
        if hit.size:   # the same hash is not yet the same value
            same = pc.equal(values.take(pa.array(hit)), self.vocab.take(pa.array(pos[hit])))
            pos[hit[~same.to_numpy(zero_copy_only=False)]] = -1
        return pos
