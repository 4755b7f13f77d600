"""Semantic-segmentation metrics: confusion matrix, per-class IoU, mIoU, harmonic mean, and paired
bootstrap intervals for the difference of two methods.

Conventions (detectron2 / CAT-Seg): confusion rows = ground truth, columns = prediction;
pixels whose target equals ``ignore_index`` are skipped; a class with union == 0 (absent from
both ground truth and prediction) has IoU NaN and is left out of the mean, while a class that is
predicted but absent from the ground truth has IoU 0 and counts. Percentages are 0-100.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from .errors import UsageError


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """(C, C) int64 counts, rows = ground truth, columns = prediction.

    ``pred`` and ``target`` are integer label-id tensors of the same shape (e.g. (N, H, W)).
    Every ``pred`` value must lie in [0, C), ignored pixels included.
    """
    if num_classes < 1:
        raise UsageError(f"num_classes must be >= 1, got {num_classes}")
    if 0 <= ignore_index < num_classes:
        raise UsageError(f"ignore_index {ignore_index} collides with a class id in [0, {num_classes})")
    for name, t in (("pred", pred), ("target", target)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise UsageError(f"{name} must hold integer label ids, got dtype {t.dtype} "
                             "(take argmax of logits first)")
    if pred.shape != target.shape:
        raise UsageError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    bad_pred = (pred < 0) | (pred >= num_classes)
    if bad_pred.any():
        raise UsageError(f"pred id {int(pred[bad_pred][0])} outside [0, {num_classes})")
    keep = target != ignore_index
    target, pred = target[keep], pred[keep]
    bad_target = (target < 0) | (target >= num_classes)
    if bad_target.any():
        raise UsageError(f"target id {int(target[bad_target][0])} outside [0, {num_classes}) "
                         f"and not ignore_index {ignore_index}")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _check_square(conf: torch.Tensor) -> None:
    if conf.dim() != 2 or conf.shape[0] != conf.shape[1]:
        raise UsageError(f"confusion matrix must be square (C, C), got shape {tuple(conf.shape)}")


def iou_per_class(conf: torch.Tensor) -> torch.Tensor:
    """(C,) float64 IoU in [0, 1]: tp / (gt + pred - tp); NaN where the union is 0."""
    _check_square(conf)
    conf = conf.double()
    tp = conf.diagonal()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = tp / union.clamp(min=1)
    return torch.where(union > 0, iou, torch.full_like(iou, math.nan))


def mean_iou(conf: torch.Tensor) -> float:
    """mIoU in percent over classes with union > 0; NaN if there is none."""
    iou = iou_per_class(conf)
    valid = ~iou.isnan()
    return float(iou[valid].mean() * 100) if valid.any() else math.nan


def harmonic_mean(values: Iterable[float]) -> float:
    """Harmonic mean of non-negative numbers (e.g. per-domain mIoUs); 0.0 if any value is 0."""
    vals = [float(v) for v in values]
    if not vals:
        raise UsageError("harmonic_mean of an empty sequence")
    for v in vals:
        if not math.isfinite(v) or v < 0:
            raise UsageError(f"harmonic_mean needs finite non-negative values, got {v}")
    if any(v == 0 for v in vals):
        return 0.0
    return len(vals) / sum(1.0 / v for v in vals)


def batched_miou(conf: torch.Tensor) -> torch.Tensor:
    """(R,) mIoU in percent of R confusion matrices (R, C, C), classes with union 0 left out (NaN if none)."""
    conf = conf.double()
    tp = conf.diagonal(dim1=1, dim2=2)
    union = conf.sum(1) + conf.sum(2) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
    return iou.nanmean(1) * 100


def paired_bootstrap(conf_a: dict[str, torch.Tensor], conf_b: dict[str, torch.Tensor], resamples: int = 1000,
                     level: float = 0.95, seed: int = 0) -> dict:
    """Confidence interval of mIoU(a) - mIoU(b), per domain and of the h-mean over domains, by resampling
    each domain's test images with replacement; both methods see the same draw (paired). `conf_a[d]`,
    `conf_b[d]` are per-image confusions (N_d, C_d, C_d) of the same images. Returns
    {"delta", "low", "high"} for "hmean" and for each domain under "per_domain", plus the settings."""
    if set(conf_a) != set(conf_b) or not conf_a:
        raise UsageError("paired_bootstrap needs both methods on the same, non-empty set of domains")
    gen = torch.Generator().manual_seed(seed)
    tail = (1 - level) / 2 * 100
    draws_a, draws_b, per_domain = [], [], {}
    for d in conf_a:
        a, b = conf_a[d].double(), conf_b[d].double()
        if a.shape != b.shape or a.dim() != 3 or len(a) == 0:
            raise UsageError(f"domain {d!r}: per-image confusions must have equal shapes (N, C, C), N > 0")
        n = len(a)
        counts = torch.zeros(resamples, n, dtype=torch.float64)
        counts.scatter_add_(1, torch.randint(n, (resamples, n), generator=gen), torch.ones(resamples, n, dtype=torch.float64))
        ra = batched_miou((counts @ a.reshape(n, -1)).view(resamples, *a.shape[1:]))   # (R,) resampled mIoU of a
        rb = batched_miou((counts @ b.reshape(n, -1)).view(resamples, *b.shape[1:]))
        draws_a.append(ra)
        draws_b.append(rb)
        per_domain[d] = _interval(mean_iou(a.sum(0)) - mean_iou(b.sum(0)), ra - rb, tail)
    hmean = lambda m: m.shape[1] / (1 / m.clamp(min=1e-9)).sum(1)                       # (R, D) -> (R,)
    full_a = [mean_iou(conf_a[d].sum(0)) for d in conf_a]
    full_b = [mean_iou(conf_b[d].sum(0)) for d in conf_b]
    return {"hmean": _interval(harmonic_mean(full_a) - harmonic_mean(full_b),
                               hmean(torch.stack(draws_a, 1)) - hmean(torch.stack(draws_b, 1)), tail),
            "per_domain": per_domain, "resamples": resamples, "level": level, "seed": seed}


def _interval(delta: float, draws: torch.Tensor, tail: float) -> dict:
    low, high = torch.quantile(draws, torch.tensor([tail, 100 - tail], dtype=draws.dtype) / 100).tolist()
    return {"delta": round(delta, 2), "low": round(low, 2), "high": round(high, 2)}


class MIoU:
    """Accumulates a (C, C) int64 confusion matrix over batches of label ids (not logits)."""

    def __init__(self, num_classes: int, ignore_index: int = 255, per_image: bool = False) -> None:
        if num_classes < 1:
            raise UsageError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self._images: list[torch.Tensor] | None = [] if per_image else None

    @property
    def confusion(self) -> torch.Tensor:
        """A copy of the accumulated (C, C) int64 matrix, rows = ground truth."""
        return self._conf.clone()

    @property
    def image_confusions(self) -> torch.Tensor:
        """(N, C, C) int64: one confusion matrix per image seen (with per_image=True), for the bootstrap."""
        if self._images is None:
            raise UsageError("this MIoU was made without per_image=True")
        return torch.stack(self._images) if self._images else torch.zeros(0, self.num_classes, self.num_classes)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch; ``pred`` and ``target`` are same-shape integer label-id tensors, (B, H, W) when
        counting per image."""
        if self._images is None:
            self._conf += confusion_matrix(pred, target, self.num_classes, self.ignore_index).cpu()
            return
        for p, t in zip(pred, target):
            conf = confusion_matrix(p, t, self.num_classes, self.ignore_index).cpu()
            self._images.append(conf)
            self._conf += conf

    def compute(self) -> dict:
        """{"miou": %, "iou": [% or None per class], "pixel_accuracy": %} (NaN if nothing counted)."""
        iou = iou_per_class(self._conf)
        total = int(self._conf.sum())
        return {
            "miou": mean_iou(self._conf),
            "iou": [None if math.isnan(v) else v * 100 for v in iou.tolist()],
            "pixel_accuracy": 100.0 * int(self._conf.trace()) / total if total else math.nan,
        }
