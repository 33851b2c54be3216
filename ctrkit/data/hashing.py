"""A stable 64-bit hash of categorical values, and a vocabulary index that finds values exactly.

`fnv1a64(values)` is FNV-1a (64 bit) over each value's UTF-8 bytes, computed for a whole Arrow
string array at once: offset basis 0xcbf29ce484222325, for each byte `h = (h ^ byte) * 0x100000001b3`
modulo 2^64. Any language reproduces it in a few lines (`preprocess.json` names it), so a hashed
vocabulary (`vocab: hash`) gives a server the same ids, and it does not depend on the process
(Python's `hash` of a str does).

`VocabIndex(values)` finds values' positions in a vocabulary by a 64-bit key per value in an int
hash table (pandas'), never by a lossy hash alone:
- a value of at most 8 bytes is its own key: 8 bytes read as a little-endian integer; up to 7
  bytes zero-padded, with the length in the top byte. These keys are distinct for distinct values
  within each of the two classes (8 bytes; 0-7 bytes), so each class has its own table and a hit
  needs no check. Criteo's and Avazu's hex ids are 8 bytes: their keys are the column's own bytes,
  read in place;
- a longer value is keyed by its FNV-1a hash, and a hit is then compared as text, so a hash
  collision can never map a value to another value's id.
`int_positions` looks integers (bucketed numerics) up without making text of them: a vocabulary
value that is an integer's decimal text ("5", "-3") is found by that integer.
"""
from __future__ import annotations

from typing import Tuple

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


SHORT, EIGHT, LONG, NULL = 0, 1, 2, 3   # the classes of `byte_keys`


def byte_keys(values: pa.Array) -> Tuple[np.ndarray, np.ndarray]:
    """(uint64 key, class) of each value of a string array: SHORT (0-7 bytes: the bytes padded
    with zeros, the length in the top byte), EIGHT (the 8 bytes, little-endian), LONG (more than
    8 bytes: the key is 0, see `VocabIndex`), NULL."""
    values = as_strings(values)
    n = len(values)
    validity, offsets_buf, data_buf = values.buffers()
    offsets = np.frombuffer(offsets_buf, np.int32)[values.offset:values.offset + n + 1]
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    cls = np.where(lengths == 8, EIGHT, np.where(lengths < 8, SHORT, LONG)).astype(np.int8)
    if validity is not None and values.null_count:
        cls[~values.is_valid().to_numpy(zero_copy_only=False)] = NULL
    keys = np.zeros(n, np.uint64)
    eight = cls == EIGHT
    if (eight | ((cls == NULL) & (lengths == 0))).all():
        # every value 8 bytes, or null without bytes: the values' bytes lie end to end
        span = data[int(offsets[0]):int(offsets[-1])]
        keys[eight] = span.view("<u8") if span.size else 0
        return keys, cls
    rows = np.flatnonzero(cls <= EIGHT)
    starts, lens = offsets[:-1][rows].astype(np.int64), lengths[rows].astype(np.int64)
    k = np.zeros(len(rows), np.uint64)
    last = max(len(data) - 1, 0)
    for j in range(8):
        has = lens > j
        b = data[np.minimum(starts + j, last)] if len(data) else np.zeros(len(rows), np.uint8)
        k |= np.where(has, b, 0).astype(np.uint64) << np.uint64(8 * j)
    short = lens < 8
    k[short] |= lens[short].astype(np.uint64) << np.uint64(56)
    keys[rows] = k
    return keys, cls


class VocabIndex:
    """Positions of values in a vocabulary (a string array of distinct values), -1 when absent."""

    def __init__(self, vocab: pa.Array) -> None:
        self.vocab = as_strings(vocab)
        keys, cls = byte_keys(self.vocab)
        # per class: (int64 keys of its vocabulary values as a pandas index, their positions and
        # a last -1, which get_indexer's -1 for a key not found picks)
        self._tables = {}
        for c in (SHORT, EIGHT):
            where = np.flatnonzero(cls == c)
            self._tables[c] = (pd.Index(keys[where].view(np.int64)), np.append(where, -1))
        self._long = np.flatnonzero(cls == LONG)
        self._by_hash = pd.Index(fnv1a64(self.vocab.take(pa.array(self._long))).view(np.int64))
        self._objects = None
        if not self._by_hash.is_unique:   # two long values share a 64-bit hash: compare all
            self._objects = pd.Index(self.vocab.take(pa.array(self._long)).to_numpy(
                zero_copy_only=False), dtype=object)
        self._ints = None

    def __len__(self) -> int:
        return len(self.vocab)

    def positions(self, values: pa.Array) -> np.ndarray:
        """int64 position of each of `values` in the vocabulary, -1 when absent (or null)."""
        values = as_strings(values)
        keys, cls = byte_keys(values)
        nulls = cls == NULL
        for c, (index, where) in self._tables.items():
            if (cls == c).any() and ((cls == c) | nulls).all():
                # one class throughout (hex ids): every row looked up, no gather, no scatter
                pos = where[index.get_indexer(keys.view(np.int64))]
                pos[nulls] = -1
                return pos
        pos = np.full(len(values), -1, np.int64)
        for c, (index, where) in self._tables.items():
            rows = np.flatnonzero(cls == c)
            if rows.size and len(index):
                pos[rows] = where[index.get_indexer(keys[rows].view(np.int64))]
        rows = np.flatnonzero(cls == LONG)
        if rows.size and self._long.size:
            pos[rows] = self._long_positions(values.take(pa.array(rows)))
        return pos

    def _long_positions(self, values: pa.Array) -> np.ndarray:
        """Positions of values longer than 8 bytes: by hash, then compared as text."""
        if self._objects is not None:
            found = self._objects.get_indexer(values.to_numpy(zero_copy_only=False))
            return np.where(found >= 0, self._long[found], -1)
        found = self._by_hash.get_indexer(fnv1a64(values).view(np.int64))
        hit = np.flatnonzero(found >= 0)
        pos = np.full(len(values), -1, np.int64)
        if hit.size:   # the same hash is not yet the same value
            cand = self._long[found[hit]]
            same = pc.equal(values.take(pa.array(hit)), self.vocab.take(pa.array(cand)))
            ok = same.to_numpy(zero_copy_only=False)
            pos[hit[ok]] = cand[ok]
        return pos

    def int_positions(self, values: np.ndarray) -> np.ndarray:
        """int64 position of each integer of `values` (int64) whose decimal text is in the
        vocabulary, -1 when absent."""
        if self._ints is None:
            self._ints = self._int_table()
        lo, table, index, where = self._ints
        if table is not None:   # (compared before subtracting: no int64 wrap-around)
            inside = (values >= lo) & (values <= lo + len(table) - 1)
            return np.where(inside, table[np.where(inside, values - lo, 0)], -1)
        return where[index.get_indexer(values)]   # (-1, not found, picks where's last -1)

    def _int_table(self):
        """The lookup of the vocabulary values that are an integer's decimal text (a value like
        "05" or "x" is never an integer's text): (lowest, direct table of positions, None, None)
        for a narrow range, else (0, None, pandas index of the integers, their positions and a
        last -1)."""
        ok = pc.match_substring_regex(self.vocab, r"^(0|-?[1-9][0-9]{0,18})$")
        where = np.flatnonzero(pc.fill_null(ok, False).to_numpy(zero_copy_only=False))
        text = self.vocab.take(pa.array(where, pa.int64()))
        try:
            ints = pc.cast(text, pa.int64()).to_numpy(zero_copy_only=False)
        except pa.ArrowInvalid:   # 19 digits beyond int64: no integer has that text
            big = [int(v) for v in text.to_pylist()]
            fits = np.array([-2 ** 63 <= v < 2 ** 63 for v in big], bool)
            where, ints = where[fits], np.array([v for v in big if -2 ** 63 <= v < 2 ** 63],
                                                np.int64)
        if ints.size and int(ints.max()) - int(ints.min()) < max(1024, 4 * ints.size):
            lo = int(ints.min())   # a direct table, at most 4 slots per value
            table = np.full(int(ints.max()) - lo + 1, -1, np.int64)
            table[ints - lo] = where
            return lo, table, None, None
        return 0, None, pd.Index(ints), np.append(where, -1)   # (a last -1 for "not found")
