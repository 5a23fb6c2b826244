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


# Referring / instruction segmentation (InstructPart §5, after LISA): per-image IoUs, their mean
# (gIoU), the cumulative intersection over the cumulative union (cIoU), and precision at IoU
# thresholds: P@50 and P@50:95 (COCO's thresholds 0.50, 0.55, ..., 0.95, averaged).
PRECISION_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def referring_metrics(preds: list[np.ndarray], gts: list[np.ndarray]) -> dict[str, float]:
    """gIoU, cIoU, P@50 and P@50:95 over a set of (predicted, ground-truth) bool masks, in
    percent as the paper reports them. An image's IoU counts as a true positive at threshold t
    when IoU > t (the paper: "exceeds"); an empty prediction of an empty truth has IoU 1."""
    if len(preds) != len(gts) or not preds:
        raise ValueError(f"referring_metrics: {len(preds)} predictions for {len(gts)} masks")
    ious, inter, union = [], 0, 0
    for pred, gt in zip(preds, gts, strict=True):
        ious.append(mask_iou(pred, gt))
        inter += int(np.count_nonzero(np.asarray(pred, bool) & np.asarray(gt, bool)))
        union += int(np.count_nonzero(np.asarray(pred, bool) | np.asarray(gt, bool)))
    iou = np.asarray(ious)
    precision = [float((iou > t).mean()) for t in PRECISION_THRESHOLDS]
    return {"gIoU": 100 * float(iou.mean()),
            "cIoU": 100 * (inter / union if union else 1.0),
            "P@50": 100 * precision[0], "P@50:95": 100 * float(np.mean(precision))}
