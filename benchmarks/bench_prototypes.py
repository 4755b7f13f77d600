"""Retrieval beyond the centroid: latency per query of semla_lab.core.retrieval.DomainIndex.search with P=4 k-means
prototypes, a 4-component diagonal GMM, and k-means with the coverage fallback and text-aware distances, next to
the paper's centroid index (the same DomainIndex.search, index 'centroid') on the same synthetic library, measured side by side
(interleaved runs). Libraries of 1,000 and 10,000 domains at D=64, K=5. Target: < 1 ms per single query with
4 prototypes per domain over 10,000 domains on one CPU thread.

Each search is checked against exhaustive exact distances (DomainIndex.image_distances + top-K) on 64 queries.
On a shared machine the CPU-time median (process time of the one-thread run) is the steadier number; the table
gives wall and CPU medians, and the target is judged on the CPU median with the wall median printed beside it.

    python benchmarks/bench_prototypes.py [--quick] [--json out.json]
"""
from __future__ import annotations

from common import (fmt_s, fmt_x, measure_interleaved, paired_ratio, parser, payload, setup, table, target_lines,
                    write_json)

import torch
import torch.nn.functional as F

from semla_lab.core.profiles import DomainProfile
from semla_lab.core.retrieval import DomainIndex, RetrievalConfig, top_k

P, D, K = 4, 64, 5
SIZES = (1_000, 10_000)
TARGET_S, TARGET_L = 1e-3, 10_000
CONFIGS = {"kmeans:4": RetrievalConfig(k=K, index="kmeans:4"), "gmm:4": RetrievalConfig(k=K, index="gmm:4"),
           "kmeans:4 + coverage + text 0.3": RetrievalConfig(k=K, index="kmeans:4", fallback="coverage",
                                                             text_weight=0.3)}


def synthetic_index(n: int, seed: int = 0) -> DomainIndex:
    """n domains of P unit-norm prototypes each (k-means and GMM means alike), GMM variances 0.01, coverage radii
    0.4, random vocabulary embeddings."""
    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(n, P, D, generator=g), dim=-1)
    centroids = F.normalize(means.mean(1), dim=-1)
    vocab = F.normalize(torch.randn(n, D, generator=g), dim=-1)
    gmm = {"variances": torch.full((P, D), 0.01), "log_weights": torch.full((P,), -torch.log(torch.tensor(P)).item()),
           "scale2": torch.tensor([0.01]), "nll_floor": torch.tensor([-150.0])}
    names = [f"domain{i:05d}" for i in range(n)]
    profiles = {name: DomainProfile(centroids[i], 100,
                                    {"kmeans:4": {"means": means[i]}, "gmm:4": {"means": means[i], **gmm}},
                                    {"centroid": 0.5, "kmeans:4": 0.4, "gmm:4": 0.4}, vocab[i])
                for i, name in enumerate(names)}
    return DomainIndex(centroids, names, profiles)


def same_as_exhaustive(index: DomainIndex, cfg: RetrievalConfig, text: torch.Tensor, seed: int = 7) -> bool:
    """search's top-K equals the top-K of exact distances to every domain, on 64 queries."""
    q = F.normalize(torch.randn(64, D, generator=torch.Generator().manual_seed(seed)), dim=-1)
    exact = index.image_distances(q, cfg)
    if cfg.text_weight:
        exact = (1 - cfg.text_weight) * exact + cfg.text_weight * index.text_distances(text)
    return bool(torch.equal(index.search(q, cfg, class_text=text).indices, top_k(exact, cfg.k)[1]))


def measure_size(n: int, device: torch.device, reps: int) -> list[dict]:
    index = synthetic_index(n)
    g = torch.Generator().manual_seed(1)
    q1, qb = F.normalize(torch.randn(1, D, generator=g), dim=-1), F.normalize(torch.randn(64, D, generator=g), dim=-1)
    text = F.normalize(torch.randn(19, D, generator=g), dim=-1)
    rows = []
    for batch, q in (("1 query", q1), ("batch of 64", qb)):
        fns = {"centroid (paper)": lambda q=q: index.search(q, RetrievalConfig(k=K))}
        fns.update({name: (lambda q=q, cfg=cfg: index.search(q, cfg, class_text=text))
                    for name, cfg in CONFIGS.items()})
        times = measure_interleaved(fns, device, reps)
        base = times["centroid (paper)"]
        for name, t in times.items():
            rows.append({"n_domains": n, "queries": batch, "index": name, "wall_s": t.median / len(q),
                         "cpu_s": t.cpu_median / len(q), "cpu_ratio_to_centroid": paired_ratio(t, base, cpu=True),
                         "same_as_exhaustive": None if name.startswith("centroid") else
                         same_as_exhaustive(index, CONFIGS[name], text)})
    return rows


def main(argv=None) -> dict:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    device = setup(args)
    sizes = (1_000, TARGET_L) if not args.quick else (100, TARGET_L)
    reps = 5 if args.quick else 50
    print(f"DomainIndex.search on {device} ({torch.get_num_threads()} torch thread(s)), P={P}, D={D}, K={K}; "
          "medians per query after warm-up, runs interleaved.\n")
    rows = [r for n in sizes for r in measure_size(n, device, reps)]
    print(table(rows, [("n_domains", "domains", lambda v: f"{v:,}"), ("queries", "queries", None),
                       ("index", "index", None),
                       ("wall_s", "wall / query", fmt_s), ("cpu_s", "CPU / query", fmt_s),
                       ("cpu_ratio_to_centroid", "CPU x centroid", fmt_x),
                       ("same_as_exhaustive", "top-K = exhaustive", None)],
                title="retrieval with prototypes, GMMs, coverage and text") + "\n")
    r = next(r for r in rows if r["n_domains"] == TARGET_L and r["queries"] == "1 query" and r["index"] == "kmeans:4")
    targets = [{"name": f"DomainIndex.search kmeans:4, single query, {TARGET_L:,} domains, D={D}, {device.type}",
                "goal": "< 1 ms", "measured": f"{fmt_s(r['cpu_s'])} CPU ({fmt_s(r['wall_s'])} wall)",
                "value": r["cpu_s"], "met": r["cpu_s"] < TARGET_S}]
    print(target_lines(targets))
    out = payload("prototypes", device, args.quick, rows, targets, k=K, prototypes=P, dim=D)
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
