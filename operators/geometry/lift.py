"""Lift per-view 2D patch features onto 3D surface points (CMAT, cmat-cast-3d-affordance.txt §3.1).

CMAT §3.1 renders V views, encodes each with a frozen 2D foundation model and "projects back and
interpolates" the feature maps onto the point cloud; §4 (Stage 1) lifts by inverse projection and
fills with nearest neighbours. Here:

1. every point is projected into every view (`operators.geometry.cameras.project_points`);
2. a point is seen by a view when its depth agrees with the rendered depth of its pixel
   (`operators.geometry.cameras.visibility`, the same test the label aggregation uses);
3. the view's patch grid is sampled bilinearly at the projected pixel. The ONE grid convention:
   a (h, w) grid over an (H, W) image has strides sx = W / w, sy = H / h, and patch (i, j) is
   centred at pixel (u, v) = ((j + 0.5) * sx, (i + 0.5) * sy) of the continuous pixel frame
   (pixel (v, u) covers [u, u+1) x [v, v+1)). That is `align_corners=False` semantics:
   grid coordinate x = u / sx - 0.5, y = v / sy - 0.5, clamped to [0, w-1] x [0, h-1] at the
   borders (outside the outermost patch centres the border patch's feature is used).
   At DINOv2's half stride (7 px with a 14 px kernel) the backbone's tokens actually sit half
   a pixel further right/down ((k + 0.5) * 7 + 0.5: integer padding of 3 + 4 px, see
   operators.models.backbones), i.e. 1/14 of a grid cell; this module ignores that offset;
4. features are averaged over the views that see the point;
5. a point no view sees takes the feature of its nearest seen point (scipy cKDTree).

Memory: points go through in chunks of `chunk`: the working set is O(V * chunk) for projections
and visibility plus O(chunk * C) for the sums, besides the (N, C) output and one float32 copy of
all views' grids (V * h * w * C; 7 MB for 19 views of 16 x 16 x 384). The result does not depend
on the chunk size. Sampling is a sparse (points x grid cells) matrix of bilinear weights times
the stacked grids, which avoids (samples x C) temporaries.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import csr_matrix
from scipy.spatial import cKDTree

from operators.geometry.cameras import project_points, visibility

_PCA_FIT_POINTS = 16384


def bilinear_weights(uv: np.ndarray, image_size: tuple[int, int],
                     grid_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The four grid cells and weights that bilinear sampling at continuous pixels uv (n, 2)
    combines, with the convention of the module docstring.

    Returns flat cell indices (n, 4) int64 into the row-major (h * w) grid and weights (n, 4)
    float32 summing to 1 (clamped at the borders: a weight may sit on a repeated cell).
    """
    height, width = image_size
    grid_h, grid_w = grid_size
    gx = np.clip(uv[:, 0].astype(np.float64) * (grid_w / width) - 0.5, 0.0, grid_w - 1)
    gy = np.clip(uv[:, 1].astype(np.float64) * (grid_h / height) - 0.5, 0.0, grid_h - 1)
    x0 = np.floor(gx).astype(np.int64)
    y0 = np.floor(gy).astype(np.int64)
    x1 = np.minimum(x0 + 1, grid_w - 1)
    y1 = np.minimum(y0 + 1, grid_h - 1)
    fx, fy = gx - x0, gy - y0
    cells = np.stack([y0 * grid_w + x0, y0 * grid_w + x1, y1 * grid_w + x0, y1 * grid_w + x1], axis=1)
    weights = np.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], axis=1)
    return cells, weights.astype(np.float32)


def sample_patch_grid(grid: np.ndarray, uv: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Bilinear sample of one view's patch grid (h, w, C) at continuous pixels uv (n, 2) of an
    (H, W) image, with the convention of the module docstring. Returns (n, C) float32."""
    grid_h, grid_w, channels = grid.shape
    cells, weights = bilinear_weights(np.asarray(uv), image_size, (grid_h, grid_w))
    flat = grid.reshape(grid_h * grid_w, channels)
    return np.einsum("nk,nkc->nc", weights, flat[cells].astype(np.float32))


def _check_inputs(xyz: np.ndarray, view_features: np.ndarray, K: np.ndarray, cam_to_world: np.ndarray,
                  depth: np.ndarray, image_size: tuple[int, int], chunk: int) -> None:
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"lift_features: xyz must be (N, 3), got {xyz.shape}")
    if not np.isfinite(xyz).all():
        raise ValueError("lift_features: xyz has non-finite coordinates")
    if view_features.ndim != 4:
        raise ValueError(f"lift_features: view_features must be (V, h, w, C), got {view_features.shape}")
    n_views = view_features.shape[0]
    if K.shape != (n_views, 3, 3) or cam_to_world.shape != (n_views, 4, 4):
        raise ValueError(f"lift_features: K must be ({n_views}, 3, 3) and cam_to_world ({n_views}, 4, 4), "
                         f"got {K.shape} and {cam_to_world.shape}")
    height, width = image_size
    if depth.shape != (n_views, height, width):
        raise ValueError(f"lift_features: depth must be ({n_views}, {height}, {width}) (views x image_size), "
                         f"got {depth.shape}")
    if chunk < 1:
        raise ValueError(f"lift_features: chunk must be >= 1, got {chunk}")


def lift_features(
    xyz: np.ndarray,
    view_features: np.ndarray,
    K: np.ndarray,
    cam_to_world: np.ndarray,
    depth: np.ndarray,
    image_size: tuple[int, int],
    chunk: int = 16384,
    rel_tol: float = 0.01,
    abs_tol: float = 2e-3,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-point features from per-view patch grids (CMAT §3.1; steps in the module docstring).

    xyz (N, 3) world points; view_features (V, h, w, C) (float16/32); K (V, 3, 3);
    cam_to_world (V, 4, 4); depth (V, H, W) rendered camera-z (0 = miss); image_size (H, W) of
    the views the features were computed from. rel_tol / abs_tol: the depth-test tolerances of
    `operators.geometry.cameras.visibility`.

    Returns features (N, C) float32 and n_views_seen (N,) int16, the number of views whose
    features were averaged (0: the point got its nearest seen neighbour's feature).
    Raises ValueError when no point is seen by any view (nothing to lift from).
    """
    xyz = np.asarray(xyz)
    view_features = np.asarray(view_features)
    K = np.asarray(K)
    cam_to_world = np.asarray(cam_to_world)
    depth = np.asarray(depth)
    image_size = (int(image_size[0]), int(image_size[1]))
    _check_inputs(xyz, view_features, K, cam_to_world, depth, image_size, chunk)
    n_points, n_views, n_channels = xyz.shape[0], view_features.shape[0], view_features.shape[-1]

    grid_h, grid_w = view_features.shape[1:3]
    cells_per_view = grid_h * grid_w
    # All views' cells as rows of one float32 matrix: a chunk's samples are then one sparse
    # (points x cells) matrix of bilinear weights times it, with no (samples x C) temporaries.
    cells = view_features.reshape(n_views * cells_per_view, n_channels).astype(np.float32, copy=False)
    features = np.zeros((n_points, n_channels), np.float32)
    n_seen = np.zeros(n_points, np.int16)
    for start in range(0, n_points, chunk):
        points = xyz[start:start + chunk]
        projection = project_points(points, K, cam_to_world)
        visible = visibility(points, K, cam_to_world, depth, rel_tol, abs_tol, projection=projection)
        views, rows = np.nonzero(visible)
        corner, weights = bilinear_weights(projection[0][views, rows], image_size, (grid_h, grid_w))
        weights_matrix = csr_matrix(
            (weights.ravel(), (np.repeat(rows, 4), (corner + views[:, None] * cells_per_view).ravel())),
            shape=(points.shape[0], cells.shape[0]))  # duplicate (row, cell) entries add up
        counts = visible.sum(axis=0)
        seen = counts > 0
        summed = np.asarray(weights_matrix[seen] @ cells, dtype=np.float32)
        block = features[start:start + chunk]
        block[seen] = summed / counts[seen, None]
        n_seen[start:start + chunk] = counts

    seen = n_seen > 0
    if not seen.any():
        raise ValueError(f"lift_features: none of the {n_points} points is visible in any of the "
                         f"{n_views} views (check cameras, depth and the depth-test tolerances)")
    unseen = np.flatnonzero(~seen)
    if unseen.size:
        seen_idx = np.flatnonzero(seen)
        _, nearest = cKDTree(xyz[seen_idx]).query(xyz[unseen], k=1)
        features[unseen] = features[seen_idx[nearest]]
    return features, n_seen


def subsample_points(n_total: int, n: int, seed: int) -> np.ndarray:
    """n distinct point indices out of n_total, sorted, identical for identical arguments.

    Stores a fixed number of points per asset (e.g. 2048 or 8192 of the 100K surface samples).
    Raises ValueError when n > n_total (a fixed-size table cannot hold fewer points).
    """
    if n_total < 0 or n < 0:
        raise ValueError(f"subsample_points: sizes must be >= 0, got n_total={n_total}, n={n}")
    if n > n_total:
        raise ValueError(f"subsample_points: cannot pick {n} distinct points out of {n_total}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=n, replace=False)).astype(np.int64)


def pca_colors(features: np.ndarray) -> np.ndarray:
    """(N, C) features -> (N, 3) uint8 RGB: the first three principal components, each mapped
    from its 1st..99th percentile to 0..255 (robust to outliers). Deterministic: each component's
    sign is fixed so that its largest loading is positive. Missing components (C < 3 or rank < 3)
    give a constant mid-grey channel."""
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"pca_colors: features must be (N, C), got {features.shape}")
    n_points = features.shape[0]
    colours = np.full((n_points, 3), 128, np.uint8)
    if n_points < 2:
        return colours
    features = features.astype(np.float32, copy=False)
    mean = features.mean(axis=0, dtype=np.float64)
    # The axes are fitted on at most _PCA_FIT_POINTS evenly spaced points: plenty for a picture.
    fit = features[:: max(1, n_points // _PCA_FIT_POINTS)].astype(np.float64) - mean
    covariance = fit.T @ fit / max(len(fit) - 1, 1)  # C x C: cheaper than an SVD of N x C
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1][:3]
    centred = features - mean.astype(np.float32)
    for channel, component in enumerate(order):
        if eigenvalues[component] <= 1e-12 * max(eigenvalues.max(), 1e-300):
            continue
        axis = eigenvectors[:, component]
        axis = axis * np.sign(axis[np.argmax(np.abs(axis))])
        projected = centred @ axis.astype(np.float32)
        lo, hi = np.percentile(projected, [1.0, 99.0])
        if hi - lo <= 0:
            continue
        colours[:, channel] = np.round(np.clip((projected - lo) / (hi - lo), 0.0, 1.0) * 255).astype(np.uint8)
    return colours
