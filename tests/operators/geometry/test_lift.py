"""Feature lifting (CMAT §3.1) on hand-built cameras and on a rendered procedural asset."""

from __future__ import annotations

import numpy as np
import pytest

from operators.data.procedural import make_asset
from operators.geometry.lift import lift_features, pca_colors, sample_patch_grid, subsample_points
from operators.geometry.render import render_asset
from operators.models.backbones import load_backbone
from operators.settings import RenderSettings

SIZE = 40          # 40 x 40 pixel views
GRID = 4           # 4 x 4 patch grid: stride 10 px, patch (i, j) centred at (10 j + 5, 10 i + 5)
FOCAL = 40.0
DISTANCE = 2.0     # cameras at z = 2 looking down -z at the plane z = 0


def camera(x: float) -> np.ndarray:
    """cam_to_world of a camera at (x, 0, 2) looking towards -z, image up = world +y."""
    pose = np.eye(4, dtype=np.float32)
    pose[:3, 1] = (0.0, -1.0, 0.0)   # camera y (down) = world -y
    pose[:3, 2] = (0.0, 0.0, -1.0)   # camera z (forward) = world -z
    pose[:3, 3] = (x, 0.0, DISTANCE)
    return pose


def two_views() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cameras at x = 0 and x = 0.5 over the plane z = 0. Projection: u = 20 (X - cam_x) + 20,
    v = 20 - 20 Y. Features: channel 0 = column index j (+10 in view 1), channel 1 = row index i.
    Depth is 2 everywhere (the plane fills the image) except an occluder at depth 1 over the
    pixel of the point (0.3, -0.3, 0) in both views."""
    K = np.array([[FOCAL, 0, SIZE / 2], [0, FOCAL, SIZE / 2], [0, 0, 1]], np.float32)
    Ks = np.stack([K, K])
    poses = np.stack([camera(0.0), camera(0.5)])
    depth = np.full((2, SIZE, SIZE), DISTANCE, np.float32)
    depth[0, 26, 26] = 1.0   # (0.3, -0.3): view 0 u = 26, v = 26
    depth[1, 26, 16] = 1.0   # view 1 u = 16, v = 26
    rows, cols = np.meshgrid(np.arange(GRID), np.arange(GRID), indexing="ij")
    features = np.zeros((2, GRID, GRID, 2), np.float32)
    features[..., 0] = cols
    features[1, ..., 0] += 10
    features[..., 1] = rows
    return features, Ks, poses, depth


def test_bilinear_sampling_convention() -> None:
    grid = np.zeros((GRID, GRID, 1), np.float32)
    grid[..., 0] = np.arange(GRID)[None, :]
    uv = np.array([[5.0, 5.0], [10.0, 5.0], [22.0, 5.0], [0.0, 5.0], [39.9, 5.0]], np.float32)
    # x = u / 10 - 0.5, clamped to [0, 3]: patch centres at 5, 15, 25, 35
    np.testing.assert_allclose(sample_patch_grid(grid, uv, (SIZE, SIZE))[:, 0], [0.0, 0.5, 1.7, 0.0, 3.0],
                               atol=1e-6)


def test_lift_on_a_hand_built_plane() -> None:
    features, K, poses, depth = two_views()
    xyz = np.array([
        [0.10, 0.20, 0.0],    # A: seen by both views
        [-0.85, 0.00, 0.0],   # B: view 0 only (view 1 projects it to u = -7, outside), border clamp
        [0.30, -0.30, 0.0],   # C: occluded in both views
        [0.35, -0.30, 0.0],   # D: C's nearest neighbour, seen by both
    ], np.float32)
    lifted, seen = lift_features(xyz, features, K, poses, depth, (SIZE, SIZE))
    assert lifted.dtype == np.float32 and seen.dtype == np.int16
    assert seen.tolist() == [2, 1, 0, 2]
    # A: view 0 (u, v) = (22, 16) -> (x, y) = (1.7, 1.1); view 1 (12, 16) -> (0.7 + 10, 1.1)
    np.testing.assert_allclose(lifted[0], [(1.7 + 10.7) / 2, 1.1], atol=1e-5)
    # B: view 0 (3, 20) -> x = -0.2 clamped to 0, y = 1.5
    np.testing.assert_allclose(lifted[1], [0.0, 1.5], atol=1e-5)
    # D: view 0 (27, 26) -> (2.2, 2.1); view 1 (17, 26) -> (1.2 + 10, 2.1); C copies D
    np.testing.assert_allclose(lifted[3], [(2.2 + 11.2) / 2, 2.1], atol=1e-5)
    np.testing.assert_array_equal(lifted[2], lifted[3])


def test_chunking_does_not_change_the_result() -> None:
    features, K, poses, depth = two_views()
    rng = np.random.default_rng(3)
    xyz = np.concatenate([rng.uniform(-0.9, 0.9, (300, 2)), np.zeros((300, 1))], axis=1).astype(np.float32)
    xyz[:5] = [0.3, -0.3, 0.0]  # occluded copies take a neighbour's feature
    one, seen_one = lift_features(xyz, features, K, poses, depth, (SIZE, SIZE), chunk=10**6)
    many, seen_many = lift_features(xyz, features, K, poses, depth, (SIZE, SIZE), chunk=7)
    np.testing.assert_array_equal(one, many)
    np.testing.assert_array_equal(seen_one, seen_many)
    half, _ = lift_features(xyz, features.astype(np.float16), K, poses, depth, (SIZE, SIZE), chunk=64)
    np.testing.assert_allclose(half, one, atol=1e-2)


def test_lift_rejects_bad_input() -> None:
    features, K, poses, depth = two_views()
    xyz = np.array([[0.0, 0.0, 5.0]], np.float32)  # behind both cameras
    with pytest.raises(ValueError, match="none of the 1 points is visible"):
        lift_features(xyz, features, K, poses, depth, (SIZE, SIZE))
    with pytest.raises(ValueError, match="depth must be"):
        lift_features(xyz, features, K, poses, depth, (SIZE, SIZE + 1))
    with pytest.raises(ValueError, match="xyz"):
        lift_features(xyz[:, :2], features, K, poses, depth, (SIZE, SIZE))


def test_subsample_points_is_deterministic() -> None:
    first = subsample_points(100_000, 2048, seed=7)
    assert first.shape == (2048,) and len(np.unique(first)) == 2048
    assert (np.diff(first) > 0).all() and first.max() < 100_000
    np.testing.assert_array_equal(first, subsample_points(100_000, 2048, seed=7))
    assert not np.array_equal(first, subsample_points(100_000, 2048, seed=8))
    with pytest.raises(ValueError, match="cannot pick"):
        subsample_points(10, 11, seed=0)


def test_pca_colors() -> None:
    features = np.random.default_rng(0).normal(size=(500, 16)).astype(np.float32)
    colours = pca_colors(features)
    assert colours.shape == (500, 3) and colours.dtype == np.uint8
    assert colours.min() == 0 and colours.max() == 255
    np.testing.assert_array_equal(colours, pca_colors(features))
    assert pca_colors(features[:, :1]).shape == (500, 3)


def test_lift_a_rendered_procedural_asset_through_the_tiny_backbone() -> None:
    asset = make_asset("mug", seed=0)
    settings = RenderSettings(views=4, width=56, height=56, n_points=1500)
    views, samples = render_asset(asset.mesh, settings, seed=0)
    backbone = load_backbone("dinov2-random-tiny")
    grids = backbone.features(views.rgb)
    assert grids.shape == (4, 4, 4, 64)
    lifted, seen = lift_features(samples.xyz, grids, views.K, views.cam_to_world, views.depth, (56, 56),
                                 chunk=500)
    assert lifted.shape == (1500, 64) and np.isfinite(lifted).all()
    assert (seen > 0).mean() > 0.5
    assert pca_colors(lifted).shape == (1500, 3)
