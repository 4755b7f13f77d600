"""Embedding-space analysis, weights-vs-tau and fusion-by-hand helpers (notebooks 04-06)."""
import copy
import os

import numpy as np
import pandas as pd
import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from semla_lab.evaluation.analysis import (compare_centroids, distance_matrix, effective_number, fuse_by_hand,
                                fused_layer_delta, group_means, linear_cross_terms, lora_factors, lora_modules,
                                masks_miou, method_masks, nearest_centroid_confusion, one_at_a_time, pca_project,
                                peft_layer_delta, semla_with, top_confusions, umap_project, weights_vs_tau)
from semla_lab.evaluation.experiments import EvalConfig
from semla_lab.core.fusion import FusedAdapters
from semla_lab.library.index import AdapterLibrary
from semla_lab.library.predictor import SemLAPredictor
from semla_lab.core.retrieval import RetrievalConfig
from semla_lab.models.segmenter import LORA_TARGETS


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
            seen["rows"] = len(x)
            return x[:, :2] * 2

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=FakeUMAP))
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    pts, _, centers = _clusters(n=5)
    p, c = umap_project(pts, centers, n_neighbors=4, random_state=3)
    assert seen["rows"] == 18 and seen["n_jobs"] == 1 and seen["random_state"] == 3
    assert seen["n_neighbors"] == 4 and seen["n_components"] == 2
    assert p.shape == (15, 2) and c.shape == (3, 2)
    assert np.allclose(p, 2 * pts[:, :2].double().numpy()) and np.allclose(c, 2 * centers[:, :2].numpy())
    assert "NUMBA_CACHE_DIR" in os.environ
    p, none = umap_project(pts)
    assert none is None and seen["rows"] == 15


def test_weights_vs_tau_goes_from_hard_to_uniform():
    d = torch.tensor([0.30, 0.32, 0.40, 0.50])
    table = weights_vs_tau(d, [0.01, 0.05, 1.0, 1e4], names=list("wxyz"))
    assert list(table.columns) == list("wxyz") and list(table.index) == [0.01, 0.05, 1.0, 1e4]
    assert np.allclose(table.sum(axis=1), 1.0)
    assert table.loc[0.01, "w"] > 0.999                        # logit gap (1/0.30 - 1/0.32) / 0.01 = 20.8
    assert (np.diff(table.loc[0.05].values) < 0).all()         # nearer always weighs more
    assert np.allclose(table.loc[1e4].values, 0.25, atol=1e-3)
    n_eff = effective_number(table)
    assert n_eff[0] == pytest.approx(1.0, abs=1e-3) and n_eff[-1] == pytest.approx(4.0, abs=1e-2)
    assert (np.diff(n_eff) > 0).all()
    assert list(weights_vs_tau(d[:2], [0.1]).columns) == ["rank 1", "rank 2"]


def _factors(k=3, r=2, d_in=5, d_out=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(r, d_in, generator=g) for _ in range(k)],
            [torch.randn(d_out, r, generator=g) for _ in range(k)])


def test_fuse_by_hand_and_linear_cross_terms():
    As, Bs = _factors()
    w, s = [0.5, 0.3, 0.2], 2.0
    cat = fuse_by_hand(As, Bs, w, s)
    loop = sum(wi * s * B.double() @ A.double() for wi, A, B in zip(w, As, Bs))
    assert torch.allclose(cat, loop)
    parts = linear_cross_terms(As, Bs, w, s)
    assert torch.allclose(parts["diagonal"], cat)
    assert torch.allclose(parts["linear"], fuse_by_hand(As, Bs, w, s, "linear"))
    explicit = sum((w[i] * w[j]) ** 0.5 * s * Bs[i].double() @ As[j].double()
                   for i in range(3) for j in range(3) if i != j)
    assert torch.allclose(parts["cross"], explicit)
    assert parts["cross"].norm() > 0.1 * cat.norm()
    one = linear_cross_terms(As[:1], Bs[:1], [1.0], s)         # a single adapter: no cross terms
    assert torch.count_nonzero(one["cross"]) == 0
    with pytest.raises(ValueError):
        fuse_by_hand(As, Bs, w, s, "svd")


@pytest.fixture(scope="module")
def lora_setup(tiny_segmenter):
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    names = ["a0", "a1", "a2"]
    peft_model = get_peft_model(copy.deepcopy(tiny_segmenter), cfg, adapter_name=names[0])
    for n in names[1:]:
        peft_model.add_adapter(n, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.eval()
    states = {n: get_peft_model_state_dict(peft_model, adapter_name=n) for n in names}
    fused = FusedAdapters(copy.deepcopy(tiny_segmenter), {n: (states[n], 2.0) for n in names})
    return peft_model, fused, states, names


@pytest.mark.parametrize("fusion", ["cat", "linear"])
def test_hand_package_and_peft_deltas_agree(lora_setup, fusion):
    peft_model, fused, states, names = lora_setup
    modules = lora_modules(states["a0"])
    assert modules == fused.modules
    module = "visual.transformer.resblocks.0.attn.out_proj"
    assert module in modules
    order, w = ["a2", "a0"], [0.8, 0.2]
    As, Bs = zip(*(lora_factors(states[n], module) for n in order))
    hand = fuse_by_hand(As, Bs, w, 2.0, fusion).float()
    ours = fused_layer_delta(fused, module, fused.index(order).tolist(), w, fusion)
    theirs = peft_layer_delta(peft_model, order, w, module, fusion)
    assert hand.shape == ours.shape == theirs.shape
    assert torch.allclose(ours, hand, atol=1e-5) and torch.allclose(theirs, hand, atol=1e-5)
    assert "_probe" not in peft_model.peft_config
    with pytest.raises(KeyError):
        lora_factors(states["a0"], "visual.no_such_layer")


def test_one_at_a_time_slices_an_ablation_table():
    rows = [{"k": k, "tau": t, "metric": "euclidean", "weighting": "softmax", "fusion": "cat",
             "method": "semla", "hmean": 10 * k + t} for k in (5, 1, 3) for t in (0.05, 0.2)]
    rows.append({**rows[0], "metric": "cosine"})
    table = pd.DataFrame(rows)
    ks = one_at_a_time(table, "k")
    assert ks["k"].tolist() == [1, 3, 5] and (ks["tau"] == 0.05).all()
    taus = one_at_a_time(table, "tau", method="semla")
    assert taus["tau"].tolist() == [0.05, 0.2] and (taus["k"] == 5).all()
    assert one_at_a_time(table, "metric")["metric"].tolist() == ["euclidean", "cosine"]
    assert len(one_at_a_time(table, "k", defaults=EvalConfig(tau=0.2))) == 3
    with pytest.raises(ValueError):
        one_at_a_time(table, "batch_size")


def test_one_at_a_time_with_two_knobs():
    rows = [{"k": k, "tau": 0.05, "metric": "euclidean", "weighting": wt, "fusion": "cat", "method": "semla",
             "hmean": k} for k in (3, 1) for wt in ("softmax", "uniform")]
    rows.append({**rows[0], "fusion": "linear"})
    grid = one_at_a_time(pd.DataFrame(rows), ["k", "weighting"])
    assert len(grid) == 4 and grid["k"].tolist() == [1, 1, 3, 3]
    assert grid.pivot(index="k", columns="weighting", values="hmean").shape == (2, 2)


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


def test_masks_miou_scores_each_mask():
    label = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 255]])
    masks = {"perfect": label.clamp(max=1), "swapped": 1 - label.clamp(max=1), "half": torch.zeros(2, 4)}
    scores = masks_miou(masks, label, 2)
    assert list(scores.index) == ["perfect", "swapped", "half"]
    assert scores["perfect"] == pytest.approx(100.0) and scores["swapped"] == pytest.approx(0.0)
    assert scores["half"] == pytest.approx(50 * 4 / 7)            # class 0: 4/7, class 1: 0/3


def test_method_masks_zero_shot_semla_and_oracle(tiny_segmenter, tiny_clip_random, tmp_path):
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False)
    lib = AdapterLibrary.create(tmp_path / "lib", tiny_clip_random.identity(True), None,
                                {"r": 2, "lora_alpha": 4, "target_modules": LORA_TARGETS})
    for i, name in enumerate(["d0", "d1", "d2"]):
        torch.manual_seed(i)
        model = get_peft_model(copy.deepcopy(tiny_segmenter), cfg)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0, 0.3)
        model.save_pretrained(tmp_path / name, save_embedding_layers=False)
        lib.add(name, tmp_path / name, torch.nn.functional.normalize(torch.randn(64), dim=0), 10)
    predictor = SemLAPredictor(tiny_segmenter, tiny_clip_random, lib, RetrievalConfig(k=1), device="cpu")
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    classes = ["road", "sky", "car"]
    predictor.set_image(image, exclude=["d0"])
    masks = method_masks(predictor, classes, oracle="d0")
    assert list(masks) == ["zero-shot", "SemLA", "oracle"]
    assert all(m.shape == (64, 64) for m in masks.values())
    assert torch.equal(masks["zero-shot"], predictor.predict(classes, adapt=False))
    chosen = predictor.explain()[0][0]                                   # k=1: SemLA == that domain's oracle
    assert chosen != "d0"
    assert torch.equal(masks["SemLA"], method_masks(predictor, classes, oracle=chosen)["oracle"])
    assert list(method_masks(predictor, classes)) == ["zero-shot", "SemLA"]


def test_semla_with_keeps_the_predictors_other_retrieval_options():
    """Only K and tau change for the call: index, fallback and text weight stay; the config is restored."""
    class Recorder:
        config = RetrievalConfig(index="kmeans:4", fallback="coverage", fallback_strength=2.0, text_weight=0.3)
        seen = []

        def set_image(self, image, exclude=()):
            self.seen.append(self.config)

        def explain(self):
            return [("d0", 0.1, 1.0)]

        def predict(self, class_names):
            return torch.zeros(2, 2, dtype=torch.long)

    predictor = Recorder()
    saved = predictor.config
    out = semla_with(predictor, None, ["road"], k=3, tau=0.2)
    assert predictor.seen == [RetrievalConfig(3, 0.2, index="kmeans:4", fallback="coverage", fallback_strength=2.0,
                                              text_weight=0.3)]
    assert predictor.config is saved and out["n_eff"] == 1.0 and out["miou"] is None
