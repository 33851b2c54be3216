"""distinct_ids: one sort gives distinct values, inverse map and per-value grouping."""
import torch
import torch.nn.functional as F

from ctrkit.data.ids import distinct_ids


def test_distinct_ids_matches_torch_unique_and_groups_positions():
    values = torch.randint(0, 50, (1000,)) + (torch.randint(0, 3, (1000,)) << 32)
    ids = distinct_ids(values)
    keys, inverse = torch.unique(values, sorted=True, return_inverse=True)
    assert torch.equal(ids.keys, keys) and torch.equal(ids.inverse, inverse)
    assert ids.offsets[0] == 0 and ids.offsets[-1] == values.numel()
    for u in range(0, keys.numel(), 7):   # each group holds exactly the positions of one key
        group = ids.order[ids.offsets[u]:ids.offsets[u + 1]]
        assert torch.equal(group.sort().values, (values == keys[u]).nonzero().flatten())


def test_segment_sum_over_groups_equals_index_add():
    values = torch.randint(0, 30, (500,))
    ids = distinct_ids(values)
    g = torch.randn(500, 4)
    seg = F.embedding_bag(ids.order, g, ids.offsets, mode="sum", include_last_offset=True)
    ref = torch.zeros(ids.keys.numel(), 4).index_add_(0, ids.inverse, g)
    torch.testing.assert_close(seg, ref)
