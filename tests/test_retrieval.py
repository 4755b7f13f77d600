from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

from semla_lab.core.errors import UsageError
from semla_lab.core.retrieval import (DomainIndex, Retrieval, RetrievalConfig, distances, retrieve, softmax_weights,
                                      top_k, uniform_weights)

# 1-D library: centroids at 0, 1, 3; query 0.9 -> distances 0.9, 0.1, 2.1
C1 = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
N1 = ["a", "b", "c"]
Q1 = torch.tensor([0.9], dtype=torch.float64)


def test_hand_computed_example():
    d = distances(Q1, C1)
    assert d.shape == (1, 3)
    assert d[0].tolist() == pytest.approx([0.9, 0.1, 2.1])
    values, idx = top_k(d, 2)
    assert idx.tolist() == [[1, 0]]
    assert values[0].tolist() == pytest.approx([0.1, 0.9])
    # tau = 5: logits (1/0.1)/5 = 2 and (1/0.9)/5 = 2/9
    e1, e2 = math.exp(2), math.exp(2 / 9)
    w = softmax_weights(values, tau=5.0)
    assert w.dtype == torch.float64
    assert w[0].tolist() == pytest.approx([e1 / (e1 + e2), e2 / (e1 + e2)], rel=1e-12)
    # default tau = 0.05: logits 200 and 22.2 -> w_far = 1 / (1 + exp(200 - 200/9))
    r = retrieve(Q1, C1, N1, RetrievalConfig(k=2))
    assert r.indices.tolist() == [[1, 0]]
    assert r.weights[0, 1].item() == pytest.approx(1 / (1 + math.exp(200 - 200 / 9)), rel=1e-9)
    names, dists, weights = zip(*r.chosen(0))
    assert names == ("b", "a")
    assert dists == pytest.approx((0.1, 0.9))
    assert sum(weights) == pytest.approx(1.0)


def test_uniform_weighting():
    r = retrieve(Q1, C1, N1, RetrievalConfig(k=3, weighting="uniform"))
    assert r.indices.tolist() == [[1, 0, 2]]
    assert torch.equal(r.weights, torch.full((1, 3), 1 / 3, dtype=torch.float64))
    assert torch.equal(uniform_weights(2, 4), torch.full((2, 4), 0.25))


def test_cosine_orders_most_similar_first_and_ignores_scale():
    cents = torch.tensor([[10.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    q = torch.tensor([[1.0, 0.1]])
    # cos sims: [10,0] 0.995, [1,1] 0.774, [0,1] 0.0995 -> order 0, 2, 1
    _, idx = top_k(distances(q, cents, "cosine"), 3)
    assert idx.tolist() == [[0, 2, 1]]
    d = distances(q, cents, "cosine")[0]
    assert d[0].item() == pytest.approx(1 - 1 / math.sqrt(1.01), abs=1e-6)
    # Euclidean prefers the small vector [1, 1] (distance 0.9) over [10, 0] (distance ~9)
    _, idx = top_k(distances(q, cents), 1)
    assert idx.tolist() == [[2]]


def test_leave_one_out_never_returns_excluded():
    torch.manual_seed(0)
    cents = torch.randn(5, 4)
    names = [f"d{i}" for i in range(5)]
    queries = cents + 0.01 * torch.randn(5, 4)   # each query is nearest to its own centroid
    for i, name in enumerate(names):
        r = retrieve(queries, cents, names, RetrievalConfig(k=4), exclude=[name])
        assert not (r.indices == i).any()
    r = retrieve(queries, cents, names, RetrievalConfig(k=1), exclude="d0")
    assert r.indices[1:, 0].tolist() == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="k=5.*4"):
        retrieve(queries, cents, names, RetrievalConfig(k=5), exclude=["d0"])


def test_ties_broken_by_lower_index():
    d = torch.tensor([[1.0, 0.5, 0.5, 1.0]])
    values, idx = top_k(d, 3)
    assert idx.tolist() == [[1, 2, 0]]
    _, idx = top_k(d, 2, exclude=torch.tensor([False, True, False, False]))
    assert idx.tolist() == [[2, 0]]


def test_exact_match_dominates_and_exact_ties_share():
    r = retrieve(C1[1], C1, N1, RetrievalConfig(k=3))
    assert torch.isfinite(r.weights).all()
    assert r.indices[0, 0] == 1 and r.weights[0, 0] > 1 - 1e-12
    w = softmax_weights(torch.tensor([[0.0, 0.0, 0.3]]))
    assert w[0].tolist() == pytest.approx([0.5, 0.5, 0.0])
    assert softmax_weights(torch.zeros(1, 4, dtype=torch.float16)).dtype == torch.float16


@pytest.mark.parametrize("call, match", [
    (lambda: top_k(torch.ones(1, 3), 0), "k=0"),
    (lambda: top_k(torch.ones(1, 3), 4), "k=4.*3"),
    (lambda: top_k(torch.tensor([[math.nan, 1.0]]), 1), "NaN"),
    (lambda: softmax_weights(torch.ones(1, 2), tau=0.0), "tau"),
    (lambda: softmax_weights(torch.ones(1, 2), tau=-1.0), "tau"),
    (lambda: softmax_weights(-torch.ones(1, 2)), ">= 0"),
    (lambda: distances(torch.tensor([math.nan]), C1), "queries"),
    (lambda: distances(Q1, torch.tensor([[math.inf]])), "centroids"),
    (lambda: distances(Q1, torch.zeros(0, 1)), "empty library"),
    (lambda: distances(torch.zeros(2, 3), torch.zeros(4, 2)), "D=3.*D=2"),
    (lambda: distances(Q1, C1, "manhattan"), "manhattan"),
    (lambda: distances(torch.zeros(1, 2), torch.ones(3, 2), "cosine"), "zero vector"),
    (lambda: distances(torch.tensor([1]), torch.tensor([[1]])), "floating"),
    (lambda: retrieve(Q1, C1, ["a", "b"]), "2 names for 3"),
    (lambda: retrieve(Q1, C1, ["a", "a", "b"]), "unique"),
    (lambda: retrieve(Q1, C1, N1, RetrievalConfig(k=1), exclude=["zz"]), "'zz'"),
    (lambda: retrieve(Q1, C1, N1, RetrievalConfig(k=4)), "k=4.*3"),
    (lambda: RetrievalConfig(k=0), "k"),
    (lambda: RetrievalConfig(tau=0.0), "tau"),
    (lambda: RetrievalConfig(metric="l1"), "l1"),
    (lambda: RetrievalConfig(weighting="max"), "max"),
])
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- properties
FAST = settings(max_examples=50, deadline=None)


@st.composite
def libraries(draw, max_l: int = 6):
    """(query (1, D), centroids (L, D), names, k) with coordinates in [-3, 3], float64."""
    d = draw(st.integers(1, 3))
    n = draw(st.integers(1, max_l))
    coord = st.floats(-3, 3, allow_nan=False)
    cents = torch.tensor(draw(st.lists(st.lists(coord, min_size=d, max_size=d), min_size=n, max_size=n)),
                         dtype=torch.float64)
    query = torch.tensor([draw(st.lists(coord, min_size=d, max_size=d))], dtype=torch.float64)
    return query, cents, [f"n{i}" for i in range(n)], draw(st.integers(1, n))


taus = st.floats(1e-3, 10.0)


@FAST
@given(libraries(), taus, st.sampled_from(["euclidean", "cosine"]))
def test_weights_are_a_distribution(lib, tau, metric):
    q, cents, names, k = lib
    if metric == "cosine":
        assume(q.norm() > 1e-3 and (cents.norm(dim=1) > 1e-3).all())
    r = retrieve(q, cents, names, RetrievalConfig(k=k, tau=tau, metric=metric))
    assert r.weights.shape == (1, k)
    assert (r.weights >= 0).all()
    assert r.weights.sum().item() == pytest.approx(1.0, abs=1e-12)


@FAST
@given(libraries(), taus, st.data())
def test_library_order_does_not_matter(lib, tau, data):
    q, cents, names, k = lib
    d = distances(q, cents)[0].sort().values
    assume(k == len(names) or d[k - 1] < d[k])   # no tie at the top-K boundary
    perm = data.draw(st.permutations(range(len(names))))
    cfg = RetrievalConfig(k=k, tau=tau)
    a = retrieve(q, cents, names, cfg)
    b = retrieve(q, cents[list(perm)], [names[i] for i in perm], cfg)
    wa = {n: w for n, _, w in a.chosen(0)}
    wb = {n: w for n, _, w in b.chosen(0)}
    assert wa.keys() == wb.keys()
    for n in wa:
        assert wa[n] == pytest.approx(wb[n], abs=1e-12)


@FAST
@given(libraries())
def test_k1_puts_all_weight_on_the_nearest(lib):
    q, cents, names, _ = lib
    r = retrieve(q, cents, names, RetrievalConfig(k=1))
    assert r.weights.tolist() == [[1.0]]
    assert r.distances[0, r.indices[0, 0]] == r.distances.min()


@FAST
@given(libraries())
def test_small_tau_concentrates_on_the_nearest(lib):
    q, cents, names, k = lib
    assume(k >= 2)
    d = distances(q, cents)[0].sort().values
    assume(d[1] - d[0] >= 0.5)   # distances <= 6 * sqrt(3): logit gap >= 0.5 / 108 / 1e-4 > 46
    r = retrieve(q, cents, names, RetrievalConfig(k=k, tau=1e-4))
    assert r.weights[0, 0] > 0.99


@FAST
@given(libraries(), taus)
def test_nearer_never_gets_less_weight(lib, tau):
    q, cents, names, k = lib
    r = retrieve(q, cents, names, RetrievalConfig(k=k, tau=tau))
    d = r.distances[0, r.indices[0]]
    assert (d[:-1] <= d[1:]).all()
    assert (r.weights[0, :-1] >= r.weights[0, 1:]).all()


def test_retrieval_is_a_plain_record():
    import pickle
    r = retrieve(torch.zeros(2, 1, dtype=torch.float64) + 0.9, C1, N1, RetrievalConfig(k=2))
    assert isinstance(r, Retrieval)
    assert r.indices.dtype == torch.long and r.indices.shape == (2, 2)
    copy = pickle.loads(pickle.dumps(r))                         # e.g. back from a Ray task
    assert r.distances.shape == (2, 3) and r.names == N1 and torch.equal(copy.distances, r.distances)


def _exhaustive(queries, centroids, cfg, excluded=()):
    """The paper's retrieval from the checked building blocks: every distance, a full stable sort, the weights."""
    dist = distances(queries, centroids, cfg.metric)
    mask = torch.zeros(len(centroids), dtype=torch.bool)
    mask[list(excluded)] = True
    values, indices = top_k(dist, cfg.k, mask)
    weights = softmax_weights(values, cfg.tau) if cfg.weighting == "softmax" else uniform_weights(*indices.shape,
                                                                                                  dtype=values.dtype)
    return dist, indices, weights


def test_domain_index_search_equals_the_building_blocks_on_a_large_library():
    """The one search path (GEMM preselection + exact re-measure) gives exactly the indices, weights and
    distances of exhaustive exact retrieval, ties and exclusions included, for every metric."""
    g = torch.Generator().manual_seed(0)
    centroids = torch.randn(3000, 16, generator=g)
    centroids[7] = centroids[3]                                  # an exact tie: the lower index comes first
    names = [f"d{i}" for i in range(3000)]
    queries = torch.cat([torch.randn(31, 16, generator=g), centroids[3][None] + 1e-3])
    index = DomainIndex(centroids, names)
    for cfg, exclude in [(RetrievalConfig(k=5), ()), (RetrievalConfig(k=7, tau=0.2), ("d1", "d2")),
                         (RetrievalConfig(k=3, weighting="uniform"), ()), (RetrievalConfig(k=4, metric="cosine"), ()),
                         (RetrievalConfig(k=4, metric="cosine"), ("d3",)), (RetrievalConfig(k=2), ("d3",))]:
        r = index.search(queries, cfg, exclude)
        dist, indices, weights = _exhaustive(queries, centroids, cfg, [names.index(n) for n in exclude])
        assert torch.equal(r.indices, indices) and torch.equal(r.weights, weights), (cfg, exclude)
        assert torch.equal(r.distances, dist), (cfg, exclude)
        assert torch.equal(retrieve(queries, centroids, names, cfg, exclude).indices, indices)
    assert index.search(queries[-1], RetrievalConfig(k=2)).indices.tolist() == [[3, 7]]


@pytest.mark.parametrize("kind", ["centroid", "kmeans:2", "gmm:2", "cosine", "text"])
def test_exclusion_means_one_thing_on_every_index(kind):
    """An excluded domain is never chosen and keeps its exact distance; an unknown name or a k above what remains
    is one clear error; a single string is one name; repeats count once."""
    from semla_lab.core.profiles import fit_profile
    g = torch.Generator().manual_seed(1)
    centroids = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    names = [f"d{i}" for i in range(6)]
    embs = {n: centroids[i] + 0.05 * torch.randn(20, 8, generator=g) for i, n in enumerate(names)}
    profiles = {n: fit_profile(embs[n], centroids[i], ["kmeans:2", "gmm:2"], vocabulary=embs[n][:3])
                for i, n in enumerate(names)}
    index = DomainIndex(centroids, names, profiles)
    cfg = (RetrievalConfig(k=5, metric="cosine") if kind == "cosine" else
           RetrievalConfig(k=5, text_weight=0.3) if kind == "text" else RetrievalConfig(k=5, index=kind))
    text = embs["d0"][:3]
    queries = embs["d0"][:4]
    full = index.search(queries, cfg, class_text=text).distances
    for exclude in (["d0"], "d0", ["d0", "d0"]):
        r = index.search(queries, cfg, exclude, class_text=text)
        assert not (r.indices == 0).any() and r.indices.shape == (4, 5)
        assert torch.allclose(r.distances, full) and torch.isfinite(r.distances).all()
    with pytest.raises(UsageError, match="unknown library entries.*'zz'"):
        index.search(queries, cfg, ["zz"], class_text=text)
    with pytest.raises(UsageError, match=r"k=5 must be in \[1, 4\]"):
        index.search(queries, cfg, ["d0", "d1"], class_text=text)


def test_centroids_are_validated_when_the_index_is_built():
    with pytest.raises(UsageError, match="centroids contains NaN"):
        DomainIndex(torch.tensor([[0.0], [math.nan]]), ["a", "b"])
    with pytest.raises(UsageError, match="empty"):
        DomainIndex(torch.zeros(0, 3), []).search(torch.zeros(3))


def test_search_neither_revalidates_nor_measures_every_centroid(monkeypatch):
    """What the predictor and evaluation run per batch: no pass over the centroids to validate them, no exact
    distance to every centroid (one GEMM preselects); the exact distances come when a caller reads them."""
    import semla_lab.core.retrieval as retrieval
    g = torch.Generator().manual_seed(2)
    index = DomainIndex(torch.randn(3000, 16, generator=g), [f"d{i}" for i in range(3000)])
    measured, checked, cdist = [], [], torch.cdist
    monkeypatch.setattr(torch, "cdist", lambda a, b, **kw: measured.append(b.shape[-2]) or cdist(a, b, **kw))
    monkeypatch.setattr(retrieval, "_check_finite", lambda t, name: checked.append(name))
    r = index.search(torch.randn(4, 16, generator=g), RetrievalConfig(k=5), exclude=["d9"])
    assert checked == ["queries"] and measured and max(measured) < 3000
    assert r.distances.shape == (4, 3000) and max(measured) == 3000
