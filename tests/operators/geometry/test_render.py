"""Unit tests of the ray-casting renderer and the surface sampler (no Ray)."""

from __future__ import annotations

import dataclasses

import numpy as np
import open3d as o3d
import pytest

from operators.geometry.cameras import camera_poses, intrinsics, view_angles
from operators.geometry.mesh import Mesh, MeshError
from operators.geometry.render import render_asset, render_cameras, render_views, sample_surface
from operators.settings import RenderSettings

SMALL = RenderSettings(views=5, width=48, height=40, n_points=500)


def unit_cube() -> Mesh:
    box = o3d.geometry.TriangleMesh.create_box(1.0, 1.0, 1.0)
    box.translate((-0.5, -0.5, -0.5))
    return Mesh(vertices=np.asarray(box.vertices, dtype=np.float64),
                triangles=np.asarray(box.triangles, dtype=np.int32))


def camera_at_z3() -> np.ndarray:
    """cam_to_world of a camera at (0, 0, 3) looking towards -z, image up = world +y."""
    pose = np.eye(4)
    pose[:3, 0] = (1.0, 0.0, 0.0)    # camera x (right) = world +x
    pose[:3, 1] = (0.0, -1.0, 0.0)   # camera y (down) = world -y
    pose[:3, 2] = (0.0, 0.0, -1.0)   # camera z (forward) = world -z
    pose[:3, 3] = (0.0, 0.0, 3.0)
    return pose[None]


def world_hits(views, view: int) -> tuple[np.ndarray, np.ndarray]:
    """Hit points (N, 3) of one view from depth, and their (v, u) pixel indices (N, 2)."""
    rows, cols = np.nonzero(views.mask[view])
    z = views.depth[view][rows, cols].astype(np.float64)
    K = views.K[view].astype(np.float64)
    cam = np.stack([(cols + 0.5 - K[0, 2]) / K[0, 0] * z, (rows + 0.5 - K[1, 2]) / K[1, 1] * z, z], 1)
    pose = views.cam_to_world[view].astype(np.float64)
    return cam @ pose[:3, :3].T + pose[:3, 3], np.stack([rows, cols], 1)


def project(points: np.ndarray, K: np.ndarray, cam_to_world: np.ndarray) -> np.ndarray:
    """(N, 3) camera coordinates -> (N, 3) continuous (u, v, z)."""
    world_to_cam = np.linalg.inv(cam_to_world.astype(np.float64))
    cam = points @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
    K = K.astype(np.float64)
    return np.stack([K[0, 0] * cam[:, 0] / cam[:, 2] + K[0, 2],
                     K[1, 1] * cam[:, 1] / cam[:, 2] + K[1, 2], cam[:, 2]], 1)


# ----------------------------------------------------------------------------- cube seen from +z


def test_cube_from_front_depth_mask_and_faces() -> None:
    settings = RenderSettings(views=1, width=64, height=64, fov_deg=40.0)
    K = intrinsics(settings)
    views = render_cameras(unit_cube(), K, camera_at_z3(), settings, seed=0)
    assert views.depth[0, 32, 32] == pytest.approx(2.5, abs=1e-4)
    # The front face z=0.5 projects to a square of half-size f*0.5/2.5 pixels about the centre;
    # a pixel is hit when its centre lies inside it.
    half = float(K[0, 0]) * 0.5 / 2.5
    centres = np.arange(64) + 0.5
    inside = int(((centres > 32 - half) & (centres < 32 + half)).sum())
    assert abs(int(views.mask[0].sum()) - inside**2) <= 4 * inside  # one-pixel border tolerance
    assert np.allclose(views.depth[0][views.mask[0]], 2.5, atol=1e-4)  # only the front face
    faces = views.face_id[0][views.mask[0]]
    assert faces.min() >= 0 and faces.max() < 12
    assert (views.face_id[0][~views.mask[0]] == -1).all()
    assert (views.depth[0][~views.mask[0]] == 0).all()
    # The front face's normal is +z and faces the camera.
    assert np.allclose(views.normal[0][views.mask[0]], (0.0, 0.0, 1.0), atol=1e-5)
    assert (views.normal[0][~views.mask[0]] == 0).all()


def test_hit_points_project_back_to_their_pixel() -> None:
    settings = RenderSettings(views=4, width=40, height=32)
    views = render_views(unit_cube(), settings, seed=3)
    for view in range(settings.views):
        points, pixels = world_hits(views, view)
        # The hit also lies on the cube's surface (max-norm 0.5).
        assert np.allclose(np.abs(points).max(axis=1), 0.5, atol=1e-4)
        uvz = project(points, views.K[view], views.cam_to_world[view])
        assert (np.floor(uvz[:, 1]).astype(int) == pixels[:, 0]).all()
        assert (np.floor(uvz[:, 0]).astype(int) == pixels[:, 1]).all()
        assert np.allclose(uvz[:, 2], views.depth[view][views.mask[view]], atol=1e-4)


def test_normals_face_the_camera_even_with_flipped_winding() -> None:
    cube = unit_cube()
    flipped = Mesh(cube.vertices, cube.triangles[:, ::-1].copy())
    for mesh in (cube, flipped):
        views = render_views(mesh, SMALL, seed=1)
        for view in range(SMALL.views):
            points, _ = world_hits(views, view)
            towards_camera = views.cam_to_world[view][:3, 3] - points
            normals = views.normal[view][views.mask[view]]
            assert np.allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-5)
            assert (np.einsum("nc,nc->n", normals, towards_camera) > 0).all()


# ----------------------------------------------------------------------------- cameras


@pytest.mark.parametrize("distribution", ["fibonacci", "rings"])
def test_camera_poses_distinct_look_at_centre_and_fit(distribution: str) -> None:
    settings = RenderSettings(distribution=distribution)
    # An elongated, off-centre box: every corner must be in every view.
    vertices = np.array([[x, y, z] for x in (1.0, 1.3) for y in (0.0, 2.0) for z in (-0.2, 0.1)])
    bbox = np.stack([vertices.min(0), vertices.max(0)])
    centre = bbox.mean(axis=0)
    K, poses = camera_poses(bbox, settings)
    assert K.shape == (3, 3) and K.dtype == np.float32
    assert poses.shape == (19, 4, 4) and poses.dtype == np.float32
    eyes = poses[:, :3, 3].astype(np.float64)
    assert len(np.unique(np.round(eyes, 5), axis=0)) == 19
    # Orthonormal right-handed rotations whose z axis points at the centre.
    rotations = poses[:, :3, :3].astype(np.float64)
    assert np.allclose(rotations @ rotations.transpose(0, 2, 1), np.eye(3), atol=1e-5)
    assert np.allclose(np.linalg.det(rotations), 1.0, atol=1e-5)
    to_centre = centre - eyes
    to_centre /= np.linalg.norm(to_centre, axis=1, keepdims=True)
    assert np.allclose(rotations[:, :, 2], to_centre, atol=1e-5)
    # Image up (-y) has a positive world-y component: objects are upright in the images.
    assert (-rotations[:, 1, 1] > 0).all()
    elevations = np.degrees(np.arcsin(-to_centre[:, 1]))
    assert elevations.min() >= -60 - 1e-3 and elevations.max() <= 80 + 1e-3
    assert (elevations < -30).any() and (elevations > 30).any()
    for pose in poses:
        uvz = project(vertices, K, pose)
        assert (uvz[:, 2] > 0).all()
        assert (uvz[:, 0] >= 0).all() and (uvz[:, 0] < settings.width).all()
        assert (uvz[:, 1] >= 0).all() and (uvz[:, 1] < settings.height).all()


def test_view_angles_elevation_limits_and_counts() -> None:
    for distribution in ("fibonacci", "rings"):
        for views in (1, 2, 3, 19, 30):
            settings = RenderSettings(views=views, distribution=distribution)
            elevations, azimuths = view_angles(settings)
            assert elevations.shape == azimuths.shape == (views,)
            assert np.degrees(elevations).min() >= -60 - 1e-9
            assert np.degrees(elevations).max() <= 80 + 1e-9
            if views >= 2:  # both extremes are taken: from above and from below
                assert np.degrees(elevations).min() == pytest.approx(-60)
                assert np.degrees(elevations).max() == pytest.approx(80)


def test_straight_down_and_up_views_are_well_defined() -> None:
    bbox = np.array([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
    for elevation in (90.0, -90.0):
        settings = RenderSettings(views=3, elevation_min_deg=elevation, elevation_max_deg=elevation)
        _, poses = camera_poses(bbox, settings)
        assert np.isfinite(poses).all()
        rotations = poses[:, :3, :3].astype(np.float64)
        assert np.allclose(rotations @ rotations.transpose(0, 2, 1), np.eye(3), atol=1e-5)
        assert np.allclose(rotations[:, :, 2], (0.0, -np.sign(elevation), 0.0), atol=1e-5)


def test_views_and_resolution_honoured() -> None:
    settings = RenderSettings(views=3, width=24, height=16)
    views = render_views(unit_cube(), settings, seed=0)
    assert views.rgb.shape == (3, 16, 24, 3) and views.rgb.dtype == np.uint8
    assert views.depth.shape == (3, 16, 24) and views.depth.dtype == np.float32
    assert views.mask.shape == (3, 16, 24) and views.mask.dtype == np.bool_
    assert views.face_id.shape == (3, 16, 24) and views.face_id.dtype == np.int32
    assert views.normal.shape == (3, 16, 24, 3) and views.normal.dtype == np.float32
    assert views.K.shape == (3, 3, 3) and views.K.dtype == np.float32
    assert views.cam_to_world.shape == (3, 4, 4) and views.cam_to_world.dtype == np.float32
    assert (views.mask == (views.depth > 0)).all()
    assert views.mask.any(axis=(1, 2)).all()


# ----------------------------------------------------------------------------- colour


def triangle_facing_camera(vertex_colors: np.ndarray | None = None, **extra) -> Mesh:
    vertices = np.array([[-0.8, -0.6, 0.0], [0.8, -0.6, 0.0], [0.0, 0.8, 0.0]])
    return Mesh(vertices, np.array([[0, 1, 2]], dtype=np.int32), vertex_colors, **extra)


def test_vertex_colours_interpolate_with_open3d_barycentrics() -> None:
    red, blue = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)
    mesh = triangle_facing_camera(np.array([red, blue, blue], dtype=np.float32))
    settings = RenderSettings(views=1, width=32, height=32, ambient=1.0)  # ambient 1: rgb = albedo
    views = render_cameras(mesh, intrinsics(settings), camera_at_z3(), settings, seed=0)
    points, pixels = world_hits(views, 0)
    assert len(points) > 50
    # Weight of the red corner 0 at each hit, from the geometry (z = 0 plane).
    a, b, c = mesh.vertices[:, :2]
    edge_1, edge_2, rel = b - a, c - a, points[:, :2] - a
    det = edge_1[0] * edge_2[1] - edge_1[1] * edge_2[0]
    w1 = (rel[:, 0] * edge_2[1] - rel[:, 1] * edge_2[0]) / det
    w2 = (edge_1[0] * rel[:, 1] - edge_1[1] * rel[:, 0]) / det
    w_red = 1.0 - w1 - w2
    rgb = views.rgb[0][pixels[:, 0], pixels[:, 1]].astype(np.float64)
    assert np.abs(rgb[:, 0] - 255 * w_red).max() <= 1.5
    assert np.abs(rgb[:, 2] - 255 * (1 - w_red)).max() <= 1.5
    assert (rgb[:, 1] == 0).all()
    assert w_red.max() > 0.6 and w_red.min() < 0.1  # both ends of the gradient are seen


def test_texture_lookup_with_v_axis_up() -> None:
    # 2x2 texture: top row red | green, bottom row blue | white (image rows go down, v goes up).
    texture = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 255]]], np.uint8)
    vertices = np.array([[-1.0, -1.0, 0.0], [1.0, -1.0, 0.0], [1.0, 1.0, 0.0], [-1.0, 1.0, 0.0]])
    triangles = np.array([[0, 1, 2], [0, 2, 3]], dtype=np.int32)
    corner_uv = {0: (0.0, 0.0), 1: (1.0, 0.0), 2: (1.0, 1.0), 3: (0.0, 1.0)}
    uvs = np.array([[corner_uv[i] for i in tri] for tri in triangles], dtype=np.float32)
    mesh = Mesh(vertices, triangles, triangle_uvs=uvs, texture=texture)
    settings = RenderSettings(views=1, width=32, height=32, ambient=1.0)
    rgb = render_cameras(mesh, intrinsics(settings), camera_at_z3(), settings, seed=0).rgb[0]
    assert tuple(rgb[12, 12]) == (255, 0, 0)      # upper left of the image = top-left texel
    assert tuple(rgb[12, 20]) == (0, 255, 0)      # upper right
    assert tuple(rgb[20, 12]) == (0, 0, 255)      # lower left
    assert tuple(rgb[20, 20]) == (255, 255, 255)  # lower right


def test_background_and_grey_lambertian_range() -> None:
    settings = dataclasses.replace(SMALL, background=(10, 200, 30), ambient=0.35)
    views = render_views(unit_cube(), settings, seed=2)
    assert (views.rgb[~views.mask] == (10, 200, 30)).all()
    grey = views.rgb[views.mask].astype(np.float64)
    assert (grey[:, 0] == grey[:, 1]).all() and (grey[:, 1] == grey[:, 2]).all()
    assert grey.min() >= np.floor(0.7 * 0.35 * 255) and grey.max() <= np.ceil(0.7 * 255)
    assert grey.max() > 0.7 * 0.35 * 255 + 20  # some face is lit


def test_render_is_deterministic_for_a_seed() -> None:
    mesh = unit_cube()
    first, again = render_views(mesh, SMALL, seed=7), render_views(mesh, SMALL, seed=7)
    assert np.array_equal(first.rgb, again.rgb) and np.array_equal(first.depth, again.depth)
    other = render_views(mesh, SMALL, seed=8)
    assert np.array_equal(first.depth, other.depth)  # geometry does not depend on the seed
    assert not np.array_equal(first.rgb, other.rgb)  # the lights do


# ----------------------------------------------------------------------------- surface samples


def test_samples_lie_on_their_face_and_are_deterministic() -> None:
    sphere = o3d.geometry.TriangleMesh.create_sphere(0.5, resolution=8)
    mesh = Mesh(np.asarray(sphere.vertices, np.float64), np.asarray(sphere.triangles, np.int32))
    samples = sample_surface(mesh, 2000, seed=11)
    assert samples.xyz.shape == (2000, 3) and samples.xyz.dtype == np.float32
    assert samples.normal.shape == (2000, 3) and samples.normal.dtype == np.float32
    assert samples.face_id.shape == (2000,) and samples.face_id.dtype == np.int32
    corners = mesh.vertices[mesh.triangles[samples.face_id]]
    normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    offset = samples.xyz.astype(np.float64) - corners[:, 0]
    assert np.abs(np.einsum("nc,nc->n", offset, normals)).max() < 1e-5
    assert np.allclose(samples.normal, normals, atol=1e-6)
    again = sample_surface(mesh, 2000, seed=11)
    assert np.array_equal(samples.xyz, again.xyz) and np.array_equal(samples.face_id, again.face_id)
    other = sample_surface(mesh, 2000, seed=12)
    assert not np.array_equal(samples.xyz, other.xyz)


def test_samples_are_uniform_by_area() -> None:
    # Two disjoint triangles with areas 3 : 1.
    vertices = np.array([[0, 0, 0], [3, 0, 0], [0, 2, 0],
                         [5, 0, 0], [6, 0, 0], [5, 2, 0]], dtype=np.float64)
    mesh = Mesh(vertices, np.array([[0, 1, 2], [3, 4, 5]], dtype=np.int32))
    samples = sample_surface(mesh, 4000, seed=0)
    share_big = float((samples.face_id == 0).mean())
    assert share_big == pytest.approx(0.75, abs=0.03)  # binomial std ~0.007
    assert set(np.unique(samples.face_id)) == {0, 1}


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("field, value", [
    ("views", 0), ("width", 4), ("height", 7), ("fov_deg", 1.0), ("fov_deg", 170.0),
    ("distribution", "spiral"), ("elevation_min_deg", -91.0), ("elevation_max_deg", 95.0),
    ("elevation_min_deg", 85.0), ("ambient", 1.5), ("ambient", -0.1), ("n_points", 0),
    ("background", (0, 0, 256)), ("background", (0, 0)), ("distance_margin", 0.5),
])
def test_invalid_settings_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        RenderSettings(**{field: value})


@pytest.mark.parametrize("mesh, message", [
    (Mesh(np.zeros((0, 3)), np.zeros((0, 3), np.int32)), "empty"),
    (Mesh(np.array([[0, 0, 0], [1, 0, 0], [np.nan, 1, 0]]), np.array([[0, 1, 2]], np.int32)), "NaN"),
])
def test_bad_mesh_raises_mesh_error(mesh: Mesh, message: str) -> None:
    with pytest.raises(MeshError, match=message):
        render_asset(mesh, SMALL, seed=0, name="asset-x")


def test_render_asset_gives_views_and_points() -> None:
    views, samples = render_asset(unit_cube(), SMALL, seed=0)
    assert views.rgb.shape == (5, 40, 48, 3)
    assert samples.xyz.shape == (500, 3)
    assert np.allclose(np.abs(samples.xyz).max(axis=1), 0.5, atol=1e-5)
