"""`semla-lab analyze`: a user's image files against an adapter library. Read and embed them in batches,
retrieve once per image, compare each with the library's in-domain reference (evaluation/domain_shift.py),
and given class names segment a sample (and every image with a label mask) zero-shot and with SemLA.
Notebook 12 uses it; evaluation/report_html.py renders the result.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..core.errors import UsageError
from ..core.retrieval import Retrieval
from ..evaluation.domain_shift import (Reference, ShiftAnalysis, coverage_scores, in_domain_reference,
                                       spread_sample)
from ..models.clip import check_embedder


METHODS = ("zero-shot", "SemLA")


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
