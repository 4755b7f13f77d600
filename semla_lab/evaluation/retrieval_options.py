"""Retrieval options beyond the paper, measured (notebook 10): prototypes, the coverage fallback and
text-aware retrieval, each on its own and combined, against zero-shot, the uniform merge and SemLA.

Knobs are chosen on properties measured on the val split, never on the test table:
  own-domain accuracy   share of images whose nearest library domain is their own (nothing excluded)
  regret                leave-one-out: best other single adapter minus the single-adapter mIoU of each image's
                        top-1 retrieved domain, mean over images (single-adapter mIoU from `semla-lab transfer`)
  coverage              share of a domain's own images inside its coverage radius, and the base model's mean
                        weight on leave-one-out queries under the fallback
Then every variant is evaluated leave-one-out and on the held-out domains, for each adapter seed's library
(`study`), and the result is written as assets/benchmark/beyond.json.
"""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..models.clip import embed_class_names, index_embeddings
from ..core.io import atomic_write_json
from .config import EvalConfig
from .outputs import summarize
from .scoring import evaluate_target
from ..library.predictor import LibraryModel
from ..core.retrieval import DomainIndex, RetrievalConfig
from ..data.sources import load_target
from ..data.split import Split


def embed_targets(clip, targets: list[Split], embedder: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{target: (image embeddings (N, D) as the library's `embedder` made its centroids, class-name embeddings
    (T, D))}: the input of retrieval_properties."""
    return {t.name: (index_embeddings(clip, t.images.float().div(255), embedder), embed_class_names(clip, t.class_names))
            for t in targets}


def retrieval_properties(index: DomainIndex, embedded: dict, single: dict[str, dict[str, float]],
                         config: RetrievalConfig) -> dict:
    """Own-domain accuracy, leave-one-out top-1 regret and coverage of one retrieval config over targets that
    are library domains. `single[target][adapter]` is that adapter's mIoU alone on the target."""
    hits, regrets, inside, base = [], {}, [], []
    for name, (emb, text) in embedded.items():
        own = index.names.index(name)
        top = index.search(emb, replace(config, k=1, fallback="none"), class_text=text).indices[:, 0]
        hits.append((top == own).float())
        loo = index.search(emb, replace(config, k=1, fallback="none"), exclude=[name], class_text=text)
        others = {a: s for a, s in single[name].items() if a != name}
        retrieved = [others[index.names[i]] for i in loo.indices[:, 0].tolist()]
        regrets[name] = max(others.values()) - sum(retrieved) / len(emb)
        radius = index.radii(config.index)[own]
        inside.append((index.image_distances(emb, config)[:, own] <= radius).float())
        if config.fallback == "coverage":
            base.append(index.search(emb, config, exclude=[name], class_text=text).base_weights)
    out = {"own_accuracy": round(float(torch.cat(hits).mean()), 3),
           "regret": round(sum(regrets.values()) / len(regrets), 2),
           "worst_regret": max(regrets.items(), key=lambda kv: kv[1]),
           "own_inside_radius": round(float(torch.cat(inside).mean()), 3)}
    if base:
        out["mean_base_weight"] = round(float(torch.cat(base).mean()), 3)
    return out


def evaluate_variants(engine: LibraryModel, clip, targets: list[Split], variants: dict[str, EvalConfig],
                      progress: bool = False) -> dict[str, dict[str, float]]:
    """{target: {method: mIoU}}: zero-shot, uniform and SemLA once, then each variant's SemLA under its label."""
    base_cfg = next(iter(variants.values()))
    per_domain = {}
    for t in tqdm(targets, desc="targets", disable=not progress):
        scores, _ = evaluate_target(engine, clip, t, ["zero_shot", "uniform", "semla"], replace(base_cfg, **_paper()))
        for label, cfg in variants.items():
            extra, _ = evaluate_target(engine, clip, t, [cfg.extra_method], cfg)
            scores[label] = extra[cfg.extra_method]
        per_domain[t.name] = {m: round(s, 2) for m, s in scores.items()}
    return per_domain


def _paper() -> dict:
    return {"index": "centroid", "fallback": "none", "fallback_strength": 1.0, "text_weight": 0.0}


def study(segmenter, clip, libraries: dict[str, object], loo_targets: list[str], heldout_targets: list[str],
          variants: dict[str, EvalConfig], max_images: int | None = None, out: str | Path | None = None,
          device=None, progress: bool = True) -> dict:
    """Every variant on the leave-one-out and held-out targets, for each library (adapter seed):
    {"variants", "seeds": {seed: {"loo": results, "heldout": results}}, "mean": ...}; written to `out`."""
    loaded = {split: [load_target(t, max_images) for t in names]
              for split, names in (("loo", loo_targets), ("heldout", heldout_targets))}
    seeds = {}
    for seed, library in libraries.items():
        engine = LibraryModel(segmenter, library, device)
        seeds[seed] = {}
        for split, targets in loaded.items():
            per_domain = evaluate_variants(engine, clip, targets, variants, progress)
            seeds[seed][split] = summarize(per_domain, {t.name: len(t.images) for t in targets})
    payload = {"variants": {label: asdict(cfg) for label, cfg in variants.items()},
               "max_images": max_images, "seeds": seeds, "mean": mean_over_seeds(seeds)}
    if out is not None:
        atomic_write_json(Path(out), payload)
    return payload


CHOICE_RULE = ("prototypes: the k-means P and the GMM P with the highest val h-mean; text: the lambda with the highest "
               "val h-mean; fallback: the smallest beta whose worst val domain is at most 1 point below zero-shot (else "
               "the beta with the best worst domain); combination: the index kind and text weight that each beat SemLA's "
               "val h-mean, plus the fallback at its beta")


def val_rows(results: dict) -> dict[str, dict]:
    """{method: {"hmean", "worst_vs_zero_shot", "worst_domain"}} from val results.json-style `results`."""
    zs = results["zero_shot"]["per_domain"]
    rows = {}
    for m, r in results.items():
        gaps = {d: r["per_domain"][d] - zs[d] for d in zs}
        worst = min(gaps, key=gaps.get)
        rows[m] = {"hmean": r["hmean"], "worst_vs_zero_shot": round(gaps[worst], 2), "worst_domain": worst}
    return rows


def choose_options(rows: dict[str, dict]) -> list[dict]:
    """The options CHOICE_RULE picks from `val_rows` (labels as `EvalConfig.extra_method` writes them):
    [k-means, GMM, fallback, text, combination], each as EvalConfig fields."""
    def best(prefix):
        cands = [m for m in rows if m.startswith(prefix)]
        return max(cands, key=lambda m: (rows[m]["hmean"], -len(m)))

    kmeans, gmm, text = best("semla+kmeans:"), best("semla+gmm:"), best("semla+text")
    covs = sorted((m for m in rows if m.startswith("semla+coverage")), key=lambda m: float(m.removeprefix("semla+coverage")))
    safe = [m for m in covs if rows[m]["worst_vs_zero_shot"] >= -1]
    cov = safe[0] if safe else max(covs, key=lambda m: rows[m]["worst_vs_zero_shot"])
    fallback = {"fallback": "coverage", "fallback_strength": float(cov.removeprefix("semla+coverage"))}
    combo = {}
    index_pick = max((kmeans, gmm), key=lambda m: rows[m]["hmean"])
    if rows[index_pick]["hmean"] >= rows["semla"]["hmean"]:
        combo["index"] = index_pick.removeprefix("semla+")
    if rows[text]["hmean"] >= rows["semla"]["hmean"]:
        combo["text_weight"] = float(text.removeprefix("semla+text"))
    return [{"index": kmeans.removeprefix("semla+")}, {"index": gmm.removeprefix("semla+")}, fallback,
            {"text_weight": float(text.removeprefix("semla+text"))}, {**combo, **fallback}]


def mean_over_seeds(seeds: dict) -> dict:
    """{split: {method: {"hmean", "hmean_min", "hmean_max", "per_domain"}}}: per-domain mIoU averaged over seeds,
    h-mean of each seed then averaged."""
    out = {}
    for split in next(iter(seeds.values())):
        runs = [s[split] for s in seeds.values()]
        out[split] = {}
        for m in runs[0]:
            h = [r[m]["hmean"] for r in runs]
            domains = runs[0][m]["per_domain"]
            out[split][m] = {"hmean": round(sum(h) / len(h), 2), "hmean_min": min(h), "hmean_max": max(h),
                             "per_domain": {d: round(sum(r[m]["per_domain"][d] for r in runs) / len(runs), 2)
                                            for d in domains}}
    return out


def beyond_table(payload: dict, split: str) -> pd.DataFrame:
    """Methods as rows, domains as columns, then h-mean (mean over seeds) and its range over seeds."""
    rows = {m: {**r["per_domain"], "h-mean": r["hmean"], "h-mean min": r["hmean_min"], "h-mean max": r["hmean_max"]}
            for m, r in payload["mean"][split].items()}
    return pd.DataFrame.from_dict(rows, orient="index")


def deltas(payload: dict, split: str, over: str = "semla") -> pd.DataFrame:
    """Per-domain mIoU of every variant minus `over` (seed means): which domains each idea moves."""
    table = beyond_table(payload, split).drop(columns=["h-mean", "h-mean min", "h-mean max"])
    return table.drop(index=[m for m in ("zero_shot", "uniform", over) if m in table.index]) - table.loc[over]


def worst_below_zero_shot(payload: dict, split: str, method: str) -> tuple[str, float]:
    """(domain, method - zero-shot) of the domain where `method` falls furthest below zero-shot (seed means)."""
    r = payload["mean"][split]
    gaps = {d: r[method]["per_domain"][d] - r["zero_shot"]["per_domain"][d] for d in r["zero_shot"]["per_domain"]}
    d = min(gaps, key=gaps.get)
    return d, round(gaps[d], 2)

