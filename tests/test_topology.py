"""Gossip topologies: mixing matrices are symmetric, doubly stochastic and make gossip converge."""
import numpy as np
import pytest

from ctrkit.comm.topology import Topology, build_topology
from ctrkit.errors import ConfigError

NAMES = ["ring", "torus", "exponential", "complete"]
SIZES = list(range(1, 10)) + [16]
STAR = [[0, j] for j in range(1, 6)]
PATH = [[i, i + 1] for i in range(5)]
IRREGULAR = {"star": (6, STAR), "path": (6, PATH),
             "lollipop": (6, [[0, 1], [1, 2], [2, 0], [2, 3], [3, 4], [4, 5], [5, 5], [1, 0]])}


def _all_topologies():
    for name in NAMES:
        for n in SIZES:
            yield pytest.param(name, n, None, id=f"{name}-{n}")
    for key, (n, edges) in IRREGULAR.items():
        yield pytest.param("edges", n, edges, id=f"edges-{key}")


ALL_TOPOLOGIES = list(_all_topologies())


def check_mixing(t: Topology) -> None:
    W = t.weights
    assert W.shape == (t.n, t.n) and W.dtype == np.float64
    np.testing.assert_array_equal(W, W.T)
    np.testing.assert_allclose(W.sum(axis=0), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(W.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert (W >= 0).all()
    for i in range(t.n):
        nb = t.neighbors[i]
        assert list(nb) == sorted(set(nb)) and i not in nb
        assert set(np.flatnonzero(W[i] > 0)) == set(nb) | {i}
        assert t.self_weight(i) == W[i, i]
        assert t.neighbor_weights(i) == {j: W[i, j] for j in nb}
        for j in nb:
            assert i in t.neighbors[j]


@pytest.mark.parametrize("name,n,edges", ALL_TOPOLOGIES)
def test_mixing_matrix_valid(name, n, edges):
    t = build_topology(name, n, edges)
    assert t.name == name and t.n == n and len(t.neighbors) == n
    check_mixing(t)
    gap = t.spectral_gap
    assert 0 < gap <= 1
    if n == 1:
        assert t.neighbors == ((),) and t.weights.tolist() == [[1.0]]
    if name == "complete":
        assert gap == pytest.approx(1.0, abs=1e-12)
    assert t.describe().startswith(f"{name}: n={n}, degree ") and "spectral gap" in t.describe()


@pytest.mark.parametrize("name,n,edges", ALL_TOPOLOGIES)
def test_gossip_reaches_exact_average(name, n, edges):
    t = build_topology(name, n, edges)
    x = np.random.default_rng(n).normal(size=(n, 3))
    avg = x.mean(axis=0)
    for _ in range(5000):
        x = t.weights @ x
        if np.abs(x - avg).max() < 1e-12:
            break
    np.testing.assert_allclose(x.mean(axis=0), avg, rtol=0, atol=1e-12)  # the average is conserved
    np.testing.assert_allclose(x, np.broadcast_to(avg, x.shape), rtol=0, atol=1e-11)


@pytest.mark.parametrize("n", range(3, 17))
def test_ring_weights_exactly_one_third(n):
    t = build_topology("ring", n)
    for i in range(n):
        assert t.neighbors[i] == tuple(sorted({(i - 1) % n, (i + 1) % n}))
        assert t.self_weight(i) == 1 / 3
        assert t.neighbor_weights(i) == {(i - 1) % n: 1 / 3, (i + 1) % n: 1 / 3}
    assert t.describe().startswith("ring: n=%d, degree 2," % n)


def test_small_rings():
    t2 = build_topology("ring", 2)
    assert t2.neighbors == ((1,), (0,))
    np.testing.assert_array_equal(t2.weights, [[0.5, 0.5], [0.5, 0.5]])
    assert t2.spectral_gap == pytest.approx(1.0)


@pytest.mark.parametrize("n,degree", [(2, 1), (3, 2), (4, 2), (5, 2), (6, 3), (8, 3), (9, 4), (16, 4)])
def test_torus_degrees(n, degree):
    t = build_topology("torus", n)
    assert set(t.degrees) == {degree}
    if n == 9:  # 3 x 3 grid with wrap-around
        assert t.neighbors[0] == (1, 2, 3, 6)
        assert t.neighbors[4] == (1, 3, 5, 7)


@pytest.mark.parametrize("n,degree", [(2, 1), (3, 2), (4, 3), (5, 4), (8, 5), (9, 6), (16, 7)])
def test_exponential_graph(n, degree):
    t = build_topology("exponential", n)
    assert set(t.degrees) == {degree}
    if n == 8:
        assert t.neighbors[0] == (1, 2, 4, 6, 7)


def test_metropolis_hastings_on_star_and_path():
    star = build_topology("edges", 6, STAR)
    assert star.neighbors[0] == (1, 2, 3, 4, 5)
    assert star.neighbor_weights(0) == {j: 1 / 6 for j in range(1, 6)}
    assert star.self_weight(0) == pytest.approx(1 / 6)
    for j in range(1, 6):
        assert star.neighbor_weights(j) == {0: 1 / 6}
        assert star.self_weight(j) == pytest.approx(5 / 6)
    path = build_topology("edges", 6, PATH)
    assert path.neighbor_weights(0) == {1: 1 / 3}
    assert path.self_weight(0) == pytest.approx(2 / 3)
    assert path.neighbor_weights(2) == {1: 1 / 3, 3: 1 / 3}
    assert path.describe() == f"edges: n=6, degree 1-2, spectral gap {path.spectral_gap:.4g}"


def test_edges_ignore_self_loops_and_duplicates():
    t = build_topology("edges", 3, [[0, 1], [1, 0], [0, 1], [1, 1], [1, 2], (2, 1)])
    assert t.neighbors == ((1,), (0, 2), (1,))
    check_mixing(t)
    assert build_topology("edges", 1, []).weights.tolist() == [[1.0]]
    arr = build_topology("edges", 4, np.array([[0, 1], [1, 2], [2, 3], [3, 0]]))
    assert arr.weights.tolist() == build_topology("ring", 4).weights.tolist()


def test_topology_is_immutable_and_hashable():
    t = build_topology("ring", 5)
    with pytest.raises(ValueError):
        t.weights[0, 0] = 0.5
    assert t == build_topology("ring", 5) and hash(t) == hash(build_topology("ring", 5))
    with pytest.raises(IndexError):
        t.self_weight(5)


@pytest.mark.parametrize("args,message", [
    (("star", 4), "unknown topology 'star'; known: ring, torus, exponential, complete, edges"),
    (("ring", 0), "number of workers must be >= 1, got 0"),
    (("torus", -3), "number of workers must be >= 1, got -3"),
    (("ring", 2.5), "number of workers must be an integer"),
    (("edges", 4), "topology 'edges' needs an edge list"),
    (("edges", 4, [[0, 1], [1, 4]]), "edge [1, 4] has a rank outside [0, 4) for n=4"),
    (("edges", 4, [[0, 1], [-1, 2]]), "edge [-1, 2] has a rank outside [0, 4)"),
    (("edges", 4, [[0, 1, 2]]), "is not a pair of integer ranks"),
    (("edges", 4, [[0, "a"]]), "is not a pair of integer ranks"),
    (("edges", 5, [[0, 1], [1, 2], [3, 4]]),
     "topology 'edges' with n=5 is disconnected: rank(s) 3, 4 unreachable from rank 0"),
    (("edges", 3, [[0, 0], [1, 2]]), "rank(s) 1, 2 unreachable from rank 0"),
    (("edges", 2, []), "rank(s) 1 unreachable from rank 0"),
    (("ring", 4, [[0, 1]]), "an edge list is only used with topology 'edges', not 'ring'"),
])
def test_errors(args, message):
    with pytest.raises(ConfigError) as exc:
        build_topology(*args)
    text = str(exc.value)
    assert message in text and "\n" not in text
