"""Multi-view rendering and surface sampling of one mesh by CPU ray casting (DFC 4.1, A.4).

DFC A.4 renders 19 views per object "from various angles, including from above and below" and
aggregates the per-view labels onto 100K points sampled on the surface; this module produces both.
It uses `open3d.t.geometry.RaycastingScene` on the CPU, which works headless (open3d's
OffscreenRenderer aborts the process without a GPU driver).

Cameras and the pixel convention are in `operators.geometry.cameras` (README "Camera and pixel
conventions").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import open3d as o3d

from operators.geometry.cameras import camera_poses
from operators.geometry.mesh import Mesh, MeshError, validate_mesh
from operators.settings import RenderSettings

# Albedo of meshes without colours or texture: mid grey keeps Lambertian shading visible.
NEUTRAL_ALBEDO = 0.7
# open3d's invalid id for a ray that hits nothing (uint32 max).
_O3D_INVALID_ID = np.iinfo(np.uint32).max


@dataclass(frozen=True)
class RenderedViews:
    """V views of one asset, stacked on the leading axis (see the module docstring)."""

    rgb: np.ndarray           # (V, H, W, 3) uint8
    depth: np.ndarray         # (V, H, W) float32, camera z, 0 on a miss
    mask: np.ndarray          # (V, H, W) bool
    face_id: np.ndarray       # (V, H, W) int32, -1 on a miss
    normal: np.ndarray        # (V, H, W, 3) float32 world unit normals facing the camera
    K: np.ndarray             # (V, 3, 3) float32
    cam_to_world: np.ndarray  # (V, 4, 4) float32


@dataclass(frozen=True)
class SurfaceSamples:
    """Points sampled uniformly by area on the mesh surface."""

    xyz: np.ndarray      # (N, 3) float32 world coordinates
    normal: np.ndarray   # (N, 3) float32 unit face normals (mesh winding, not reoriented)
    face_id: np.ndarray  # (N,) int32 triangle each point lies on


# ----------------------------------------------------------------------------- rendering


def _scene(mesh: Mesh, origin: np.ndarray) -> o3d.t.geometry.RaycastingScene:
    """Ray-casting scene of the mesh shifted by -origin (float32 keeps precision near the object)."""
    scene = o3d.t.geometry.RaycastingScene()
    vertices = np.ascontiguousarray(mesh.vertices - origin, dtype=np.float32)
    triangles = np.ascontiguousarray(mesh.triangles, dtype=np.uint32)
    scene.add_triangles(o3d.core.Tensor(vertices), o3d.core.Tensor(triangles))
    return scene


def _texture_rgb(texture: np.ndarray, name: str) -> np.ndarray:
    if texture.dtype != np.uint8:
        raise MeshError(f"{name}: texture must be uint8, got {texture.dtype}")
    if texture.ndim == 2:
        return np.repeat(texture[:, :, None], 3, axis=2)
    if texture.ndim == 3 and texture.shape[2] in (3, 4) and min(texture.shape[:2]) > 0:
        return texture[:, :, :3]
    raise MeshError(f"{name}: texture must be (H, W, 3) uint8, got shape {texture.shape}")


def _albedo(mesh: Mesh, faces: np.ndarray, bary_u: np.ndarray, bary_v: np.ndarray) -> np.ndarray:
    """(N, 3) float32 albedo in 0..1 at hits on `faces` with open3d barycentrics (u, v).

    open3d: hit = (1-u-v) * p0 + u * p1 + v * p2 (checked by a test). Texture wins over vertex
    colours; neither gives a neutral grey.
    """
    weights = np.stack([1.0 - bary_u - bary_v, bary_u, bary_v], axis=1).astype(np.float32)
    if mesh.texture is not None and mesh.triangle_uvs is not None:
        texture = _texture_rgb(np.asarray(mesh.texture), "mesh")
        uvs = np.asarray(mesh.triangle_uvs, dtype=np.float32)
        if uvs.shape != (mesh.n_faces, 3, 2):
            raise MeshError(f"mesh: triangle_uvs shape {uvs.shape} != ({mesh.n_faces}, 3, 2)")
        uv = np.einsum("nk,nkc->nc", weights, uvs[faces])
        # Repeat-wrap UVs outside [0, 1] (the OBJ default) but keep 1.0 on the last texel.
        uv = np.where((uv < 0.0) | (uv > 1.0), uv - np.floor(uv), uv)
        tex_h, tex_w = texture.shape[:2]
        cols = np.clip(np.floor(uv[:, 0] * tex_w), 0, tex_w - 1).astype(np.int64)
        rows = np.clip(np.floor((1.0 - uv[:, 1]) * tex_h), 0, tex_h - 1).astype(np.int64)  # v up
        return texture[rows, cols].astype(np.float32) / 255.0
    if mesh.vertex_colors is not None:
        corner_colors = np.asarray(mesh.vertex_colors, dtype=np.float32)[mesh.triangles[faces]]
        return np.clip(np.einsum("nk,nkc->nc", weights, corner_colors), 0.0, 1.0)
    return np.full((len(faces), 3), NEUTRAL_ALBEDO, dtype=np.float32)


def _light_directions(cam_to_world: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(V, 3) unit lights, cosine-distributed over the hemisphere around the direction to the camera.

    Adding a uniform unit vector to the unit direction towards the camera gives a
    cosine-weighted direction in that hemisphere, so the side the camera sees is mostly lit.
    """
    towards_camera = -cam_to_world[:, :3, 2].astype(np.float64)
    random_unit = rng.normal(size=towards_camera.shape)
    random_unit /= np.linalg.norm(random_unit, axis=1, keepdims=True)
    light = towards_camera + random_unit
    norms = np.linalg.norm(light, axis=1, keepdims=True)
    light = np.where(norms > 1e-6, light / np.maximum(norms, 1e-12), towards_camera)
    return light.astype(np.float32)


def render_cameras(mesh: Mesh, K: np.ndarray, cam_to_world: np.ndarray,
                   settings: RenderSettings, seed: int) -> RenderedViews:
    """Render the mesh from the given cameras at settings.width x settings.height.

    K: (3, 3) shared or (V, 3, 3) per view; cam_to_world: (V, 4, 4) (see the module docstring).
    Only the image size, background and ambient of `settings` are used. `seed` draws the lights.
    """
    cam_to_world = np.asarray(cam_to_world, dtype=np.float64)
    if cam_to_world.ndim != 3 or cam_to_world.shape[1:] != (4, 4):
        raise ValueError(f"cam_to_world must be (V, 4, 4), got {cam_to_world.shape}")
    n_views, height, width = cam_to_world.shape[0], settings.height, settings.width
    K = np.broadcast_to(np.asarray(K, dtype=np.float64), (n_views, 3, 3))
    origin = 0.5 * (mesh.vertices.min(axis=0) + mesh.vertices.max(axis=0))

    # Rays through pixel centres with camera-frame direction K^-1 [u, v, 1] (z = 1): t_hit = depth.
    # World direction = M [u, v, 1] with M = R K^-1, written column by column (a batched 3x3
    # matmul over every pixel is several times slower).
    us = np.tile(np.arange(width, dtype=np.float32) + 0.5, height)
    vs = np.repeat(np.arange(height, dtype=np.float32) + 0.5, width)
    pixel_to_world = (cam_to_world[:, :3, :3] @ np.linalg.inv(K)).astype(np.float32)  # R K^-1
    rays = np.empty((n_views, height * width, 6), dtype=np.float32)
    rays[..., :3] = (cam_to_world[:, :3, 3] - origin)[:, None, :]
    dirs_world = rays[..., 3:]  # (V, H*W, 3), a view
    dirs_world[:] = pixel_to_world[:, None, :, 2]
    dirs_world += us[None, :, None] * pixel_to_world[:, None, :, 0]
    dirs_world += vs[None, :, None] * pixel_to_world[:, None, :, 1]
    # One call for all views: open3d parallelises over every ray at once.
    hits = _scene(mesh, origin).cast_rays(o3d.core.Tensor(rays.reshape(n_views, height, width, 6)))

    t_hit = hits["t_hit"].numpy()
    primitive_ids = hits["primitive_ids"].numpy()
    mask = (primitive_ids != _O3D_INVALID_ID) & (t_hit > 0.0)  # inf t_hit on a miss
    depth = np.where(mask, t_hit, np.float32(0.0))
    # open3d's invalid id is uint32 max, which reads as -1 in int32: one pass, no copies.
    face_id = np.where(mask, primitive_ids.view(np.int32), np.int32(-1))

    hit_index = np.flatnonzero(mask)
    view_of_hit = hit_index // (height * width)
    faces = face_id.reshape(-1)[hit_index]
    ray_dirs = dirs_world.reshape(-1, 3)[hit_index]
    normals = hits["primitive_normals"].numpy().reshape(-1, 3)[hit_index]
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    # Imported meshes wind inconsistently: orient every normal towards the camera.
    normals *= np.where((normals * ray_dirs).sum(axis=1) > 0.0, -1.0, 1.0)[:, None]
    barycentric = hits["primitive_uvs"].numpy().reshape(-1, 2)[hit_index]
    albedo = _albedo(mesh, faces, barycentric[:, 0], barycentric[:, 1])

    lights = _light_directions(cam_to_world, np.random.default_rng(seed))
    lambert = np.maximum((normals * lights[view_of_hit]).sum(axis=1), 0.0)
    shading = settings.ambient + (1.0 - settings.ambient) * lambert
    colour = np.clip(np.rint(albedo * shading[:, None] * 255.0), 0, 255).astype(np.uint8)

    rgb = np.empty((n_views * height * width, 3), dtype=np.uint8)
    rgb[:] = np.asarray(settings.background, dtype=np.uint8)
    rgb[hit_index] = colour
    normal_image = np.zeros((n_views * height * width, 3), dtype=np.float32)
    normal_image[hit_index] = normals
    return RenderedViews(
        rgb=rgb.reshape(n_views, height, width, 3),
        depth=depth,
        mask=mask,
        face_id=face_id,
        normal=normal_image.reshape(n_views, height, width, 3),
        K=np.ascontiguousarray(K, dtype=np.float32),
        cam_to_world=cam_to_world.astype(np.float32),
    )


def render_views(mesh: Mesh, settings: RenderSettings, seed: int) -> RenderedViews:
    """Render settings.views views around the mesh (cameras from `camera_poses`)."""
    K, cam_to_world = camera_poses(mesh.bbox(), settings)
    return render_cameras(mesh, K, cam_to_world, settings, seed)


# ----------------------------------------------------------------------------- surface samples


def sample_surface(mesh: Mesh, n_points: int, seed: int) -> SurfaceSamples:
    """n_points points uniform by area on the surface (DFC A.4), deterministic for a seed.

    A face is drawn with probability proportional to its area, then a point uniformly inside it
    (barycentrics (1 - sqrt(r1), sqrt(r1) (1 - r2), sqrt(r1) r2)), so each point's face is known
    exactly, without searching for the closest triangle afterwards.
    """
    if n_points < 1:
        raise ValueError(f"n_points must be >= 1, got {n_points}")
    corners = mesh.vertices[mesh.triangles]  # (F, 3, 3)
    cross = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    lengths = np.linalg.norm(cross, axis=1)  # twice the areas; the normals' lengths too
    areas = 0.5 * lengths
    total = float(areas.sum())
    if not total > 0.0:
        raise MeshError("mesh has zero surface area: nothing to sample")
    rng = np.random.default_rng(seed)
    face_id = np.minimum(np.searchsorted(np.cumsum(areas) / total, rng.random(n_points),
                                         side="right"), mesh.n_faces - 1).astype(np.int32)
    sqrt_r1, r2 = np.sqrt(rng.random(n_points)), rng.random(n_points)
    weights = np.stack([1.0 - sqrt_r1, sqrt_r1 * (1.0 - r2), sqrt_r1 * r2], axis=1)
    xyz = np.einsum("nk,nkc->nc", weights, corners[face_id])
    return SurfaceSamples(
        xyz=xyz.astype(np.float32),
        normal=(cross[face_id] / np.maximum(lengths[face_id], 1e-300)[:, None]).astype(np.float32),
        face_id=face_id,
    )


def render_asset(mesh: Mesh, settings: RenderSettings, seed: int,
                 *, name: str = "mesh") -> tuple[RenderedViews, SurfaceSamples]:
    """Validate the mesh (MeshError naming `name`), render its views and sample its surface."""
    validate_mesh(mesh, name)
    return render_views(mesh, settings, seed), sample_surface(mesh, settings.n_points, seed)
