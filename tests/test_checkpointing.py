"""The checkpoint manager's one rule for when `last` is saved, and where it resumes from."""
import pytest
import torch
from torch import nn

from ctrkit.distributed.runtime import DistEnv
from ctrkit.errors import CtrkitError
from ctrkit.models.embedding import BatchedEmbeddingBags, TableModule, table_config
from ctrkit.optim.build import split_parameters
from ctrkit.train.checkpointing import CheckpointManager


def test_last_is_saved_on_schedule_after_evaluations_and_when_the_loop_stops(tmp_path):
    every = CheckpointManager(tmp_path, DistEnv(), every=5)
    assert [s for s in range(1, 12) if every.due(s, "step")] == [5, 10]
    assert not every.due(4, "eval")                 # the schedule owns the saves
    assert every.due(7, "stop")                     # stopping always saves ...
    every.save(7, {"model": {}, "step": 7})
    assert not every.due(7, "stop")                 # ... unless this step is saved already
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    at_evals = CheckpointManager(tmp_path, DistEnv(), every=0)
    assert not any(at_evals.due(s, "step") for s in range(1, 12))
    assert at_evals.due(3, "eval") and at_evals.due(3, "stop")


def test_resume_needs_a_checkpoint(tmp_path):
    m = CheckpointManager(tmp_path, DistEnv(), every=0)
    assert m.resume_from(False) is None
    with pytest.raises(CtrkitError, match="rank 0 has no checkpoint to resume from"):
        m.resume_from(True)
    m.save(3, {"model": {"w": torch.ones(1)}, "step": 3})
    assert m.resume_from(True) == tmp_path / "checkpoints" / "last.pt"
    assert m.load(m.resume_from(True))["step"] == 3


class _RowTables(TableModule):
    """A toy table module: one weight of row-sparse gradients, one parameter it updates itself."""

    def __init__(self):
        super().__init__()
        self.tables, self.feature_names, self.embedding_dim = [], [], 2
        self.rows = nn.Parameter(torch.zeros(4, 2))
        self.own = nn.Parameter(torch.zeros(3))

    def row_sparse_parameters(self):
        return [self.rows]


def test_split_parameters_asks_the_table_modules():
    model = nn.Sequential(_RowTables(), nn.Linear(2, 1),
                          BatchedEmbeddingBags([table_config("t", "f", 5, 2)]))
    sparse, dense = split_parameters(model)
    assert [id(p) for p in sparse] == [id(model[0].rows), id(model[2].weight)]
    assert {id(p) for p in dense} == {id(model[1].weight), id(model[1].bias)}   # not `own`
