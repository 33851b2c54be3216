"""Streaming vocabularies: counts merged over batches equal counting the whole split at once, and
a training file that changes between prepare's two passes is an error, not a prepared folder."""
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import ctrkit.data.preprocess as pp
from ctrkit.cli import main
from ctrkit.data.synth import write_synthetic
from ctrkit.data.vocab import ValueCounter, fit_vocab


def _whole(values):
    """Reference: distinct values in order of first appearance and their counts, in Python."""
    counts = {}
    for v in values:
        if v is not None:
            counts[v] = counts.get(v, 0) + 1
    return list(counts), np.array(list(counts.values()), np.int64)


@pytest.mark.parametrize("merge_rows", [1, 3, 1 << 16])
def test_counts_merged_over_batches_equal_the_whole_split(merge_rows):
    rng = np.random.default_rng(0)
    pool = [f"v{i}" for i in range(40)] + [None]
    values = [pool[i] for i in rng.zipf(1.5, 2000) % len(pool)]
    c = ValueCounter(merge_rows=merge_rows)
    for s in range(0, len(values), 97):
        part = pa.array(values[s:s + 97])
        c.add(pc.dictionary_encode(part) if s % 2 else part)   # both kinds of column
    got_values, got_counts = c.result()
    want_values, want_counts = _whole(values)
    assert got_values.to_pylist() == want_values
    assert np.array_equal(got_counts, want_counts)
    vocab, counts = fit_vocab(got_values, got_counts, min_count=2)
    order = sorted(range(len(want_values)), key=lambda i: (-want_counts[i], i))
    keep = [i for i in order if want_counts[i] >= 2]
    assert vocab.to_pylist() == [want_values[i] for i in keep]
    assert counts.tolist() == [int(want_counts[i]) for i in keep]
    assert fit_vocab(got_values, got_counts, 1, max_size=3)[0].to_pylist() == \
        [want_values[i] for i in order[:3]]


def test_files_typed_differently_merge_as_strings():
    c = ValueCounter(merge_rows=1)
    c.add(pa.array([5, 7, 5]))
    c.add(pa.array(["7", "x"]))
    values, counts = c.result()
    assert values.to_pylist() == ["5", "7", "x"] and counts.tolist() == [2, 2, 1]


def test_a_file_changed_between_the_passes_is_an_error(tmp_path, monkeypatch, capsys):
    raw = tmp_path / "raw"
    write_synthetic(raw, 2000, seed=1, card_scale=0.01, progress=False)
    train = tmp_path / "train.tsv"
    shutil.copy(raw / "train.tsv", train)
    fit = pp._fit_vocabularies

    def fit_then_append(*a, **k):
        out = fit(*a, **k)
        with open(train, "ab") as f:   # another process appends while prepare runs
            f.write((raw / "train.tsv").read_bytes().splitlines(keepends=True)[0])
        return out
    monkeypatch.setattr(pp, "_fit_vocabularies", fit_then_append)
    code = main(["prepare", f"data.train={train}", f"data.prepared_dir={tmp_path / 'prep'}",
                 "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "changed while being prepared" in err and str(train) in err, err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "prep" / "schema.json").exists()


def test_many_files_prepared_in_parallel_equal_one_process(tmp_path):
    """A training split of three day files and a bad row, prepared by two worker processes: the
    same vocabularies, the same rows and ids in the same order, the same row accounting (rows
    read = written + skipped), each file in shards of its own."""
    import pyarrow.feather as feather

    from ctrkit.config import load_config
    from ctrkit.data.shards import load_shard
    raw = tmp_path / "raw"
    write_synthetic(raw, 3000, valid_rows=500, seed=2, card_scale=0.01, progress=False)
    lines = (raw / "train.tsv").read_bytes().splitlines(keepends=True)
    lines[1500] = b"x" + lines[1500]                      # a bad label: skipped and counted
    for i in range(3):
        (tmp_path / f"day_{i}.tsv").write_bytes(b"".join(lines[i * 1000:(i + 1) * 1000]))

    def run(name, *extra):
        cfg = load_config(None, [f"data.train={tmp_path / 'day_*.tsv'}", "data.skip_bad_rows=true",
                                 f"data.valid={raw / 'valid.tsv'}", "data.shard_rows=700",
                                 f"data.prepared_dir={tmp_path / name}", *extra])
        return pp.prepare(cfg, progress=False)
    one, many = run("one"), run("many", "data.prepare_workers=2")
    assert [s.split("/")[1] for s in many.splits["train"].shards] == [
        "part-f00000-00000", "part-f00000-00001", "part-f00001-00000", "part-f00001-00001",
        "part-f00002-00000", "part-f00002-00001"]
    for f in one.sparse:
        assert feather.read_table(str(one.vocab_path(f.name))).equals(
            feather.read_table(str(many.vocab_path(f.name))))
    for split in ("train", "valid"):
        a, b = one.splits[split], many.splits[split]
        assert (a.files, a.rows_read, a.rows_written, a.skipped, a.positives) == \
            (b.files, b.rows_read, b.rows_written, b.skipped, b.positives)
        for part in ("sparse", "dense", "labels"):
            cat = lambda s: np.concatenate([getattr(load_shard(s.root, n), part)  # noqa: E731
                                            for n in s.splits[split].shards])
            assert np.array_equal(cat(one), cat(many)), (split, part)
    t = one.splits["train"]
    assert t.rows_read == 3000 and t.rows_written == 2999 and t.skipped == {"bad_label": 1}


def test_valid_and_test_can_be_the_last_rows_of_the_training_files(tmp_path):
    """valid_fraction / test_fraction: in file order, the first rows train, then valid, then test;
    vocabularies come from the training rows only; rows read = written + skipped + held out."""
    import pyarrow.feather as feather

    from ctrkit.config import load_config
    from ctrkit.data.shards import load_shard
    from ctrkit.errors import ConfigError
    raw = tmp_path / "raw"
    write_synthetic(raw, 2000, seed=5, card_scale=0.01, progress=False)
    lines = (raw / "train.tsv").read_bytes().splitlines(keepends=True)
    (tmp_path / "day_0.tsv").write_bytes(b"".join(lines[:1200]))
    (tmp_path / "day_1.tsv").write_bytes(b"".join(lines[1200:]))
    (tmp_path / "head.tsv").write_bytes(b"".join(lines[:1600]))

    def run(name, train, *extra):
        cfg = load_config(None, [f"data.train={train}", f"data.prepared_dir={tmp_path / name}",
                                 "data.shard_rows=300", *extra])
        return pp.prepare(cfg, progress=False)
    cut = run("cut", tmp_path / "day_*.tsv", "data.valid_fraction=0.1", "data.test_fraction=0.1")
    ref = run("ref", tmp_path / "head.tsv")   # the first 80 % as a file of its own
    t, v, s = (cut.splits[k] for k in ("train", "valid", "test"))
    assert (t.rows_read, t.rows_written, t.held_out) == (2000, 1600, {"valid": 200, "test": 200})
    assert (v.rows_written, s.rows_written, v.from_split, s.from_split) == (200, 200, "train", "train")
    for f in cut.sparse:   # fitted on the 1600 training rows only
        assert feather.read_table(str(cut.vocab_path(f.name))).equals(
            feather.read_table(str(ref.vocab_path(f.name))))
    rows = lambda sch, split: np.concatenate(  # noqa: E731
        [load_shard(sch.root, n).labels for n in sch.splits[split].shards])
    assert np.array_equal(rows(cut, "train"), rows(ref, "train"))
    labels = np.array([float(x[:1]) for x in lines])
    assert np.array_equal(rows(cut, "valid"), labels[1600:1800])
    assert np.array_equal(rows(cut, "test"), labels[1800:])
    only = run("only_valid", tmp_path / "day_*.tsv", "data.valid_fraction=0.2")
    assert sorted(only.splits) == ["train", "valid"]
    assert np.array_equal(rows(only, "valid"), labels[1600:])
    assert only.splits["train"].held_out == {"valid": 400}
    with pytest.raises(ConfigError, match="data.valid and data.valid_fraction"):
        load_config(None, ["data.valid=x.tsv", "data.valid_fraction=0.1"])
    with pytest.raises(ConfigError, match="must be < 1"):
        load_config(None, ["data.valid_fraction=0.6", "data.test_fraction=0.4"])


def test_a_file_read_in_pieces_prepares_as_when_read_whole(tmp_path, capsys):
    """read_whole_mb=0: an 8 MB file is parsed in pieces of a few 1 MB blocks cut at line ends;
    the prepared folder equals the whole-file read's, and a bad value deep in the file is still
    named by its line."""
    import filecmp

    from ctrkit.config import load_config
    raw = tmp_path / "raw"
    write_synthetic(raw, 33000, seed=6, card_scale=0.05, progress=False)
    assert (raw / "train.tsv").stat().st_size > 6 << 20

    def run(name, *extra):
        cfg = load_config(None, [f"data.train={raw / 'train.tsv'}", f"data.prepared_dir={tmp_path / name}",
                                 "data.read_block_mb=1", *extra])
        return pp.prepare(cfg, progress=False)
    whole, pieces = run("whole"), run("pieces", "data.read_whole_mb=0")
    cmp = filecmp.dircmp(whole.root, pieces.root, ignore=["schema.json", ".ctrkit-manifest.json",
                                                          ".ctrkit-lock"])
    assert not cmp.diff_files and not cmp.left_only and not cmp.right_only
    for sub in cmp.subdirs.values():
        for sub2 in [sub, *sub.subdirs.values()]:
            assert not sub2.diff_files, sub2.diff_files
    lines = (raw / "train.tsv").read_bytes().splitlines(keepends=True)
    lines[30000] = b"x" + lines[30000][1:]
    (tmp_path / "bad.tsv").write_bytes(b"".join(lines))
    code = main(["prepare", f"data.train={tmp_path / 'bad.tsv'}", "data.read_whole_mb=0",
                 "data.read_block_mb=1", f"data.prepared_dir={tmp_path / 'bad'}", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "bad.tsv:30001" in err, err


def test_pieces_start_at_one_block_and_leave_no_scrap_blocks(tmp_path):
    """The reader's pieces (read_whole_mb=0, 2 MB blocks): the first is 1 MB, so a consumer such
    as predict starts on a few thousand rows; later ones are whole 2 MB blocks (a piece is the last
    one's leftover bytes plus new ones, never a block of a row or two beyond its size); every row
    once, in order."""
    from ctrkit.config import load_config
    from ctrkit.data.formats import resolve_layout
    from ctrkit.data.reader import FIRST_PIECE, ReadStats, iter_batches
    raw = tmp_path / "raw"
    write_synthetic(raw, 40000, seed=3, card_scale=0.05, progress=False)
    path = raw / "train.tsv"
    size = path.stat().st_size
    assert size > 8 * FIRST_PIECE
    cfg = load_config(None, [f"data.train={path}"])
    layout = resolve_layout(cfg.data, path)
    batches = list(iter_batches(path, layout, 2, ReadStats(), whole_file_mb=0))
    rows = np.array([b.num_rows for b in batches])
    per_mb = rows.sum() / (size / (1 << 20))
    assert abs(rows[0] - per_mb * FIRST_PIECE / (1 << 20)) < 0.02 * rows[0]
    assert (rows[1:-1] > 0.95 * 2 * per_mb).all(), rows
    labels = np.concatenate([b.column(layout.label).to_numpy() for b in batches])
    want = [int(line.split(b"\t", 1)[0]) for line in path.read_bytes().splitlines()]
    assert labels.tolist() == want
