"""prepare shared by torchrun's ranks: each rank runs its share of the file tasks, rank 0 merges
them in file order, and the prepared folder equals one process's byte for byte."""
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from ctrkit.data.synth import write_synthetic
from ctrkit.errors import CtrkitError


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _square_or_fail(i):
    if i == 5:
        raise CtrkitError(f"task {i}: bad row")
    if i == 6:
        raise OSError(28, "No space left on device", f"/data/shard-{i}")
    return i * i, os.getpid()


def _rank_tasks(rank, world, port, out):
    from ctrkit.distributed.prepare import RankTasks
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        tasks = RankTasks(dist.group.WORLD, 1)
        if rank == 0:
            results = list(tasks.map(_square_or_fail, [(i,) for i in range(5)]))
            try:
                list(tasks.map(_square_or_fail, [(i,) for i in range(8)]))
                failed = None
            except CtrkitError as e:
                failed = str(e)
            try:
                list(tasks.map(_square_or_fail, [(0,), (6,)]))
                disk = None
            except OSError as e:   # (rank 1's, rebuilt: rank 0 reports it as a disk error)
                disk = (e.errno, e.filename)
            tasks.end(None)
            out[rank] = (results, failed, disk, tasks.ran)
        else:
            out[rank] = (tasks.follow(), os.getpid(), tasks.ran)
    finally:
        dist.destroy_process_group()


def test_rank_tasks_run_each_ranks_share_and_return_results_in_task_order():
    """Three ranks, rounds of three tasks: results in task order, each task run by the rank
    whose turn it is (its pid), a task's error on rank 2 raised on rank 0 with its message, an
    OSError on rank 1 raised on rank 0 as an OSError with its errno and file, and the followers
    released by rank 0's end."""
    out = mp.Manager().dict()
    mp.start_processes(_rank_tasks, args=(3, _port(), out), nprocs=3, start_method="fork")
    results, failed, disk, ran0 = out[0]
    pids = {0: None, 1: out[1][1], 2: out[2][1]}
    assert [r for r, _ in results] == [0, 1, 4, 9, 16]
    assert [pid for _, pid in results][1:3] == [pids[1], pids[2]]   # tasks 1 and 2: ranks 1, 2
    assert results[4][1] == pids[1]                                 # task 4: rank 1's turn
    assert failed == "task 5: bad row"                              # task 5 ran on rank 2
    assert disk == (28, "/data/shard-6")                            # an OSError stays one
    assert out[1][0] is None and out[2][0] is None                  # released, no error
    # first map: rank 0 ran tasks 0, 3; rank 1: 1, 4; rank 2: 2. The failed map's first round
    # (tasks 0-2) went well, its second (3-5) failed: no third round was started. The last map:
    # one round, rank 0 task 0, rank 1 task 6.
    assert (ran0, out[1][2], out[2][2]) == (5, 5, 3)


@pytest.fixture(scope="module")
def days(tmp_path_factory):
    """Four day files (one with a bad label at its 301st line) and a validation file."""
    d = tmp_path_factory.mktemp("days")
    write_synthetic(d / "raw", 4000, valid_rows=500, seed=3, card_scale=0.01, progress=False)
    lines = (d / "raw" / "train.tsv").read_bytes().splitlines(keepends=True)
    lines[1300] = b"x" + lines[1300]   # day_1.tsv line 301
    for i in range(4):
        (d / f"day_{i}.tsv").write_bytes(b"".join(lines[i * 1000:(i + 1) * 1000]))
    return d


def _args(days, out, *extra):
    return [f"data.train={days / 'day_*.tsv'}", f"data.valid={days / 'raw' / 'valid.tsv'}",
            "data.shard_rows=600", f"data.prepared_dir={out}", *extra]


def _torchrun(*args):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", "-m", "ctrkit", *args, "--quiet"],
                          capture_output=True, text=True, timeout=300)


def _files(folder: Path) -> dict:
    """Every file ctrkit wrote (not the lock, which names its process) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".ctrkit-lock"}


@pytest.mark.slow
def test_torchrun_ranks_prepare_day_files_as_one_process_does(days, tmp_path):
    from ctrkit.cli import main
    assert main(["prepare", *_args(days, tmp_path / "one", "data.prepare_workers=2",
                                   "data.skip_bad_rows=true"), "--quiet"]) == 0
    r = _torchrun("prepare", *_args(days, tmp_path / "ranks", "data.skip_bad_rows=true"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rank 1 of 2 ran 4 file tasks" in r.stderr   # two files counted, two encoded
    one, ranks = _files(tmp_path / "one"), _files(tmp_path / "ranks")
    assert sorted(one) == sorted(ranks)
    import json
    a, b = (json.loads(x.pop("schema.json")) for x in (one, ranks))
    assert a.pop("seconds") > 0 and b.pop("seconds") > 0
    assert a == b and one == ranks
    assert a["splits"]["train"]["rows_read"] == 4000 and a["splits"]["train"]["skipped"] == {
        "bad_label": 1}


@pytest.mark.slow
def test_a_bad_row_on_rank_1_is_every_ranks_one_line_error(days, tmp_path):
    r = _torchrun("prepare", *_args(days, tmp_path / "p"))
    assert r.returncode != 0
    line = f"ctrkit prepare: error: {days / 'day_1.tsv'}:301 field label:"
    assert r.stderr.count(line) == 2, r.stderr[-2000:]   # rank 0 and rank 1 say it
    left = {p.name for p in (tmp_path / "p").iterdir()}
    assert left <= {".ctrkit-manifest.json", ".ctrkit-lock"}   # no half-written shards


@pytest.mark.slow
def test_torchrun_training_prepares_its_day_files_on_every_rank(days, tmp_path):
    r = _torchrun("train", *_args(days, tmp_path / "p", "data.skip_bad_rows=true"),
                  f"train.run_dir={tmp_path / 'run'}", "model.hidden_units=[16]",
                  "train.batch_size=256", "train.max_steps=4", "train.tensorboard=false",
                  "train.plot=false", "distributed.algorithm=damsgrad", "train.device=cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rank 1 of 2 ran 4 file tasks" in r.stderr
    assert (tmp_path / "run" / "metrics.json").is_file()
