"""Segmentation metrics on hand-built masks and points whose answers are computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from operators.metrics.segmentation import mask_iou, point_precision_recall


def test_mask_iou_hand_cases() -> None:
    a = np.zeros((4, 5), bool)
    b = np.zeros((4, 5), bool)
    a[0:2, 0:3] = True
    b[0:2, 1:4] = True
    assert mask_iou(a, b) == 4 / 8
    assert mask_iou(a, a) == 1.0
    assert mask_iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0  # both empty: defined as 1
    assert mask_iou(a, np.zeros_like(a)) == 0.0
    with pytest.raises(ValueError):
        mask_iou(a, a[:3])


def test_point_precision_recall_by_hand() -> None:
    scores = np.array([0.9, 0.6, 0.2, 0.7, 0.1])
    gt = np.array([True, False, True, True, False])
    seen = np.array([True, True, True, False, True])
    # predicted (>= 0.5): points 0, 1, 3; on the part: 0 and 3 -> precision 2/3.
    # part points seen: 0 and 2; of those predicted: 0 -> recall 1/2.
    assert point_precision_recall(scores, gt, seen) == (2 / 3, 0.5)
    # without `seen` every part point counts: 0, 2, 3 of which 0 and 3 predicted -> 2/3
    assert point_precision_recall(scores, gt) == (2 / 3, 2 / 3)
    # a threshold above every score predicts nothing: precision undefined, recall 0
    precision, recall = point_precision_recall(scores, gt, seen, threshold=0.95)
    assert math.isnan(precision) and recall == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        point_precision_recall(scores, gt[:3])


def test_referring_metrics_by_hand() -> None:
    from operators.metrics.segmentation import referring_metrics
    gt = np.zeros((4, 4), bool)
    gt[:2, :2] = True                                    # 4 pixels
    exact = gt.copy()
    half = np.zeros((4, 4), bool)
    half[:2, :1] = True                                  # 2 of the 4: IoU 0.5
    wide = np.zeros((4, 4), bool)
    wide[:2, :3] = True                                  # 6 pixels covering the 4: IoU 4/6
    result = referring_metrics([exact, half, wide], [gt, gt, gt])
    assert result["gIoU"] == pytest.approx(100 * (1 + 0.5 + 4 / 6) / 3)
    # cumulative: intersections 4 + 2 + 4 = 10, unions 4 + 4 + 6 = 14
    assert result["cIoU"] == pytest.approx(100 * 10 / 14)
    # IoU > 0.5: the exact one and the wide one (0.5 itself does not count)
    assert result["P@50"] == pytest.approx(100 * 2 / 3)
    # thresholds 0.50 .. 0.95: exact passes all 10, wide (0.667) passes 0.50, 0.55, 0.60, 0.65
    assert result["P@50:95"] == pytest.approx(100 * (10 + 4) / (3 * 10))
