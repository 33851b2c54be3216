"""BatchedEmbeddingBags' lookups of one id per bag, without and with autograd, on both sides of
the size where scoring switches from index_select to embedding_bag's kernel, against each
table's rows picked in float64 from a copy of its weight."""
import numpy as np
import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

import ctrkit.models.embedding as E
from ctrkit.models.embedding import BatchedEmbeddingBags

SIZES = [50, 7, 300, 1000]


def _tables(dim):
    return [EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=n,
                               feature_names=[f"f{i}"]) for i, n in enumerate(SIZES)]


def _batch(rows, seed):
    g = np.random.default_rng(seed)
    ids = np.stack([g.integers(0, n, rows) for n in SIZES])   # [T, B]
    kjt = KeyedJaggedTensor(keys=[f"f{i}" for i in range(len(SIZES))],
                            values=torch.from_numpy(ids.reshape(-1)),
                            lengths=torch.ones(ids.size, dtype=torch.int32))
    return ids, kjt


@pytest.mark.parametrize("dim", [1, 8])
@pytest.mark.parametrize("rows", [3, 300, E._BAG_GATHER_MIN // len(SIZES) + 5])
def test_one_id_per_bag_lookups_are_each_tables_rows(dim, rows):
    torch.manual_seed(0)
    m = BatchedEmbeddingBags(_tables(dim), init_std=1.0)
    ref = [m.table_weight(i).detach().double().numpy().copy() for i in range(len(SIZES))]
    ids, kjt = _batch(rows, seed=rows)
    want = np.stack([ref[t][ids[t]] for t in range(len(SIZES))], axis=1)   # [B, T, D]
    with torch.no_grad():
        got = m(kjt)
    assert got.shape == (rows, len(SIZES), dim)
    np.testing.assert_array_equal(got.double().numpy(), want)
    np.testing.assert_array_equal(m(kjt).detach().double().numpy(), want)   # (with autograd)
