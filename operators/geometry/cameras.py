"""Cameras, projection and visibility: the conventions every stage shares.

Camera convention (shared by every stage; README "Camera and pixel conventions"):
- World frame: +y up. Cameras sit on a sphere around the bbox centre and look at that centre.
  View directions are given by an elevation (angle above the y=0 plane through the centre,
  negative = from below) and an azimuth (angle around +y, 0 = camera on the +z side).
- Camera frame: OpenCV, x right, y down, z forward. `cam_to_world` (4, 4) float32 maps camera
  coordinates to world coordinates: its columns are the world directions of the camera's x, y, z
  axes and its translation is the camera centre. The camera's "up" (-y) is world +y projected
  perpendicular to the viewing direction; looking straight down (up) it is world -z (+z), which is
  the limit of tilting a camera on the +z side down (up).
- Intrinsics `K` = [[f, 0, W/2], [0, f, H/2], [0, 0, 1]], square pixels, f from the vertical fov.
  Pixel (v, u) covers [u, u+1) x [v, v+1); its ray goes through its centre (u+0.5, v+0.5).
  The ray direction is K^-1 [u+0.5, v+0.5, 1] (camera z component 1), so the hit distance along
  it is the camera-frame depth z.
- depth = camera z at the pixel centre, 0 on a miss; mask = depth > 0; face_id = triangle index,
  -1 on a miss; normal = world unit face normal flipped to face the camera, 0 on a miss.

Plain numpy: the renderer (open3d) builds its cameras here, and the label aggregation, the feature
lifting, the trainers and the benchmarks project with the same functions.
"""

from __future__ import annotations

import numpy as np

from operators.settings import RenderSettings

# Points closer to the camera plane than this (metres) count as behind it.
_MIN_DEPTH = 1e-6
# Below this |forward x up| the view direction is treated as straight up or down.
_DEGENERATE_LOOK_EPS = 1e-6


def intrinsics(settings: RenderSettings) -> np.ndarray:
    """(3, 3) float32 pinhole K with square pixels from the vertical fov, principal point centred."""
    focal = 0.5 * settings.height / np.tan(np.radians(settings.fov_deg) / 2.0)
    return np.array([[focal, 0.0, settings.width / 2.0],
                     [0.0, focal, settings.height / 2.0],
                     [0.0, 0.0, 1.0]], dtype=np.float32)


def view_angles(settings: RenderSettings) -> tuple[np.ndarray, np.ndarray]:
    """Elevations and azimuths (radians, (V,) float64) of the views, per `settings.distribution`."""
    n = settings.views
    low, high = np.radians(settings.elevation_min_deg), np.radians(settings.elevation_max_deg)
    if settings.distribution == "fibonacci":
        # Evenly spaced in sin(elevation) = evenly by area of the spherical zone; endpoints
        # included so the extreme views from above and below are really taken.
        if n == 1:
            sines = np.array([np.sin(0.5 * (low + high))])
        else:
            sines = np.linspace(np.sin(low), np.sin(high), n)
        elevations = np.arcsin(np.clip(sines, -1.0, 1.0))
        golden_angle = np.pi * (3.0 - np.sqrt(5.0))
        azimuths = np.mod(np.arange(n) * golden_angle, 2.0 * np.pi)
        return elevations, azimuths
    # "rings": a top and a bottom view at the elevation limits, the rest on rings in between.
    if n == 1:
        return np.array([0.5 * (low + high)]), np.zeros(1)
    n_ring_views = n - 2
    n_rings = int(np.clip(round(n_ring_views / 6), 1, max(n_ring_views, 1)))
    ring_elevations = np.linspace(low, high, n_rings + 2)[1:-1]
    elevations, azimuths = [high, low], [0.0, 0.0]
    for ring, ids in enumerate(np.array_split(np.arange(n_ring_views), n_rings)):
        count = len(ids)
        # Offset alternate rings by half a step so neighbouring rings do not line up.
        offset = 0.5 * (ring % 2) * 2.0 * np.pi / max(count, 1)
        elevations += [ring_elevations[ring]] * count
        azimuths += list(offset + np.arange(count) * 2.0 * np.pi / max(count, 1))
    return np.asarray(elevations, dtype=np.float64), np.mod(np.asarray(azimuths), 2.0 * np.pi)


def look_at(eyes: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(V, 4, 4) float64 OpenCV cam_to_world for cameras at `eyes` (V, 3) looking at `target` (3,)."""
    forward = target[None, :] - eyes
    forward /= np.linalg.norm(forward, axis=1, keepdims=True)
    world_up = np.broadcast_to(np.array([0.0, 1.0, 0.0]), forward.shape).copy()
    right = np.cross(forward, world_up)
    degenerate = np.linalg.norm(right, axis=1) < _DEGENERATE_LOOK_EPS
    if degenerate.any():
        # Straight down: image up = world -z; straight up: +z (limit of tilting a +z camera).
        fallback_up = np.zeros((int(degenerate.sum()), 3))
        fallback_up[:, 2] = np.where(forward[degenerate, 1] < 0.0, -1.0, 1.0)
        right[degenerate] = np.cross(forward[degenerate], fallback_up)
    right /= np.linalg.norm(right, axis=1, keepdims=True)
    down = np.cross(forward, right)  # x right, y down, z forward: right-handed
    pose = np.tile(np.eye(4), (len(eyes), 1, 1))
    pose[:, :3, 0], pose[:, :3, 1], pose[:, :3, 2], pose[:, :3, 3] = right, down, forward, eyes
    return pose


def camera_distance(bbox: np.ndarray, settings: RenderSettings) -> float:
    """Distance from the bbox centre at which its bounding sphere fits the narrower fov, x margin."""
    radius = max(0.5 * float(np.linalg.norm(bbox[1] - bbox[0])), 1e-9)
    focal = float(intrinsics(settings)[1, 1])
    half_fov = min(np.arctan(0.5 * settings.height / focal), np.arctan(0.5 * settings.width / focal))
    # A sphere of radius r seen from distance d fills a cone of half-angle asin(r / d).
    return settings.distance_margin * radius / np.sin(half_fov)


def camera_poses(bbox: np.ndarray, settings: RenderSettings) -> tuple[np.ndarray, np.ndarray]:
    """K (3, 3) float32 and cam_to_world (V, 4, 4) float32 of the views of an object with `bbox`.

    bbox: (2, 3) min and max corner. All cameras look at the bbox centre from `camera_distance`.
    """
    bbox = np.asarray(bbox, dtype=np.float64)
    if bbox.shape != (2, 3) or not np.isfinite(bbox).all():
        raise ValueError(f"bbox must be a finite (2, 3) array of min and max corners, got {bbox!r}")
    centre = 0.5 * (bbox[0] + bbox[1])
    elevations, azimuths = view_angles(settings)
    directions = np.stack([np.cos(elevations) * np.sin(azimuths),
                           np.sin(elevations),
                           np.cos(elevations) * np.cos(azimuths)], axis=1)
    eyes = centre[None, :] + camera_distance(bbox, settings) * directions
    return intrinsics(settings), look_at(eyes, centre).astype(np.float32)



def _check_points(xyz: np.ndarray) -> np.ndarray:
    xyz = np.asarray(xyz)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"xyz must have shape (N, 3), got {xyz.shape}")
    return xyz.astype(np.float64, copy=False)


def _check_cameras(K: np.ndarray, cam_to_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    K = np.asarray(K, np.float64)
    cam_to_world = np.asarray(cam_to_world, np.float64)
    if K.ndim == 2:
        K = K[None]
    if cam_to_world.ndim == 2:
        cam_to_world = cam_to_world[None]
    if K.shape[1:] != (3, 3) or cam_to_world.shape[1:] != (4, 4) or K.shape[0] != cam_to_world.shape[0]:
        raise ValueError(f"K must be (V, 3, 3) and cam_to_world (V, 4, 4) with the same V, "
                         f"got {K.shape} and {cam_to_world.shape}")
    if not (np.isfinite(K).all() and np.isfinite(cam_to_world).all()):
        raise ValueError("K and cam_to_world must be finite")
    return K, cam_to_world


def project_points(xyz: np.ndarray, K: np.ndarray, cam_to_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project world points into every view.

    Returns uv (V, N, 2) float32 continuous pixel coordinates (u = column, v = row; NaN for points
    at or behind the camera plane) and z (V, N) float32, the camera-frame depth.
    """
    xyz = _check_points(xyz)
    K, cam_to_world = _check_cameras(K, cam_to_world)
    n_views, n_points = K.shape[0], xyz.shape[0]
    uv = np.empty((n_views, n_points, 2), np.float32)
    z = np.empty((n_views, n_points), np.float32)
    for v in range(n_views):
        world_to_cam = np.linalg.inv(cam_to_world[v])
        cam = xyz @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
        pix = cam @ K[v].T
        in_front = cam[:, 2] > _MIN_DEPTH
        with np.errstate(divide="ignore", invalid="ignore"):
            projected = pix[:, :2] / pix[:, 2:3]
        projected[~in_front] = np.nan
        uv[v] = projected
        z[v] = cam[:, 2]
    return uv, z


def visibility(
    xyz: np.ndarray,
    K: np.ndarray,
    cam_to_world: np.ndarray,
    depth: np.ndarray,
    rel_tol: float = 0.01,
    abs_tol: float = 2e-3,
    *,
    projection: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """(V, N) bool: the point is in front of the camera, projects inside the image, and its depth
    matches the rendered depth of its pixel: |z - d| <= abs_tol + rel_tol * d with d > 0.

    The tolerance absorbs that d is sampled at the pixel centre while the point lies anywhere in
    the pixel (on a slanted surface that differs by about pixel footprint x slope; metres).
    Pass `projection=project_points(...)` to reuse a projection.
    """
    if rel_tol < 0 or abs_tol < 0:
        raise ValueError(f"visibility tolerances must be >= 0, got rel_tol={rel_tol}, abs_tol={abs_tol}")
    depth = np.asarray(depth)
    if depth.ndim == 2:
        depth = depth[None]
    uv, z = projection if projection is not None else project_points(xyz, K, cam_to_world)
    n_views, n_points = z.shape
    if depth.ndim != 3 or depth.shape[0] != n_views:
        raise ValueError(f"depth must be (V, H, W) with V={n_views}, got {depth.shape}")
    height, width = depth.shape[1:]
    visible = np.zeros((n_views, n_points), bool)
    for v in range(n_views):
        u, w = uv[v, :, 0], uv[v, :, 1]
        with np.errstate(invalid="ignore"):
            inside = (z[v] > _MIN_DEPTH) & (u >= 0) & (u < width) & (w >= 0) & (w < height)
        idx = np.flatnonzero(inside)
        cols = np.minimum(np.floor(u[idx]).astype(np.intp), width - 1)
        rows = np.minimum(np.floor(w[idx]).astype(np.intp), height - 1)
        d = depth[v, rows, cols].astype(np.float64)
        agrees = (d > 0) & (np.abs(z[v, idx] - d) <= abs_tol + rel_tol * d)
        visible[v, idx[agrees]] = True
    return visible
