"""Dense functional correspondence metrics (DFC §5.1, B.1): ground truth, transfer, discovery.

Pixel convention: a pixel is (u, v) = (column, row) in a continuous frame where pixel (row r,
col c) covers [c, c+1) x [r, r+1), so its centre is (c + 0.5, r + 0.5). Images are square, S x S.
Thresholds `k` are given in pixels at the paper's 224 px: a distance d at size S counts as within
k when d / (S - 1) <= k / 223, i.e. d <= k * (S - 1) / 223 (at S = 224 simply d <= k).

The released evaluation compares with `<=`; the paper's text writes `<`. We follow the release.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist

REFERENCE_SIZE = 224  # image size (px) at which the paper states every pixel threshold

# Matches per block when pairing matches with ground truth: bounds the candidate pairs held at
# once (n ~ 20k matches x m ~ 10k truths would otherwise be 200M distances).
_CHUNK = 2048


def _threshold_px(k: float, image_size: int) -> float:
    """Threshold k (px at 224 px) in pixels of an S x S image: k * (S - 1) / 223."""
    # multiply before dividing so that S = 224 gives k back exactly (no 1-ulp boundary drift)
    return k * (image_size - 1) / (REFERENCE_SIZE - 1)


def _key(prefix: str, k: float) -> str:
    """Metric name such as "pck@23" ("pck@2.5" for a fractional threshold)."""
    return f"{prefix}@{k:g}"


def _as_points(points: np.ndarray, dim: int, name: str) -> np.ndarray:
    """`points` as a float64 (n, dim) array, or ValueError naming `name`."""
    arr = np.asarray(points, np.float64)
    if arr.ndim == 1 and arr.size == 0:
        arr = arr.reshape(0, dim)  # an empty list carries no shape: accept it as zero points
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"{name}: expected shape (n, {dim}), got {arr.shape}")
    return arr


def farthest_point_sampling(points: np.ndarray, k: int, start: int = 0) -> np.ndarray:
    """Indices (k,) int64 of `k` of `points` (n, d) (or (n,) for 1-D), picked greedily.

    The first pick is `start`; each next pick is the point whose distance to the nearest point
    already picked is largest (ties: lowest index), so the result is deterministic. k >= n
    returns arange(n). Time O(n k), memory O(n).
    """
    pts = np.asarray(points, np.float64)
    if pts.ndim == 1:
        pts = pts[:, None]
    if pts.ndim != 2:
        raise ValueError(f"farthest_point_sampling: points must be (n, d), got {pts.shape}")
    n = pts.shape[0]
    if k < 0:
        raise ValueError(f"farthest_point_sampling: k must be >= 0, got {k}")
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if not 0 <= start < n:
        raise ValueError(f"farthest_point_sampling: start {start} outside [0, {n})")
    chosen = np.empty(k, np.int64)
    if k == 0:
        return chosen
    # squared distance to the nearest chosen point; the order of squares equals that of distances
    nearest = np.full(n, np.inf)
    picked = np.zeros(n, bool)
    current = start
    for step in range(k):
        chosen[step] = current
        picked[current] = True
        diff = pts - pts[current]
        np.minimum(nearest, np.einsum("ij,ij->i", diff, diff), out=nearest)
        # duplicates of chosen points also sit at distance 0: mask picks so none repeats
        current = int(np.argmax(np.where(picked, -1.0, nearest)))
    return chosen


def ground_truth_matches(pixels_1: np.ndarray, surface_1: np.ndarray, pixels_2: np.ndarray,
                         surface_2: np.ndarray, max_points: int = 10000) -> np.ndarray:
    """Ground-truth pixel pairs (m, 4) [u1, v1, u2, v2] from 3D-aligned surface points.

    pixels_i (n_i, 2) are the view-i pixels on the functional part; surface_i (n_i, 3) their
    back-projected surface points, both views in one common (functionally aligned) frame, any
    length unit. Both sets are reduced by farthest-point sampling in pixel space (start index 0)
    to m = min(max_points, n1, n2) points, then matched one-to-one with minimum total 3D distance.
    Rows follow the order of the sampled view-1 pixels. Empty (0, 4) when either set is empty.
    Cost: an m x m float64 matrix and an O(m^3) assignment (m = 10000: 800 MB, minutes).
    """
    p1, p2 = _as_points(pixels_1, 2, "pixels_1"), _as_points(pixels_2, 2, "pixels_2")
    s1, s2 = _as_points(surface_1, 3, "surface_1"), _as_points(surface_2, 3, "surface_2")
    if p1.shape[0] != s1.shape[0] or p2.shape[0] != s2.shape[0]:
        raise ValueError(f"ground_truth_matches: pixels/surface lengths differ: "
                         f"{p1.shape[0]}/{s1.shape[0]} and {p2.shape[0]}/{s2.shape[0]}")
    m = min(int(max_points), p1.shape[0], p2.shape[0])
    if m <= 0:
        return np.zeros((0, 4), np.float64)
    # DFC B.1: Hungarian needs equal set sizes, so thin the larger set(s) by FPS over pixels,
    # which keeps the sample spread evenly over the part's image region
    idx_1 = farthest_point_sampling(p1, m)
    idx_2 = farthest_point_sampling(p2, m)
    cost = cdist(s1[idx_1], s2[idx_2])  # 3D Euclidean distance in the aligned frame
    rows, cols = linear_sum_assignment(cost)
    return np.concatenate([p1[idx_1[rows]], p2[idx_2[cols]]], axis=1)


def label_transfer(similarity: np.ndarray, target_pixels: np.ndarray) -> np.ndarray:
    """Predicted target pixel (n_src, 2) of each source point: the most similar candidate.

    similarity (n_src, n_tgt): source query points x candidate target pixels (the caller has
    already restricted the candidates, e.g. to the target object mask); target_pixels (n_tgt, 2).
    Ties go to the lowest candidate index.
    """
    sim = np.asarray(similarity, np.float64)
    tgt = _as_points(target_pixels, 2, "target_pixels")
    if sim.ndim != 2 or sim.shape[1] != tgt.shape[0]:
        raise ValueError(f"label_transfer: similarity {sim.shape} does not fit "
                         f"{tgt.shape[0]} target pixels")
    if sim.shape[0] == 0:
        return np.zeros((0, 2), np.float64)
    if tgt.shape[0] == 0:
        raise ValueError("label_transfer: no candidate target pixels")
    return tgt[np.argmax(sim, axis=1)]  # DFC §5.1: nearest neighbour in feature similarity


def pck(predicted: np.ndarray, truth: np.ndarray, image_size: int,
        thresholds: Sequence[float] = (23, 15, 10)) -> dict[str, float]:
    """Label-transfer accuracy of predicted pixels (n, 2) against ground truth (n, 2).

    "pck@k": fraction with distance d <= k * (S - 1) / 223 px (k in 224-px units; the paper
    writes `<`, the release uses `<=`). "normalized_dist": mean of d / (S - 1). S = image_size.
    Empty input gives NaN everywhere.
    """
    pred, gt = _as_points(predicted, 2, "predicted"), _as_points(truth, 2, "truth")
    if pred.shape != gt.shape:
        raise ValueError(f"pck: shapes differ: {pred.shape} vs {gt.shape}")
    if image_size < 2:
        raise ValueError(f"pck: image_size must be >= 2, got {image_size}")
    keys = [_key("pck", k) for k in thresholds]
    if pred.shape[0] == 0:
        return {**{key: float("nan") for key in keys}, "normalized_dist": float("nan")}
    dist = np.linalg.norm(pred - gt, axis=1)
    # DFC §5.1: PCK@k and normalised distance, here with the release's `<=` and S - 1
    out = {key: float(np.mean(dist <= _threshold_px(k, image_size)))
           for key, k in zip(keys, thresholds)}
    out["normalized_dist"] = float(np.mean(dist / (image_size - 1)))
    return out


def _min_max(values: np.ndarray) -> np.ndarray:
    """values rescaled to [0, 1] by (x - min) / (max - min); a constant vector maps to 0."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        # nothing to rank: 0 means "no similarity bonus" and "no cycle penalty" respectively
        return np.zeros_like(values)
    return (values - lo) / (hi - lo)


def discovery_scores(sim_12: np.ndarray, pixels_1: np.ndarray,
                     pixels_2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate matches of every image-1 mask pixel and their cycle-consistency scores.

    sim_12 (n1, n2): similarity of the object-mask pixels pixels_1 (n1, 2) of image 1 and
    pixels_2 (n2, 2) of image 2. Returns (matches (n1, 4) [u1, v1, u2, v2], scores (n1,),
    cycle distances (n1,) in pixels), rows in the order of pixels_1. Score
    s = (1 - d_norm) * sim_norm where both the forward similarity and the cycle distance are
    min-max normalised over this pair (a constant vector becomes all 0), so s lies in [0, 1].
    """
    sim = np.asarray(sim_12, np.float64)
    p1, p2 = _as_points(pixels_1, 2, "pixels_1"), _as_points(pixels_2, 2, "pixels_2")
    if sim.shape != (p1.shape[0], p2.shape[0]):
        raise ValueError(f"discovery_scores: sim_12 {sim.shape} does not fit "
                         f"{p1.shape[0]} x {p2.shape[0]} pixels")
    n1 = p1.shape[0]
    if n1 == 0:
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0)
    if p2.shape[0] == 0:
        raise ValueError("discovery_scores: image 2 has no mask pixels")
    # DFC §5.1: forward match j(i), its backward match q_i, cycle distance ||p1_i - q_i||
    forward = np.argmax(sim, axis=1)
    backward = np.argmax(sim, axis=0)  # best image-1 pixel of every image-2 pixel
    cycle = np.linalg.norm(p1 - p1[backward[forward]], axis=1)
    best_sim = sim[np.arange(n1), forward]
    # the paper's raw (1 - ||p - q||) mixes pixels with similarity units; the release rescales
    # both terms to [0, 1] per pair first
    scores = (1.0 - _min_max(cycle)) * _min_max(best_sim)
    matches = np.concatenate([p1, p2[forward]], axis=1)
    return matches, scores, cycle


def _kept_counts(cutoffs: np.ndarray, n: int) -> np.ndarray:
    """Number of matches kept at each cutoff t% of n: ceil(t * n / 100)."""
    exact = cutoffs * n / 100.0
    # t * n is exact for integer t, so the quotient is either an exact integer or at least 0.01
    # away from one; the tiny slack only stops float noise from rounding an integer up
    return np.clip(np.ceil(exact - 1e-9), 0, n).astype(np.int64)


def discovery_precision_recall(matches: np.ndarray, scores: np.ndarray, truth: np.ndarray, k: float,
                               cutoffs: np.ndarray = np.arange(1, 101),
                               ) -> tuple[np.ndarray, np.ndarray]:
    """Precision (T,) and recall (T,) of the top-t% matches, one value per cutoff t in `cutoffs`.

    matches (n, 4) and truth (m, 4) are [u1, v1, u2, v2] pairs; k is in pixels of these images
    (already scaled, see `discovery_metrics`). At cutoff t the ceil(t n / 100) highest-scoring
    matches are kept (ties by input order). A kept match is correct when some truth pair has both
    endpoints within k px (<=) of its endpoints; a truth pair is discovered when some kept match
    is within k px of it at both ends. precision = correct / kept, recall = discovered / m.
    No matches: precision and recall 0. No truth: precision 0, recall NaN (undefined).
    """
    found = _as_points(matches, 4, "matches")
    gt = _as_points(truth, 4, "truth")
    sc = np.asarray(scores, np.float64).reshape(-1)
    cuts = np.asarray(cutoffs, np.float64).reshape(-1)
    if sc.shape[0] != found.shape[0]:
        raise ValueError(f"discovery_precision_recall: {found.shape[0]} matches, "
                         f"{sc.shape[0]} scores")
    if np.any((cuts <= 0) | (cuts > 100)):
        raise ValueError("discovery_precision_recall: cutoffs must lie in (0, 100]")
    n, m = found.shape[0], gt.shape[0]
    if n == 0:
        return np.zeros(cuts.shape), np.zeros(cuts.shape)
    order = np.argsort(-sc, kind="stable")
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)  # rank[i]: position of match i in the score ranking
    correct = np.zeros(n, bool)
    first_rank = np.full(m, n, np.int64)  # best rank of a match near each truth pair; n = none
    if m > 0:
        tree_gt = cKDTree(gt)
        # the exact test (both 2D distances <= k) implies every coordinate differs by <= k, so
        # a 4D Chebyshev ball gives all candidates; pad the radius so float rounding inside the
        # tree cannot drop a pair sitting exactly on the boundary, the exact test follows
        radius = k * (1.0 + 1e-9) + 1e-9
        for lo in range(0, n, _CHUNK):
            block = found[lo:lo + _CHUNK]
            pairs = cKDTree(block).sparse_distance_matrix(
                tree_gt, radius, p=np.inf, output_type="ndarray")
            i, j = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64)
            d1 = np.hypot(block[i, 0] - gt[j, 0], block[i, 1] - gt[j, 1])
            d2 = np.hypot(block[i, 2] - gt[j, 2], block[i, 3] - gt[j, 3])
            near = (d1 <= k) & (d2 <= k)  # DFC §5.1: both end points within k px
            i, j = i[near] + lo, j[near]
            correct[i] = True
            np.minimum.at(first_rank, j, rank[i])
    kept = _kept_counts(cuts, n)
    correct_so_far = np.cumsum(correct[order])
    precision = correct_so_far[kept - 1] / kept
    if m == 0:
        return precision, np.full(cuts.shape, np.nan)
    # a truth pair is discovered at cutoff t once its best-ranked nearby match is kept
    recall = np.searchsorted(np.sort(first_rank), kept, side="left") / m
    return precision, recall


def best_f1(precision: np.ndarray, recall: np.ndarray) -> float:
    """max over cutoffs of 2PR / (P + R), a point with P + R = 0 counting 0 (DFC §5.1).

    NaN when the curve is empty or holds a NaN (e.g. a pair without ground truth).
    """
    p, r = np.asarray(precision, np.float64), np.asarray(recall, np.float64)
    if p.shape != r.shape:
        raise ValueError(f"best_f1: shapes differ: {p.shape} vs {r.shape}")
    if p.size == 0 or np.isnan(p).any() or np.isnan(r).any():
        return float("nan")
    total = p + r
    f1 = np.divide(2.0 * p * r, total, out=np.zeros_like(total), where=total > 0)
    return float(f1.max())


def average_precision(precision: np.ndarray, recall: np.ndarray) -> float:
    """AP = sum_t (R_t - R_{t-1}) P_t over the cutoffs in order, with R_0 = 0 (DFC §5.1).

    (The release also prepends P_0 = 1, which the sum never reads.) NaN as in `best_f1`.
    """
    p, r = np.asarray(precision, np.float64), np.asarray(recall, np.float64)
    if p.shape != r.shape or p.ndim != 1:
        raise ValueError(f"average_precision: expected two (T,) arrays, got {p.shape}, {r.shape}")
    if p.size == 0 or np.isnan(p).any() or np.isnan(r).any():
        return float("nan")
    return float(np.sum(np.diff(r, prepend=0.0) * p))


def discovery_metrics(matches: np.ndarray, scores: np.ndarray, truth: np.ndarray,
                      ks: Sequence[float] = (23, 15, 10, 5),
                      image_size: int = REFERENCE_SIZE) -> dict[str, float]:
    """"best_f1@k" and "ap@k" of one image pair, k in 224-px units (scaled to image_size).

    matches (n, 4), scores (n,), truth (m, 4) as in `discovery_precision_recall`, in pixels of
    the S x S images (S = image_size). The benchmark averages these per-pair values over pairs.
    """
    out: dict[str, float] = {}
    for k in ks:
        precision, recall = discovery_precision_recall(
            matches, scores, truth, _threshold_px(k, image_size))
        out[_key("best_f1", k)] = best_f1(precision, recall)
        out[_key("ap", k)] = average_precision(precision, recall)
    return out

