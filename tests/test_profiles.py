"""Domain profiles (prototypes, GMMs, coverage, vocabulary), their storage in a library, and retrieval with the
options beyond the paper: each option off equals the paper, bad options fail with one clear error."""
from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from semla_lab.core.errors import UsageError
from semla_lab.library.index import PROFILES, AdapterLibrary, LibraryError
from semla_lab.core.profiles import fit_profile, kind_distances, parse_index, stack, vocabulary_embedding
from semla_lab.core.retrieval import DomainIndex, RetrievalConfig, retrieve

from test_library import BASE, D, EMBEDDER, LORA, adapters, make_adapter  # noqa: F401  (fixture)


def clusters(seed: int, centres: int = 2, n: int = 60, spread: float = 0.05) -> torch.Tensor:
    """n unit vectors (n, D) around `centres` random directions."""
    g = torch.Generator().manual_seed(seed)
    mus = F.normalize(torch.randn(centres, D, generator=g), dim=-1)
    x = mus.repeat_interleave(n // centres, 0) + spread * torch.randn(n, D, generator=g)
    return F.normalize(x, dim=-1)


@pytest.fixture
def profiled(tmp_path, adapters):  # noqa: F811
    """A library of three domains with kmeans:2 and gmm:2 profiles and vocabularies; its embeddings."""
    lib = AdapterLibrary.create(tmp_path / "lib", EMBEDDER, BASE, LORA)
    embs = {name: clusters(i) for i, name in enumerate("abc")}
    for name in "abc":
        lib.add(name, adapters[name], embs[name].mean(0), len(embs[name]))
    vocab = {name: clusters(10 + i, 1, 4) for i, name in enumerate("abc")}
    lib.set_profiles({n: fit_profile(embs[n], lib.get(n).centroid, ["kmeans:2", "gmm:2"], vocabulary=vocab[n])
                      for n in "abc"})
    return lib, embs, vocab


# ---- the math -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, expected", [("centroid", ("centroid", 1)), ("kmeans:4", ("kmeans", 4)),
                                            ("gmm:2", ("gmm", 2))])
def test_parse_index(kind, expected):
    assert parse_index(kind) == expected


@pytest.mark.parametrize("kind, match", [("kmeans:0", "P .* must be >= 1"), ("gmm:-2", "must be >= 1"),
                                         ("kmeans", "unknown index kind"), ("centroid:3", "unknown index kind"),
                                         ("faiss:4", "unknown index kind"), (4, "unknown index kind")])
def test_bad_index_kinds_fail_with_one_clear_line(kind, match):
    with pytest.raises(UsageError, match=match) as e:
        parse_index(kind)
    assert "\n" not in str(e.value)


def test_kmeans_distance_is_to_the_nearest_prototype():
    x = clusters(0)
    prof = fit_profile(x, x.mean(0), ["kmeans:2"])
    q = clusters(5, n=8)
    means = prof.models["kmeans:2"]["means"]
    expected = torch.cdist(q, means).min(1).values
    got = kind_distances(q, "kmeans:2", stack([prof], "kmeans:2"))[:, 0]
    assert torch.allclose(got, expected, atol=1e-6)
    # two clusters: each own image is nearer its prototype than the centroid in the middle
    own = kind_distances(x, "kmeans:2", stack([prof], "kmeans:2"))[:, 0]
    assert (own < torch.cdist(x, x.mean(0)[None])[:, 0]).float().mean() > 0.9


def test_gmm_distance_equals_euclidean_for_one_isotropic_component():
    """The documented scaling: sqrt(2 s^2 (NLL - NLL*)) = ||x - mu|| for one isotropic component."""
    mu, var = torch.randn(1, 1, D), torch.full((1, 1, D), 0.02)
    stacked = {"means": mu, "variances": var, "log_weights": torch.zeros(1, 1), "scale2": torch.tensor([0.02])}
    from semla_lab.core.profiles import gmm_nll
    stacked["nll_floor"] = gmm_nll(mu[0], stacked)[0]
    q = torch.randn(5, D)
    assert torch.allclose(kind_distances(q, "gmm:1", stacked)[:, 0], (q - mu[0]).norm(dim=1), rtol=1e-4)


def test_gmm_log_likelihood_matches_sklearn():
    from sklearn.mixture import GaussianMixture
    x = clusters(1)
    prof = fit_profile(x, x.mean(0), ["gmm:2"])
    gm = GaussianMixture(2, covariance_type="diag", reg_covar=1e-4, random_state=0).fit(x.double().numpy())
    from semla_lab.core.profiles import gmm_nll
    q = clusters(7, n=6)
    ours = gmm_nll(q.double(), {k: v[None].double() for k, v in prof.models["gmm:2"].items()})[:, 0]
    assert torch.allclose(ours, -torch.from_numpy(gm.score_samples(q.double().numpy())), rtol=1e-4, atol=1e-3)


def test_coverage_radius_is_the_quantile_of_own_distances():
    x = clusters(2)
    prof = fit_profile(x, x.mean(0), ["kmeans:2"], quantile=0.9)
    own = torch.cdist(x, x.mean(0)[None])[:, 0]
    assert math.isclose(prof.coverage["centroid"], float(torch.quantile(own.double(), 0.9)), rel_tol=1e-6)
    assert prof.coverage["kmeans:2"] < prof.coverage["centroid"]
    with pytest.raises(UsageError, match="needs at least 100 images"):
        fit_profile(x, x.mean(0), ["kmeans:100"])


def test_vocabulary_embedding_is_the_normalised_mean():
    t = torch.randn(5, D)
    v = vocabulary_embedding(t)
    assert torch.allclose(v, F.normalize(F.normalize(t, dim=-1).mean(0), dim=0))
    assert math.isclose(v.norm(), 1, rel_tol=1e-6)


# ---- storage ----------------------------------------------------------------------------------------------

def test_profiles_survive_save_and_load(profiled):
    lib, embs, _ = profiled
    fresh = AdapterLibrary(lib.root).profiles()
    assert list(fresh) == ["a", "b", "c"]
    for name in "abc":
        assert fresh[name].kinds == ["centroid", "kmeans:2", "gmm:2"]
        for kind in ("kmeans:2", "gmm:2"):
            for key, t in lib.profiles()[name].models[kind].items():
                assert torch.equal(fresh[name].models[kind][key], t)
        assert fresh[name].coverage.keys() == {"centroid", "kmeans:2", "gmm:2"}
        assert fresh[name].vocabulary.shape == (D,) and fresh[name].num_images == 60


def test_old_library_without_profiles_opens_and_retrieves_as_before(tmp_path, adapters):  # noqa: F811
    lib = AdapterLibrary.create(tmp_path / "old", EMBEDDER, BASE, LORA)
    for i, name in enumerate("ab"):
        lib.add(name, adapters[name], torch.full((D,), float(i)), 10)
    before = sorted(p.name for p in lib.root.iterdir())
    reopened = AdapterLibrary(lib.root)
    assert reopened.profiles() == {} and sorted(p.name for p in lib.root.iterdir()) == before
    q = torch.randn(4, D)
    a = DomainIndex.from_library(reopened).search(q, RetrievalConfig(k=2))
    b = retrieve(q, reopened.centroids(), reopened.names(), RetrievalConfig(k=2))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights) and a.base_weights is None
    with pytest.raises(UsageError, match="no 'kmeans:4' index for domain.*add-prototypes") as e:
        DomainIndex.from_library(reopened).search(q, RetrievalConfig(k=2, index="kmeans:4"))
    assert "\n" not in str(e.value)


def test_profiles_are_ignored_by_the_index_and_kept_across_writes(profiled, adapters):  # noqa: F811
    lib, embs, _ = profiled
    index_before = json.loads((lib.root / "index.json").read_text())
    assert "profiles" not in json.dumps(index_before)          # old code reads index.json only
    lib.add("rank_free", adapters["c"], embs["c"].mean(0) + 0.01, 5)
    assert list(lib.profiles()) == ["a", "b", "c"]              # the new domain has none yet
    lib.remove("b")
    assert list(AdapterLibrary(lib.root).profiles()) == ["a", "c"]
    files = sorted(p.name for p in lib.root.glob("profiles-*"))
    assert files == ["profiles-1.safetensors"]


def test_a_domain_re_added_with_another_centroid_loses_its_stale_profile(profiled, adapters):  # noqa: F811
    lib, embs, _ = profiled
    lib.remove("a")
    lib.add("a", adapters["a"], embs["a"].mean(0) * 0.5, 60)
    assert list(lib.profiles()) == ["b", "c"]
    with pytest.raises(LibraryError, match="another centroid"):
        lib.set_profiles({"b": fit_profile(embs["b"], embs["a"].mean(0))})


def test_profile_writes_keep_the_previous_file_and_drop_older(profiled):
    lib, embs, _ = profiled
    for _ in range(2):
        lib.set_profiles({"a": fit_profile(embs["a"], lib.get("a").centroid, ["kmeans:3"])})
    meta = json.loads((lib.root / PROFILES).read_text())
    assert meta["version"] == 3
    assert sorted(p.name for p in lib.root.glob("profiles-*")) == ["profiles-2.safetensors", "profiles-3.safetensors"]
    assert lib.profiles()["a"].kinds == ["centroid", "kmeans:3"] and "gmm:2" in lib.profiles()["b"].kinds


def test_malformed_profiles_file_is_one_clear_error(profiled):
    lib, _, _ = profiled
    (lib.root / PROFILES).write_text(json.dumps({"format": 99}))
    with pytest.raises(LibraryError, match="malformed"):
        AdapterLibrary(lib.root).profiles()


# ---- retrieval with the options ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad, match", [({"index": "kmeans:0"}, "must be >= 1"), ({"text_weight": 1.5}, r"\[0, 1\]"),
                                        ({"text_weight": -0.1}, r"\[0, 1\]"), ({"fallback": "always"}, "fallback"),
                                        ({"fallback_strength": -1}, ">= 0"),
                                        ({"index": "kmeans:2", "metric": "cosine"}, "euclidean")])
def test_bad_options_fail_with_one_clear_line(bad, match):
    with pytest.raises(UsageError, match=match) as e:
        RetrievalConfig(**bad)
    assert "\n" not in str(e.value)


def test_options_off_equal_the_paper(profiled):
    lib, embs, vocab = profiled
    index = DomainIndex.from_library(lib)
    q = clusters(9, n=10)
    paper = retrieve(q, lib.centroids(), lib.names(), RetrievalConfig(k=2))
    for cfg in (RetrievalConfig(k=2, text_weight=0.0), RetrievalConfig(k=2, index="centroid")):
        r = index.search(q, cfg, class_text=vocab["a"])
        assert torch.equal(r.indices, paper.indices) and torch.equal(r.weights, paper.weights)


def test_fallback_with_infinite_radius_or_zero_strength_equals_semla(profiled):
    lib, embs, _ = profiled
    q = clusters(9, n=10)
    for kind in ("centroid", "kmeans:2", "gmm:2"):
        index = DomainIndex.from_library(lib)
        plain = index.search(q, RetrievalConfig(k=2, index=kind))
        zero = index.search(q, RetrievalConfig(k=2, index=kind, fallback="coverage", fallback_strength=0))
        profiles = copy.deepcopy(index.profiles)
        for p in profiles.values():
            p.coverage[kind] = float("inf")
        inf = DomainIndex(index.centroids, index.names, profiles).search(
            q, RetrievalConfig(k=2, index=kind, fallback="coverage", fallback_strength=5))
        for r in (zero, inf):
            assert torch.equal(r.indices, plain.indices) and torch.allclose(r.weights, plain.weights, atol=1e-6)
            assert torch.all(r.base_weights < 1e-6)


@pytest.mark.parametrize("kind, images", [("centroid", 1), ("kmeans:2", 2)])
def test_fallback_with_a_zero_coverage_radius(kind, images):
    """A one-image domain, or kmeans:P fitted on P images, has coverage radius 0: weights stay finite (the
    adapter covers distance 0 only), and strength 0 is plain SemLA, bit for bit."""
    g = torch.Generator().manual_seed(4)
    embs = [F.normalize(torch.randn(images, D, generator=g), dim=1) for _ in range(3)]
    centroids = torch.stack([e.mean(0) for e in embs])
    names = ["a", "b", "c"]
    profiles = {n: fit_profile(e, c, [] if kind == "centroid" else [kind]) for n, e, c in zip(names, embs, centroids)}
    assert all(p.coverage[kind] == 0 for p in profiles.values())
    index = DomainIndex(centroids, names, profiles)
    q = torch.cat([F.normalize(torch.randn(3, D, generator=g), dim=1), embs[0][:1]])     # 3 far, 1 at a's image
    plain = index.search(q, RetrievalConfig(k=2, index=kind))
    zero = index.search(q, RetrievalConfig(k=2, index=kind, fallback="coverage", fallback_strength=0))
    assert torch.equal(zero.indices, plain.indices) and torch.equal(zero.weights, plain.weights)
    assert torch.equal(zero.base_weights, torch.zeros(4))
    some = index.search(q, RetrievalConfig(k=2, index=kind, fallback="coverage", fallback_strength=1))
    assert torch.isfinite(some.weights).all() and torch.isfinite(some.base_weights).all()
    assert torch.equal(some.base_weights[:3], torch.ones(3)) and some.weights[:3].abs().sum() == 0
    assert some.indices[3, 0] == 0 and some.weights[3, 0] == plain.weights[3, 0]    # at distance 0: kept


def test_fallback_gives_far_queries_to_the_base_model(profiled):
    lib, embs, _ = profiled
    index = DomainIndex.from_library(lib)
    cfg = RetrievalConfig(k=2, index="kmeans:2", fallback="coverage", fallback_strength=2)
    near = index.search(embs["a"][:5], cfg)
    far = index.search(-embs["a"][:5], cfg)          # the opposite direction: outside every radius
    assert near.base_weights.mean() < 0.1 and far.base_weights.min() > 0.5
    assert torch.allclose(far.weights.sum(1) + far.base_weights, torch.ones(5), atol=1e-6)
    # the formula: w'_k = w_k exp(-beta max(0, d_k / r_k - 1))
    plain = index.search(-embs["a"][:5], RetrievalConfig(k=2, index="kmeans:2"))
    radii = torch.tensor([lib.profiles()[n].coverage["kmeans:2"] for n in lib.names()])
    d = plain.distances.gather(1, plain.indices)
    expected = plain.weights * torch.exp(-2 * (d / radii[plain.indices] - 1).clamp_min(0))
    assert torch.allclose(far.weights, expected, atol=1e-6)


def test_text_weight_mixes_image_and_text_distances(profiled):
    lib, embs, vocab = profiled
    index = DomainIndex.from_library(lib)
    q = embs["a"][:4]
    image = index.image_distances(q)
    text = index.text_distances(vocab["c"])
    r = index.search(q, RetrievalConfig(k=3, text_weight=0.3), class_text=vocab["c"])
    assert torch.allclose(r.distances, 0.7 * image + 0.3 * text, atol=1e-6)
    only_text = index.search(q, RetrievalConfig(k=1, text_weight=1.0), class_text=vocab["c"])
    assert only_text.indices[:, 0].tolist() == [lib.names().index("c")] * 4     # the vocabulary decides
    with pytest.raises(UsageError, match="class names"):
        index.search(q, RetrievalConfig(k=1, text_weight=0.3))


def test_leave_one_out_holds_for_every_option(profiled):
    lib, embs, vocab = profiled
    index = DomainIndex.from_library(lib)
    cfg = RetrievalConfig(k=2, index="gmm:2", fallback="coverage", text_weight=0.2)
    r = index.search(embs["a"], cfg, exclude=["a"], class_text=vocab["a"])
    assert lib.names().index("a") not in r.indices.flatten().tolist()


def test_library_copy_opens_with_profiles(profiled, tmp_path):
    lib, _, _ = profiled
    shutil.copytree(lib.root, tmp_path / "copy")
    assert list(AdapterLibrary(tmp_path / "copy").profiles()) == ["a", "b", "c"]


def test_search_finds_the_exhaustive_top_k_on_a_large_library():
    """The GEMM preselection + exact re-measure equals sorting exact distances to every domain."""
    from semla_lab.core.profiles import DomainProfile
    from semla_lab.core.retrieval import top_k
    g = torch.Generator().manual_seed(3)
    n, p = 2000, 4
    means = F.normalize(torch.randn(n, p, D, generator=g), dim=-1)
    var = 0.005 + 0.02 * torch.rand(n, p, D, generator=g)
    logw = torch.log_softmax(torch.randn(n, p, generator=g), -1)
    names = [f"d{i}" for i in range(n)]
    profiles = {}
    for i, name in enumerate(names):
        gmm = {"means": means[i], "variances": var[i], "log_weights": logw[i], "scale2": var[i].mean().reshape(1),
               "nll_floor": torch.tensor([-100.0])}
        profiles[name] = DomainProfile(means[i].mean(0), 10, {"kmeans:4": {"means": means[i]}, "gmm:4": gmm},
                                       {"centroid": 1.0, "kmeans:4": 0.5, "gmm:4": 0.5}, means[i, 0])
    index = DomainIndex(means.mean(1), names, profiles)
    q = F.normalize(torch.randn(16, D, generator=g), dim=-1)
    text = torch.randn(3, D, generator=g)
    for cfg in (RetrievalConfig(k=5, index="kmeans:4"), RetrievalConfig(k=5, index="gmm:4"),
                RetrievalConfig(k=3, index="kmeans:4", text_weight=0.4, fallback="coverage")):
        exact = index.image_distances(q, cfg)
        if cfg.text_weight:
            exact = (1 - cfg.text_weight) * exact + cfg.text_weight * index.text_distances(text)
        r = index.search(q, cfg, exclude=["d0", "d5"], class_text=text)
        exact[:, [0, 5]] = float("inf")
        values, indices = top_k(exact, cfg.k)
        assert torch.equal(r.indices, indices)
        assert torch.allclose(r.distances.gather(1, r.indices), values, rtol=1e-5)
