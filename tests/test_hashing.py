"""The stable value hash (FNV-1a 64 over UTF-8 bytes) and the vocabulary index (exact keys)."""
import numpy as np
import pyarrow as pa
import pytest

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
    """Values longer than 8 bytes are found by hash: with a weak one (the first byte), a query
    that hashes like a vocabulary value but is another value is absent; a vocabulary whose values
    share hashes falls back to the values."""
    def first_byte(values):
        s = hashing.as_strings(values).to_pylist()
        return np.array([ord(v[0]) if v else 0 for v in s], np.uint64)
    monkeypatch.setattr(hashing, "fnv1a64", first_byte)
    ix = VocabIndex(pa.array(["apple pie", "banana split"]))
    query = ["avocado toast", "banana split", "apple pie", "blueberry pie"]
    assert ix.positions(pa.array(query)).tolist() == [-1, 1, 0, -1]
    shared = VocabIndex(pa.array(["apple pie", "avocado toast"]))
    assert shared.positions(pa.array(["avocado toast", "apple pie", "axe handles"])).tolist() == [
        1, 0, -1]


def _random_texts(rng, n, alphabet):
    return ["".join(rng.choice(alphabet, size=int(rng.integers(0, 13)))) for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vocab_index_agrees_with_a_dict_on_texts_of_every_length(seed):
    """Keys of 0-7 bytes, of 8 bytes and hashed longer values, mixed in one vocabulary and one
    query: the NUL byte and bytes 1-7 (the ones a short key's length byte could be confused with,
    "ab" against "ab\\0"), multi-byte UTF-8, nulls, a sliced array; against a plain dict."""
    rng = np.random.default_rng(seed)
    alphabet = np.array(list("ab\x00\x01\x07\x08é") + ["\u20ac"])
    vocab = list(dict.fromkeys(_random_texts(rng, 400, alphabet)
                               + ["ab", "ab\x00", "abcdefg\x07", "abcdefg", "\x07abcdefg", ""]))
    ix = VocabIndex(pa.array(vocab))
    ref = {v: i for i, v in enumerate(vocab)}
    query = _random_texts(rng, 600, alphabet) + vocab + ["ab\x00\x00", "abcdefg\x00", None]
    rng.shuffle(query)
    query = [None if rng.random() < 0.05 else q for q in query]
    want = [ref.get(q, -1) if q is not None else -1 for q in query]
    assert ix.positions(pa.array(query)).tolist() == want
    arr = pa.array(["pad"] + query)
    assert ix.positions(arr.slice(1)).tolist() == want


def test_vocab_index_reads_ids_of_eight_bytes_in_place():
    """Hex ids (8 bytes each, with nulls between them: the one-class path with no gather; a null
    is absent even where eight NUL bytes, whose key a null's slot holds, are a value) and an
    empty vocabulary."""
    vocab = ["68fd1e64", "05db9164", "ae82ea21", "8cf07265", "\x00" * 8]
    ix = VocabIndex(pa.array(vocab))
    query = pa.array([None, "ae82ea21", "68fd1e64", None, "00000000", "8cf07265", "\x00" * 8])
    assert ix.positions(query).tolist() == [-1, 2, 0, -1, -1, 3, 4]
    assert ix.positions(query.slice(2, 3)).tolist() == [0, -1, -1]
    assert VocabIndex(pa.array([], pa.string())).positions(query).tolist() == [-1] * 7


@pytest.mark.parametrize("wide", [False, True])
def test_integers_are_found_by_their_decimal_text(wide):
    """`int_positions` gives each integer the position of its decimal text: never a text that
    merely reads as the same number ("05", "-0", "+5", " 5", "5.0"), through the direct table
    (a narrow range) and the hash index (a wide one); a 19-digit text beyond int64 is no integer."""
    vocab = ["7", "05", "-0", "+5", " 5", "5.0", "x", "-12", "0", "300", "9999999999999999999"]
    vocab += ["-4611686018427387904", "9223372036854775807"] if wide else ["42"]
    ix = VocabIndex(pa.array(vocab))
    ref = {v: i for i, v in enumerate(vocab)}
    values = np.array([7, 5, 0, -12, 300, 42, 6, -5, 2 ** 62, -4611686018427387904,
                       9223372036854775807, -9223372036854775808], np.int64)
    assert ix.int_positions(values).tolist() == [ref.get(str(int(v)), -1) for v in values]


@pytest.mark.parametrize("vocab", [[], ["x", "05", "-0"]])
def test_integers_against_a_vocabulary_without_integer_texts_are_all_absent(vocab):
    """An empty vocabulary (a numeric column empty throughout training) or one with no integer's
    text: every integer is absent, none crashes the lookup."""
    ix = VocabIndex(pa.array(vocab, pa.string()))
    values = np.array([0, 5, -1, 2 ** 62], np.int64)
    assert ix.int_positions(values).tolist() == [-1] * 4
    assert ix.int_positions(np.array([], np.int64)).tolist() == []
