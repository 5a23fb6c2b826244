"""Ground-truth geometry for dense functional correspondence (DFC §3.2 and Appendix B.1).

Exact on procedural assets: a view's pixels on a functional part come from the rendered triangle
ids (`face_id`) and the asset's per-face part index (`face_part`), their surface points from
the rendered depth (no depth test needed: the ray cast already found the visible surface), and
two assets sharing a function are aligned by the parts' functional frames
(`operators.data.procedural`: p -> o_B + R_B^T R_A (p - o_A)). The matching itself
(farthest-point sampling in pixel space, then a 3D assignment) is
`operators.metrics.correspondence.ground_truth_matches`.

Pixel convention: `operators.geometry.cameras` (pixel (row r, col c) is centred at
(u, v) = (c + 0.5, r + 0.5)).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pixel_centres(mask: np.ndarray) -> np.ndarray:
    """(n, 2) float32 (u, v) centres of the True pixels of an (H, W) mask, row-major order."""
    rows, cols = np.nonzero(np.asarray(mask))
    return np.stack([cols + 0.5, rows + 0.5], axis=1).astype(np.float32)


def part_mask(face_id: np.ndarray, face_part: np.ndarray, parts: Sequence[int]) -> np.ndarray:
    """(H, W) bool: pixels whose visible triangle belongs to one of `parts` (face_id -1 = miss)."""
    face_id = np.asarray(face_id)
    face_part = np.asarray(face_part).reshape(-1)
    if face_id.size and face_id.max() >= face_part.shape[0]:
        raise ValueError(f"face_id {int(face_id.max())} is out of range for the "
                         f"{face_part.shape[0]} faces of face_part")
    is_part = np.isin(face_part, np.asarray(list(parts), dtype=np.int64))
    hit = face_id >= 0
    out = np.zeros(face_id.shape, bool)
    out[hit] = is_part[face_id[hit]]
    return out


def unproject(uv: np.ndarray, depth: np.ndarray, K: np.ndarray,
              cam_to_world: np.ndarray) -> np.ndarray:
    """World points (n, 3) float64 of pixel centres uv (n, 2) at their rendered depth.

    depth (H, W) is the camera-frame z at each pixel centre (the renderer's convention), so the
    camera point is z * K^-1 [u, v, 1]. Pixels with depth 0 (background) give NaN."""
    uv = np.asarray(uv, np.float64)
    cols = np.minimum(np.floor(uv[:, 0]).astype(np.intp), depth.shape[1] - 1)
    rows = np.minimum(np.floor(uv[:, 1]).astype(np.intp), depth.shape[0] - 1)
    z = np.asarray(depth, np.float64)[rows, cols]
    rays = np.concatenate([uv, np.ones((uv.shape[0], 1))], axis=1) @ np.linalg.inv(
        np.asarray(K, np.float64)).T
    camera = rays * z[:, None]
    world = camera @ np.asarray(cam_to_world, np.float64)[:3, :3].T + cam_to_world[:3, 3]
    world[z <= 0] = np.nan
    return world


def frame_to_frame(points: np.ndarray, frame_from: np.ndarray, frame_to: np.ndarray) -> np.ndarray:
    """Move points of one part into the pose of another part with the same function (DFC §3.2
    aligns two objects by their functional parts): p -> o_B + R_B^T R_A (p - o_A).

    frame_*: (4, 3) rows origin, x, y, z axes (`assets.part_frames`, one per part)."""
    frame_from = np.asarray(frame_from, np.float64)
    frame_to = np.asarray(frame_to, np.float64)
    local = (np.asarray(points, np.float64) - frame_from[0]) @ frame_from[1:].T  # R_A (p - o_A)
    return local @ frame_to[1:] + frame_to[0]                                    # o_B + R_B^T .


def part_surface(face_id: np.ndarray, depth: np.ndarray, K: np.ndarray, cam_to_world: np.ndarray,
                 face_part: np.ndarray, parts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """A view's pixels on `parts` and their world surface points: (n, 2) uv, (n, 3) xyz."""
    pixels = pixel_centres(part_mask(face_id, face_part, parts) & (np.asarray(depth) > 0))
    return pixels, unproject(pixels, depth, K, cam_to_world)
