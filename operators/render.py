"""Multi-view rendering and surface sampling of one mesh by CPU ray casting (DFC 4.1, A.4).

DFC A.4 renders 19 views per object "from various angles, including from above and below" and
aggregates the per-view labels onto 100K points sampled on the surface; this module produces both.
It uses `open3d.t.geometry.RaycastingScene` on the CPU, which works headless (open3d's
OffscreenRenderer aborts the process without a GPU driver).

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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import open3d as o3d

from operators.mesh import Mesh, MeshError, validate_mesh

DISTRIBUTIONS = ("fibonacci", "rings")
# Albedo of meshes without colours or texture: mid grey keeps Lambertian shading visible.
NEUTRAL_ALBEDO = 0.7
# open3d's invalid id for a ray that hits nothing (uint32 max).
_O3D_INVALID_ID = np.iinfo(np.uint32).max
# o3d.utility.random.seed takes a signed 32-bit int.
_O3D_MAX_SEED = 2**31 - 1
# Below this |forward x up| the view direction is treated as straight up or down.
_DEGENERATE_LOOK_EPS = 1e-6


@dataclass(frozen=True)
class RenderSettings:
    """How to render one asset. Angles in degrees; sizes in pixels."""

    views: int = 19                      # DFC A.4 renders 19 views incl. from above and below
    width: int = 224
    height: int = 224
    fov_deg: float = 40.0                # vertical field of view
    # "fibonacci": elevations evenly spread (in sin(elevation), i.e. by sphere area) from
    # elevation_min_deg to elevation_max_deg, azimuths stepped by the golden angle.
    # "rings": one view at each elevation limit plus rings of azimuths at elevations in between.
    distribution: str = "fibonacci"
    elevation_min_deg: float = -60.0     # negative = from below
    elevation_max_deg: float = 80.0
    distance_margin: float = 1.15        # camera distance so the bbox's bounding sphere fits, times this
    background: tuple[int, int, int] = (255, 255, 255)
    ambient: float = 0.35                # albedo * (ambient + (1-ambient) * max(0, n.l))
    n_points: int = 100_000              # DFC A.4 aggregates onto 100K surface points

    def __post_init__(self) -> None:
        def fail(field: str, requirement: str) -> None:
            raise ValueError(f"RenderSettings.{field} {requirement}, got {getattr(self, field)!r}")

        for field in ("views", "width", "height", "n_points"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                fail(field, "must be an integer")
        if self.views < 1:
            fail("views", "must be >= 1")
        if self.width < 8:
            fail("width", "must be >= 8 pixels")
        if self.height < 8:
            fail("height", "must be >= 8 pixels")
        if not 1.0 < self.fov_deg < 170.0:
            fail("fov_deg", "must be in (1, 170) degrees")
        if self.distribution not in DISTRIBUTIONS:
            fail("distribution", f"must be one of {DISTRIBUTIONS}")
        if not -90.0 <= self.elevation_min_deg <= 90.0:
            fail("elevation_min_deg", "must be in [-90, 90] degrees")
        if not -90.0 <= self.elevation_max_deg <= 90.0:
            fail("elevation_max_deg", "must be in [-90, 90] degrees")
        if self.elevation_min_deg > self.elevation_max_deg:
            raise ValueError(
                f"RenderSettings.elevation_min_deg ({self.elevation_min_deg}) must be <= "
                f"elevation_max_deg ({self.elevation_max_deg})")
        if not (np.isfinite(self.distance_margin) and self.distance_margin >= 1.0):
            fail("distance_margin", "must be >= 1 (below 1 the object is cropped)")
        if not 0.0 <= self.ambient <= 1.0:
            fail("ambient", "must be in [0, 1]")
        if self.n_points < 1:
            fail("n_points", "must be >= 1")
        background = tuple(self.background)
        if len(background) != 3 or not all(
                isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c <= 255
                for c in background):
            fail("background", "must be three integers in 0..255 (RGB)")


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


# ----------------------------------------------------------------------------- cameras


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
    us, vs = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    pixels = np.stack([us, vs, np.ones_like(us)], axis=-1).reshape(-1, 3).astype(np.float32)
    pixel_to_world = (cam_to_world[:, :3, :3] @ np.linalg.inv(K)).astype(np.float32)  # R K^-1
    dirs_world = np.matmul(pixels[None], pixel_to_world.transpose(0, 2, 1))  # (V, H*W, 3)
    eyes = cam_to_world[:, :3, 3] - origin
    rays = np.empty((n_views, height * width, 6), dtype=np.float32)
    rays[..., :3] = eyes[:, None, :]
    rays[..., 3:] = dirs_world
    # One call for all views: open3d parallelises over every ray at once.
    hits = _scene(mesh, origin).cast_rays(o3d.core.Tensor(rays.reshape(n_views, height, width, 6)))

    t_hit = hits["t_hit"].numpy()
    primitive_ids = hits["primitive_ids"].numpy()
    mask = np.isfinite(t_hit) & (primitive_ids != _O3D_INVALID_ID)
    depth = np.where(mask, t_hit, 0.0).astype(np.float32)
    mask &= depth > 0.0
    face_id = np.where(mask, primitive_ids.astype(np.int64), -1).astype(np.int32)

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


def face_normals(mesh: Mesh) -> np.ndarray:
    """(F, 3) float64 unit normals by the mesh's winding (zero for degenerate faces)."""
    v = mesh.vertices[mesh.triangles]
    cross = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    return cross / np.maximum(np.linalg.norm(cross, axis=1, keepdims=True), 1e-300)


def sample_surface(mesh: Mesh, n_points: int, seed: int) -> SurfaceSamples:
    """n_points points uniform by area on the surface (DFC A.4), deterministic for a seed.

    open3d's sampler draws from a process-global generator that `o3d.utility.random.seed`
    resets; it does not say which face a point came from, so the face is recovered as the
    closest triangle (exact up to ties on shared edges, where either face is right).
    """
    if n_points < 1:
        raise ValueError(f"n_points must be >= 1, got {n_points}")
    legacy = o3d.geometry.TriangleMesh(
        o3d.utility.Vector3dVector(np.ascontiguousarray(mesh.vertices, dtype=np.float64)),
        o3d.utility.Vector3iVector(np.ascontiguousarray(mesh.triangles, dtype=np.int32)))
    o3d.utility.random.seed(int(np.random.default_rng(seed).integers(0, _O3D_MAX_SEED)))
    points = np.asarray(legacy.sample_points_uniformly(number_of_points=int(n_points)).points)

    origin = 0.5 * (mesh.vertices.min(axis=0) + mesh.vertices.max(axis=0))
    closest = _scene(mesh, origin).compute_closest_points(
        o3d.core.Tensor(np.ascontiguousarray(points - origin, dtype=np.float32)))
    face_id = closest["primitive_ids"].numpy().astype(np.int32)
    return SurfaceSamples(
        xyz=points.astype(np.float32),
        normal=face_normals(mesh)[face_id].astype(np.float32),
        face_id=face_id,
    )


def render_asset(mesh: Mesh, settings: RenderSettings, seed: int,
                 *, name: str = "mesh") -> tuple[RenderedViews, SurfaceSamples]:
    """Validate the mesh (MeshError naming `name`), render its views and sample its surface."""
    validate_mesh(mesh, name)
    return render_views(mesh, settings, seed), sample_surface(mesh, settings.n_points, seed)
