"""RowGossip's send rule with a tolerance (`distributed.gossip_tol`), on one worker, no processes.

RowGossip's docstring: a candidate row is sent when |x - x_hat| > tol |x| (row norms); below that
its difference stays in x - x_hat; after the consensus step a row whose residual and step are both
at most tol |x| leaves the candidate set. The long runs in test_gossip_traffic.py check what this
does to traffic and consensus; these tests pin the rule itself on rows built so that the
plausible wrong rules (tol |x_hat| instead of tol |x|, an absolute tol) decide them the other way.

One worker (W = [[1]], no neighbours): s = x_hat, so the consensus step never moves x and what a
round sends is exactly the rows whose public copy x_hat changed.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from ctrkit.comm.exchange import NeighborExchange
from ctrkit.comm.topology import Topology
from ctrkit.optim.decentralized import RowGossip

TOL, D = 0.25, 4
ALONE = Topology("single", 1, ((),), np.ones((1, 1)))

# (x_hat, x) of each row along one axis, and whether the row must be sent: |q| vs tol |x|.
ROWS = [
    (4.5, 3.5, True),     # |q| = 1 > tol|x| = 0.875          (tol|x_hat| = 1.125: "not sent")
    (3.5, 4.5, False),    # |q| = 1 < tol|x| = 1.125          (tol|x_hat| = 0.875: "sent")
    (99.0, 100.0, False),  # |q| = 1 < tol|x| = 25            (absolute tol 0.25: "sent")
    (0.0, 0.01, True),    # |q| = 0.01 > tol|x| = 0.0025      (absolute tol 0.25: "not sent")
    (2.0, 2.0, False),    # no difference at all
]


def _gossip():
    hat = torch.tensor([[h, 0.0, 0.0, 0.0] for h, _, _ in ROWS])
    table = hat.clone()
    state: dict = {}
    g = RowGossip(table, state, "x", None, 1.0, tol=TOL)   # x_hat = s = the table as it is now
    table[:, 0] = torch.tensor([x for _, x, _ in ROWS])
    g.mark(torch.arange(len(ROWS)))
    return g, table, state


def _round(g: RowGossip, step: int) -> Counter:
    traffic: Counter = Counter()
    g.step(NeighborExchange(0, ()), ALONE, 0, step, 2, traffic)
    return traffic


def test_a_row_is_sent_when_its_difference_exceeds_tol_times_its_norm():
    g, table, state = _gossip()
    before = state["xhat"].clone()
    _round(g, 0)
    sent = (state["xhat"] != before).any(dim=1).tolist()
    assert sent == [want for _, _, want in ROWS], sent
    for i, (h, x, want) in enumerate(ROWS):
        np.testing.assert_allclose(state["xhat"][i, 0].item(), x if want else h, rtol=0, atol=1e-6)
    # one worker: s = x_hat, the consensus step leaves x where it was
    assert torch.equal(state["xsum"], state["xhat"])
    assert table[:, 0].tolist() == [np.float32(x) for _, x, _ in ROWS]


def test_settled_rows_leave_the_candidates_and_the_next_round_sends_nothing():
    """After one round every row is settled: sent (no residual) or with a residual of at most
    tol |x| and no consensus step; none stays a candidate, and the next round changes nothing."""
    g, table, state = _gossip()
    _round(g, 0)
    assert state["xdirty"].numel() == 0, state["xdirty"].tolist()
    hat = state["xhat"].clone()
    _round(g, 1)
    assert torch.equal(state["xhat"], hat)

