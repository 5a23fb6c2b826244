"""Segmentation quality: masks in views, per-point part scores on surfaces."""

from __future__ import annotations

import numpy as np


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two bool masks of the same shape.

    Two empty masks count as IoU 1.0: the prediction "nothing here" is exactly right.
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask_iou: shapes differ: {pred.shape} vs {gt.shape}")
    union = int(np.count_nonzero(pred | gt))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(pred & gt)) / union


def point_precision_recall(scores: np.ndarray, gt: np.ndarray, seen: np.ndarray | None = None,
                           threshold: float = 0.5) -> tuple[float, float]:
    """Precision and recall of the points predicted as part (score >= threshold).

    precision = predicted points on the part / predicted points; recall = predicted part points
    / part points, both counting only the points `seen` (e.g. by at least one view: a label
    cannot reach a point no view shows) in the recall. NaN where a denominator is 0.
    """
    scores, gt = np.asarray(scores, np.float64), np.asarray(gt, bool)
    seen = np.ones_like(gt) if seen is None else np.asarray(seen, bool)
    if not scores.shape == gt.shape == seen.shape:
        raise ValueError(f"point_precision_recall: shapes differ: scores {scores.shape}, "
                         f"gt {gt.shape}, seen {seen.shape}")
    predicted = scores >= threshold
    n_predicted = int(predicted.sum())
    n_part = int(np.count_nonzero(gt & seen))
    precision = np.count_nonzero(predicted & gt) / n_predicted if n_predicted else float("nan")
    recall = np.count_nonzero(predicted & gt & seen) / n_part if n_part else float("nan")
    return float(precision), float(recall)
