"""embedding_space.py: centroids, nearest-centroid confusion, distances, PCA and UMAP views (notebook 04)."""
import os

import numpy as np
import pytest
import pandas as pd
import torch

from semla_lab.evaluation.weighting import weights_vs_tau
from semla_lab.evaluation.embedding_space import (compare_centroids, distance_matrix, group_means,
                                                 nearest_centroid_confusion, pca_project, top_confusions, umap_project)


def _clusters(n=10, d=8, seed=0):
    """Three tight clusters around the first three basis vectors; labels a, b, c."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.eye(d)[:3] * 4
    pts = torch.cat([c + 0.1 * torch.randn(n, d, generator=g) for c in centers])
    return pts, ["a"] * n + ["b"] * n + ["c"] * n, centers


def test_group_means_and_perfect_nearest_centroid():
    pts, labels, centers = _clusters()
    names, cents = group_means(pts, labels)
    assert names == ["a", "b", "c"]
    assert torch.allclose(cents, centers, atol=0.1)
    assert torch.allclose(cents[1], pts[10:20].mean(0))
    acc, conf = nearest_centroid_confusion(pts, labels, cents, names)
    assert acc == 1.0
    assert np.allclose(conf.values, np.eye(3))
    assert top_confusions(conf).empty


def test_confusion_counts_a_misplaced_query():
    pts, labels, centers = _clusters()
    labels = labels[:-1] + ["a"]            # the last "c" point claims to be "a": it sits nearest c
    acc, conf = nearest_centroid_confusion(pts, labels, centers, ["a", "b", "c"])
    assert acc == pytest.approx(29 / 30)
    assert conf.loc["a", "c"] == pytest.approx(1 / 11)
    assert np.allclose(conf.sum(axis=1).values, 1.0)
    top = top_confusions(conf, n=3)
    assert top.iloc[0].tolist() == ["a", "c", pytest.approx(1 / 11)]
    with pytest.raises(ValueError):
        group_means(pts, labels[:-1])


def test_distance_matrix_and_compare_centroids():
    _, _, centers = _clusters()
    dm = distance_matrix(centers, ["a", "b", "c"])
    assert list(dm.index) == list(dm.columns) == ["a", "b", "c"]
    assert np.allclose(dm.values, dm.values.T) and np.allclose(np.diag(dm.values), 0)
    assert dm.loc["a", "b"] == pytest.approx(4 * 2 ** 0.5, rel=1e-5)
    cos = distance_matrix(centers, ["a", "b", "c"], metric="cosine")
    assert cos.loc["a", "b"] == pytest.approx(1.0)
    shifted = centers + 0.5 * torch.eye(8)[3]                 # our estimates: off by 0.5 each
    cmp = compare_centroids(shifted, centers, ["a", "b", "c"])
    assert np.allclose(cmp["to own"], 0.5, atol=1e-5)
    assert (cmp["to nearest other"] > cmp["to own"]).all()
    assert cmp.loc["a", "nearest other"] == "b"


def test_pca_projects_a_line_and_extra_points_consistently():
    g = torch.Generator().manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(6, generator=g), dim=0)
    t = torch.linspace(-3, 3, 40)[:, None]
    pts = t * direction + 1e-3 * torch.randn(40, 6, generator=g)
    p, e, ratio = pca_project(pts, pts[:5])
    assert p.shape == (40, 2) and e.shape == (5, 2)
    assert ratio[0] > 0.999
    assert np.allclose(e, p[:5])
    p2, none, _ = pca_project(pts * 1.0)
    assert none is None and np.allclose(p, p2)               # deterministic signs
    assert abs(np.corrcoef(p[:, 0], t[:, 0].numpy())[0, 1]) > 0.999


def test_umap_fits_points_and_extra_jointly(monkeypatch):
    """The plumbing around umap-learn (a stand-in module: the real first call compiles numba code
    for ~20-40 s; notebook 04 runs the real one)."""
    import sys
    import types
    seen = {}

    class FakeUMAP:
        def __init__(self, **kwargs):
            seen.update(kwargs)

        def fit_transform(self, x):
            seen["rows"], seen["cache"] = len(x), os.environ.get("NUMBA_CACHE_DIR")
            return x[:, :2] * 2

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=FakeUMAP))
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    pts, _, centers = _clusters(n=5)
    p, c = umap_project(pts, centers, n_neighbors=4, random_state=3)
    assert seen["rows"] == 18 and seen["n_jobs"] == 1 and seen["random_state"] == 3
    assert seen["n_neighbors"] == 4 and seen["n_components"] == 2
    assert p.shape == (15, 2) and c.shape == (3, 2)
    assert np.allclose(p, 2 * pts[:, :2].double().numpy()) and np.allclose(c, 2 * centers[:, :2].numpy())
    assert seen["cache"] and "NUMBA_CACHE_DIR" not in os.environ, "set for umap only, then restored"
    p, none = umap_project(pts)
    assert none is None and seen["rows"] == 15


def test_notebook_plots_smoke():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from semla_lab.evaluation import plots
    pts, labels, centers = _clusters(n=4)
    p, c, _ = pca_project(pts, centers)
    fig = plots.annotate_points(plots.embedding_scatter(p, labels, c, ["a", "b", "c"]), c, ["a", "b", "c"])
    assert len(fig.axes[0].texts) == 3
    dist = pd.Series([0.3, 0.1, 0.5], index=["a", "b", "c"])
    fig2 = plots.distance_bars(dist, ["b"], ["c"])
    assert [t.get_text() for t in fig2.axes[0].get_xticklabels()] == ["b", "a", "c"]
    fig3 = plots.weights_vs_tau_plot({"q": weights_vs_tau(torch.tensor([0.2, 0.3]), [0.01, 0.1, 1.0])})
    assert len(fig3.axes[0].lines) == 3                       # two adapters + the tau marker
    table = pd.DataFrame({"k": [1, 3, 5], "hmean": [40.0, 42.0, 41.0]})
    fig4 = plots.ablation_curves({"k": table}, references={"zero-shot": 30.0, "oracle": 50.0})
    assert len(fig4.axes[0].lines) == 3
    two = pd.concat([table.assign(weighting="softmax"), table.assign(weighting="uniform", hmean=[40.0, 43, 44])])
    fig5 = plots.ablation_curves({"k": two, "tau": table.rename(columns={"k": "tau"})}, hue="weighting")
    assert len(fig5.axes[0].lines) == 2 and len(fig5.axes[1].lines) == 1
    plt.close("all")


def test_one_centroid_and_one_nearest_centroid_accuracy():
    """domain_centroids and nearest_centroid_accuracy are embed_domains, group_means and
    nearest_centroid_confusion put together, nothing else."""
    from semla_lab.evaluation.embedding_space import domain_centroids, embed_domains, nearest_centroid_accuracy
    from semla_lab.models.clip import load_clip
    clip, domains = load_clip(device="cpu"), ["acdc_fog", "nyu", "cityscapes"]
    centroids = domain_centroids(clip, domains, count=6)
    assert torch.equal(centroids, group_means(*embed_domains(clip, domains, "train", 6))[1])
    queries, labels = embed_domains(clip, domains, "test", 4)
    assert nearest_centroid_accuracy(clip, domains, train=6, test=4) == \
        nearest_centroid_confusion(queries, labels, centroids, domains)[0]
