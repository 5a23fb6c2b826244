"""Plain-Python per-point references that the benchmarks time against the vectorised operators.

REFERENCE ONLY: the straightforward way of doing the work (one point, one view at a time), with
the same rules as `operators.geometry.cameras.project_points` / `visibility`.
"""

from __future__ import annotations

import numpy as np

Camera = tuple[list[list[float]], list[float], float, float, float, float]  # R, t, fx, fy, cx, cy


def reference_cameras(K: np.ndarray, cam_to_world: np.ndarray) -> list[Camera]:
    cameras = []
    for v in range(K.shape[0]):
        world_to_cam = np.linalg.inv(cam_to_world[v].astype(np.float64))
        cameras.append((world_to_cam[:3, :3].tolist(), world_to_cam[:3, 3].tolist(),
                        float(K[v, 0, 0]), float(K[v, 1, 1]), float(K[v, 0, 2]), float(K[v, 1, 2])))
    return cameras


def visible_pixel(x: float, y: float, z: float, camera: Camera, depth_rows: list,
                  width: int, height: int, rel_tol: float, abs_tol: float
                  ) -> tuple[float, float] | None:
    """The point's continuous pixel (u, v) in one view when it is in front of the camera, inside
    the image and agrees with the rendered depth of its pixel; else None."""
    r, t, fx, fy, cx, cy = camera
    zc = r[2][0] * x + r[2][1] * y + r[2][2] * z + t[2]
    if zc <= 1e-6:
        return None
    u = fx * (r[0][0] * x + r[0][1] * y + r[0][2] * z + t[0]) / zc + cx
    w = fy * (r[1][0] * x + r[1][1] * y + r[1][2] * z + t[1]) / zc + cy
    if not (0.0 <= u < width and 0.0 <= w < height):
        return None
    d = depth_rows[int(w)][int(u)]
    if d <= 0.0 or abs(zc - d) > abs_tol + rel_tol * d:
        return None
    return u, w
