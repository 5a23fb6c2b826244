"""SOCO's PCK: the radius from the target box, CC (any valid target) vs SOC (the exact one),
strict inequality, and the per-image / per-category averages, against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from operators.metrics.keypoints import pair_pck, pck_radius, pck_summary


def test_the_radius_is_alpha_times_the_longer_box_side() -> None:
    assert pck_radius([10, 20, 110, 70], 0.1) == pytest.approx(10.0)   # 100 x 50 box
    with pytest.raises(ValueError, match="not \\[left, top, right, bottom\\]"):
        pck_radius([10, 20, 5, 70], 0.1)


def test_cc_accepts_any_target_of_the_concept_soc_only_the_exact_one() -> None:
    box = [0, 0, 100, 100]                     # radius 10 at alpha 0.1
    wheels = np.array([[20, 80], [80, 80]])    # front-left, front-right wheel centres
    predicted = np.array([[78, 81], [50, 10]])  # lands on the right wheel; the second misses
    # CC: keypoint 0 (left wheel) may match any wheel -> correct; keypoint 1 has target (50, 30)
    cc = pair_pck(predicted, [wheels, np.array([[50, 30]])], box)
    # SOC: keypoint 0 must hit the left wheel -> wrong
    soc = pair_pck(predicted, [wheels[:1], np.array([[50, 30]])], box)
    assert (cc, soc) == (0.5, 0.0)


def test_a_prediction_exactly_on_the_radius_is_wrong() -> None:
    box = [0, 0, 100, 40]                      # radius 10
    assert pair_pck(np.array([[10.0, 0.0]]), [np.array([[0.0, 0.0]])], box) == 0.0
    assert pair_pck(np.array([[9.99, 0.0]]), [np.array([[0.0, 0.0]])], box) == 1.0


def test_averages_per_image_and_per_category() -> None:
    rows = [("car", 1.0), ("car", 0.5), ("car", 0.0), ("bus", 1.0)]
    summary = pck_summary(rows)
    assert summary["per_img"] == pytest.approx(100 * 2.5 / 4)          # 62.5
    assert summary["per_category"] == {"bus": 100.0, "car": pytest.approx(50.0)}
    assert summary["overall"] == pytest.approx(75.0)                   # (100 + 50) / 2
