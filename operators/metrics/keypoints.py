"""Keypoint correspondence (SOCO §4, "Evaluation Setup"): PCK@alpha with the radius
alpha * max(h, w) of the target object's bounding box, a prediction correct when strictly inside
the radius of ANY of the keypoint's valid targets: every target keypoint of the same concept for
concept correspondence (CC), the one keypoint of the same concept and identity for SOC and
Cross-SOC (the caller builds the candidate lists). Per pair, then averaged per image pair
(`per-img`, the paper's main number) and per category then overall."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np


def pck_radius(bbox: Sequence[float], alpha: float) -> float:
    """alpha * max(width, height) of a [left, top, right, bottom] box, in pixels."""
    left, top, right, bottom = (float(v) for v in bbox)
    if right < left or bottom < top:
        raise ValueError(f"pck_radius: box {list(bbox)} is not [left, top, right, bottom]")
    return alpha * max(right - left, bottom - top)


def pair_pck(predicted: np.ndarray, candidates: Sequence[np.ndarray], bbox: Sequence[float],
             alpha: float = 0.1) -> float:
    """The fraction of a pair's source keypoints whose prediction (K, 2) lies strictly within
    the radius of one of its valid targets (candidates[k]: (m_k, 2), m_k >= 1)."""
    predicted = np.asarray(predicted, np.float64).reshape(-1, 2)
    if len(candidates) != len(predicted) or not len(predicted):
        raise ValueError(f"pair_pck: {len(predicted)} predictions for {len(candidates)} "
                         "keypoints")
    radius = pck_radius(bbox, alpha)
    correct = 0
    for point, targets in zip(predicted, candidates, strict=True):
        targets = np.asarray(targets, np.float64).reshape(-1, 2)
        if not len(targets):
            raise ValueError("pair_pck: a keypoint without a valid target")
        correct += bool((np.linalg.norm(targets - point, axis=1) < radius).any())
    return correct / len(predicted)


def pck_summary(pairs: Iterable[tuple[str, float]]) -> dict[str, float | dict[str, float]]:
    """(category, pair PCK) rows -> percent: `per_img` (the mean over pairs), `per_category`
    (each category's mean over its pairs) and `overall` (the mean of the category means)."""
    by_category: dict[str, list[float]] = defaultdict(list)
    for category, value in pairs:
        by_category[category].append(float(value))
    if not by_category:
        raise ValueError("pck_summary: no pairs")
    every = [v for values in by_category.values() for v in values]
    means = {c: 100 * float(np.mean(v)) for c, v in sorted(by_category.items())}
    return {"per_img": 100 * float(np.mean(every)), "per_category": means,
            "overall": float(np.mean(list(means.values())))}
