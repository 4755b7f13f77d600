"""Benchmark outputs read back and compared (semla_lab.evaluation.outputs, notebooks 07-09), on synthetic results."""
import json

import numpy as np
import pytest
import torch

from semla_lab.evaluation import outputs
from semla_lab.core.retrieval import RetrievalConfig, retrieve

DOMAINS = ["a", "b", "c"]


def _results():
    per = {"zero_shot": [20.0, 30.0, 40.0], "uniform": [30.0, 35.0, 45.0], "semla": [35.0, 33.0, 38.0],
           "oracle": [40.0, 45.0, 50.0]}
    from semla_lab.evaluation.outputs import summarize
    return summarize({d: {m: v[i] for m, v in per.items()} for i, d in enumerate(DOMAINS)}, dict.fromkeys(DOMAINS, 2))


def _records():
    """Two images per target; every image chooses two of the other domains."""
    recs = []
    for t in DOMAINS:
        others = [d for d in DOMAINS if d != t]
        for i, w in enumerate(([0.75, 0.25], [0.5, 0.5])):
            dist = {d: (0.0 if d == t else 0.2 + 0.1 * DOMAINS.index(d)) for d in DOMAINS}
            recs.append({"image_id": f"{t}/{i}", "target": t, "distances": dist, "chosen": others, "weights": w})
    return recs


def test_load_benchmark_round_trip_and_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="semla-lab evaluate --out"):
        outputs.load_benchmark(tmp_path)
    payload = {"results": _results(), "config": {"k": 2}}
    (tmp_path / "results.json").write_text(json.dumps(payload))
    (tmp_path / "selections.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    got, recs = outputs.load_benchmark(tmp_path)
    assert got == json.loads(json.dumps(payload)) and recs == _records()


def test_deltas_failures_and_paper_comparison():
    results = _results()
    deltas = outputs.per_domain_deltas(results)
    assert list(deltas.index) == ["c", "b", "a"]             # worst gain over uniform first
    assert deltas.loc["a", "semla - uniform"] == pytest.approx(5.0)
    assert deltas.loc["c", "semla - zero_shot"] == pytest.approx(-2.0)
    assert deltas.loc["b", "oracle - semla"] == pytest.approx(12.0)
    fails = outputs.failure_cases({"results": results})
    assert list(fails.index) == ["c", "b"]                   # c: 7 below uniform; b: 2 below uniform
    assert fails.loc["c", "shortfall"] == pytest.approx(7.0)
    assert fails.loc["c", "beaten by"] == "uniform, zero_shot" and fails.loc["b", "beaten by"] == "uniform"
    assert outputs.failure_cases(results, margin=10).empty
    comp = outputs.paper_comparison(results)
    assert comp.loc["semla", "gap closed (paper)"] == pytest.approx((54.2 - 39.4) / (61.1 - 39.4))
    assert comp.loc["oracle", "gap closed"] == 1 and comp.loc["zero_shot", "gap closed"] == 0


def test_borrow_matrix_rows_sum_to_one_and_leave_one_out_diagonal_is_zero():
    m = outputs.borrow_matrix(_records())
    assert list(m.index) == DOMAINS and list(m.columns) == DOMAINS
    np.testing.assert_allclose(m.sum(axis=1), 1.0)
    assert (np.diag(m.values) == 0).all()
    assert m.loc["a", "b"] == pytest.approx((0.75 + 0.5) / 2) and m.loc["a", "c"] == pytest.approx(0.375)
    top = outputs.top_borrowed(m, n=2)
    assert top.loc["a", "#1"] == "b (0.62)" and top.loc["c", "#2"] == "b (0.38)"
    stats = outputs.retrieval_stats(_records())
    assert stats.loc["a", "d own"] == 0 and stats.loc["a", "d top-1"] == pytest.approx(0.3)
    assert stats.loc["a", "w top-1"] == pytest.approx(0.625)
    assert stats.loc["a", "effective K"] == pytest.approx((1 / 0.625 + 2) / 2)
    assert stats.loc["b", "usual top-1"] == "a" and stats.loc["b", "share"] == 1.0


def test_records_from_retrieval_feed_the_borrow_matrix():
    g = torch.Generator().manual_seed(0)
    cents, queries = torch.randn(4, 8, generator=g), torch.randn(5, 8, generator=g)
    ret = retrieve(queries, cents, ["w", "x", "y", "z"], RetrievalConfig(k=2), exclude=["z"])
    recs = outputs.records_from_retrieval(ret, "new")
    assert len(recs) == 5 and all("z" not in r["chosen"] for r in recs)
    m = outputs.borrow_matrix(recs)
    assert list(m.columns) == ["w", "x", "y", "z"] and m.loc["new", "z"] == 0
    assert m.sum(axis=1).iloc[0] == pytest.approx(1.0)


def test_paper_comparison_shows_the_papers_late_fusion_hmeans():
    results = {m: {"hmean": 30.0, "per_domain": {}} for m in ("zero_shot", "semla", "semla_late", "uniform_late", "oracle")}
    comp = outputs.paper_comparison(results)
    assert comp.loc["semla_late", "h-mean (paper)"] == 52.1 and comp.loc["uniform_late", "h-mean (paper)"] == 49.3
    assert outputs.PAPER_HMEAN["semla"] - outputs.PAPER_HMEAN["semla_late"] == pytest.approx(2.1)   # weight-level ahead


def test_paper_per_domain_puts_the_papers_seven_domains_beside_ours():
    methods = ("zero_shot", "uniform", "semla", "oracle")
    results = {m: {"per_domain": {d: 10.0 + i for d in outputs.PAPER_PER_DOMAIN}} for i, m in enumerate(methods)}
    table = outputs.paper_per_domain(results)
    assert list(table.index) == ["acdc_rain", "acdc_fog", "acdc_night", "cityscapes", "bdd", "ade", "idd"]
    assert table.loc["bdd", ("semla", "paper")] == 57.3 and table.loc["bdd", ("uniform", "paper")] == 58.2
    assert table.loc["ade", ("zero_shot", "paper")] == 37.8 and table.loc["ade", ("uniform", "paper")] == 37.3
    assert table.loc["bdd", ("semla - uniform", "paper")] == pytest.approx(-0.9)
    assert table.loc["idd", ("semla - uniform", "here")] == pytest.approx(1.0)
    above_oracle = {d for d, r in outputs.PAPER_PER_DOMAIN.items() if r["semla"] > r["oracle"]}
    assert above_oracle == {"acdc_fog", "acdc_night"}                    # the paper: SemLA above its own oracle
