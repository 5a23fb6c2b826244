"""Correspondence metrics (DFC §5.1, B.1) on tiny hand-built cases computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from operators.metrics import correspondence
from operators.metrics.correspondence import (
    average_precision,
    best_f1,
    discovery_metrics,
    discovery_precision_recall,
    discovery_scores,
    farthest_point_sampling,
    ground_truth_matches,
    label_transfer,
    pck,
)


def test_fps_1d_greedy_order() -> None:
    x = np.array([0.0, 1.0, 10.0, 4.0, 6.0])
    # from x=0: farthest is 10 (idx 2); nearest-chosen distances then 1, 4, 4 for x=1, 4, 6 ->
    # tie 4/4 goes to the lower index 3 (x=4); then x=6 is 2 away, x=1 is 1 away -> 4, then 1
    order = farthest_point_sampling(x, 4)
    assert order.dtype == np.int64
    assert order.tolist() == [0, 2, 3, 4]
    assert farthest_point_sampling(x[:, None], 3).tolist() == [0, 2, 3]
    # from x=10: farthest is 0 (idx 0); then x=4 and x=6 both 4 away -> idx 3; then 4; then 1
    assert farthest_point_sampling(x, 4, start=2).tolist() == [2, 0, 3, 4]


def test_fps_2d_square_and_k_at_least_n() -> None:
    pts = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [0.5, 0.5]])
    # from (0,0): farthest is the opposite corner (1,1); then (1,0) and (0,1) are both 1 away
    # from the chosen set (centre only 0.707) -> idx 1, then idx 2 (1 away), centre last
    assert farthest_point_sampling(pts, 4).tolist() == [0, 3, 1, 2]
    assert farthest_point_sampling(pts, 5).tolist() == [0, 1, 2, 3, 4]
    assert farthest_point_sampling(pts, 9, start=3).tolist() == [0, 1, 2, 3, 4]
    assert farthest_point_sampling(pts, 0).tolist() == []
    # duplicates: every distance is 0, yet no index is picked twice
    assert farthest_point_sampling(np.zeros((3, 2)), 2).tolist() == [0, 1]
    with pytest.raises(ValueError):
        farthest_point_sampling(pts, 2, start=5)


def test_ground_truth_matches_optimal_not_greedy() -> None:
    pix_1 = np.array([[10.5, 20.5], [30.5, 40.5]])
    pix_2 = np.array([[50.5, 60.5], [70.5, 80.5]])
    # 3D points on the x axis: a = (0, 2), b = (3.5, 1.1) (view-2 order).
    # Greedy closest-pair-first takes a1-b[1] (|2 - 1.1| = 0.9) then a0-b[0] (3.5): total 4.4.
    # The optimum is a0-b[1] (1.1) + a1-b[0] (1.5) = 2.6.
    surf_1 = np.array([[0.0, 0, 0], [2.0, 0, 0]])
    surf_2 = np.array([[3.5, 0, 0], [1.1, 0, 0]])
    got = ground_truth_matches(pix_1, surf_1, pix_2, surf_2)
    np.testing.assert_array_equal(got, [[10.5, 20.5, 70.5, 80.5], [30.5, 40.5, 50.5, 60.5]])


def test_ground_truth_matches_subsamples_to_smaller_set() -> None:
    # 5 view-1 pixels on a row, 2 view-2 pixels: m = 2, FPS over u = (.5, 1.5, 9.5, 4.5, 6.5)
    # picks idx 0 (u=.5) then idx 2 (u=9.5). Idx 1 has the best 3D partner but is not sampled.
    pix_1 = np.array([[0.5, 0.5], [1.5, 0.5], [9.5, 0.5], [4.5, 0.5], [6.5, 0.5]])
    surf_1 = np.array([[0.0, 0, 0], [1.0, 0, 0], [10.0, 0, 0], [100.0, 0, 0], [100.0, 0, 0]])
    pix_2 = np.array([[3.5, 7.5], [5.5, 7.5]])
    surf_2 = np.array([[9.0, 0, 0], [1.0, 0, 0]])
    # sampled x = (0, 10) vs (9, 1): 0-1 and 10-9 (cost 2) beats 0-9 and 10-1 (cost 18)
    got = ground_truth_matches(pix_1, surf_1, pix_2, surf_2)
    assert got.shape == (2, 4)
    np.testing.assert_array_equal(got, [[0.5, 0.5, 5.5, 7.5], [9.5, 0.5, 3.5, 7.5]])
    # max_points=1: FPS keeps only each start index 0
    np.testing.assert_array_equal(ground_truth_matches(pix_1, surf_1, pix_2, surf_2, 1),
                                  [[0.5, 0.5, 3.5, 7.5]])
    empty = ground_truth_matches(pix_1, surf_1, np.zeros((0, 2)), np.zeros((0, 3)))
    assert empty.shape == (0, 4)


def _transfer_case() -> tuple[np.ndarray, np.ndarray]:
    """Predicted pixels from a hand-made similarity, and their ground truth."""
    targets = np.array([[100.5, 100.5], [120.5, 100.5], [100.5, 130.5]])
    sim = np.array([[0.9, 0.1, 0.2],     # -> target 0
                    [0.1, 0.8, 0.3],     # -> target 1
                    [0.2, 0.3, 0.7],     # -> target 2
                    [0.5, 0.4, 0.45]])   # -> target 0
    predicted = label_transfer(sim, targets)
    np.testing.assert_array_equal(predicted, targets[[0, 1, 2, 0]])
    truth = np.array([[100.5, 110.5],    # d = 10 (exactly on the @10 boundary)
                      [129.5, 112.5],    # d = (9, 12) -> 15 (on the @15 boundary)
                      [100.5, 130.5],    # d = 0
                      [124.5, 100.5]])   # d = 24 (> 23)
    return predicted, truth


def test_label_transfer_and_pck_at_224() -> None:
    predicted, truth = _transfer_case()
    got = pck(predicted, truth, 224, thresholds=(23, 15, 10, 5))
    # d = (10, 15, 0, 24); at S = 224 a threshold is k px, compared with <=
    assert got["pck@23"] == 0.75   # 10, 15, 0
    assert got["pck@15"] == 0.75   # 10, 15, 0 (15 <= 15)
    assert got["pck@10"] == 0.5    # 10, 0 (10 <= 10; the paper's `<` would give 0.25)
    assert got["pck@5"] == 0.25    # 0
    assert got["normalized_dist"] == pytest.approx((49 / 4) / 223)


def test_pck_threshold_scales_with_image_size() -> None:
    predicted, truth = _transfer_case()
    got = pck(predicted, truth, 448)
    # at S = 448 a k-px threshold is k * 447 / 223: 23 -> 46.1, 15 -> 30.07, 10 -> 20.04
    assert got == pytest.approx({"pck@23": 1.0, "pck@15": 1.0, "pck@10": 0.75,
                                 "normalized_dist": (49 / 4) / 447})
    # the scale is (S - 1) / 223, not S / 224: d = 20.02 passes @10 at S = 448 (20.04 px)
    # although it exceeds 10 * 448 / 224 = 20
    one = pck(np.array([[100.5, 100.5]]), np.array([[120.52, 100.5]]), 448, thresholds=(10,))
    assert one["pck@10"] == 1.0
    empty = pck(np.zeros((0, 2)), np.zeros((0, 2)), 224)
    assert set(empty) == {"pck@23", "pck@15", "pck@10", "normalized_dist"}
    assert all(math.isnan(v) for v in empty.values())


def test_discovery_scores_by_hand() -> None:
    p1 = np.array([[0.5, 0.5], [3.5, 4.5], [3.5, 14.5]])  # |p1-p0| = 5, |p2-p1| = 10
    p2 = np.array([[10.5, 10.5], [11.5, 10.5], [12.5, 10.5]])
    sim = np.array([[0.9, 0.2, 0.1],
                    [0.85, 0.3, 0.8],
                    [0.1, 0.4, 0.7]])
    # forward: row 0 -> col 0 (0.9), row 1 -> col 0 (0.85), row 2 -> col 2 (0.7)
    # backward: col 0 -> row 0 (0.9 > 0.85), col 2 -> row 1 (0.8 > 0.7)
    # q = (p0, p0, p1); cycle d = (0, 5, 10) -> min-max (0, 0.5, 1)
    # forward sims (0.9, 0.85, 0.7) -> min-max (1, 0.75, 0)
    # scores = (1 - d_norm) * sim_norm = (1, 0.5 * 0.75, 0) = (1, 0.375, 0)
    matches, scores, cycle = discovery_scores(sim, p1, p2)
    np.testing.assert_array_equal(matches, np.concatenate([p1, p2[[0, 0, 2]]], axis=1))
    np.testing.assert_allclose(cycle, [0.0, 5.0, 10.0])
    np.testing.assert_allclose(scores, [1.0, 0.375, 0.0])


def test_discovery_scores_constant_vectors_normalise_to_zero() -> None:
    p1 = np.array([[0.5, 0.5], [5.5, 0.5]])
    p2 = np.array([[0.5, 0.5], [5.5, 0.5]])
    # diagonal-dominant: every match is cycle-consistent, d = (0, 0) is constant -> d_norm 0,
    # so the score is the normalised similarity alone: (0.8, 0.6) -> (1, 0)
    _, scores, _ = discovery_scores(np.array([[0.8, 0.1], [0.2, 0.6]]), p1, p2)
    np.testing.assert_allclose(scores, [1.0, 0.0])
    # equal forward similarities (constant) -> sim_norm 0 -> every score 0
    _, scores, _ = discovery_scores(np.array([[0.5, 0.1], [0.2, 0.5]]), p1, p2)
    np.testing.assert_array_equal(scores, [0.0, 0.0])


# Ground truth g0 = (10,10 | 50,50), g1 = (20,20 | 60,60); k = 2 px. Matches by score:
#   A (0.9) = (10,10 | 50,51): g0 at distances (0, 1)             -> correct, discovers g0
#   B (0.8) = (10,10 | 60,60): end 1 fits g0, end 2 fits g1, never both -> wrong
#   C (0.7) = (11,10 | 51,50): g0 at (1, 1)                        -> correct (g0 again)
#   D (0.6) = (20,22 | 60,60): g1 at (2, 0), on the <= boundary    -> correct, discovers g1
# Input order is shuffled to C, A, D, B so ranking by score matters.
_TRUTH = np.array([[10.0, 10, 50, 50], [20.0, 20, 60, 60]])
_MATCHES = np.array([[11.0, 10, 51, 50], [10.0, 10, 50, 51], [20.0, 22, 60, 60],
                     [10.0, 10, 60, 60]])
_SCORES = np.array([0.7, 0.9, 0.6, 0.8])


def test_discovery_precision_recall_by_hand() -> None:
    precision, recall = discovery_precision_recall(_MATCHES, _SCORES, _TRUTH, 2.0,
                                                   cutoffs=np.array([25, 50, 75, 100]))
    # kept = ceil(t * 4 / 100) = 1, 2, 3, 4 -> {A}, {A,B}, {A,B,C}, {A,B,C,D}
    np.testing.assert_allclose(precision, [1.0, 0.5, 2 / 3, 0.75])
    np.testing.assert_allclose(recall, [0.5, 0.5, 0.5, 1.0])
    # F1 = 2/3, 1/2, 4/7, 6/7 -> best 6/7
    assert best_f1(precision, recall) == pytest.approx(6 / 7)
    # AP = (0.5 - 0) * 1 + 0 + 0 + (1 - 0.5) * 0.75 = 0.875
    assert average_precision(precision, recall) == pytest.approx(0.875)


def test_discovery_metrics_scale_k_with_image_size() -> None:
    # k = 1 px at S = 224: D (distance 2) becomes wrong, g1 is never discovered
    # P = (1, 1/2, 2/3, 1/2), R = 1/2 throughout -> AP 0.5, best F1 = 2/3 (first cutoff).
    # Default cutoffs 1..100 keep 1, 2, 3, 4 matches over t in 1-25, 26-50, 51-75, 76-100.
    got = discovery_metrics(_MATCHES, _SCORES, _TRUTH, ks=(2, 1), image_size=224)
    assert got == pytest.approx({"best_f1@2": 6 / 7, "ap@2": 0.875,
                                 "best_f1@1": 2 / 3, "ap@1": 0.5})
    # at S = 448, k = 1 means 447 / 223 = 2.004 px: the k = 2 answer comes back
    got = discovery_metrics(_MATCHES, _SCORES, _TRUTH, ks=(1,), image_size=448)
    assert got == pytest.approx({"best_f1@1": 6 / 7, "ap@1": 0.875})


def test_discovery_match_needs_both_ends_within_a_disc() -> None:
    truth = np.array([[10.0, 10, 50, 50]])
    cutoffs = np.array([100])
    # end 2 off by (1.4, 1.4): 1.98 px <= 2 -> correct
    p, r = discovery_precision_recall(np.array([[10.0, 10, 51.4, 51.4]]), np.ones(1), truth,
                                      2.0, cutoffs)
    assert (p.tolist(), r.tolist()) == ([1.0], [1.0])
    # end 2 off by (1.5, 1.5): each coordinate within 2 but 2.12 px > 2 -> wrong
    p, r = discovery_precision_recall(np.array([[10.0, 10, 51.5, 51.5]]), np.ones(1), truth,
                                      2.0, cutoffs)
    assert (p.tolist(), r.tolist()) == ([0.0], [0.0])


def test_discovery_perfect_and_all_wrong() -> None:
    cutoffs = np.array([50, 100])
    precision, recall = discovery_precision_recall(_TRUTH, np.array([0.2, 0.9]), _TRUTH, 2.0,
                                                   cutoffs)
    np.testing.assert_allclose(precision, [1.0, 1.0])
    np.testing.assert_allclose(recall, [0.5, 1.0])
    assert average_precision(precision, recall) == 1.0
    assert best_f1(precision, recall) == 1.0
    far = _TRUTH + np.array([100.0, 0, 0, 0])  # end 1 is 100 px off every truth pair
    precision, recall = discovery_precision_recall(far, np.array([0.2, 0.9]), _TRUTH, 23.0,
                                                   cutoffs)
    np.testing.assert_array_equal(precision, [0.0, 0.0])
    np.testing.assert_array_equal(recall, [0.0, 0.0])
    assert average_precision(precision, recall) == 0.0
    assert best_f1(precision, recall) == 0.0


def test_discovery_edge_cases_and_cutoff_rounding() -> None:
    # no matches: nothing kept, nothing found; no truth: recall undefined
    p, r = discovery_precision_recall(np.zeros((0, 4)), np.zeros(0), _TRUTH, 2.0, np.array([50]))
    assert p.tolist() == [0.0] and r.tolist() == [0.0]
    p, r = discovery_precision_recall(_MATCHES, _SCORES, np.zeros((0, 4)), 2.0, np.array([50]))
    assert p.tolist() == [0.0] and math.isnan(r[0]) and math.isnan(best_f1(p, r))
    # 100 perfect matches 10 px apart: t = 7 keeps ceil(7 * 100 / 100) = 7, not 8 (the float
    # 0.07 * 100 = 7.000000000000001 must not round up)
    grid = np.arange(100, dtype=np.float64) * 10
    truth = np.stack([grid, grid, grid, grid], axis=1)
    p, r = discovery_precision_recall(truth, -grid, truth, 1.0, np.array([7, 29, 57]))
    np.testing.assert_allclose(r, [0.07, 0.29, 0.57])
    np.testing.assert_allclose(p, [1.0, 1.0, 1.0])


def test_discovery_chunking_matches_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    cutoffs = np.array([25, 50, 75, 100])
    whole = discovery_precision_recall(_MATCHES, _SCORES, _TRUTH, 2.0, cutoffs)
    monkeypatch.setattr(correspondence, "_CHUNK", 1)  # one match per block
    chunked = discovery_precision_recall(_MATCHES, _SCORES, _TRUTH, 2.0, cutoffs)
    np.testing.assert_array_equal(whole[0], chunked[0])
    np.testing.assert_array_equal(whole[1], chunked[1])
    np.testing.assert_allclose(chunked[0], [1.0, 0.5, 2 / 3, 0.75])
