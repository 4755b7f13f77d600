"""Benchmark results: per-target scores summed up as results.json's body (summarize, gap_closed,
bootstrap_intervals), shown as tables (results_table, format_table, format_intervals) and over several runs
(aggregate_runs, semla_wins); and what `semla-lab evaluate --out` (benchmark.py) wrote, read back for
notebooks 07-09: load_benchmark -> (results.json payload, selections.jsonl records); paper_comparison,
paper_per_domain, per_domain_deltas, failure_cases; borrow_matrix (target x library domain: mean fusion weight), top_borrowed,
retrieval_stats; records_from_retrieval turns a live retrieval into such records.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from ..core.errors import MissingFileError, UsageError
from ..core.metrics import harmonic_mean, paired_bootstrap
from .methods import METHODS


def summarize(per_domain: dict[str, dict[str, float]], counts: dict[str, int]) -> dict:
    """results.json body: per method, per-domain mIoU, mean, harmonic mean, image counts."""
    methods = {m for scores in per_domain.values() for m in scores}
    out = {}
    for m in [m for m in METHODS if m in methods] + sorted(methods - set(METHODS)):
        scores = {d: round(s[m], 2) for d, s in per_domain.items() if m in s}
        values = list(scores.values())
        out[m] = {"per_domain": scores, "mean": round(sum(values) / len(values), 2),
                  "hmean": round(harmonic_mean(values), 2), "num_images": {d: counts[d] for d in scores}}
    return out


def gap_closed(results: dict) -> dict[str, float]:
    """Fraction of the oracle - zero-shot h-mean gap that each method closes."""
    if "oracle" not in results or "zero_shot" not in results:
        return {}
    zs, orc = results["zero_shot"]["hmean"], results["oracle"]["hmean"]
    if orc == zs:
        return {}
    return {m: round((r["hmean"] - zs) / (orc - zs), 3) for m, r in results.items()}


BOOTSTRAP_PAIRS = (("semla", "uniform"), ("semla", "zero_shot"))


def bootstrap_intervals(confusions: dict[str, dict[str, torch.Tensor]], resamples: int = 1000) -> dict:
    """95% paired bootstrap intervals over test images of SemLA - uniform and SemLA - zero-shot (those
    pairs present), per domain and in h-mean. `confusions[domain][method]` is (N, C, C)."""
    out = {}
    for a, b in BOOTSTRAP_PAIRS:
        domains = [d for d, c in confusions.items() if a in c and b in c]
        if domains:
            out[f"{a} - {b}"] = paired_bootstrap({d: confusions[d][a] for d in domains},
                                                 {d: confusions[d][b] for d in domains}, resamples)
    return out


def format_intervals(bootstrap: dict) -> str:
    """Domains as rows, one column per compared pair: 'delta [low, high]'."""
    if not bootstrap:
        return ""
    cell = lambda r: f"{r['delta']:+.1f} [{r['low']:+.1f}, {r['high']:+.1f}]"
    first = next(iter(bootstrap.values()))
    rows = {d: {pair: cell(b["per_domain"][d]) for pair, b in bootstrap.items()} for d in first["per_domain"]}
    rows["h-mean"] = {pair: cell(b["hmean"]) for pair, b in bootstrap.items()}
    table = pd.DataFrame.from_dict(rows, orient="index")
    return (f"{100 * first['level']:.0f}% paired bootstrap intervals over test images ({first['resamples']} "
            f"resamples):\n" + table.to_string())


def results_table(results: dict) -> pd.DataFrame:
    """Methods as rows, domains as columns, mean and h-mean last (the paper's Table 1 layout)."""
    rows = {m: {**r["per_domain"], "mean": r["mean"], "h-mean": r["hmean"]} for m, r in results.items()}
    return pd.DataFrame.from_dict(rows, orient="index")


def format_table(results: dict) -> str:
    """Domains as rows and methods as columns, then mean, h-mean and the share of the oracle - zero-shot
    h-mean gap each method closes (fits a 120-column terminal)."""
    table = results_table(results).T
    gaps = gap_closed(results)
    if gaps:
        table.loc["gap closed"] = pd.Series(gaps)
    with pd.option_context("display.width", 120, "display.max_columns", 20, "display.float_format", "{:.1f}".format):
        return table.to_string()


def aggregate_runs(payloads: list[dict]) -> pd.DataFrame:
    """Mean and spread over runs (e.g. adapter training seeds) of each method's h-mean and mean mIoU,
    plus the number of target domains where SemLA beats uniform."""
    rows = []
    extra = sorted({m for p in payloads for m in p["results"]} - set(METHODS))
    for m in [*METHODS, *extra]:
        runs = [p["results"][m] for p in payloads if m in p["results"]]
        if not runs:
            continue
        h = torch.tensor([r["hmean"] for r in runs])
        mean = torch.tensor([r["mean"] for r in runs])
        rows.append({"method": m, "runs": len(runs), "h-mean": round(h.mean().item(), 1),
                     "h-mean std": round(h.std().item(), 1) if len(runs) > 1 else 0.0,
                     "h-mean min": round(h.min().item(), 1), "h-mean max": round(h.max().item(), 1),
                     "mean": round(mean.mean().item(), 1)})
    return pd.DataFrame(rows).set_index("method")


def semla_wins(results: dict, over: str = "uniform") -> tuple[int, int]:
    """(domains where SemLA beats `over`, domains compared)."""
    a, b = results["semla"]["per_domain"], results[over]["per_domain"]
    return sum(a[d] > b[d] for d in a), len(a)


# The paper's results (arXiv 2503.21780; 20 domains, CAT-Seg ViT-L/14): harmonic mean of per-domain mIoU, from
# its Table 1 and, for the two late-fusion methods, its fusion ablation.
PAPER_HMEAN = {"zero_shot": 39.4, "uniform": 51.9, "semla": 54.2, "oracle": 61.1,
               "semla_late": 52.1, "uniform_late": 49.3}

# Seven of the paper's Table 1 domains, per method (mIoU), under this package's domain names.
PAPER_PER_DOMAIN = {
    "acdc_rain": {"zero_shot": 46.5, "uniform": 67.4, "semla": 67.7, "oracle": 70.9},
    "acdc_fog": {"zero_shot": 47.1, "uniform": 69.7, "semla": 71.9, "oracle": 70.0},
    "acdc_night": {"zero_shot": 37.9, "uniform": 50.0, "semla": 51.7, "oracle": 51.6},
    "cityscapes": {"zero_shot": 47.1, "uniform": 62.2, "semla": 63.9, "oracle": 67.5},
    "bdd": {"zero_shot": 47.9, "uniform": 58.2, "semla": 57.3, "oracle": 60.1},
    "ade": {"zero_shot": 37.8, "uniform": 37.3, "semla": 38.2, "oracle": 54.0},
    "idd": {"zero_shot": 35.4, "uniform": 38.8, "semla": 40.2, "oracle": 64.3},
}


def read_selections(path: str | Path) -> list[dict]:
    """selections.jsonl -> one dict per test image (image_id, target, distances, chosen, weights, ms)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_benchmark(folder: str | Path) -> tuple[dict, list[dict]]:
    """The results.json payload and the selections.jsonl records of a benchmark folder."""
    folder = Path(folder)
    if not (folder / "results.json").is_file():
        raise MissingFileError(f"no results.json in {folder}; produce it with "
                                f"`semla-lab evaluate --out {folder.name}` (several minutes on a CPU)")
    payload = json.loads((folder / "results.json").read_text())
    sel = folder / "selections.jsonl"
    return payload, (read_selections(sel) if sel.is_file() else [])


def _results(payload_or_results: dict) -> dict:
    return payload_or_results.get("results", payload_or_results)


def paper_comparison(payload_or_results: dict) -> pd.DataFrame:
    """Per method: our h-mean and gap closed next to the paper's (NaN where the paper has none)."""
    results = _results(payload_or_results)
    gaps = gap_closed(results)
    zs, orc = PAPER_HMEAN["zero_shot"], PAPER_HMEAN["oracle"]
    rows = {m: {"h-mean": r["hmean"], "h-mean (paper)": PAPER_HMEAN.get(m, np.nan),
                "gap closed": gaps.get(m, np.nan),
                "gap closed (paper)": (PAPER_HMEAN[m] - zs) / (orc - zs) if m in PAPER_HMEAN else np.nan}
            for m, r in results.items()}
    return pd.DataFrame.from_dict(rows, orient="index")


def paper_per_domain(payload_or_results: dict, methods: Sequence[str] = ("zero_shot", "uniform", "semla", "oracle")
                     ) -> pd.DataFrame:
    """The paper's per-domain mIoU (PAPER_PER_DOMAIN) beside ours: one row per domain, columns
    (method, "paper") and (method, "here"), then SemLA minus uniform in each."""
    results = _results(payload_or_results)
    domains = list(PAPER_PER_DOMAIN)
    cols = {}
    for m in methods:
        cols[(m, "paper")] = [PAPER_PER_DOMAIN[d][m] for d in domains]
        cols[(m, "here")] = [results[m]["per_domain"][d] for d in domains]
    table = pd.DataFrame(cols, index=pd.Index(domains, name="domain"))
    for side in ("paper", "here"):
        table[("semla - uniform", side)] = table[("semla", side)] - table[("uniform", side)]
    return table


def per_domain_deltas(payload_or_results: dict, method: str = "semla") -> pd.DataFrame:
    """One row per domain: every method's mIoU, then `method` minus zero-shot and minus uniform, and
    oracle minus `method` (what is left), sorted by the gain over uniform (worst first)."""
    results = _results(payload_or_results)
    table = pd.DataFrame({m: r["per_domain"] for m, r in results.items()})
    out = table.copy()
    for base in ("zero_shot", "uniform"):
        if base in table and base != method:
            out[f"{method} - {base}"] = table[method] - table[base]
    if "oracle" in table:
        out[f"oracle - {method}"] = table["oracle"] - table[method]
    key = f"{method} - uniform" if f"{method} - uniform" in out else method
    return out.sort_values(key)


def failure_cases(payload_or_results: dict, method: str = "semla", baselines: Sequence[str] = ("uniform", "zero_shot"),
                  margin: float = 0.0) -> pd.DataFrame:
    """Domains where `method` scores below a baseline by more than `margin` mIoU points: the scores, the
    largest shortfall and which baselines beat it, worst first (empty frame if there is none)."""
    results = _results(payload_or_results)
    baselines = [b for b in baselines if b in results and b != method]
    rows = {}
    for d, score in results[method]["per_domain"].items():
        beaten_by = [b for b in baselines if results[b]["per_domain"].get(d, -np.inf) > score + margin]
        if beaten_by:
            short = max(results[b]["per_domain"][d] - score for b in beaten_by)
            rows[d] = {method: score, **{b: results[b]["per_domain"][d] for b in baselines},
                       "shortfall": round(short, 2), "beaten by": ", ".join(beaten_by)}
    cols = [method, *baselines, "shortfall", "beaten by"]
    return pd.DataFrame.from_dict(rows, orient="index", columns=cols).sort_values("shortfall", ascending=False)


def borrow_matrix(records: Iterable[dict], sources: Sequence[str] | None = None,
                  targets: Sequence[str] | None = None) -> pd.DataFrame:
    """Target x library domain: the mean fusion weight each target's images gave each library domain
    (0 when never retrieved). Rows sum to 1. Sources default to the library order of the records."""
    records = list(records)
    if not records:
        raise UsageError("borrow_matrix needs at least one selection record")
    sources = list(sources or records[0]["distances"])
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for r in records:
        row = sums.setdefault(r["target"], np.zeros(len(sources)))
        for name, w in zip(r["chosen"], r["weights"]):
            row[sources.index(name)] += w
        counts[r["target"]] = counts.get(r["target"], 0) + 1
    targets = list(targets or sums)
    return pd.DataFrame([sums[t] / counts[t] for t in targets], index=pd.Index(targets, name="target"),
                        columns=pd.Index(sources, name="library domain"))


def top_borrowed(matrix: pd.DataFrame, n: int = 3) -> pd.DataFrame:
    """The `n` library domains each target leans on most, as 'name (weight)' strings."""
    rows = {t: [f"{s} ({w:.2f})" for s, w in row.sort_values(ascending=False).head(n).items() if w > 0]
            for t, row in matrix.iterrows()}
    return pd.DataFrame.from_dict(rows, orient="index", columns=[f"#{i + 1}" for i in range(n)])


def retrieval_stats(records: Iterable[dict]) -> pd.DataFrame:
    """Per target: mean distance to its own centroid (when the library holds it) and to the nearest
    retrieved one, mean top-1 weight, effective number of adapters 1/sum(w^2), and the most frequent
    top-1 domain with its share of images."""
    by_target: dict[str, list[dict]] = {}
    for r in records:
        by_target.setdefault(r["target"], []).append(r)
    rows = {}
    for t, recs in by_target.items():
        top1 = pd.Series([r["chosen"][0] for r in recs]).value_counts()
        w = [np.asarray(r["weights"]) for r in recs]
        rows[t] = {"d own": np.mean([r["distances"][t] for r in recs]) if t in recs[0]["distances"] else np.nan,
                   "d top-1": np.mean([r["distances"][r["chosen"][0]] for r in recs]),
                   "w top-1": np.mean([x[0] for x in w]),
                   "effective K": np.mean([1.0 / (x ** 2).sum() for x in w]),
                   "usual top-1": top1.index[0], "share": top1.iloc[0] / len(recs), "images": len(recs)}
    return pd.DataFrame.from_dict(rows, orient="index")


def records_from_retrieval(retrieval, target: str, ids: Sequence[str] | None = None) -> list[dict]:
    """selections.jsonl-style records for a retrieval.Retrieval of Q queries (for borrow_matrix etc.)."""
    q = retrieval.indices.shape[0]
    ids = list(ids) if ids is not None else [f"{target}/{i}" for i in range(q)]
    return [{"image_id": ids[i], "target": target,
             "distances": {n: float(d) for n, d in zip(retrieval.names, retrieval.distances[i])},
             "chosen": [retrieval.names[j] for j in retrieval.indices[i].tolist()],
             "weights": [float(w) for w in retrieval.weights[i]]} for i in range(q)]
