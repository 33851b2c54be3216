"""Ranks come from torch.distributed's own launcher (torchrun / `torch.distributed.run`), never a
home-made one: `ctrkit train cfg distributed.workers=N` calls it with `-m ctrkit train`, and a run
started by `torchrun --nproc_per_node N -m ctrkit train cfg` (or multi-node, with a rendezvous
endpoint) is picked up from the environment. gloo on CPU, NCCL on GPU."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ctrkit.comm.device import comm_device  # noqa: F401  (re-exported: where collectives' tensors live)
from ctrkit.comm.exchange import CommError
from ctrkit.config import Config, dump_config
from ctrkit.distributed.device import resolve_backend, resolve_device, use_device
from ctrkit.errors import CtrkitError, Interrupted
from ctrkit.optim.build import split_parameters
from ctrkit.ownership import atomic_write_text


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(cfg: Config) -> DistEnv:
    """Pick this process's device and join the process group torchrun set up (in a single
    process: the device only)."""
    device = resolve_device(cfg.train.device)
    use_device(device)
    if not launched_by_torchrun():
        return DistEnv(device=device)
    _die_with_launcher()
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    if cfg.distributed.workers not in (1, world):
        raise CtrkitError(f"distributed.workers={cfg.distributed.workers} but torchrun started "
                          f"{world} ranks")
    backend = resolve_backend(cfg.distributed.backend, device, cfg.train.device)
    if (int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"):
        raise CtrkitError(
            "torchrun restarts need TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment: "
            "with the shared rendezvous store a restarted rank reads its peers' addresses from the "
            "failed attempt and hangs or gets 'Connection refused' (pytorch/pytorch#135712)")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg.distributed.timeout_s))
    return DistEnv(rank, world, device)


def _die_with_launcher() -> None:
    """A rank started by `ctrkit train` dies with it (Linux): an orphaned rank would go on
    writing into a run folder whose lock died with the launcher."""
    launcher = os.environ.get("CTRKIT_LAUNCHER_PID")
    if not launcher or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal
    ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))   # PR_SET_PDEATHSIG
    if os.getppid() != int(launcher):                 # (it died before we asked)
        os._exit(1)


def launch_workers(cfg: Config, run_dir: Path,
                   interrupted: Callable[[Path], Interrupted] = lambda run_dir: Interrupted(
                       None, run_dir / "checkpoints")) -> None:
    """Start `distributed.workers` ranks on this machine through torch.distributed.run; a signal
    or ranks that all stopped on one raise `interrupted(run_dir)`."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    n = cfg.distributed.workers
    path = run_dir / "launch.yaml"
    atomic_write_text(path, dump_config(cfg))
    args = parse_args(["--nproc_per_node", str(n), "--standalone",
                       f"--max_restarts={cfg.distributed.max_restarts}",
                       "-m", "ctrkit", "train", str(path)])
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Each rendezvous round gets a fresh store: the shared one keeps the failed attempt's
    # addresses, and restarted ranks connect to them (pytorch/pytorch#135712).
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    # torch's elastic loggers: their warnings about signals and failures repeat our one line
    import torch.distributed.elastic.agent.server.api  # noqa: F401  (creates its loggers)
    elastic = [logging.getLogger(n) for n in ["torch.distributed.elastic",
                                              *logging.root.manager.loggerDict]
               if n.startswith("torch.distributed.elastic")]
    levels = [lg.level for lg in elastic]
    for lg in elastic:
        lg.setLevel(logging.ERROR)
    os.environ["CTRKIT_LAUNCHER_PID"] = str(os.getpid())   # (the ranks' parent)
    try:
        run(args)
    except SignalException:
        raise interrupted(run_dir) from None
    except ChildFailedError as e:
        failures = list(e.failures.values())
        if failures and all(f.exitcode == 130 for f in failures):
            raise interrupted(run_dir) from None
        raise CtrkitError(f"distributed run failed: {_first_failure(failures) or e}") from None
    finally:
        os.environ.pop("CTRKIT_LAUNCHER_PID", None)
        for lg, level in zip(elastic, levels):
            lg.setLevel(level)


def _first_failure(failures) -> Optional[str]:
    """The rank error that came first (ranks write theirs into torch's error file, see
    `ctrkit.errors.report_rank_error`): the root cause, not a peer's report of its consequence."""
    def key(f):
        data = f.error_file_data if isinstance(f.error_file_data, dict) else {}
        return (data.get("ctrkit_time", float("inf")), f.local_rank)
    if not failures:
        return None
    first = min(failures, key=key)
    if isinstance(first.error_file_data, dict) and "ctrkit_time" in first.error_file_data:
        return str(first.message)
    return f"rank {first.local_rank} exited with code {first.exitcode}"


def is_comm_failure(e: BaseException) -> bool:
    """Errors that mean a peer died, hung past the timeout or dropped its connection."""
    if isinstance(e, (dist.DistError, CommError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(
        k in text for k in ("gloo", "nccl", "timed out", "timeout", "connection", "peer"))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def reduce_mean_(t: torch.Tensor, env: DistEnv, group=None, size: Optional[int] = None) -> torch.Tensor:
    """Mean of `t` over `group` (`size` ranks), or over all ranks, in place."""
    size = env.world if size is None else size
    if size > 1:
        c = t.to(comm_device())
        dist.all_reduce(c, op=dist.ReduceOp.SUM, group=group)
        t.copy_(c).div_(size)
    return t


def gather_floats(x: float, env: DistEnv) -> list:
    if not env.active:
        return [x]
    t = torch.tensor([x], dtype=torch.float64, device=comm_device())
    out = [torch.zeros_like(t) for _ in range(env.world)]
    dist.all_gather(out, t)
    return [float(o) for o in out]


def broadcast_flag(flag: bool, env: DistEnv) -> bool:
    if not env.active:
        return flag
    t = torch.tensor([1 if flag else 0], device=comm_device())
    dist.broadcast(t, src=0)
    return bool(t.item())


def check_identical_replicas(model: torch.nn.Module, env: DistEnv, grid=None) -> None:
    """Gossip averages replicas that start equal (DESIGN.md); one that does not is a mistake
    (another seed, another init_from) that gossip would silently average away. Compares a digest
    of the dense parameters over all ranks and of the tables over the ranks holding the same
    shard (the same rank position in every shard group). One process (damsgrad at n = 1) has
    nothing to compare with."""
    if not env.active:
        return
    import hashlib
    tables = {id(p) for p in split_parameters(model)[0]}
    digests = {"dense": hashlib.blake2b(digest_size=8), "tables": hashlib.blake2b(digest_size=8)}
    for name, p in model.named_parameters():
        if id(p) in tables and grid is not None:
            continue   # (sharded tables: the shards of one group differ by design)
        part = digests["tables" if id(p) in tables else "dense"]
        part.update(name.encode())
        part.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    mine = [int.from_bytes(d.digest(), "little", signed=True) for d in digests.values()]
    t = torch.tensor(mine, dtype=torch.int64, device=comm_device())
    every = [torch.zeros_like(t) for _ in range(env.world)]
    dist.all_gather(every, t)
    k = grid.k if grid is not None else 1
    for r, other in enumerate(every):
        what = ("dense parameters" if int(other[0]) != mine[0] else
                "tables" if int(other[1]) != mine[1] and r % k == env.rank % k else None)
        if what:
            raise CtrkitError(f"rank {env.rank}: its {what} differ from rank {r}'s at the start; "
                              "decentralized replicas must start identical (same train.seed, "
                              "same train.init_from on every rank)")


def network_average(model: torch.nn.Module, env: DistEnv, grid=None) -> Optional[dict]:
    """State dict of the network-averaged model x_bar (evaluation/export only) and the consensus
    distance mean_i ||x_i - x_bar||^2 over workers, split into embedding tables and dense
    parameters. With sharded tables (`grid`, a ShardGrid) a worker is a shard group: each rank
    averages its local state with the ranks holding the same shard (the replica group)."""
    group, size = (grid.replica_pg, grid.groups) if grid is not None else (None, env.world)
    table_ids = {id(p) for p in split_parameters(model)[0]}
    avg, dist_emb, dist_dense = {}, 0.0, 0.0
    params = dict(model.named_parameters())
    for k, v in model.state_dict().items():
        if not torch.is_floating_point(v):
            avg[k] = v.clone()
            continue
        a = reduce_mean_(v.detach().clone(), env, group, size)
        avg[k] = a
        if k in params:
            d = float((v - a).pow(2).sum())
            if id(params[k]) in table_ids:
                dist_emb += d
            else:
                dist_dense += d
    # A worker's table distance is the sum over its shard group's ranks; dense parameters are
    # the same on every rank of a group.
    both = torch.tensor([dist_emb, dist_dense], dtype=torch.float64)
    reduce_mean_(both, env)
    k = env.world // size
    return {"state": avg, "consensus_embedding": float(both[0]) * k, "consensus_dense": float(both[1])}
