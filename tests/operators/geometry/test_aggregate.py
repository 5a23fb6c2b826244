"""3D aggregation operators (DFC A.4 steps 3-4) on hand-built cameras, points and boxes."""

from __future__ import annotations

import numpy as np
import pytest

from operators.geometry.aggregate import (CropTransform, box_iou, boxes_from_crop, boxes_to_mask,
                                          consensus_boxes, masks_from_scores, normalise_scores,
                                          otsu_threshold, vote_counts, vote_scores, zoom_crop)
from operators.geometry.cameras import project_points, visibility
from operators.metrics.segmentation import mask_iou
from operators.models.grounding import Box

K100 = np.array([[100, 0, 50], [0, 100, 50], [0, 0, 1]], np.float32)  # f=100, c=(50, 50), 100x100 image


def _pose(rotation: np.ndarray, position: tuple[float, float, float]) -> np.ndarray:
    pose = np.eye(4, dtype=np.float32)
    pose[:3, :3] = rotation
    pose[:3, 3] = position
    return pose


IDENTITY = _pose(np.eye(3), (0, 0, 0))
BACK = _pose(np.diag([-1.0, 1.0, -1.0]), (0, 0, 4))  # at z=4 looking along -z (180 deg about y)


# --- projection and visibility ---------------------------------------------------------------------

def test_project_points_by_hand() -> None:
    xyz = np.array([[0.1, 0.2, 1.0], [0.0, 0.0, -1.0]], np.float32)
    K = np.stack([K100] * 3)
    poses = np.stack([IDENTITY, _pose(np.eye(3), (0, 0, -1)), BACK])
    uv, z = project_points(xyz, K, poses)
    assert uv.shape == (3, 2, 2) and uv.dtype == np.float32 and z.shape == (3, 2)
    np.testing.assert_allclose(uv[0, 0], [60, 70], atol=1e-4)    # 100*0.1/1+50, 100*0.2/1+50
    np.testing.assert_allclose(uv[1, 0], [55, 60], atol=1e-4)    # camera 1 m back: z = 2
    np.testing.assert_allclose(uv[2, 0], [50 - 10 / 3, 50 + 20 / 3], atol=1e-4)  # from behind: x flips, z = 3
    np.testing.assert_allclose(z[:, 0], [1, 2, 3], atol=1e-6)
    assert np.isnan(uv[0, 1]).all() and z[0, 1] == pytest.approx(-1)  # behind camera 0


def test_visibility_depth_test() -> None:
    xyz = np.array([
        [0.1, 0.2, 1.0],     # on the surface: visible
        [0.2, 0.2, 2.0],     # behind the surface at depth 1: hidden
        [1.0, 0.0, 1.0],     # u = 150: outside the image
        [0.0, 0.0, -1.0],    # behind the camera
        [-0.45, -0.45, 1.0],  # u = v = 5: background pixel (depth 0)
        [0.1, 0.1, 1.005],   # within tolerance 0.002 + 0.01 * 1
        [0.1, 0.1, 1.05],    # beyond tolerance
    ], np.float32)
    depth = np.ones((1, 100, 100), np.float32)
    depth[0, :10, :10] = 0.0
    visible = visibility(xyz, K100[None], IDENTITY[None], depth)
    assert visible.tolist() == [[True, False, False, False, False, True, False]]
    projection = project_points(xyz, K100[None], IDENTITY[None])
    assert (visibility(xyz, K100[None], IDENTITY[None], depth, projection=projection) == visible).all()
    assert visibility(xyz, K100[None], IDENTITY[None], depth, rel_tol=0.1)[0, 6]


# --- voting ------------------------------------------------------------------------------------------

UV = np.array([
    [[10, 10], [20, 20], [30, 30], [40, 40]],  # view 0
    [[5, 5], [50, 50], [55, 55], [90, 90]],    # view 1
], np.float32)
VISIBLE = np.array([[True, True, True, False], [True, True, False, True]])
BOXES = [
    [[Box(0, 0, 25, 25)], [Box(15, 15, 35, 35)], []],                         # 2 boxes
    [[Box(45, 45, 60, 60)], [Box(0, 0, 100, 100)], [Box(85, 85, 95, 95)]],    # 3 boxes
]


def test_vote_scores_two_view_hand_example() -> None:
    # p0: v0t0 + v1t1 = 2; p1: v0t0 + v0t1 + v1t0 + v1t1 = 4; p2: v0t1 = 1 (hidden in v1);
    # p3: hidden in v0, v1t1 + v1t2 = 2.
    assert vote_counts(UV, VISIBLE, BOXES).tolist() == [2, 4, 1, 2]
    scores = vote_scores(UV, VISIBLE, BOXES)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, [0.5, 1.0, 0.25, 0.5])
    # View 0 has only 2 boxes: skipped with min 3. View 1 alone: p0 1, p1 2, p2 0, p3 2.
    np.testing.assert_allclose(vote_scores(UV, VISIBLE, BOXES, min_boxes_per_view=3), [0.5, 1.0, 0.0, 1.0])
    assert vote_scores(UV, VISIBLE, BOXES, min_boxes_per_view=4).tolist() == [0, 0, 0, 0]


def test_vote_box_is_half_open() -> None:
    uv = np.array([[[25, 10], [24.999, 10], [0, 0]]], np.float32)
    assert vote_counts(uv, np.ones((1, 3), bool), [[[Box(0, 0, 25, 25)]]]).tolist() == [0, 1, 1]


def test_normalisation() -> None:
    np.testing.assert_allclose(normalise_scores(np.array([0, 3, 6])), [0, 0.5, 1])
    assert normalise_scores(np.zeros(4)).tolist() == [0, 0, 0, 0]
    assert vote_scores(UV, VISIBLE, [[[]], [[]]]).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="one list of trials per view"):
        vote_scores(UV, VISIBLE, BOXES[:1])


def test_vote_matches_a_per_point_loop() -> None:
    rng = np.random.default_rng(0)
    n_views, n_points = 5, 300
    uv = rng.uniform(-10, 110, size=(n_views, n_points, 2)).astype(np.float32)
    visible = rng.random((n_views, n_points)) < 0.7

    def random_box() -> Box:
        (x0, x1), (y0, y1) = np.sort(rng.uniform(0, 100, 2)), np.sort(rng.uniform(0, 100, 2))
        return Box(x0, y0, x1, y1)

    boxes = [[[random_box() for _ in range(2)] for _ in range(3)] for _ in range(n_views)]
    expected = np.zeros(n_points)
    for p in range(n_points):
        for v in range(n_views):
            for trial in boxes[v]:
                for b in trial:
                    u, w = uv[v, p]
                    expected[p] += visible[v, p] and b.x0 <= u < b.x1 and b.y0 <= w < b.y1
    assert vote_counts(uv, visible, boxes).tolist() == expected.tolist()


def test_vote_at_pipeline_scale_runs() -> None:
    # 100k points x 19 views x 4 trials (DFC A.4): the projection is V*N, box tests stream per view.
    rng = np.random.default_rng(1)
    xyz = rng.uniform(-0.3, 0.3, size=(100_000, 3)).astype(np.float32)
    poses = np.stack([_pose(np.eye(3), (0, 0, -2 - 0.01 * i)) for i in range(19)])
    uv, z = project_points(xyz, np.stack([K100] * 19), poses)
    boxes = [[[Box(40, 40, 60, 60)] for _ in range(4)] for _ in range(19)]
    scores = vote_scores(uv, np.ones(z.shape, bool), boxes)
    assert scores.shape == (100_000,) and scores.max() == 1.0 and 0 < scores.mean() < 1


# --- consensus ---------------------------------------------------------------------------------------

def test_consensus_keeps_the_majority_cluster() -> None:
    a, b, c, d = Box(10, 10, 20, 20), Box(11, 11, 21, 21), Box(80, 80, 90, 90), Box(12, 10, 22, 20)
    assert consensus_boxes([[a], [b], [c], [d]], image_size=(100, 100)) == [[a], [b], [], [d]]
    assert consensus_boxes([[a], [b], [c], [d]]) == [[a], [b], [], [d]]  # scale from the boxes' union
    # Tie on box count (2 vs 2): the cluster seen in more trials wins.
    a2 = Box(12, 12, 22, 22)
    c2 = Box(81, 81, 91, 91)
    assert consensus_boxes([[a, a2], [c], [c2]], image_size=(100, 100)) == [[], [c], [c2]]
    assert consensus_boxes([[], [a], []]) == [[], [a], []]


# --- masks ---------------------------------------------------------------------------------------------

def test_otsu_threshold() -> None:
    values = np.array([0.1] * 30 + [0.9] * 70)
    t = otsu_threshold(values)
    assert 0.1 < t <= 0.9 and ((values >= t) == (values == 0.9)).all()
    assert otsu_threshold(np.full(10, 0.8)) == 0.5 and otsu_threshold(np.array([])) == 0.5


def _flat_square_scene() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A 1 m square at z=2 seen from the front (identity) and from behind (BACK), 100x100 pixels.

    Pixel centres u + 0.5 in [25, 75] hit it, so the object is rows/cols 25..74 in both views.
    The part is the half x > 0: columns 50..74 from the front, 25..49 from behind.
    """
    rng = np.random.default_rng(0)
    n = 6000  # ~2.4 points per object pixel: some pixels get none and must be filled in
    xyz = np.column_stack([rng.uniform(-0.5, 0.5, n), rng.uniform(-0.5, 0.5, n), np.full(n, 2.0)])
    K, poses = np.stack([K100] * 2), np.stack([IDENTITY, BACK])
    object_mask = np.zeros((2, 100, 100), bool)
    object_mask[:, 25:75, 25:75] = True
    depth = np.where(object_mask, 2.0, 0.0).astype(np.float32)
    gt = np.zeros_like(object_mask)
    gt[0, 25:75, 50:75] = True
    gt[1, 25:75, 25:50] = True
    return xyz.astype(np.float32), K, poses, depth, gt


def test_masks_from_scores_recover_a_half_plane_part() -> None:
    xyz, K, poses, depth, gt = _flat_square_scene()
    object_mask = depth > 0
    projection = project_points(xyz, K, poses)
    visible = visibility(xyz, K, poses, depth, projection=projection)
    assert visible.all()
    # The grounding model boxed the right half in the front view, twice.
    boxes = [[[Box(50, 20, 80, 80)], [Box(50, 22, 78, 79)]], [[], []]]
    scores = vote_scores(projection[0], visible, boxes)
    np.testing.assert_array_equal(scores == 1.0, xyz[:, 0] >= 0)
    masks = masks_from_scores(scores, projection[0], visible, object_mask)
    assert masks.shape == (2, 100, 100) and masks.dtype == bool
    assert not (masks & ~object_mask).any()
    for v in range(2):
        assert mask_iou(masks[v], gt[v]) > 0.9


def test_asset_threshold_leaves_views_without_the_part_empty() -> None:
    xyz, K, poses, depth, _ = _flat_square_scene()
    projection = project_points(xyz, K, poses)
    visible = visibility(xyz, K, poses, depth, projection=projection)
    visible[1] &= xyz[:, 0] < 0  # the part is hidden in view 1
    scores = (xyz[:, 0] >= 0).astype(np.float32)
    masks = masks_from_scores(scores, projection[0], visible, depth > 0)
    assert masks[0].sum() > 1000 and not masks[1].any()
    assert not masks_from_scores(np.zeros(len(xyz)), projection[0], visible, depth > 0).any()
    full = masks_from_scores(np.ones(len(xyz)), projection[0], visible, depth > 0, threshold_scope="view")
    assert (full[0] == (depth[0] > 0)).all()


# --- zoom ----------------------------------------------------------------------------------------------

def test_zoom_round_trip_maps_boxes_back_exactly() -> None:
    image = np.arange(100 * 200 * 3, dtype=np.int64).reshape(100, 200, 3).astype(np.uint8)
    crop, transform = zoom_crop(image, Box(40, 30, 60, 50), pad_frac=0.25)
    # Padding 0.25 * 20 = 5 on each side: columns 35..64, rows 25..54.
    assert transform == CropTransform(35.0, 25.0, 1.0, 1.0, (30, 30))
    assert (crop == image[25:55, 35:65]).all()
    crop2, t2 = zoom_crop(image, Box(40, 30, 60, 50), pad_frac=0.25, out_size=(60, 60))
    assert crop2.shape == (60, 60, 3) and crop2.dtype == np.uint8 and (t2.scale_x, t2.scale_y) == (2.0, 2.0)
    in_view = [Box(45, 35, 55, 45, 0.7), Box(36.5, 25, 64, 54.25)]
    in_crop = t2.to_crop(in_view)
    assert in_crop[0] == Box(20, 20, 40, 40, 0.7)
    assert boxes_from_crop(in_crop, t2) == in_view
    # Non-integer scales round-trip to float precision.
    _, t3 = zoom_crop(image, Box(40, 30, 60, 50), out_size=(45, 50))
    back = boxes_from_crop(t3.to_crop(in_view), t3)
    np.testing.assert_allclose([[b.x0, b.y0, b.x1, b.y1] for b in back],
                               [[b.x0, b.y0, b.x1, b.y1] for b in in_view], atol=1e-9)


def test_zoom_crop_clips_at_the_border_and_resizes_smoothly() -> None:
    image = np.full((50, 50), 7, np.uint8)
    crop, transform = zoom_crop(image, Box(0, 0, 10, 8), pad_frac=0.5, out_size=(20, 30))
    assert (transform.x0, transform.y0) == (0.0, 0.0) and crop.shape == (20, 30) and (crop == 7).all()
    assert transform.crop_size == (20, 30) and transform.scale_x == 30 / 15 and transform.scale_y == 20 / 12
    with pytest.raises(ValueError, match="outside"):
        zoom_crop(image, Box(60, 60, 70, 70))


# --- the single-view box baseline ---------------------------------------------------------------------

def test_boxes_to_mask_uses_pixel_centres() -> None:
    mask = boxes_to_mask([Box(2, 1, 5, 4)], (6, 8))
    assert mask.sum() == 9 and mask[1:4, 2:5].all()
    assert not boxes_to_mask([Box(1.6, 0, 2.4, 1)], (6, 8)).any()
    assert np.flatnonzero(boxes_to_mask([Box(1.5, 0, 2.5, 1)], (6, 8))[0]).tolist() == [1]
    object_mask = np.zeros((6, 8), bool)
    object_mask[:, 3:] = True
    both = boxes_to_mask([Box(2, 1, 5, 4), Box(-5, 5, 100, 100)], (6, 8), object_mask)
    assert both.sum() == 6 + 5 and not (both & ~object_mask).any()
    assert box_iou(Box(0, 0, 2, 3), Box(1, 0, 3, 3)) == pytest.approx(3 / 9)
