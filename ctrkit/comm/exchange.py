"""Neighbour exchange over torch.distributed point-to-point (`batch_isend_irecv`), no collectives.

Dense tensors travel as one flat buffer per neighbour. Row-sparse messages (row ids + row values)
are packed into one float buffer per neighbour (ids as int32 bits when they fit, else int64 bits),
preceded by a one-number size message. Every byte handed to `isend` is counted. Messages travel
from `comm_device()` (the GPU under NCCL, else host memory) and come back on the device of the
tensors handed in.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ctrkit.comm.device import comm_device


class CommError(RuntimeError):
    """A neighbour exchange failed: a peer died, hung past the timeout or closed its connection."""


class NeighborExchange:
    def __init__(self, rank: int, neighbors: Sequence[int], group: Optional[dist.ProcessGroup] = None,
                 num_rows_hint: int = 0) -> None:
        self.rank, self.neighbors, self.group = rank, list(neighbors), group
        self.bytes_sent = 0
        self.id_dtype = torch.int32 if num_rows_hint < 2 ** 31 else torch.int64
        self.device = comm_device()

    def _run(self, sends: Dict[int, torch.Tensor], recvs: Dict[int, torch.Tensor],
             what: str = "dense") -> None:
        ops = []
        for j in self.neighbors:
            ops.append(dist.P2POp(dist.isend, sends[j], j, self.group))
            ops.append(dist.P2POp(dist.irecv, recvs[j], j, self.group))
            self.bytes_sent += sends[j].numel() * sends[j].element_size()
        if not ops:
            return
        peer = None
        try:
            works = dist.batch_isend_irecv(ops)
            # one request per operation (gloo): wait for each, so a failure names its peer
            paired = len(works) == len(ops)
            for op, w in zip(ops, works):
                peer = op.peer if paired else None
                w.wait()
        except (RuntimeError, dist.DistError) as e:
            raise CommError(self._failure(what, peer, e)) from None

    def _failure(self, what: str, peer: Optional[int], e: BaseException) -> str:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = f"neighbour exchange ({what}, batch_isend_irecv) of rank {self.rank}"
        if peer is None:
            return f"{where} with ranks {self.neighbors} failed: {first}"
        if "timed out" in first.lower() or "timeout" in first.lower():
            return (f"rank {peer} stopped answering: {where} waited for it longer than "
                    f"distributed.timeout_s ({first[:160]})")
        return f"{where} with rank {peer} failed: {first[:200]}"

    def dense(self, flat: torch.Tensor) -> Dict[int, torch.Tensor]:
        """Send `flat` to every neighbour; return what each neighbour sent (same shape)."""
        home = flat.device
        flat = flat.contiguous().to(self.device)
        recvs = {j: torch.empty_like(flat) for j in self.neighbors}
        self._run({j: flat for j in self.neighbors}, recvs)
        return {j: r.to(home) for j, r in recvs.items()}

    def blobs(self, data: torch.Tensor, what: str = "compressed") -> Dict[int, torch.Tensor]:
        """Send one uint8 message (any length) to every neighbour; return each neighbour's."""
        home, dev = data.device, self.device
        size = torch.tensor([data.numel()], dtype=torch.int64, device=dev)
        sizes = {j: torch.empty(1, dtype=torch.int64, device=dev) for j in self.neighbors}
        self._run({j: size for j in self.neighbors}, sizes, f"{what} sizes")
        buf = (data.contiguous() if data.numel() else torch.zeros(1, dtype=torch.uint8)).to(dev)
        recvs = {j: torch.empty(max(1, int(sizes[j])), dtype=torch.uint8, device=dev)
                 for j in self.neighbors}
        self._run({j: buf for j in self.neighbors}, recvs, what)
        return {j: b[:int(sizes[j])].to(home) for j, b in recvs.items()}

    def rows(self, rows: torch.Tensor, values: torch.Tensor) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
        """Send (row ids, [U, D] values) to every neighbour; return each neighbour's pair."""
        d, home, dev = values.shape[1], values.device, self.device
        size = torch.tensor([rows.numel()], dtype=torch.int64, device=dev)
        sizes = {j: torch.empty(1, dtype=torch.int64, device=dev) for j in self.neighbors}
        self._run({j: size for j in self.neighbors}, sizes, "row counts")
        ids = rows.to(self.id_dtype)
        buf = torch.cat([ids.view(torch.float32).reshape(-1), values.reshape(-1).to(torch.float32)])
        words_per_id = 1 if self.id_dtype == torch.int32 else 2
        # gloo cannot send empty tensors: an empty message is one padding word
        if buf.numel() == 0:
            buf = torch.zeros(1)
        buf = buf.to(dev)
        recvs = {j: torch.empty(max(1, int(sizes[j]) * (words_per_id + d)), dtype=torch.float32,
                                device=dev) for j in self.neighbors}
        self._run({j: buf for j in self.neighbors}, recvs, "rows")
        out = {}
        for j, b in recvs.items():
            n = int(sizes[j])
            b = b[:n * (words_per_id + d)].to(home)
            rid = b[: n * words_per_id].view(self.id_dtype).to(torch.int64)
            out[j] = (rid, b[n * words_per_id:].view(n, d))
        return out
