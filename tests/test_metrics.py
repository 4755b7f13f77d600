from __future__ import annotations

import math

import pytest
import torch

from semla_lab.core.errors import UsageError
from semla_lab.core.metrics import MIoU, confusion_matrix, harmonic_mean, iou_per_class, mean_iou

# 2x3 map, 3 classes, one ignored pixel (its prediction 2 must not count):
#   target [[0, 0, 1],      pred [[0, 1, 1],
#           [1, 2, 255]]          [1, 0, 2]]
# counted (gt, pred): (0,0) (0,1) (1,1) (1,1) (2,0)
# conf rows = gt: [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
# IoU0 = 1 / (2 + 2 - 1) = 1/3; IoU1 = 2 / (2 + 3 - 2) = 2/3; IoU2 = 0 / (1 + 0 - 0) = 0
# mIoU = (1/3 + 2/3 + 0) / 3 = 1/3 -> 33.33 %; pixel accuracy = 3/5 -> 60 %
TARGET = torch.tensor([[0, 0, 1], [1, 2, 255]])
PRED = torch.tensor([[0, 1, 1], [1, 0, 2]])
CONF = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 0]])


def test_confusion_matrix_by_hand():
    conf = confusion_matrix(PRED, TARGET, 3)
    assert conf.dtype == torch.int64
    assert torch.equal(conf, CONF)


def test_confusion_matrix_batched_same_as_sum():
    batch = confusion_matrix(torch.stack([PRED, PRED]), torch.stack([TARGET, TARGET]), 3)
    assert torch.equal(batch, 2 * CONF)


def test_iou_and_miou_by_hand():
    iou = iou_per_class(CONF)
    assert iou.dtype == torch.float64
    assert iou.tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert mean_iou(CONF) == pytest.approx(100 / 3)


def test_predicted_but_absent_from_gt_counts_as_zero_and_absent_from_both_is_excluded():
    # target [0, 0, 0, 0], pred [0, 0, 1, 1], C = 3
    # class 0: tp 2, gt 4, pred 2 -> 2 / 4 = 0.5; class 1: tp 0, gt 0, pred 2 -> 0 (counts)
    # class 2: union 0 -> NaN (excluded); mIoU = (0.5 + 0) / 2 = 25 %
    conf = confusion_matrix(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 0]), 3)
    iou = iou_per_class(conf)
    assert iou[:2].tolist() == [0.5, 0.0]
    assert math.isnan(iou[2])
    assert mean_iou(conf) == pytest.approx(25.0)


def test_all_ignored_gives_nan():
    conf = confusion_matrix(torch.tensor([0, 1]), torch.tensor([255, 255]), 2)
    assert conf.sum() == 0
    assert math.isnan(mean_iou(conf))


def test_custom_ignore_index():
    conf = confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, -1, 1]), 2, ignore_index=-1)
    assert torch.equal(conf, torch.tensor([[1, 0], [0, 1]]))


def test_miou_accumulator():
    m = MIoU(3)
    m.update(PRED[0], TARGET[0])
    m.update(PRED[1], TARGET[1])
    assert torch.equal(m.confusion, CONF)
    out = m.compute()
    assert out["miou"] == pytest.approx(100 / 3)
    assert out["iou"] == pytest.approx([100 / 3, 200 / 3, 0.0])
    assert out["pixel_accuracy"] == pytest.approx(60.0)


def test_miou_accumulator_absent_class_is_none():
    m = MIoU(3)
    m.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    out = m.compute()
    assert out["iou"] == [100.0, 100.0, None]
    assert out["miou"] == 100.0


def test_miou_confusion_is_a_copy():
    m = MIoU(2)
    conf = m.confusion
    conf += 5
    assert m.confusion.sum() == 0


@pytest.mark.parametrize("values, expected", [
    ([40, 60], 48.0),              # 2 / (1/40 + 1/60) = 2 / (5/120) = 48
    ([30, 60, 20], 30.0),          # 3 / (2/60 + 1/60 + 3/60) = 3 / (6/60) = 30
    ([50], 50.0),
    ([0, 70], 0.0),
    ((torch.tensor(40.0), 60.0), 48.0),
])
def test_harmonic_mean(values, expected):
    assert harmonic_mean(values) == pytest.approx(expected)


@pytest.mark.parametrize("values, match", [
    ([], "empty"),
    ([40, -1], "-1"),
    ([40, math.nan], "nan"),
    ([40, math.inf], "inf"),
])
def test_harmonic_mean_errors(values, match):
    with pytest.raises(ValueError, match=match):
        harmonic_mean(values)


@pytest.mark.parametrize("pred, target, match", [
    (torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), "shape"),
    (torch.tensor([0, 1]), torch.tensor([0, 3]), "target id 3"),
    (torch.tensor([0, 1]), torch.tensor([0, -2]), "target id -2"),
    (torch.tensor([0, 3]), torch.tensor([0, 1]), "pred id 3"),
    (torch.tensor([0, -1]), torch.tensor([0, 1]), "pred id -1"),
    (torch.tensor([0, 7]), torch.tensor([0, 255]), "pred id 7"),
    (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long), "shape"),
    (torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), "dtype"),
])
def test_confusion_matrix_errors(pred, target, match):
    with pytest.raises(ValueError, match=match):
        confusion_matrix(pred, target, 3)


def test_confusion_matrix_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        confusion_matrix(torch.tensor([0]), torch.tensor([0]), 0)
    with pytest.raises(ValueError, match="ignore_index 1"):
        confusion_matrix(torch.tensor([0]), torch.tensor([0]), 3, ignore_index=1)
    with pytest.raises(ValueError, match="square"):
        iou_per_class(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="dtype"):
        MIoU(3).update(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))


def test_batched_miou_equals_mean_iou_per_matrix():
    from semla_lab.core.metrics import batched_miou
    gen = torch.Generator().manual_seed(0)
    conf = torch.randint(0, 20, (5, 4, 4), generator=gen)
    conf[2, 3, :] = 0
    conf[2, :, 3] = 0                                      # class 3 absent: left out, as mean_iou does
    assert torch.allclose(batched_miou(conf), torch.tensor([mean_iou(c) for c in conf], dtype=torch.float64))


def _images(n, classes, wrong, seed):
    """Per-image confusions of n 8x8 images whose labels are predicted wrongly with probability `wrong`."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, classes, (n, 8, 8), generator=gen)
    flip = torch.rand(n, 8, 8, generator=gen) < wrong
    pred = torch.where(flip, (target + 1) % classes, target)
    return torch.stack([confusion_matrix(p, t, classes) for p, t in zip(pred, target)])


def test_paired_bootstrap_matches_a_plain_resampling_loop():
    from semla_lab.core.metrics import paired_bootstrap
    a = {"x": _images(12, 3, 0.1, 1), "y": _images(9, 4, 0.3, 2)}
    b = {"x": _images(12, 3, 0.4, 1), "y": _images(9, 4, 0.3, 3)}
    got = paired_bootstrap(a, b, resamples=200, seed=5)
    gen = torch.Generator().manual_seed(5)
    draws, deltas = {}, {}
    for d in a:
        idx = torch.randint(len(a[d]), (200, len(a[d])), generator=gen)   # the same draws, in the same order
        ra = torch.tensor([mean_iou(a[d][i].sum(0)) for i in idx])
        rb = torch.tensor([mean_iou(b[d][i].sum(0)) for i in idx])
        draws[d] = (ra, rb)
        lo, hi = torch.quantile((ra - rb).double(), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        assert got["per_domain"][d]["low"] == pytest.approx(lo, abs=0.011)
        assert got["per_domain"][d]["high"] == pytest.approx(hi, abs=0.011)
        deltas[d] = mean_iou(a[d].sum(0)) - mean_iou(b[d].sum(0))
        assert got["per_domain"][d]["delta"] == pytest.approx(deltas[d], abs=0.006)
    h = lambda x, y: 2 / (1 / x + 1 / y)
    hd = h(draws["x"][0], draws["y"][0]) - h(draws["x"][1], draws["y"][1])
    lo, hi = torch.quantile(hd.double(), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    assert (got["hmean"]["low"], got["hmean"]["high"]) == (pytest.approx(lo, abs=0.011), pytest.approx(hi, abs=0.011))
    assert got["per_domain"]["x"]["low"] > 0, "30 points fewer wrong pixels on every image is a clear win"
    assert got["per_domain"]["x"]["low"] <= got["per_domain"]["x"]["delta"] <= got["per_domain"]["x"]["high"]


def test_paired_bootstrap_of_a_method_against_itself_is_zero_and_needs_matching_domains():
    from semla_lab.core.metrics import paired_bootstrap
    a = {"x": _images(6, 3, 0.2, 1)}
    same = paired_bootstrap(a, a, resamples=50)
    assert same["hmean"] == {"delta": 0.0, "low": 0.0, "high": 0.0}
    with pytest.raises(UsageError, match="same, non-empty set of domains"):
        paired_bootstrap(a, {"y": a["x"]})
