"""Domain shift of images against an adapter library, measured: how far each image lies from the library's
domains, how that compares with the library's own images, which domains SemLA borrows from and how much;
`ShiftAnalysis` holds the result of workflows/analyze.py (`semla-lab analyze`, notebook 12), which
report_html.py renders.

Per image: the K retrieved domains with distances and weights, the distance to the nearest centroid, and its
**coverage**: the share of the library's in-domain reference distances that are at least as large. The
reference distances are those of held-out images of each library domain (REFERENCE_COUNT mini-world test
images, regenerated deterministically) to their own domain's centroid; coverage 1 = as close as the closest
in-domain images, 0 = farther than all of them. A library domain that is not a mini-world domain (name,
dataset and factors of a shipped spec) has no regenerable images: it is listed in `Reference.missing`, and
without any reference coverage is NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..models.clip import index_embeddings
from ..core.retrieval import Retrieval, distances


REFERENCE_COUNT = 64        # held-out test images per library domain for the in-domain distances
UMAP_MIN_POINTS = 100       # fewer points on the map: PCA (UMAP's neighbourhoods need a crowd)


@dataclass
class Reference:
    """In-domain reference: embeddings (M, D) of held-out images of the library's domains, their domain
    names (M,), their distances (M,) to their own domain's centroid; domains without images in `missing`."""
    embeddings: torch.Tensor
    domains: list[str]
    distances: torch.Tensor
    missing: list[str]


def regenerable_spec(library, name: str):
    """The shipped mini-world spec whose images built this library domain, or None (other data)."""
    from ..data.world.generate import shipped_domains
    spec = shipped_domains().get(name)
    meta = library.get(name).metadata
    if spec is None or meta.get("dataset") != spec.dataset or meta.get("factors", {}) != spec.factors:
        return None
    return spec


def in_domain_reference(clip, library, names: Sequence[str], count: int = REFERENCE_COUNT,
                        progress: bool = False) -> Reference:
    """Embed `count` held-out test images of each of `names` (library domains) and measure each one's
    distance to its own domain's centroid (the library's metric is Euclidean on the embeddings)."""
    from ..data.world.generate import generate
    embs, domains, dists, missing = [], [], [], []
    for name in tqdm(list(names), desc="in-domain reference", disable=not progress):
        spec = regenerable_spec(library, name)
        if spec is None:
            missing.append(name)
            continue
        emb = index_embeddings(clip, generate(spec, "test", count).images, library.embedder)
        embs.append(emb)
        domains += [name] * len(emb)
        dists.append(distances(emb, library.centroids([name]))[:, 0])
    dim = library.dim
    return Reference(torch.cat(embs) if embs else torch.zeros(0, dim), domains,
                     torch.cat(dists) if dists else torch.zeros(0), missing)


def coverage_scores(nearest: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(N,) share of the reference distances (M,) that are >= each image's nearest distance (N,); NaN when
    there is no reference."""
    if reference.numel() == 0:
        return torch.full(nearest.shape, math.nan, dtype=torch.float64)
    return (reference.double()[None, :] >= nearest.double()[:, None]).double().mean(1)


def borrowed(retrieval: Retrieval) -> pd.DataFrame:
    """Per library domain: `weight share` (its summed fusion weights over all images / number of images, so
    the shares sum to 1) and `top-1 images` (how many images have it nearest); most borrowed first, domains
    never retrieved left out."""
    n, names = len(retrieval.indices), retrieval.names
    share = torch.zeros(len(names), dtype=torch.float64).index_add_(
        0, retrieval.indices.flatten(), retrieval.weights.double().flatten()) / max(n, 1)
    top1 = torch.bincount(retrieval.indices[:, 0], minlength=len(names))
    table = pd.DataFrame({"weight share": share.numpy(), "top-1 images": top1.numpy()}, index=pd.Index(names, name="domain"))
    return table[table["weight share"] > 0].sort_values(["weight share", "top-1 images"], ascending=False, kind="stable")


def spread_sample(values: np.ndarray, n: int) -> list[int]:
    """Up to n positions into `values`, evenly spaced over their sorted order (smallest to largest)."""
    order = np.argsort(values, kind="stable")
    if n <= 0 or len(order) == 0:
        return []
    picks = np.unique(np.round(np.linspace(0, len(order) - 1, min(n, len(order)))).astype(int))
    return [int(order[p]) for p in picks]


@dataclass
class ShiftAnalysis:
    """The result. `table`: one row per file, analysed or skipped (what images.csv holds); `retrieval` and
    `embeddings` (N, D): one row per analysed image, in table order; `masks`: file -> {method: (H, W)}
    for the mask sample; `miou`: method -> mIoU over the labelled images (None without labels)."""
    table: pd.DataFrame
    embeddings: torch.Tensor
    retrieval: Retrieval
    reference: Reference
    excluded: list[str]
    classes: list[str] | None = None
    masks: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    miou: pd.Series | None = None

    @property
    def analysed(self) -> pd.DataFrame:
        return self.table[self.table["status"] == "analysed"]

    @property
    def skipped(self) -> pd.DataFrame:
        return self.table[self.table["status"] == "skipped"][["file", "reason"]]

    @property
    def domains(self) -> list[str]:
        """The library domains retrieval could choose (all but the excluded)."""
        return [n for n in self.retrieval.names if n not in self.excluded]

    def borrowed(self) -> pd.DataFrame:
        return borrowed(self.retrieval)

    def least_covered(self, n: int = 12) -> pd.DataFrame:
        """The n analysed images farthest from their nearest centroid."""
        return self.analysed.sort_values("nearest_distance", ascending=False, kind="stable").head(n)

    def reference_quantile(self, q: float) -> float:
        d = self.reference.distances
        return float(torch.quantile(d.double(), q)) if d.numel() else math.nan

    def summary(self) -> list[str]:
        """A few lines for people: counts, distances against the in-domain ones, borrowing, mIoU."""
        ok, d = self.analysed, self.analysed["nearest_distance"]
        lines = [f"analysed {len(ok)} image(s) against {len(self.domains)} library domains"
                 + (f" ({', '.join(self.excluded)} excluded)" if self.excluded else "")
                 + (f"; skipped {len(self.skipped)} unreadable file(s), listed with the reason" if len(self.skipped) else "")]
        lines.append(f"distance to the nearest centroid: median {d.median():.3f} (min {d.min():.3f}, max {d.max():.3f})")
        if self.reference.distances.numel():
            p95 = self.reference_quantile(0.95)
            beyond = int((d > p95).sum())
            lines.append(f"the library's own held-out images lie at median {self.reference_quantile(0.5):.3f} from their "
                         f"centroid (95th percentile {p95:.3f}); {beyond} of {len(ok)} image(s) "
                         f"({100 * beyond / len(ok):.0f}%) lie beyond it: poorly covered")
        else:
            lines.append("no in-domain reference: the library's domains are not mini-world domains, so their images "
                         "cannot be regenerated; coverage is not computed")
        if self.reference.missing and self.reference.distances.numel():
            lines.append(f"in-domain reference without {', '.join(self.reference.missing)} (not mini-world domains)")
        top = self.borrowed().head(3)
        lines.append("most borrowed: " + ", ".join(f"{name} {100 * row['weight share']:.0f}%" for name, row in top.iterrows()))
        if self.miou is not None:
            n = int(ok["label"].notna().sum())
            lines.append(f"mIoU over {n} labelled image(s): " + ", ".join(f"{m} {v:.1f}" for m, v in self.miou.items()))
        return lines


def map_coordinates(analysis: ShiftAnalysis, centroids: torch.Tensor) -> dict:
    """2-D coordinates for the map: the reference images, the analysed images and the library's centroids
    (rows of `centroids` in `analysis.retrieval.names` order), fitted jointly; UMAP with at least
    UMAP_MIN_POINTS points, PCA otherwise. Returns {"method", "reference", "images", "centroids"}."""
    from .embedding_space import pca_project, umap_project
    points = torch.cat([analysis.reference.embeddings, analysis.embeddings])
    if len(points) + len(centroids) >= UMAP_MIN_POINTS:
        xy, cxy = umap_project(points, centroids)
        method = "UMAP"
    else:
        xy, cxy, _ = pca_project(torch.cat([points, centroids]), centroids)
        xy, method = xy[:len(points)], "PCA"
    m = len(analysis.reference.embeddings)
    return {"method": method, "reference": xy[:m], "images": xy[m:], "centroids": cxy}


