"""Affordance metrics (3D per-point, 2D heat maps) on hand-built cases computed by hand."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from operators.metrics.affordance import (
    AIOU_THRESHOLDS,
    affordance_metrics,
    aiou,
    auc,
    heatmap_metrics,
    kld,
    mae,
    nss,
    sim,
    sim_map,
)

# Thresholds are t_k = k / 19, k = 0..19 (0.2632 = 5/19, 0.3158 = 6/19, 0.3684 = 7/19,
# 0.4211 = 8/19, 0.5789 = 11/19, 0.6316 = 12/19, 0.7895 = 15/19, 0.8421 = 16/19,
# 0.8947 = 17/19, 0.9474 = 18/19).

# Sample A: G = {0, 1} (gt >= 0.5).
PRED_A = np.array([0.9, 0.6, 0.3, 0.0])
GT_A = np.array([1.0, 0.7, 0.0, 0.2])
# k = 0 (t = 0): P = all 4 points, IoU 2/4
# k = 1..5 (t <= 0.3): P = {0, 1, 2}, IoU 2/3
# k = 6..11 (0.3 < t <= 0.6): P = {0, 1}, IoU 1
# k = 12..17 (0.6 < t <= 0.9): P = {0}, IoU 1/2
# k = 18, 19 (t > 0.9): P = {}, IoU 0
# sum = 1/2 + 5 * 2/3 + 6 + 6/2 + 0 = 77/6 -> aIoU = 77/120
AIOU_A = 77 / 120

# Sample B: G = {0, 1}.
PRED_B = np.array([0.8, 0.4, 0.4, 0.0])
GT_B = np.array([1.0, 1.0, 0.0, 0.0])
# k = 0: IoU 2/4; k = 1..7 (t <= 0.4): P = {0, 1, 2}, 2/3; k = 8..15 (0.4 < t <= 0.8): P = {0},
# 1/2; k = 16..19 (t > 0.8): P = {}, 0. sum = 1/2 + 14/3 + 4 = 55/6 -> aIoU = 55/120
AIOU_B = 55 / 120


def test_thresholds_are_linspace_0_1_20() -> None:
    assert AIOU_THRESHOLDS.shape == (20,)
    assert AIOU_THRESHOLDS[0] == 0.0 and AIOU_THRESHOLDS[-1] == 1.0


def test_aiou_hand_examples() -> None:
    assert aiou(PRED_A, GT_A) == pytest.approx(AIOU_A, abs=1e-12)
    assert aiou(PRED_B, GT_B) == pytest.approx(AIOU_B, abs=1e-12)


def test_aiou_perfect_prediction() -> None:
    # pred = the binary truth, G = {0, 1} of N = 5. At t = 0 every point is predicted: IoU 2/5.
    # For t in (0, 1] (19 thresholds, t = 1 included) pred >= t picks exactly G: IoU 1.
    gt = np.array([1.0, 1.0, 0.0, 0.0, 0.0])
    assert aiou(gt.copy(), gt) == pytest.approx((2 / 5 + 19) / 20, abs=1e-12)  # 0.97
    # gt exactly 0.5 counts as positive (>=): G = {0}, t = 0 gives 1/2, the rest 1
    assert aiou(np.array([1.0, 0.0]), np.array([0.5, 0.4])) == pytest.approx(
        (1 / 2 + 19) / 20, abs=1e-12)


def test_aiou_empty_gt_is_nan() -> None:
    assert math.isnan(aiou(np.array([0.9, 0.1]), np.array([0.49, 0.0])))
    with pytest.raises(ValueError, match="shapes differ"):
        aiou(PRED_A, GT_A[:3])


def test_auc_hand_example_with_tie() -> None:
    # positives (gt >= 0.5): scores 0.9, 0.5; negatives: 0.5, 0.1.
    # pairs: 0.9>0.5: 1, 0.9>0.1: 1, 0.5=0.5: 1/2, 0.5>0.1: 1 -> 3.5 / 4 = 0.875
    pred = np.array([0.9, 0.5, 0.5, 0.1])
    gt = np.array([0.8, 0.5, 0.49, 0.0])
    assert auc(pred, gt) == pytest.approx(0.875, abs=1e-12)
    # reversed order of the pairs' scores: 1 - 0.875
    assert auc(1.0 - pred, gt) == pytest.approx(0.125, abs=1e-12)
    # sample A: both positives (0.9, 0.6) above both negatives (0.3, 0.0) -> 1
    assert auc(PRED_A, GT_A) == 1.0


def test_auc_undefined_and_constant() -> None:
    pred = np.array([0.2, 0.7, 0.4])
    assert math.isnan(auc(pred, np.array([0.6, 1.0, 0.5])))  # all positive: no negative
    assert math.isnan(auc(pred, np.array([0.0, 0.3, 0.49])))  # all negative: no positive
    # a constant prediction ties every pair: AUC 1/2
    assert auc(np.full(4, 0.3), np.array([1.0, 0.0, 1.0, 0.0])) == 0.5


def test_sim_cases() -> None:
    p = np.array([0.2, 0.5, 0.3])
    assert sim(p, p) == pytest.approx(1.0, abs=1e-9)
    assert sim(p, 2 * p) == pytest.approx(1.0, abs=1e-9)  # only the shape of the map counts
    assert sim(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == 0.0  # disjoint supports
    # [1, 1, 2] / 4 = [1/4, 1/4, 1/2]; [0, 1, 1] / 2 = [0, 1/2, 1/2]; min = [0, 1/4, 1/2] -> 3/4
    three_quarters = sim(np.array([1.0, 1.0, 2.0]), np.array([0.0, 1.0, 1.0]))
    assert three_quarters == pytest.approx(0.75, abs=1e-9)
    # an all-zero map normalises (sum + eps) to all zeros: SIM 0, not NaN
    assert sim(np.zeros(3), p) == 0.0
    assert sim(np.zeros(3), np.zeros(3)) == 0.0
    with pytest.raises(ValueError, match="negative"):
        sim(np.array([-0.1, 1.0]), p[:2])


def test_mae_hand_example() -> None:
    # |0.2 - 0| + |0.9 - 1| + |0.5 - 0.5| = 0.3 over 3 points -> 0.1
    error = mae(np.array([0.2, 0.9, 0.5]), np.array([0.0, 1.0, 0.5]))
    assert error == pytest.approx(0.1, abs=1e-12)


def test_affordance_metrics_skips_empty_gt() -> None:
    # sample C: pred [0.2, 0.4, 0.6, 0.8], gt with no value >= 0.5 -> aIoU and AUC NaN.
    pred_c = np.array([0.2, 0.4, 0.6, 0.8])
    gt_c = np.array([0.1, 0.0, 0.3, 0.0])
    preds = np.stack([PRED_A, pred_c, PRED_B])
    gts = np.stack([GT_A, gt_c, GT_B])
    out = affordance_metrics(preds, gts)
    # aIoU over A and B only: (77/120 + 55/120) / 2 = 0.55
    assert out["aiou"] == pytest.approx(0.55, abs=1e-12)
    # AUC: A = 1; B: positives 0.8, 0.4, negatives 0.4, 0.0 -> (1 + 1 + 1/2 + 1) / 4 = 0.875;
    # mean (1 + 0.875) / 2 = 0.9375
    assert out["auc"] == pytest.approx(0.9375, abs=1e-12)
    # SIM over all three:
    # A: [0.9, 0.6, 0.3, 0] / 1.8 = [1/2, 1/3, 1/6, 0]; [1, 0.7, 0, 0.2] / 1.9 = [10/19, 7/19, 0,
    #    2/19]; min = [1/2, 1/3, 0, 0] -> 5/6
    # C: [0.1, 0.2, 0.3, 0.4]; [1/4, 0, 3/4, 0]; min = [0.1, 0, 0.3, 0] -> 0.4
    # B: [1/2, 1/4, 1/4, 0]; [1/2, 1/2, 0, 0]; min -> 3/4.  mean = (5/6 + 0.4 + 0.75) / 3
    assert out["sim"] == pytest.approx((5 / 6 + 0.4 + 0.75) / 3, abs=1e-9)
    # MAE: A (0.1 + 0.1 + 0.3 + 0.2) / 4 = 0.175; C (0.1 + 0.4 + 0.3 + 0.8) / 4 = 0.4;
    # B (0.2 + 0.6 + 0.4 + 0) / 4 = 0.3; mean = 0.875 / 3
    assert out["mae"] == pytest.approx(0.875 / 3, abs=1e-12)
    assert (out["n_samples"], out["n_skipped_aiou"], out["n_skipped_auc"]) == (3, 1, 1)


def test_affordance_metrics_counts_and_all_skipped() -> None:
    # an all-positive truth has an aIoU (perfect prediction: (4/4 + 19) / 20 = 1) but no AUC
    preds = np.stack([PRED_A, np.ones(4)])
    gts = np.stack([GT_A, np.ones(4)])
    out = affordance_metrics(preds, gts)
    assert out["aiou"] == pytest.approx((AIOU_A + 1.0) / 2, abs=1e-12)
    assert out["auc"] == 1.0  # only sample A
    assert (out["n_skipped_aiou"], out["n_skipped_auc"]) == (0, 1)
    # every sample skipped: NaN means, without a RuntimeWarning from an empty mean
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = affordance_metrics(np.full((2, 3), 0.5), np.zeros((2, 3)))
    assert math.isnan(out["aiou"]) and math.isnan(out["auc"])
    assert (out["n_samples"], out["n_skipped_aiou"], out["n_skipped_auc"]) == (2, 2, 2)
    with pytest.raises(ValueError):
        affordance_metrics(PRED_A, GT_A)  # (N,) instead of (B, N)


def test_kld_cases() -> None:
    m = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert kld(m, m) == pytest.approx(0.0, abs=1e-9)
    # pred [1, 3] -> [1/4, 3/4]; gt [1, 1] -> [1/2, 1/2]:
    # 1/2 ln(0.5 / 0.25) + 1/2 ln(0.5 / 0.75) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3) = 0.1438410
    assert kld(np.array([[1.0, 3.0]]), np.array([[1.0, 1.0]])) == pytest.approx(
        0.5 * math.log(4 / 3), abs=1e-9)
    # an all-zero truth: every term is 0 * log(...) = 0
    assert kld(m, np.zeros((2, 2))) == 0.0
    # a zero prediction where the truth has mass: large (ln(0.5 / 1e-12) / 2 each) but finite
    big = kld(np.zeros((1, 2)), np.array([[1.0, 1.0]]))
    assert big == pytest.approx(math.log(0.5 / 1e-12), rel=1e-6)


def test_sim_map_cases() -> None:
    m = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert sim_map(m, m) == pytest.approx(1.0, abs=1e-9)
    # [1, 1, 2, 0] / 4 and [0, 1, 1, 0] / 2: min = [0, 1/4, 1/2, 0] -> 3/4
    assert sim_map(np.array([[1.0, 1.0], [2.0, 0.0]]),
                   np.array([[0.0, 1.0], [1.0, 0.0]])) == pytest.approx(0.75, abs=1e-9)
    assert sim_map(np.zeros((2, 2)), m) == 0.0


# pred [[1, 2], [3, 4]]: mean 2.5, population std sqrt((2.25 + 0.25 + 0.25 + 2.25) / 4)
# = sqrt(1.25); standardised [-1.5, -0.5, 0.5, 1.5] / sqrt(1.25).
NSS_PRED = np.array([[1.0, 2.0], [3.0, 4.0]])
# gt [1, 1.5, 3, 6]: min-max scaled (x - 1) / 5 = [0, 0.1, 0.4, 1].
NSS_GT = np.array([[1.0, 1.5], [3.0, 6.0]])


def test_nss_binarize_hand_example() -> None:
    # fixations: scaled > 0.1 -> cells 3 and 4 (0.1 itself is not > 0.1):
    # (0.5 + 1.5) / 2 / sqrt(1.25) = 1 / sqrt(1.25) = 0.894427
    assert nss(NSS_PRED, NSS_GT) == pytest.approx(1 / math.sqrt(1.25), abs=1e-12)
    assert nss(NSS_PRED, NSS_GT, gt_rule="binarize") == nss(NSS_PRED, NSS_GT)


def test_nss_soft_hand_example() -> None:
    # weights gt / 11.5: (1 * -1.5 + 1.5 * -0.5 + 3 * 0.5 + 6 * 1.5) / 11.5 / sqrt(1.25)
    # = 8.25 / 11.5 / sqrt(1.25) = 0.641655
    expected = 8.25 / 11.5 / math.sqrt(1.25)
    assert nss(NSS_PRED, NSS_GT, gt_rule="soft") == pytest.approx(expected, abs=1e-12)


def test_nss_undefined_cases() -> None:
    assert math.isnan(nss(np.full((2, 2), 0.1), NSS_GT))  # constant pred: std 0
    assert math.isnan(nss(np.full((2, 2), 0.1), NSS_GT, gt_rule="soft"))
    assert math.isnan(nss(NSS_PRED, np.zeros((2, 2))))  # no fixation
    assert math.isnan(nss(NSS_PRED, np.zeros((2, 2)), gt_rule="soft"))  # sum(gt) = 0
    # a constant non-zero truth: no min-max scaling -> NaN; "soft" weighs all cells equally,
    # the mean of a standardised map, 0
    assert math.isnan(nss(NSS_PRED, np.full((2, 2), 2.0)))
    assert nss(NSS_PRED, np.full((2, 2), 2.0), gt_rule="soft") == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="gt_rule"):
        nss(NSS_PRED, NSS_GT, gt_rule="hard")


def test_heatmap_metrics_skips_nan_nss() -> None:
    m = np.array([[1.0, 2.0], [3.0, 4.0]])
    preds = np.stack([NSS_PRED, np.full((2, 2), 0.1)])  # the second has a constant pred
    gts = np.stack([NSS_GT, m])
    out = heatmap_metrics(preds, gts)
    # NSS only from the first map; KLD and SIM from both
    assert out["nss"] == pytest.approx(1 / math.sqrt(1.25), abs=1e-12)
    assert (out["n_samples"], out["n_skipped_nss"]) == (2, 1)
    # KLD = sum g ln(g / p) (the eps change it by < 1e-9 here):
    # first: p = [.1, .2, .3, .4], g = [1, 1.5, 3, 6] / 11.5 = [.08696, .13043, .26087, .52174]
    #   terms -0.012153, -0.055754, -0.036460, 0.138628 -> 0.034261
    # second: p = [.25] * 4, g = [.1, .2, .3, .4]: .1 ln .4 + .2 ln .8 + .3 ln 1.2 + .4 ln 1.6
    #   = -0.091629 - 0.044629 + 0.054696 + 0.188001 = 0.106440; mean 0.070351
    g1 = [1 / 11.5, 1.5 / 11.5, 3 / 11.5, 6 / 11.5]
    kld1 = sum(g * math.log(g / p) for g, p in zip(g1, [0.1, 0.2, 0.3, 0.4]))
    kld2 = 0.1 * math.log(0.4) + 0.2 * math.log(0.8) + 0.3 * math.log(1.2) + 0.4 * math.log(1.6)
    assert (kld1 + kld2) / 2 == pytest.approx(0.070351, abs=1e-6)
    assert out["kld"] == pytest.approx((kld1 + kld2) / 2, abs=1e-9)
    # SIM: min([.1, .2, .3, .4], [.08696, .13043, .26087, .52174]) = 5.5 / 11.5 + .4 = 0.878261
    # and min([.25] * 4, [.1, .2, .3, .4]) = .1 + .2 + .25 + .25 = 0.8; mean 0.839130
    assert out["sim"] == pytest.approx((5.5 / 11.5 + 0.4 + 0.8) / 2, abs=1e-9)
    out_soft = heatmap_metrics(preds, gts, gt_rule="soft")
    assert out_soft["nss"] == pytest.approx(8.25 / 11.5 / math.sqrt(1.25), abs=1e-12)
