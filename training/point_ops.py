"""Point-cloud operations of the PointMAE-style encoder (CMAT §3.2), batched plain torch: they
run on CPU and GPU alike, with no CUDA-only extension.

- `normalize_unit_sphere`: centre on the centroid, scale the farthest point to radius 1 (the
  encoder's input normalisation; +y stays up).
- `farthest_point_sample`: M well-spread indices per cloud (greedy farthest point, starting at
  index `start`), the patch centres and the N input points alike.
- `knn`: the k nearest points of each centre (Euclidean distance, nearest first), and `group`:
  the patches, each centred on its centre.

The numpy `operators.metrics.correspondence.farthest_point_sampling` is the reference the tests
compare with (same greedy rule, same start).
"""

from __future__ import annotations

import torch
from torch import Tensor


def normalize_unit_sphere(xyz: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, N, 3) -> the normalised clouds, their centroids (B, 3) and scales (B,): every point
    of a cloud within radius 1 of the origin, its farthest point on the sphere."""
    if xyz.ndim != 3 or xyz.shape[-1] != 3:
        raise ValueError(f"normalize_unit_sphere: xyz must be (B, N, 3), got {tuple(xyz.shape)}")
    centre = xyz.mean(dim=1)
    shifted = xyz - centre[:, None]
    scale = shifted.norm(dim=-1).amax(dim=1).clamp_min(1e-12)
    return shifted / scale[:, None, None], centre, scale


def farthest_point_sample(xyz: Tensor, m: int, start: int = 0) -> Tensor:
    """(B, N, 3) -> (B, m) int64 indices: greedily the point farthest from those chosen so far,
    from index `start`. O(m N) per cloud, vectorised over the batch (one (B, N) distance update
    per chosen point)."""
    if xyz.ndim != 3 or xyz.shape[-1] != 3:
        raise ValueError(f"farthest_point_sample: xyz must be (B, N, 3), got {tuple(xyz.shape)}")
    batch, n_points = xyz.shape[:2]
    if not 0 < m <= n_points:
        raise ValueError(f"farthest_point_sample: m must be in [1, {n_points}], got {m}")
    if not 0 <= start < n_points:
        raise ValueError(f"farthest_point_sample: start {start} is outside [0, {n_points})")
    chosen = torch.empty(batch, m, dtype=torch.long, device=xyz.device)
    nearest = torch.full((batch, n_points), float("inf"), dtype=xyz.dtype, device=xyz.device)
    current = torch.full((batch,), start, dtype=torch.long, device=xyz.device)
    rows = torch.arange(batch, device=xyz.device)
    for i in range(m):
        chosen[:, i] = current
        picked = xyz[rows, current]                                   # (B, 3)
        nearest = torch.minimum(nearest, ((xyz - picked[:, None]) ** 2).sum(-1))
        nearest[rows, current] = -1.0  # never picked twice, even among duplicate points
        current = nearest.argmax(dim=1)  # argmax returns the first maximum: lower index wins
    return chosen


def knn(xyz: Tensor, centres: Tensor, k: int) -> Tensor:
    """Indices (B, M, k) into xyz (B, N, 3) of the k nearest points of each centre (B, M, 3),
    nearest first."""
    n_points = xyz.shape[1]
    if not 0 < k <= n_points:
        raise ValueError(f"knn: k must be in [1, {n_points}], got {k}")
    distances = torch.cdist(centres, xyz, compute_mode="donot_use_mm_for_euclid_dist")
    return distances.topk(k, dim=-1, largest=False, sorted=True).indices


def group(xyz: Tensor, centres: Tensor, index: Tensor) -> Tensor:
    """The patches (B, M, k, 3): the points `index` (B, M, k) of each centre, minus the centre
    (PointMAE embeds local shape; position comes from the centre's own embedding)."""
    batch = torch.arange(xyz.shape[0], device=xyz.device)[:, None, None]
    return xyz[batch, index] - centres[:, :, None]
