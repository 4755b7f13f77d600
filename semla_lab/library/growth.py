"""Growth orders for an adapter library: in which order to add a pool's domains.

Coverage is what retrieval depends on: how far a target's images lie from their nearest library
centroid. With unlabelled images of the targets (embeddings, no labels), active growth adds, at each
step, the pool domain whose centroid most lowers the targets' coverage distance

    coverage(S) = mean over targets t of  mean over images x of t  of  min_{c in S} d(x, c)

(a greedy k-median; each target counts equally, whatever its image count). Random orders are the
baseline. Pure functions of tensors and names; notebook 11 compares the two on one curve.
"""
from __future__ import annotations

import random
from typing import Sequence

import torch

from ..core.errors import UsageError
from ..core.retrieval import distances


def _check_queries(queries: Sequence[torch.Tensor]) -> None:
    if not queries or any(q.dim() != 2 or len(q) == 0 for q in queries):
        raise UsageError("coverage needs, for every target, a non-empty (N, D) tensor of image embeddings")


def _per_target_mean(nearest: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Rows of `nearest` (Q, ...) grouped by target (consecutive blocks of `sizes`) -> the mean over
    targets of each block's mean, shape (...)."""
    return torch.stack([block.mean(0) for block in nearest.split(sizes)]).mean(0)


def coverage(queries: Sequence[torch.Tensor], centroids: torch.Tensor, metric: str = "euclidean") -> float:
    """Mean over targets of the mean distance of their images (each (N_t, D)) to the nearest centroid (L, D)."""
    _check_queries(queries)
    nearest = distances(torch.cat(list(queries)), centroids, metric).min(1).values
    return float(_per_target_mean(nearest, [len(q) for q in queries]))


def coverage_gains(queries: Sequence[torch.Tensor], library: torch.Tensor, candidates: torch.Tensor,
                   metric: str = "euclidean") -> torch.Tensor:
    """(P,) coverage of the library (S, D) plus each candidate (P, D) alone; S may be 0 (empty library)."""
    _check_queries(queries)
    flat = torch.cat(list(queries))
    to_candidates = distances(flat, candidates, metric)                              # (Q, P)
    if len(library):
        to_candidates = torch.minimum(to_candidates, distances(flat, library, metric).min(1, keepdim=True).values)
    return _per_target_mean(to_candidates, [len(q) for q in queries])


def active_order(queries: Sequence[torch.Tensor], centroids: torch.Tensor, names: Sequence[str],
                 metric: str = "euclidean") -> list[str]:
    """All `names` (one per centroid row) in greedy coverage order: each next domain is the one whose
    centroid leaves the targets nearest to the library; ties go to the earlier name."""
    if len(names) != len(centroids):
        raise UsageError(f"active_order got {len(names)} names for {len(centroids)} centroids")
    chosen: list[int] = []
    remaining = list(range(len(names)))
    while remaining:
        scores = coverage_gains(queries, centroids[chosen], centroids[remaining], metric)
        chosen.append(remaining.pop(int(scores.argmin())))
    return [names[i] for i in chosen]


def random_order(names: Sequence[str], seed: int) -> list[str]:
    """`names` shuffled by random.Random(seed)."""
    return random.Random(seed).sample(list(names), len(names))


def coverage_curve(queries: Sequence[torch.Tensor], centroids: dict[str, torch.Tensor], order: Sequence[str],
                   sizes: Sequence[int], metric: str = "euclidean") -> dict[int, float]:
    """Coverage of the first `size` domains of `order` for each size (centroids by name, each (D,))."""
    if max(sizes) > len(order) or min(sizes) < 1:
        raise UsageError(f"sizes must lie in [1, {len(order)}], got {list(sizes)}")
    return {s: coverage(queries, torch.stack([centroids[n] for n in order[:s]]), metric) for s in sizes}
