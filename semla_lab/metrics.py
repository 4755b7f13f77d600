"""Semantic-segmentation metrics: confusion matrix, per-class IoU, mIoU, harmonic mean.

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


class MIoU:
    """Accumulates a (C, C) int64 confusion matrix over batches of label ids (not logits)."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise UsageError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    @property
    def confusion(self) -> torch.Tensor:
        """A copy of the accumulated (C, C) int64 matrix, rows = ground truth."""
        return self._conf.clone()

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch; ``pred`` and ``target`` are same-shape integer label-id tensors."""
        self._conf += confusion_matrix(pred, target, self.num_classes, self.ignore_index).cpu()

    def compute(self) -> dict:
        """{"miou": %, "iou": [% or None per class], "pixel_accuracy": %} (NaN if nothing counted)."""
        iou = iou_per_class(self._conf)
        total = int(self._conf.sum())
        return {
            "miou": mean_iou(self._conf),
            "iou": [None if math.isnan(v) else v * 100 for v in iou.tolist()],
            "pixel_accuracy": 100.0 * int(self._conf.trace()) / total if total else math.nan,
        }
