"""3D aggregation of grounding boxes into per-point part scores and clean per-view masks.

DFC (dense-functional-correspondence) Appendix A.4 steps 3-4: every box (over views and trials)
votes for the surface points whose projection it contains while the point is visible; the
normalised votes are projected back into each view, smoothed, Otsu-thresholded and closed into
a binary mask. Also the optional zoom pass (A.4 step 2, small parts), an optional per-view
consensus of the trials, and the single-view box baseline (quality measures: operators.metrics).

Conventions (shared across stages): OpenCV cameras, `cam_to_world` (V, 4, 4), `K` (V, 3, 3),
continuous pixel frame where pixel (v, u) covers [u, u+1) x [v, v+1). Everything is vectorised
over points; loops run over views and boxes only, so memory stays O(V*N) for the projections
plus O(N) per box test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
from scipy import ndimage
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from operators.models.grounding import Box, boxes_to_array

# ---------------------------------------------------------------------------------------------
# Voting (A.4 step 3)
# ---------------------------------------------------------------------------------------------


def normalise_scores(counts: np.ndarray) -> np.ndarray:
    """Divide by the maximum (per asset); all-zero stays zero. float32."""
    counts = np.asarray(counts, np.float32)
    peak = float(counts.max()) if counts.size else 0.0
    return counts / peak if peak > 0 else np.zeros_like(counts)


def vote_counts(
    uv: np.ndarray,
    visible: np.ndarray,
    boxes: Sequence[Sequence[Sequence[Box]]],
    min_boxes_per_view: int = 1,
) -> np.ndarray:
    """(N,) int32 raw votes: the number of boxes (over views and trials) that contain the point's
    projection while it is visible. Views with fewer than `min_boxes_per_view` boxes over all
    their trials are skipped (the model rarely finds the part there, so its few boxes are
    likely wrong). Containment uses the half-open box x0 <= u < x1, y0 <= v < y1.
    """
    uv = np.asarray(uv)
    visible = np.asarray(visible, bool)
    if uv.ndim != 3 or uv.shape[2] != 2 or visible.shape != uv.shape[:2]:
        raise ValueError(f"uv must be (V, N, 2) and visible (V, N), got {uv.shape} and {visible.shape}")
    if len(boxes) != uv.shape[0]:
        raise ValueError(f"boxes must hold one list of trials per view: {len(boxes)} != {uv.shape[0]} views")
    counts = np.zeros(uv.shape[1], np.int32)
    for v, trials in enumerate(boxes):
        flat = [box for trial in trials for box in trial]
        if not flat or len(flat) < min_boxes_per_view:
            continue
        idx = np.flatnonzero(visible[v])
        if idx.size == 0:
            continue
        u, w = uv[v, idx, 0], uv[v, idx, 1]
        view_votes = np.zeros(idx.size, np.int32)
        for x0, y0, x1, y1, _ in boxes_to_array(flat):
            view_votes += (u >= x0) & (u < x1) & (w >= y0) & (w < y1)
        counts[idx] += view_votes  # idx is unique, so fancy += is exact
    return counts


def vote_scores(
    uv: np.ndarray,
    visible: np.ndarray,
    boxes: Sequence[Sequence[Sequence[Box]]],
    min_boxes_per_view: int = 1,
) -> np.ndarray:
    """(N,) float32 per-point part score in [0, 1]: `vote_counts` divided by its maximum
    (DFC A.4 step 3, normalised per asset and part; all-zero stays zero).

    boxes: view -> trial -> boxes, one entry per view of `uv`.
    """
    return normalise_scores(vote_counts(uv, visible, boxes, min_boxes_per_view))


def consensus_boxes(
    trial_boxes: Sequence[Sequence[Box]],
    radius_frac: float = 0.15,
    image_size: tuple[int, int] | None = None,
) -> list[list[Box]]:
    """Keep, in one view, only the boxes of the largest cluster of box centres over its trials.

    Mirrors the consensus of the paper's released code (DFC C.4 clusters the four trials):
    box centres closer than `radius_frac * scale` are linked and the connected components are the
    clusters; scale = max(H, W) of `image_size`, or, without it, the larger side of the union of
    all the view's boxes. Ties go to the cluster spanning more trials, then the earliest box.
    Returns the same trial structure with the other boxes removed.
    """
    if not radius_frac >= 0:
        raise ValueError(f"consensus_boxes: radius_frac must be >= 0, got {radius_frac}")
    flat = [(t, box) for t, trial in enumerate(trial_boxes) for box in trial]
    if len(flat) <= 1:
        return [list(trial) for trial in trial_boxes]
    array = boxes_to_array([box for _, box in flat]).astype(np.float64)
    if image_size is not None:
        scale = float(max(image_size))
    else:
        scale = float(max(array[:, 2].max() - array[:, 0].min(), array[:, 3].max() - array[:, 1].min()))
    centres = 0.5 * (array[:, :2] + array[:, 2:4])
    distance = np.linalg.norm(centres[:, None, :] - centres[None, :, :], axis=-1)
    n_clusters, labels = connected_components(csr_matrix(distance <= radius_frac * scale), directed=False)
    trial_of = np.array([t for t, _ in flat])

    def rank(cluster: int) -> tuple[int, int, int]:
        members = np.flatnonzero(labels == cluster)
        return (members.size, np.unique(trial_of[members]).size, -int(members[0]))

    keep = max(range(n_clusters), key=rank)
    out: list[list[Box]] = [[] for _ in trial_boxes]
    for i, (t, box) in enumerate(flat):
        if labels[i] == keep:
            out[t].append(box)
    return out


# ---------------------------------------------------------------------------------------------
# Per-view masks (A.4 step 4)
# ---------------------------------------------------------------------------------------------


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (maximal between-class variance) of `values`; foreground is >= it.

    Degenerate input (empty or constant) returns 0.5, the midpoint of the 0-1 score range, so a
    constant score map gives a full mask when it is high and an empty one when it is low.
    """
    values = np.asarray(values, np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.5
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-6:
        return 0.5
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = 0.5 * (edges[:-1] + edges[1:])
    weight_low = np.cumsum(hist)[:-1].astype(np.float64)
    weight_high = values.size - weight_low
    mass_low = np.cumsum(hist * centres)[:-1]
    mean_low = mass_low / weight_low.clip(min=1)
    mean_high = (float((hist * centres).sum()) - mass_low) / weight_high.clip(min=1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    # A flat optimum (well separated classes) -> take its middle, not its first bin.
    k = int(round(0.5 * (best[0] + best[-1])))
    return float(edges[k + 1])


def splat_scores(
    scores: np.ndarray, uv: np.ndarray, visible: np.ndarray, shape: tuple[int, int], sigma: float = 1.0
) -> np.ndarray:
    """(H, W) float32 smooth score image of one view from its visible points.

    Mean score per pixel, then a normalised gaussian: G*(mean x occupied) / G*(occupied), so empty
    pixels between samples take the weighted mean of their neighbours instead of being pulled to
    zero. Pixels with no sample within the filter's reach stay 0.
    """
    height, width = shape
    idx = np.flatnonzero(visible)
    cols = np.clip(np.floor(uv[idx, 0]).astype(np.intp), 0, width - 1)
    rows = np.clip(np.floor(uv[idx, 1]).astype(np.intp), 0, height - 1)
    pixel = rows * width + cols
    total = np.bincount(pixel, weights=scores[idx].astype(np.float64), minlength=height * width)
    count = np.bincount(pixel, minlength=height * width)
    occupied = (count > 0).astype(np.float64)
    mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    mean, occupied = mean.reshape(height, width), occupied.reshape(height, width)
    if sigma > 0:
        mean = ndimage.gaussian_filter(mean * occupied, sigma, mode="constant")
        occupied = ndimage.gaussian_filter(occupied, sigma, mode="constant")
    smooth = np.divide(mean, occupied, out=np.zeros_like(mean), where=occupied > 1e-12)
    return smooth.astype(np.float32)


def _closing(mask: np.ndarray, iterations: int) -> np.ndarray:
    if iterations <= 0:
        return mask
    # Pad so the erosion half of the closing does not eat the image border.
    padded = np.pad(mask, iterations)
    closed = ndimage.binary_closing(padded, iterations=iterations)
    return closed[iterations:-iterations, iterations:-iterations]


def masks_from_scores(
    scores: np.ndarray,
    uv: np.ndarray,
    visible: np.ndarray,
    object_mask: np.ndarray,
    sigma: float = 1.0,
    closing_iterations: int = 2,
    threshold_scope: Literal["asset", "view"] = "asset",
) -> np.ndarray:
    """(V, H, W) bool part masks from per-point scores (DFC A.4 step 4).

    Per view: splat the visible points' scores (`splat_scores`, sigma in pixels), threshold with
    Otsu, close holes (binary closing, `closing_iterations` of a 3x3 cross), AND the object mask.
    threshold_scope "asset" (default) computes one Otsu threshold over the object pixels of all
    views: scores are normalised per asset, and a view where the part is hidden then gives an
    empty mask instead of Otsu splitting its noise in two; "view" thresholds each view alone.
    """
    scores = np.asarray(scores, np.float32).ravel()
    uv = np.asarray(uv)
    visible = np.asarray(visible, bool)
    object_mask = np.asarray(object_mask, bool)
    if object_mask.ndim == 2:
        object_mask = object_mask[None]
    n_views = object_mask.shape[0]
    if uv.shape != (n_views, scores.size, 2) or visible.shape != (n_views, scores.size):
        raise ValueError(f"masks_from_scores: expected uv {(n_views, scores.size, 2)} and visible "
                         f"{(n_views, scores.size)}, got {uv.shape} and {visible.shape}")
    if sigma < 0 or closing_iterations < 0:
        raise ValueError(f"sigma and closing_iterations must be >= 0, got {sigma}, {closing_iterations}")
    if threshold_scope not in ("asset", "view"):
        raise ValueError(f"threshold_scope must be 'asset' or 'view', got {threshold_scope!r}")
    shape = object_mask.shape[1:]
    smooth = np.stack([splat_scores(scores, uv[v], visible[v], shape, sigma) for v in range(n_views)])
    if threshold_scope == "asset":
        thresholds = [otsu_threshold(smooth[object_mask])] * n_views
    else:
        thresholds = [otsu_threshold(smooth[v][object_mask[v]]) for v in range(n_views)]
    masks = np.zeros(object_mask.shape, bool)
    for v in range(n_views):
        part = (smooth[v] >= thresholds[v]) & (smooth[v] > 0) & object_mask[v]
        masks[v] = _closing(part, closing_iterations) & object_mask[v]
    return masks


# ---------------------------------------------------------------------------------------------
# Zoom pass (A.4 step 2, small parts)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CropTransform:
    """Maps between a zoom crop and its source view: x_view = x0 + x_crop / scale_x (same in y).

    (x0, y0): the crop's top-left corner in view pixels (integers); scale_*: crop pixels per view
    pixel; crop_size: (H, W) of the crop image.
    """

    x0: float
    y0: float
    scale_x: float
    scale_y: float
    crop_size: tuple[int, int]

    def to_view(self, boxes: Sequence[Box]) -> list[Box]:
        return [Box(self.x0 + b.x0 / self.scale_x, self.y0 + b.y0 / self.scale_y,
                    self.x0 + b.x1 / self.scale_x, self.y0 + b.y1 / self.scale_y, b.score) for b in boxes]

    def to_crop(self, boxes: Sequence[Box]) -> list[Box]:
        return [Box((b.x0 - self.x0) * self.scale_x, (b.y0 - self.y0) * self.scale_y,
                    (b.x1 - self.x0) * self.scale_x, (b.y1 - self.y0) * self.scale_y, b.score) for b in boxes]


def _resize_bilinear(image: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """Pixel-area aligned bilinear resize (pixel centres map to pixel centres)."""
    height, width = image.shape[:2]
    out_h, out_w = out_size
    rows = (np.arange(out_h) + 0.5) * (height / out_h) - 0.5
    cols = (np.arange(out_w) + 0.5) * (width / out_w) - 0.5
    grid = np.meshgrid(rows, cols, indexing="ij")
    planes = image[..., None] if image.ndim == 2 else image
    out = np.stack([ndimage.map_coordinates(planes[..., c].astype(np.float64), grid, order=1, mode="nearest")
                    for c in range(planes.shape[-1])], axis=-1)
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    elif image.dtype == bool:
        out = out >= 0.5
    out = out.astype(image.dtype)
    return out[..., 0] if image.ndim == 2 else out


def zoom_crop(
    image: np.ndarray, box: Box, pad_frac: float = 0.25, out_size: tuple[int, int] | None = None
) -> tuple[np.ndarray, CropTransform]:
    """Crop the view around `box` for a second, zoomed grounding query.

    The box grows by `pad_frac` of its width/height on each side, snaps outwards to whole pixels
    and is clipped to the image; `out_size` (H, W) optionally resizes the crop (bilinear).
    Map the boxes found in the crop back with `boxes_from_crop(boxes, transform)`.
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"zoom_crop: image must be (H, W) or (H, W, C), got {image.shape}")
    if pad_frac < 0:
        raise ValueError(f"zoom_crop: pad_frac must be >= 0, got {pad_frac}")
    height, width = image.shape[:2]
    pad_x, pad_y = pad_frac * box.width, pad_frac * box.height
    x0 = min(max(math.floor(box.x0 - pad_x), 0), width)
    y0 = min(max(math.floor(box.y0 - pad_y), 0), height)
    x1 = min(max(math.ceil(box.x1 + pad_x), x0 + 1), width)
    y1 = min(max(math.ceil(box.y1 + pad_y), y0 + 1), height)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"zoom_crop: box {box} lies outside the {height}x{width} image")
    crop = image[y0:y1, x0:x1]
    crop_h, crop_w = y1 - y0, x1 - x0
    if out_size is None:
        return crop.copy(), CropTransform(float(x0), float(y0), 1.0, 1.0, (crop_h, crop_w))
    out_h, out_w = int(out_size[0]), int(out_size[1])
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"zoom_crop: out_size must be positive, got {out_size}")
    transform = CropTransform(float(x0), float(y0), out_w / crop_w, out_h / crop_h, (out_h, out_w))
    return _resize_bilinear(crop, (out_h, out_w)), transform


def boxes_from_crop(boxes: Sequence[Box], transform: CropTransform) -> list[Box]:
    """Boxes found in a `zoom_crop` crop, in the source view's pixels."""
    return transform.to_view(boxes)


# ---------------------------------------------------------------------------------------------
# Quality helpers
# ---------------------------------------------------------------------------------------------


def box_iou(a: Box, b: Box) -> float:
    """IoU of two boxes in the continuous frame (0.0 when both are empty)."""
    iw = max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0))
    ih = max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))
    inter = iw * ih
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


def boxes_to_mask(
    boxes: Sequence[Box], shape: tuple[int, int], object_mask: np.ndarray | None = None
) -> np.ndarray:
    """(H, W) bool union of the boxes (a pixel is in a box when its centre is), AND `object_mask`
    when given: the single-view baseline (boxes x object mask) of DFC Table 5."""
    height, width = int(shape[0]), int(shape[1])
    mask = np.zeros((height, width), bool)
    for b in boxes:
        # Centre u + 0.5 in [x0, x1)  <=>  u in [ceil(x0 - 0.5), ceil(x1 - 0.5)).
        c0, c1 = (min(max(math.ceil(x - 0.5), 0), width) for x in (b.x0, b.x1))
        r0, r1 = (min(max(math.ceil(y - 0.5), 0), height) for y in (b.y0, b.y1))
        mask[r0:r1, c0:c1] = True
    if object_mask is not None:
        object_mask = np.asarray(object_mask, bool)
        if object_mask.shape != mask.shape:
            raise ValueError(f"boxes_to_mask: object_mask shape {object_mask.shape} != {mask.shape}")
        mask &= object_mask
    return mask
