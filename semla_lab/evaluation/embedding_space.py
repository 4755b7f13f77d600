"""The CLIP embedding space of the domains (notebook 04): embed_domains -> group_means (centroids; both at
once: domain_centroids), 2-D views (pca_project, umap_project), distances (distance_matrix,
compare_centroids), and how well the centroids tell domains apart (nearest_centroid_confusion,
nearest_centroid_accuracy, top_confusions).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..core.errors import UsageError
from ..core.retrieval import distances
from ..core.runtime import scoped_env


def embed_domains(clip, domains: Sequence[str], split: str = "train", count: int | None = 60,
                  normalize: bool = True) -> tuple[torch.Tensor, list[str]]:
    """The first `count` images (None: all) of `split` of each domain (a source name, sources.py), embedded
    by `clip`. Returns embeddings (N, D) (L2-normalised when `normalize`) and one domain name per row."""
    from ..data.sources import load_split
    from ..models.clip import embed_images
    embs, labels = [], []
    for source in domains:
        data = load_split(source, split, count)
        embs.append(embed_images(clip, data.images, normalize=normalize))
        labels += [data.name] * len(embs[-1])
    return torch.cat(embs), labels


def group_means(embeddings: torch.Tensor, labels: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """Per-label mean of embeddings (N, D): names in order of first appearance and centroids (L, D).
    Like the library, centroids are the plain mean (not re-normalised)."""
    if len(labels) != len(embeddings):
        raise UsageError(f"got {len(labels)} labels for {len(embeddings)} embeddings")
    names = list(dict.fromkeys(labels))
    lab = np.asarray(labels)
    return names, torch.stack([embeddings[torch.from_numpy(lab == n)].mean(0) for n in names])


def domain_centroids(clip, domains: Sequence[str], split: str = "train", count: int | None = None,
                     normalize: bool = True) -> torch.Tensor:
    """(L, D) centroid of each domain: the mean embedding of its first `count` `split` images (None: all),
    as a library's centroids are made from its domains' training images."""
    return group_means(*embed_domains(clip, domains, split, count, normalize))[1]


def pca_project(points: torch.Tensor, extra: torch.Tensor | None = None, k: int = 2
                ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """PCA fitted on points (N, D) by SVD: (points (N, k), extra projected the same way (M, k) or None,
    explained-variance ratio of the k components (k,)). Component signs are fixed (largest loading
    positive) so the picture does not flip between runs."""
    x = points.double()
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    comps = vh[:k]
    sign = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    comps = comps * sign
    ratio = (s[:k] ** 2 / (s ** 2).sum()).numpy()
    proj = lambda t: ((t.double() - mean) @ comps.T).numpy()
    return proj(x), None if extra is None else proj(extra), ratio


def umap_project(points: torch.Tensor, extra: torch.Tensor | None = None, n_neighbors: int = 15,
                 min_dist: float = 0.1, random_state: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """2-D UMAP of points (N, D) and `extra` (M, D) (e.g. centroids), fitted jointly on both.
    Deterministic (fixed random_state, one thread). The first call in a process compiles numba
    code (~20 s); NUMBA_CACHE_DIR points at a writable folder (unless set) while umap is imported and runs."""
    import warnings
    cache = os.environ.get("NUMBA_CACHE_DIR") or str(Path(tempfile.gettempdir()) / "semla_numba_cache")
    with scoped_env(NUMBA_CACHE_DIR=cache), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs value.*overridden.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        import umap
        x = points if extra is None else torch.cat([points, extra])
        reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, min_dist=min_dist,
                            random_state=random_state, n_jobs=1)
        out = reducer.fit_transform(x.double().numpy())
    return out[:len(points)], None if extra is None else out[len(points):]


def distance_matrix(a: torch.Tensor, names_a: Sequence[str], b: torch.Tensor | None = None,
                    names_b: Sequence[str] | None = None, metric: str = "euclidean") -> pd.DataFrame:
    """Distances between rows of a (L, D) and b (M, D) (default: a itself) as a labelled DataFrame."""
    b, names_b = (a, names_a) if b is None else (b, names_b)
    d = distances(a, b, metric).numpy()
    return pd.DataFrame(d, index=list(names_a), columns=list(names_b))


def nearest_centroid_confusion(queries: torch.Tensor, query_labels: Sequence[str], centroids: torch.Tensor,
                               names: Sequence[str], metric: str = "euclidean") -> tuple[float, pd.DataFrame]:
    """Assign each query (Q, D) to its nearest centroid. Returns the accuracy (fraction of queries
    whose nearest centroid carries their own label) and the confusion matrix as row fractions
    (rows: true domain, columns: nearest centroid; rows in order of first appearance)."""
    names = list(names)
    pred = distances(queries, centroids, metric).argmin(1).numpy()
    truth = list(dict.fromkeys(query_labels))
    conf = pd.DataFrame(0.0, index=truth, columns=names)
    for lab, p in zip(query_labels, pred):
        conf.loc[lab, names[p]] += 1
    hits = torch.tensor([names[p] == lab for lab, p in zip(query_labels, pred)], dtype=torch.float32)
    return float(hits.mean()), conf.div(conf.sum(axis=1), axis=0)


def nearest_centroid_accuracy(clip, domains: Sequence[str], train: int = 100, test: int = 50) -> float:
    """Share of `test` held-out images per domain whose nearest centroid (each from `train` training images)
    is their own domain's: what retrieval depends on."""
    queries, labels = embed_domains(clip, domains, "test", test)
    names, centroids = group_means(*embed_domains(clip, domains, "train", train))
    return nearest_centroid_confusion(queries, labels, centroids, names)[0]


def top_confusions(confusion: pd.DataFrame, n: int = 5) -> pd.DataFrame:
    """The n largest off-diagonal entries of a confusion DataFrame: columns true, predicted, fraction."""
    rows = [(t, p, float(confusion.loc[t, p])) for t in confusion.index for p in confusion.columns
            if t != p and confusion.loc[t, p] > 0]
    rows.sort(key=lambda r: (-r[2], r[0], r[1]))
    return pd.DataFrame(rows[:n], columns=["true", "predicted", "fraction"])


def compare_centroids(ours: torch.Tensor, reference: torch.Tensor, names: Sequence[str],
                      metric: str = "euclidean") -> pd.DataFrame:
    """Per domain: distance from our centroid to the reference centroid of the same domain, and to
    the nearest reference centroid of another domain (a small `to own` next to a large `to nearest
    other` means the two estimates agree well enough for retrieval)."""
    d = distances(ours, reference, metric)
    names = list(names)
    own = d.diagonal()
    other = d + torch.diag(torch.full((len(names),), float("inf")))
    return pd.DataFrame({"to own": own.numpy(), "to nearest other": other.min(1).values.numpy(),
                         "nearest other": [names[i] for i in other.argmin(1).tolist()]}, index=names)
