"""The methods that SemLA is compared with, in one registry: how each picks adapters for a batch.

  zero_shot      the base segmenter, no adapter
  oracle         the target domain's own adapter (only when the library holds it)
  uniform        every library adapter but the excluded ones, merged with equal weights (weight level)
  semla          per-image top-K retrieval, softmax(1/d / tau) weights, weight-level fusion
  semla_late     the same adapters and weights, mixing output probabilities instead
  uniform_late   the uniform merge's adapters and weights, output-level
  semla+<opts>   SemLA with options beyond the paper (retrieval.py: index kmeans:P / gmm:P, coverage
                 fallback, text weight), named by RetrievalConfig.label, e.g. semla+kmeans:4+coverage1+text0.3
Leave-one-out evaluation excludes the target's own adapter from retrieval and the uniform merge; the
benchmark (experiments.py), the notebooks' per-image views and analysis.method_masks all dispatch here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import pandas as pd
import torch

from ..models.clip import index_embeddings
from ..models.segmenter import class_text
from ..core.errors import UsageError
from ..core.metrics import MIoU
from ..library.predictor import LibraryModel
from ..core.retrieval import DomainIndex, Retrieval, RetrievalConfig


@dataclass
class Batch:
    """What every method sees: images (B, 3, H, W) float in [0, 1], class-name embeddings (T, D), the
    batch's retrieval, the target's own domain (None when unknown), the excluded library domains and the
    retrieval with options beyond the paper (None when none are on)."""
    model: LibraryModel
    images: torch.Tensor
    text: torch.Tensor
    retrieval: Retrieval
    own: str | None = None
    exclude: Sequence[str] = ()
    fusion: str = "cat"
    beyond: Retrieval | None = None

    def uniform(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices (B, L') of every library adapter but the excluded ones, and equal weights (B, L')."""
        keep = torch.tensor([i for i, d in enumerate(self.model.names) if d not in self.exclude])
        idx = keep.expand(len(self.images), -1)
        return idx, torch.full(idx.shape, 1.0 / idx.shape[1])


def _zero_shot(b: Batch):
    return b.model.logits(b.images, b.text)


def _oracle(b: Batch):
    if b.own is None or b.own not in b.model.names:
        return None
    n = len(b.images)
    return b.model.logits(b.images, b.text, torch.full((n, 1), b.model.names.index(b.own)), torch.ones(n, 1))


def _uniform(b: Batch):
    return b.model.logits(b.images, b.text, *b.uniform())


def _uniform_late(b: Batch):
    return b.model.late_logits(b.images, b.text, *b.uniform())


def _semla(b: Batch):
    return b.model.logits(b.images, b.text, b.retrieval.indices, b.retrieval.weights, b.fusion)


def _semla_late(b: Batch):
    return b.model.late_logits(b.images, b.text, b.retrieval.indices, b.retrieval.weights)


def _semla_beyond(b: Batch):
    return b.model.logits(b.images, b.text, b.beyond.indices, b.beyond.weights, b.fusion)


# name -> (B, T, H, W) logits of a Batch, or None where the method does not apply (oracle off-library)
REGISTRY: dict[str, Callable[[Batch], torch.Tensor | None]] = {
    "zero_shot": _zero_shot, "uniform": _uniform, "semla": _semla, "semla_late": _semla_late,
    "uniform_late": _uniform_late, "oracle": _oracle}
METHODS = tuple(REGISTRY)
LABELS = {"zero_shot": "zero-shot", "uniform": "uniform", "semla": "SemLA", "semla_late": "SemLA late",
          "uniform_late": "uniform late", "oracle": "oracle"}      # for plot titles


def is_beyond(method: str) -> bool:
    """A `semla+<opts>` method: SemLA with options beyond the paper."""
    return method.startswith("semla+")


def check_methods(methods: Sequence[str]) -> list[str]:
    unknown = [m for m in methods if m not in REGISTRY and not is_beyond(m)]
    if unknown:
        raise UsageError(f"unknown method(s) {unknown}; expected some of {list(METHODS)}")
    return list(methods)


def method_logits(method: str, batch: Batch) -> torch.Tensor | None:
    check_methods([method])
    return _semla_beyond(batch) if is_beyond(method) else REGISTRY[method](batch)


@torch.no_grad()
def predict_batch(model: LibraryModel, clip, images: torch.Tensor, text: torch.Tensor, methods: Sequence[str],
                  retrieval: RetrievalConfig = RetrievalConfig(), fusion: str = "cat", own: str | None = None,
                  exclude: Sequence[str] = (), embedder: tuple | None = None, beyond: RetrievalConfig | None = None,
                  index: DomainIndex | None = None) -> tuple[dict[str, torch.Tensor], Batch, dict[str, float]]:
    """Predicted masks (B, H, W) per applicable method for images (B, 3, H, W) (uint8 or float in
    [0, 1]), the Batch (its retrieval over every library domain but `exclude`), and seconds per stage
    (embed, retrieve, then each method). `embedder` = (CLIP, centroids in library order) retrieves with
    another embedding model than the library's. `beyond` (a config with options beyond the paper) adds the
    retrieval that a `semla+<opts>` method uses; `index` reuses a DomainIndex of the library over model.names.
    """
    check_methods(methods)
    x = images.float().div(255) if images.dtype == torch.uint8 else images.float()
    t0 = time.perf_counter()
    if embedder is None:
        emb = model.embed(clip, x)
        index = index or DomainIndex.from_library(model.library, model.names)
    else:
        emb, index = index_embeddings(embedder[0], x, model.library.embedder), DomainIndex(embedder[1], model.names)
    t1 = time.perf_counter()
    ret = index.search(emb, retrieval, exclude=list(exclude))
    seconds = {"embed": t1 - t0, "retrieve": time.perf_counter() - t1}
    extra = index.search(emb, beyond, list(exclude), class_text=text) if beyond is not None else None
    batch = Batch(model, x, text, ret, own, list(exclude), fusion, extra)
    masks = {}
    for m in methods:
        ts = time.perf_counter()
        logits = method_logits(m, batch)
        if logits is not None:
            masks[m] = logits.argmax(1).cpu()
            seconds[m] = time.perf_counter() - ts
    return masks, batch, seconds


def method_predictions(model: LibraryModel, clip, images: torch.Tensor, class_names: Sequence[str],
                       methods: Sequence[str] = ("zero_shot", "uniform", "semla", "oracle"),
                       retrieval: RetrievalConfig = RetrievalConfig(), fusion: str = "cat", own: str | None = None,
                       exclude: Sequence[str] = ()) -> tuple[dict[str, torch.Tensor], Retrieval]:
    """`predict_batch` with class names: masks (N, H, W) per method and the SemLA Retrieval. Pass the
    target's name as `exclude` for leave-one-out, and as `own` for the oracle."""
    masks, batch, _ = predict_batch(model, clip, images, class_text(model.model, clip, class_names), methods,
                                    retrieval, fusion, own, exclude)
    return masks, batch.retrieval


def per_image_miou(predictions: dict[str, torch.Tensor], labels: torch.Tensor, num_classes: int) -> pd.DataFrame:
    """Images x methods: the mIoU (0-100) of every predicted mask (N, H, W) against labels (N, H, W)."""
    rows = []
    for i in range(len(labels)):
        row = {}
        for m, masks in predictions.items():
            meter = MIoU(num_classes)
            meter.update(masks[i], labels[i].long())
            row[m] = meter.compute()["miou"]
        rows.append(row)
    return pd.DataFrame(rows, columns=list(predictions))
