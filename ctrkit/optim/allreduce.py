"""The `allreduce` baseline's gradient average, with the bytes it costs each rank.

`allreduce_gradients` averages the gradients over all ranks (`decentralized.average_gradients`:
one all_reduce of the dense vector; per table all_gathers of the row count, the row ids and the
rows, padded to the largest rank's) and returns what this rank contributed (`payload_bytes`) and
what it put on the wire for it (`wire_bytes`, ctrkit/comm/collective.py), the figure gossip
reports. The optimizers then step on the average: the configured ones, or with
`distributed.base_optimizer=amsgrad` damsgrad's own `DecentralizedOptimizer` on a one-worker view
(built by the trainer next to damsgrad's), so the replicas stay bit-identical and n = 1 is
damsgrad's n = 1 bit for bit.
"""
from __future__ import annotations

from typing import Dict

from torch import nn

from ctrkit.comm.collective import collective_wire_bytes
from ctrkit.optim import decentralized
from ctrkit.optim.build import split_parameters

ROW_COUNT_BYTES = 8   # the int64 row count each rank all_gathers per table


def allreduce_gradients(model: nn.Module, world: int) -> Dict[str, float]:
    """Average the model's gradients over the `world` ranks; returns this rank's bytes:
    `payload_bytes` (average_gradients' count: 4 per dense entry, and per table the padded chunk
    top * (8 + 4 d) of int64 ids and fp32 rows, top the largest rank's row count) and
    `wire_bytes` (a ring all_reduce of the dense vector, per table the all_gathers of the row
    count and of the chunk; 0 at world = 1)."""
    payload = decentralized.average_gradients(model, world)   # (looked up at call time)
    tables, dense = split_parameters(model)
    dense_bytes = 4 * sum(p.numel() for p in dense)   # (the all_reduce'd vector, zeros included)
    chunks = payload - dense_bytes                     # the tables' padded chunks, summed
    wire = (collective_wire_bytes("all_reduce", dense_bytes, world)
            + collective_wire_bytes("all_gather", chunks, world)
            + len(tables) * collective_wire_bytes("all_gather", ROW_COUNT_BYTES, world))
    return {"payload_bytes": float(payload), "wire_bytes": wire}
