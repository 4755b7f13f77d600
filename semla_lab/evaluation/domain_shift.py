"""Domain shift of a user's images against an adapter library: how far each image lies from the library's
domains, how that compares with the library's own images, which domains SemLA borrows from and how much,
and, given class names, what adaptation changes in the masks (mIoU per method when label masks exist).
`semla-lab analyze` and notebook 12 use it; report_html.py renders the result.

Per image: the K retrieved domains with distances and weights (one retrieval, SemLAPredictor in batches),
the distance to the nearest centroid, and its **coverage**: the share of the library's in-domain reference
distances that are at least as large. The reference distances are those of held-out images of each library
domain (REFERENCE_COUNT mini-world test images, regenerated deterministically) to their own domain's
centroid; coverage 1 = as close as the closest in-domain images, 0 = farther than all of them. A library
domain that is not a mini-world domain (name, dataset and factors of a shipped spec) has no regenerable
images: it is listed in `Reference.missing`, and without any reference coverage is NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..models.clip import check_embedder, index_embeddings
from ..core.errors import UsageError
from ..core.retrieval import Retrieval, distances

REFERENCE_COUNT = 64        # held-out test images per library domain for the in-domain distances
UMAP_MIN_POINTS = 100       # fewer points on the map: PCA (UMAP's neighbourhoods need a crowd)
METHODS = ("zero-shot", "SemLA")


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


def _retrieved(chosen: list[tuple[str, float, float]]) -> dict:
    row = {"nearest_domain": chosen[0][0], "nearest_distance": chosen[0][1]}
    for k, (name, dist, weight) in enumerate(chosen, start=1):
        row.update({f"domain_{k}": name, f"distance_{k}": dist, f"weight_{k}": weight})
    return row


def _masks(predictor, images: list[torch.Tensor], retrieval: Retrieval, classes: list[str]) -> dict[str, list]:
    predictor.set_image_batch(images, retrieval=retrieval)
    return {"zero-shot": predictor.predict_batch(classes, adapt=False), "SemLA": predictor.predict_batch(classes)}


def _take(retrieval: Retrieval, rows: Sequence[int]) -> Retrieval:
    rows = torch.as_tensor(list(rows), dtype=torch.long)
    return Retrieval(retrieval.indices[rows], retrieval.weights[rows], retrieval.distances[rows], retrieval.names)


def analyze_images(paths: Sequence[str | Path], predictor, classes: Sequence[str] | None = None,
                   labels: str | Path | None = None, exclude: Sequence[str] = (), max_images: int | None = None,
                   sample: int = 4, reference: Reference | None = None, ignore: str | Path | None = None,
                   progress: bool = True) -> ShiftAnalysis:
    """Analyse the images that `paths` name (files, folders, globs; see user_images.find_files) with a
    SemLAPredictor: embed `predictor.batch_size` images at a time, retrieve once per image, compare with
    the in-domain reference. With `classes`, also segment `sample` images (spread from best to worst
    covered) zero-shot and with SemLA, each at its own resolution; with `labels` (a folder of masks named
    like the images, ids into `classes`), segment every labelled image and measure mIoU per method.
    Unreadable files are skipped and listed; `max_images` stops after that many analysed images. `reference`
    (in_domain_reference of the domains not excluded) is computed when not given."""
    from ..data.datasets import read_label
    from ..core.metrics import MIoU, batched_miou
    from ..data.user_images import find_files, match_labels, read_images
    if labels is not None and not classes:
        raise UsageError("--labels needs --classes: the class names that the mask ids refer to")
    if max_images is not None and max_images < 1:
        raise UsageError(f"max_images must be >= 1, got {max_images}")
    classes = list(classes) if classes else None
    files = find_files(paths, ignore)
    pairs = match_labels(labels, files) if labels is not None else {}
    names = predictor.library.names()
    unknown = [e for e in exclude if e not in names]
    if unknown:
        raise UsageError(f"cannot exclude {', '.join(unknown)}: not in the library ({', '.join(names)})")
    allowed = [n for n in names if n not in exclude]
    if reference is None:
        reference = in_domain_reference(predictor.clip, predictor.library, allowed, progress=progress)
    elif set(reference.domains) | set(reference.missing) != set(allowed):
        raise UsageError("the reference covers other domains than the library's not excluded ones; "
                         "compute it with in_domain_reference(clip, library, those domains)")
    rows, embeddings, parts = [], [], []
    meters = {m: MIoU(len(classes), per_image=True) for m in METHODS} if pairs else {}
    batch: list[tuple[dict, Path, torch.Tensor]] = []      # (its row, file, image) until the batch is full

    def flush():
        retrieval = predictor.set_image_batch([image for _, _, image in batch], exclude=exclude)
        embeddings.append(predictor.embeddings)
        parts.append(retrieval)
        for q, (row, _, _) in enumerate(batch):
            row.update(_retrieved(retrieval.chosen(q)))
        labelled = [q for q, (_, file, _) in enumerate(batch) if file in pairs]
        if labelled:
            masks = _masks(predictor, [batch[q][2] for q in labelled], _take(retrieval, labelled), classes)
            for j, q in enumerate(labelled):
                row, file, image = batch[q]
                label = read_label(pairs[file], len(classes), tuple(image.shape[1:]))
                for m in METHODS:
                    meters[m].update([masks[m][j]], [label])
                row["label"] = str(pairs[file])
        batch.clear()

    analysed = 0
    with tqdm(total=len(files), desc="analysing", unit="file", disable=not progress) as bar:
        for file, image, skipped in read_images(files):
            bar.update()
            if skipped is not None:
                rows.append({"file": skipped.file, "status": "skipped", "reason": skipped.reason})
                continue
            rows.append({"file": str(file), "status": "analysed", "reason": "", "width": image.shape[2],
                         "height": image.shape[1]})
            batch.append((rows[-1], file, image))
            analysed += 1
            if len(batch) == predictor.batch_size or analysed == max_images:
                flush()
            if analysed == max_images:
                break
    if batch:
        flush()
    if not analysed:
        raise UsageError(f"none of the {len(files)} file(s) could be read as an image; "
                         f"first: {rows[0]['file']}: {rows[0]['reason']}")
    retrieval = Retrieval(torch.cat([p.indices for p in parts]), torch.cat([p.weights for p in parts]),
                          torch.cat([p.distances for p in parts]), parts[0].names)
    table = pd.DataFrame(rows).astype({"width": "Int64", "height": "Int64"})      # blank for skipped files
    ok = (table["status"] == "analysed").to_numpy()
    table.insert(table.columns.get_loc("nearest_distance") + 1, "coverage", np.nan)
    table.loc[ok, "coverage"] = coverage_scores(torch.tensor(table.loc[ok, "nearest_distance"].to_numpy()),
                                                reference.distances).numpy()
    miou = None
    if "label" in table:                  # some analysed image had a mask (max_images may stop before any)
        for m in METHODS:
            per_image = batched_miou(meters[m].image_confusions).numpy()
            table.loc[table["label"].notna().to_numpy(), f"miou_{m.lower().replace('-', '_')}"] = per_image
        miou = pd.Series({m: meters[m].compute()["miou"] for m in METHODS}, name="mIoU")
    result = ShiftAnalysis(table, torch.cat(embeddings), retrieval, reference, list(exclude), classes, miou=miou)
    if classes:
        ok_rows = np.flatnonzero(ok)
        picks = spread_sample(table.loc[ok, "nearest_distance"].to_numpy(), sample)
        files_picked = [table.loc[ok_rows[p], "file"] for p in picks]
        images = [image for _, image, _ in read_images(Path(f) for f in files_picked)]
        masks = _masks(predictor, images, _take(retrieval, picks), classes)
        result.masks = {f: {m: masks[m][j] for m in METHODS} for j, f in enumerate(files_picked)}
    return result


def map_coordinates(analysis: ShiftAnalysis, centroids: torch.Tensor) -> dict:
    """2-D coordinates for the map: the reference images, the analysed images and the library's centroids
    (rows of `centroids` in `analysis.retrieval.names` order), fitted jointly; UMAP with at least
    UMAP_MIN_POINTS points, PCA otherwise. Returns {"method", "reference", "images", "centroids"}."""
    from .analysis import pca_project, umap_project
    points = torch.cat([analysis.reference.embeddings, analysis.embeddings])
    if len(points) + len(centroids) >= UMAP_MIN_POINTS:
        xy, cxy = umap_project(points, centroids)
        method = "UMAP"
    else:
        xy, cxy, _ = pca_project(torch.cat([points, centroids]), centroids)
        xy, method = xy[:len(points)], "PCA"
    m = len(analysis.reference.embeddings)
    return {"method": method, "reference": xy[:m], "images": xy[m:], "centroids": cxy}


def analyze(paths: Sequence[str | Path], classes: Sequence[str] | None = None, labels: str | Path | None = None,
            library: str | Path | None = None, exclude: Sequence[str] = (), max_images: int | None = None,
            progress: bool = True, **kwargs) -> pd.DataFrame:
    """The analysis of `semla-lab analyze` as one DataFrame (the rows of images.csv), with the shipped tiny
    CLIP and segmenter and the shipped library (or `library`, which must be built on the tiny CLIP).
    Keyword arguments go to analyze_images (e.g. sample, reference)."""
    from ..library.predictor import SemLAPredictor
    predictor = SemLAPredictor.from_assets(library)
    check_embedder(predictor.clip, predictor.library.embedder, f"library {predictor.library.root}")
    return analyze_images(paths, predictor, classes, labels, exclude, max_images, progress=progress, **kwargs).table
