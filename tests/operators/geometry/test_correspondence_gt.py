"""Ground-truth geometry of the DFC protocol: frames, unprojection, part pixels, matches."""

from __future__ import annotations

import numpy as np

from operators.geometry.cameras import project_points
from operators.geometry.correspondence import (frame_to_frame, part_mask, part_surface,
                                               pixel_centres, unproject)
from operators.metrics.correspondence import ground_truth_matches


def _frame(origin, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    axes = np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])  # rows x, y, z: turned about y
    return np.vstack([origin, axes])


def test_frame_to_frame_moves_a_part_onto_the_other() -> None:
    a, b = _frame([1.0, 2.0, 3.0], 0.3), _frame([-1.0, 0.5, 0.0], -1.1)
    # the origin goes to the origin, origin + axis_k of A to origin + axis_k of B
    points = np.vstack([a[0], a[0] + a[1], a[0] + 2 * a[3]])
    np.testing.assert_allclose(frame_to_frame(points, a, b),
                               np.vstack([b[0], b[0] + b[1], b[0] + 2 * b[3]]), atol=1e-12)
    np.testing.assert_allclose(frame_to_frame(points, a, a), points, atol=1e-12)


def test_unproject_inverts_the_projection() -> None:
    K = np.array([[50.0, 0, 32], [0, 50.0, 32], [0, 0, 1]])
    cam_to_world = np.eye(4)
    cam_to_world[:3, 3] = [0.2, -0.1, -3.0]
    depth = np.full((64, 64), 2.5, np.float32)
    depth[:, :10] = 0  # background
    uv = np.array([[12.5, 3.5], [40.5, 60.5], [2.5, 2.5]])
    world = unproject(uv, depth, K, cam_to_world)
    assert np.isnan(world[2]).all()  # a background pixel has no surface point
    back, z = project_points(world[:2], K[None], cam_to_world[None].astype(np.float32))
    np.testing.assert_allclose(back[0], uv[:2], atol=1e-4)
    np.testing.assert_allclose(z[0], [2.5, 2.5], atol=1e-5)


def test_part_pixels_and_the_self_pair_matches_itself() -> None:
    face_id = np.full((6, 8), -1, np.int32)
    face_id[1:4, 2:6] = 0
    face_id[4, 2:6] = 1
    face_part = np.array([2, 5])
    mask = part_mask(face_id, face_part, [2])
    assert mask.sum() == 12 and not mask[4].any()
    np.testing.assert_array_equal(pixel_centres(mask)[0], [2.5, 1.5])
    K = np.array([[10.0, 0, 4], [0, 10.0, 3], [0, 0, 1]])
    depth = np.where(face_id >= 0, 1.0 + 0.1 * np.arange(8)[None], 0.0).astype(np.float32)
    pixels, surface = part_surface(face_id, depth, K, np.eye(4), face_part, [2])
    truth = ground_truth_matches(pixels, surface, pixels, surface)
    assert truth.shape == (12, 4)
    np.testing.assert_array_equal(truth[:, :2], truth[:, 2:])  # every pixel is its own match
