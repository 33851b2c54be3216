"""Nothing a user wrote is deleted; concurrent runs do not corrupt each other; stale prepared data
is never used silently; checkpoints, logs and interrupts leave a run that resumes."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ctrkit.cli import main
from ctrkit.data.synth import write_synthetic
from ctrkit.ownership import OwnedFolder


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    d = tmp_path_factory.mktemp("raw")
    write_synthetic(d, 3000, valid_rows=500, test_rows=500, seed=3, card_scale=0.01, progress=False)
    return d


def _common(raw, tmp_path, *extra):
    return [f"data.train={raw / 'train.tsv'}", f"data.valid={raw / 'valid.tsv'}",
            f"data.prepared_dir={tmp_path / 'prep'}", f"train.run_dir={tmp_path / 'run'}",
            "model.hidden_units=[16]", "train.batch_size=256", "train.tensorboard=false",
            "train.plot=false", "train.device=cpu", "train.threads=1", "--quiet", *extra]


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.err.strip()


def _one_line(err):
    assert "Traceback" not in err and len(err.splitlines()) == 1, err


# ------------------------------------------------------------------ ownership

def test_overwrite_never_deletes_a_folder_holding_the_data(capsys, raw, tmp_path):
    """train.run_dir = the data's own folder (with a config.yaml in it) is refused, overwrite or
    not; the data stays."""
    data = tmp_path / "mydata"
    data.mkdir()
    (data / "train.tsv").write_bytes((raw / "train.tsv").read_bytes())
    (data / "config.yaml").write_text("mine: 1\n")
    code, err = _run(capsys, "train", f"data.train={data / 'train.tsv'}",
                     f"data.prepared_dir={tmp_path / 'prep'}", f"train.run_dir={data}",
                     "train.overwrite=true", "--quiet")
    assert code == 2 and "contains input file" in err
    _one_line(err)
    assert sorted(p.name for p in data.iterdir()) == ["config.yaml", "train.tsv"]


def test_run_overwrite_removes_only_what_ctrkit_wrote(capsys, raw, tmp_path):
    args = _common(raw, tmp_path, "train.epochs=1")
    assert _run(capsys, "train", *args)[0] == 0
    run = tmp_path / "run"
    (run / "notes.txt").write_text("mine")
    (run / "checkpoints" / "keep.pt").write_text("mine too")
    code, err = _run(capsys, "train", *args, "train.overwrite=true")
    assert code == 2 and "ctrkit did not write" in err
    assert "notes.txt" in err or "keep.pt" in err
    _one_line(err)
    assert (run / "notes.txt").read_text() == "mine"
    assert (run / "checkpoints" / "keep.pt").read_text() == "mine too"
    (run / "notes.txt").unlink()
    (run / "checkpoints" / "keep.pt").unlink()
    assert _run(capsys, "train", *args, "train.overwrite=true")[0] == 0
    assert (run / "metrics.json").is_file()


def test_a_user_folder_is_not_a_run_folder(capsys, raw, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("mine: 1\n")   # looks like a run, is not ctrkit's
    code, err = _run(capsys, "train", *_common(raw, tmp_path), "train.overwrite=true")
    assert code == 2 and "is not a ctrkit run folder" in err
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]   # not even a lock file


def test_prepare_overwrite_keeps_user_files_and_siblings(capsys, raw, tmp_path):
    out = tmp_path / "prep"
    args = [f"data.train={raw / 'train.tsv'}", f"data.prepared_dir={out}", "--quiet"]
    sibling = tmp_path / "prep.tmp-prepare"
    sibling.mkdir()
    (sibling / "precious.txt").write_text("mine")
    assert _run(capsys, "prepare", *args)[0] == 0
    assert (sibling / "precious.txt").read_text() == "mine"
    (out / "vocab" / "README").write_text("my notes")
    code, err = _run(capsys, "prepare", *args, "data.overwrite=true")
    assert code == 2 and "vocab/README" in err and "ctrkit did not write" in err
    assert (out / "vocab" / "README").read_text() == "my notes"
    (out / "vocab" / "README").unlink()
    before = set(OwnedFolder(out, "x").files())
    assert _run(capsys, "prepare", *args, "data.overwrite=true", "data.shard_rows=1000")[0] == 0
    after = set(OwnedFolder(out, "x").files())
    assert "train/part-00002/sparse.npy" in after and "train/part-00002/sparse.npy" not in before
    assert not [f for f in after if ".tmp-" in f]


def test_synth_overwrite_replaces_only_its_own_files(capsys, tmp_path):
    (tmp_path / "train.tsv").write_text("my data\n")
    args = ["synth", f"synth.out_dir={tmp_path}", "synth.rows=200", "synth.valid_rows=0",
            "synth.test_rows=0", "synth.overwrite=true", "--quiet"]
    code, err = _run(capsys, *args)
    assert code == 2 and "was not written by ctrkit synth" in err
    assert (tmp_path / "train.tsv").read_text() == "my data\n"
    (tmp_path / "train.tsv").unlink()
    assert _run(capsys, *args)[0] == 0
    assert _run(capsys, *args)[0] == 0          # its own output it may replace


# ------------------------------------------------------------------ concurrency

def _ctrkit(*argv, **kw):
    return subprocess.Popen([sys.executable, "-m", "ctrkit", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_two_prepares_of_one_folder(raw, tmp_path):
    out = tmp_path / "prep"
    args = ["prepare", f"data.train={raw / 'train.tsv'}", f"data.valid={raw / 'valid.tsv'}",
            f"data.prepared_dir={out}", "--quiet"]
    procs = [_ctrkit(*args) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
    schema = json.loads((out / "schema.json").read_text())
    for split in schema["splits"].values():
        for shard in split["shards"]:
            assert (out / shard / "sparse.npy").is_file()
    assert not [f for f in OwnedFolder(out, "x").files() if ".tmp-" in f]


@pytest.mark.slow
def test_two_trains_share_a_not_yet_prepared_folder(raw, tmp_path):
    procs = [_ctrkit("train", *[a.replace(str(tmp_path / "run"), str(tmp_path / f"run{i}"))
                                for a in _common(raw, tmp_path, "train.epochs=1")])
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert (tmp_path / "run0" / "metrics.json").is_file()
    assert (tmp_path / "run1" / "metrics.json").is_file()


def test_a_busy_run_folder_is_refused(capsys, raw, tmp_path):
    run = tmp_path / "run"
    with OwnedFolder(run, "run folder").lock():   # (what a running train holds)
        code, err = _run(capsys, "train", *_common(raw, tmp_path))
    assert code == 2 and "in use by another ctrkit process (pid" in err
    _one_line(err)


# ------------------------------------------------------------------ fingerprints

def test_changed_data_config_is_prepared_again(capsys, raw, tmp_path):
    args = _common(raw, tmp_path, "train.epochs=1", "train.overwrite=true")
    assert _run(capsys, "train", *args)[0] == 0
    vocab1 = json.loads((tmp_path / "prep" / "schema.json").read_text())["features"]
    code, err = _run(capsys, "train", *args, "data.min_count=5")
    assert code == 0
    assert "preparing" in err and "data.min_count was 1 there, is 5 now" in err
    schema = json.loads((tmp_path / "prep" / "schema.json").read_text())
    assert schema["source"]["data"]["min_count"] == 5
    assert sum(f["vocab_size"] for f in schema["features"]) < sum(f["vocab_size"] for f in vocab1)
    cfg = (tmp_path / "run" / "config.yaml").read_text()
    assert "min_count: 5" in cfg


def test_changed_input_file_is_prepared_again(capsys, raw, tmp_path):
    src = tmp_path / "train.tsv"
    lines = (raw / "train.tsv").read_text().splitlines(keepends=True)
    src.write_text("".join(lines[:1000]))
    args = [f"data.train={src}", f"data.prepared_dir={tmp_path / 'prep'}", "--quiet", "--json"]
    assert _run(capsys, "prepare", *args)[0] == 0
    src.write_text("".join(lines[:1500]))
    code = main(["prepare", *args])
    out = capsys.readouterr()
    assert code == 0 and "changed since" in out.err
    assert json.loads(out.out)["splits"]["train"]["rows_written"] == 1500


def test_stale_folder_without_manifest_is_an_error(capsys, raw, tmp_path):
    args = [f"data.train={raw / 'train.tsv'}", f"data.prepared_dir={tmp_path / 'prep'}", "--quiet"]
    assert _run(capsys, "prepare", *args)[0] == 0
    (tmp_path / "prep" / ".ctrkit-manifest.json").unlink()   # e.g. a folder a user copied
    code, err = _run(capsys, "prepare", *args, "data.label=click")
    assert code == 2 and "data.label was 'label' there, is 'click' now" in err
    _one_line(err)


# ------------------------------------------------------------------ eval, logs, checkpoints

def test_eval_of_another_runs_checkpoint_leaves_this_run_alone(capsys, raw, tmp_path):
    a = _common(raw, tmp_path, "train.epochs=1")
    b = [x.replace(str(tmp_path / "run"), str(tmp_path / "other")) for x in a]
    assert _run(capsys, "train", *a)[0] == 0
    assert _run(capsys, "train", *b, "train.seed=1")[0] == 0
    mine = (tmp_path / "run" / "metrics.json").read_bytes()
    code = main(["eval", *a, "--checkpoint", str(tmp_path / "other" / "checkpoints" / "last.pt"),
                 "--json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"].endswith("other/checkpoints/last.pt")
    assert (tmp_path / "run" / "metrics.json").read_bytes() == mine
    assert "last.pt" in json.loads((tmp_path / "other" / "metrics.json").read_text())["checkpoint"]


def test_eval_with_a_broken_metrics_json_is_one_line(capsys, raw, tmp_path):
    args = _common(raw, tmp_path, "train.epochs=1")
    assert _run(capsys, "train", *args)[0] == 0
    (tmp_path / "run" / "metrics.json").write_text("{not json")
    code, err = _run(capsys, "eval", *args)
    assert code == 2 and "metrics.json: not valid JSON" in err
    _one_line(err)


def test_metrics_csv_header_is_on_disk_before_any_row(tmp_path):
    from ctrkit.train.logging import FIELDS, RunLogger, plot_curves
    log = RunLogger(tmp_path, tensorboard=False)          # (a kill now leaves this file)
    assert (tmp_path / "metrics.csv").read_text().splitlines() == [",".join(FIELDS)]
    log.log({"step": 5, "split": "train", "loss": 0.5})
    log.log({"step": 10, "split": "train", "loss": 0.4})
    log.close()
    # resume at step 5: the header stays, row 10 (logged after the checkpoint) goes
    log = RunLogger(tmp_path, tensorboard=False, resume_step=5)
    log.log({"step": 6, "split": "valid", "auc": 0.6, "logloss": 0.5})
    log.close()
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0] == ",".join(FIELDS) and [r.split(",")[0] for r in rows[1:]] == ["5", "6"]
    # a headerless file (what an older ctrkit left after an early kill) is repaired on resume
    (tmp_path / "metrics.csv").write_text("\n".join(rows[1:]) + "\n")
    RunLogger(tmp_path, tensorboard=False, resume_step=10).close()
    plot_curves(tmp_path)


def test_resume_after_an_early_kill(raw, tmp_path):
    """A run killed before its first log row resumes, and its curves plot."""
    args = _common(raw, tmp_path, "train.epochs=1", "train.plot=true", "train.checkpoint_every=2",
                   "train.log_every=4")
    env = dict(os.environ, CTRKIT_TEST_KILL="0:3")
    r = subprocess.run([sys.executable, "-m", "ctrkit", "train", *args], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 17
    assert main(["train", *args, "train.resume=true"]) == 0
    assert (tmp_path / "run" / "curves.png").is_file()
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("step,epoch,samples,split")


def test_truncated_checkpoint_and_changed_model_are_one_line(capsys, raw, tmp_path):
    args = _common(raw, tmp_path, "train.epochs=1")
    assert _run(capsys, "train", *args)[0] == 0
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    good = last.read_bytes()
    code, err = _run(capsys, "train", *args, "train.resume=true", "model.hidden_units=[8]")
    assert code == 2 and "does not match model" in err
    _one_line(err)
    last.write_bytes(good[: len(good) // 2])
    code, err = _run(capsys, "train", *args, "train.resume=true", "train.epochs=2")
    assert code == 2 and f"{last}: not a readable ctrkit checkpoint" in err
    _one_line(err)
    code, err = _run(capsys, "train", *[a.replace("/run", "/run2") for a in args],
                     f"train.init_from={raw / 'train.tsv'}")
    assert code == 2 and "not a readable ctrkit checkpoint" in err
    _one_line(err)


def test_disk_full_while_checkpointing(capsys, raw, tmp_path, monkeypatch):
    import errno

    import torch

    def full(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(f))
    monkeypatch.setattr(torch, "save", full)
    code, err = _run(capsys, "train", *_common(raw, tmp_path, "train.epochs=1"))
    assert code == 2 and "No space left on device" in err and "checkpoints" in err
    _one_line(err)
    left = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()]
    assert left == [], left


def test_disk_full_while_writing_shards(capsys, raw, tmp_path, monkeypatch):
    import errno

    import ctrkit.data.preprocess as pp

    class Full(pp.ShardWriter):
        def _flush(self):
            (self.root / "train").mkdir(exist_ok=True)
            raise OSError(errno.ENOSPC, "No space left on device", str(self.root / "train" / "x.npy"))
    monkeypatch.setattr(pp, "ShardWriter", Full)
    code, err = _run(capsys, "prepare", f"data.train={raw / 'train.tsv'}",
                     f"data.prepared_dir={tmp_path / 'prep'}", "--quiet")
    assert code == 2 and "No space left on device" in err
    _one_line(err)
    assert not [f for f in OwnedFolder(tmp_path / "prep", "x").contents()]


# ------------------------------------------------------------------ interrupts

def _wait_for(path, timeout=120):
    t0 = time.time()
    while not path.exists():
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.2)


@pytest.mark.slow
def test_sigint_saves_and_the_resumed_run_matches_an_uninterrupted_one(raw, tmp_path):
    import torch
    args = _common(raw, tmp_path, "train.epochs=500", "train.batch_size=64",
                   "train.early_stop.enabled=false", "train.lr_plateau.enabled=false",
                   "train.log_every=1", "train.eval_every=100000")
    p = _ctrkit("train", *args)
    _wait_for(tmp_path / "run" / "metrics.csv")
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    _one_line(err)
    assert "resume with: ctrkit train" in err and "train.resume=true" in err
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert f"interrupted at step {saved['step']}" in err
    assert 0 < saved["step"] < 500 * 40   # 2500 rows / 64 per step
    # continue to a few steps past the interruption; an uninterrupted run to the same step
    total = f"train.max_steps={saved['step'] + 7}"
    r = subprocess.run([sys.executable, "-m", "ctrkit", "train", *args, "train.resume=true", total],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    full = [a.replace(str(tmp_path / "run"), str(tmp_path / "full")) for a in args]
    r = subprocess.run([sys.executable, "-m", "ctrkit", "train", *full, total],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    a = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == saved["step"] + 7
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# ------------------------------------------------------------------ found by the bad-input sweep

def test_a_damaged_prepared_folder_is_prepared_again(capsys, raw, tmp_path):
    args = [f"data.train={raw / 'train.tsv'}", f"data.prepared_dir={tmp_path / 'prep'}", "--quiet"]
    assert _run(capsys, "prepare", *args)[0] == 0
    shard = tmp_path / "prep" / "train" / "part-00000" / "sparse.npy"
    shard.write_bytes(shard.read_bytes()[:1000])
    code, err = _run(capsys, "prepare", *args)
    assert code == 0 and "train/part-00000/sparse.npy is cut short" in err
    (tmp_path / "prep" / "vocab" / "C1.arrow").unlink()
    code, err = _run(capsys, "prepare", *args)
    assert code == 0 and "vocab/C1.arrow is missing" in err
    from ctrkit.data.schema import Schema
    assert Schema.load(tmp_path / "prep").damaged() is None


@pytest.mark.parametrize("where", ["run", "prep"])
def test_an_output_folder_that_is_a_file(capsys, raw, tmp_path, where):
    (tmp_path / "afile").write_text("mine")
    key = {"run": "train.run_dir", "prep": "data.prepared_dir"}[where]
    for target in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        code, err = _run(capsys, "train", *_common(raw, tmp_path), f"{key}={target}")
        assert code == 2 and f"{key}: {tmp_path / 'afile'} is a file, not a folder" in err
        _one_line(err)
    assert (tmp_path / "afile").read_text() == "mine"


def test_resume_on_other_data_is_refused_before_touching_the_data(capsys, raw, tmp_path):
    args = _common(raw, tmp_path, "train.epochs=1")
    assert _run(capsys, "train", *args)[0] == 0
    schema = (tmp_path / "prep" / "schema.json").read_bytes()
    code, err = _run(capsys, "train", *args, "train.resume=true", "train.epochs=2",
                     "data.min_count=2")
    assert code == 2 and "train.resume: data.min_count was 1 in this run, is 2 now" in err
    _one_line(err)
    assert (tmp_path / "prep" / "schema.json").read_bytes() == schema


def test_usage_errors_are_one_line(capsys):
    for argv in (["prepare", "--nope"], ["eval", "--checkpoint"], ["frobnicate"]):
        code, err = _run(capsys, *argv)
        assert code == 2 and "error:" in err and "--help" in err
        _one_line(err)


# ------------------------------------------------------------------ found by review

def test_a_ctrkit_folder_of_another_kind_is_never_cleared(capsys, raw, tmp_path):
    args = _common(raw, tmp_path, "train.epochs=1")
    assert _run(capsys, "train", *args)[0] == 0
    run, prep = tmp_path / "run", tmp_path / "prep"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, err = _run(capsys, "prepare", f"data.train={raw / 'train.tsv'}",
                     f"data.prepared_dir={run}", "--quiet")
    assert code == 2 and "is a ctrkit run folder, not a prepared folder" in err
    code, err = _run(capsys, "train", *args, f"train.run_dir={prep}", "train.overwrite=true")
    assert code == 2   # (the prepared folder is an input of the run, and not a run folder)
    assert prep.joinpath("schema.json").is_file()
    code, err = _run(capsys, "synth", f"synth.out_dir={prep}", "synth.rows=100",
                     "synth.overwrite=true", "--quiet")
    assert code == 2 and "is a ctrkit prepared folder, not a synthetic data folder" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_patterns_do_not_reach_user_files(capsys, raw, tmp_path):
    args = _common(raw, tmp_path, "train.epochs=1")
    assert _run(capsys, "train", *args)[0] == 0
    run = tmp_path / "run"
    mine = [run / "checkpoints" / "best" / "README", run / ".config.yaml.tmp-backup",
            run / "tb" / "events.out.tfevents.keep" / "x.txt"]
    for p in mine:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("mine")
        code, err = _run(capsys, "train", *args, "train.overwrite=true")
        assert code == 2 and "ctrkit did not write" in err, (p, err)
        assert p.read_text() == "mine"
        p.unlink()
    # a manifest edited to reach outside the folder is not followed
    outside = tmp_path / "userempty" / "a"
    outside.mkdir(parents=True)
    m = json.loads((run / ".ctrkit-manifest.json").read_text())
    m["dirs"] += ["../userempty/a", str(outside)]
    m["files"] += ["../train.tsv"]
    (run / ".ctrkit-manifest.json").write_text(json.dumps(m))
    assert _run(capsys, "train", *args, "train.overwrite=true")[0] == 0
    assert outside.is_dir()


def test_feature_names_cannot_leave_the_prepared_folder(capsys, tmp_path):
    code, err = _run(capsys, "prepare", "data.format=csv", f"data.train={tmp_path / 'x.csv'}",
                     "data.features=[{name: ../../victim, source: a, type: categorical}]")
    assert code == 2 and "data.features.0.name" in err


def test_eval_on_other_data_leaves_the_runs_metrics(capsys, raw, tmp_path):
    args = _common(raw, tmp_path, "train.epochs=1")
    assert _run(capsys, "train", *args)[0] == 0
    mine = (tmp_path / "run" / "metrics.json").read_bytes()
    code = main(["eval", *args, f"data.valid={raw / 'train.tsv'}",
                 f"data.prepared_dir={tmp_path / 'prep2'}"])
    err = capsys.readouterr().err
    assert code == 0 and "metrics.json not updated" in err
    assert (tmp_path / "run" / "metrics.json").read_bytes() == mine


def test_resume_with_another_number_of_workers_is_refused(capsys, raw, tmp_path):
    args = _common(raw, tmp_path, "train.epochs=1")
    assert _run(capsys, "train", *args)[0] == 0
    code, err = _run(capsys, "train", *args, "train.resume=true", "distributed.workers=2",
                     "distributed.algorithm=damsgrad")
    assert code == 2 and "checkpointed by a single process, not by distributed.workers=2" in err
    _one_line(err)
