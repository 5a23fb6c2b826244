"""The CMAT pre-training losses of training.cmat_losses against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from training.cmat_losses import (
    affinity,
    affinity_loss,
    centre_mse,
    chamfer_l2,
    cmat_loss,
    koleo_loss,
    pool_patch_features,
)

F64 = torch.float64


def _t(rows: list, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype)


# ---------------------------------------------------------------- chamfer_l2

PRED_A = [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
TARGET_A = [[0.0, 0.0, 0.0], [0.0, 2.0, 0.0]]


def test_chamfer_l2_by_hand() -> None:
    # pred -> target: (0,0,0) hits (0,0,0): 0; (1,0,0): min(1, 1 + 4) = 1; mean 0.5
    # target -> pred: (0,0,0): 0; (0,2,0): min(4, 1 + 4) = 4; mean 2.0
    got = chamfer_l2(_t([PRED_A]), _t([TARGET_A]))
    assert float(got) == pytest.approx(2.5, abs=1e-12)


def test_chamfer_l2_means_each_patch_then_the_patches() -> None:
    # patch A: 2.5 (above); patch B: the same set twice: 0; mean over patches 1.25
    got = chamfer_l2(_t([PRED_A, TARGET_A]), _t([TARGET_A, TARGET_A]))
    assert float(got) == pytest.approx(1.25, abs=1e-12)
    # k = 2, k2 = 1: pred -> target: (1 + 9) / 2 = 5; target -> pred: min(1, 9) = 1; total 6
    got = chamfer_l2(_t([[[1.0, 0.0, 0.0], [3.0, 0.0, 0.0]]]), _t([[[0.0, 0.0, 0.0]]]))
    assert float(got) == pytest.approx(6.0, abs=1e-12)


def test_chamfer_l2_is_zero_on_identical_sets_with_a_finite_gradient() -> None:
    points = torch.randn(4, 8, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    pred = points.clone().requires_grad_(True)
    got = chamfer_l2(pred, points)
    got.backward()
    assert got.item() == 0.0
    assert torch.equal(pred.grad, torch.zeros_like(points))


def test_chamfer_l2_is_symmetric_when_k_equals_k2() -> None:
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 6, 3, dtype=F64, generator=gen), torch.randn(3, 6, 3, dtype=F64,
                                                                       generator=gen)
    assert float(chamfer_l2(a, b)) == pytest.approx(float(chamfer_l2(b, a)), rel=1e-12)
    assert float(chamfer_l2(_t([TARGET_A]), _t([PRED_A]))) == pytest.approx(2.5, abs=1e-12)


def test_chamfer_l2_rejects_mismatched_patches() -> None:
    with pytest.raises(ValueError, match="patches"):
        chamfer_l2(torch.zeros(2, 4, 3), torch.zeros(3, 4, 3))


# ---------------------------------------------------------------- centre_mse

def test_centre_mse_by_hand() -> None:
    # differences (-1, 0, 0) and (0, 2, 3): squares 1 + 0 + 0 + 0 + 4 + 9 = 14 over 6 coords
    got = centre_mse(_t([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]), _t([[1.0, 0.0, 0.0]] * 2))
    assert float(got) == pytest.approx(14 / 6, rel=1e-12)
    with pytest.raises(ValueError, match="must match"):
        centre_mse(torch.zeros(2, 3), torch.zeros(3, 3))


# ---------------------------------------------------------------- pool_patch_features

POINTS = [[0.0, 0, 0], [1.0, 0, 0], [5.0, 0, 0], [9.0, 0, 0], [10.0, 0, 0]]
FEATURES = [[1.0, 0.0], [2.0, 2.0], [3.0, 4.0], [10.0, 0.0], [20.0, 6.0]]


def test_pool_patch_features_by_hand() -> None:
    # sample 0, centres x = 0 and x = 10: x = 0, 1 and the tie x = 5 (lower index wins) go to
    #   centre 0: mean of [1,0], [2,2], [3,4] = [2, 2]; x = 9, 10: mean of [10,0], [20,6] = [15, 3]
    # sample 1, the same centres swapped: the tie now goes to x = 10 (index 0):
    #   centre 0 (x = 10): mean of [3,4], [10,0], [20,6] = [11, 10/3]; centre 1: [1.5, 1]
    points = _t([POINTS, POINTS])
    centres = _t([[[0.0, 0, 0], [10.0, 0, 0]], [[10.0, 0, 0], [0.0, 0, 0]]])
    features = _t([FEATURES, FEATURES]).requires_grad_(True)
    got = pool_patch_features(features, points, centres)
    expected = _t([[[2.0, 2.0], [15.0, 3.0]], [[11.0, 10 / 3], [1.5, 1.0]]])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # each point's feature enters its patch's mean with weight 1 / (points in that patch)
    got.sum().backward()
    weights = _t([[1 / 3, 1 / 3, 1 / 3, 1 / 2, 1 / 2], [1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3]])
    torch.testing.assert_close(features.grad, weights[..., None].expand(-1, -1, 2))


def test_pool_patch_features_gives_an_empty_patch_zeros() -> None:
    # a third centre far from every point owns nothing: zeros, not NaN (0 / 0)
    centres = _t([[[0.0, 0, 0], [10.0, 0, 0], [100.0, 100, 100]]])
    got = pool_patch_features(_t([FEATURES]), _t([POINTS]), centres)
    torch.testing.assert_close(got, _t([[[2.0, 2.0], [15.0, 3.0], [0.0, 0.0]]]))


# ---------------------------------------------------------------- affinity

def test_affinity_of_orthogonal_features_is_the_identity() -> None:
    features = _t([[[2.0, 0, 0], [0, 5.0, 0], [0, 0, 0.5]]])
    torch.testing.assert_close(affinity(features), torch.eye(3, dtype=F64)[None])


def test_affinity_by_hand() -> None:
    # (3, 4) . (1, 0) / (5 * 1) = 0.6
    got = affinity(_t([[[3.0, 4.0], [1.0, 0.0]]]))
    torch.testing.assert_close(got, _t([[[1.0, 0.6], [0.6, 1.0]]]))


# ---------------------------------------------------------------- affinity_loss

def test_affinity_loss_is_zero_for_the_same_relations() -> None:
    # student (D = 3): the teacher's patches embedded in 3D, scaled by 2 and 0.5 per patch
    teacher = _t([[[3.0, 4.0], [1.0, 0.0]]])
    student = _t([[[6.0, 8.0, 0.0], [0.5, 0.0, 0.0]]])
    assert float(affinity_loss(student, teacher)) == pytest.approx(0.0, abs=1e-12)


def test_affinity_loss_by_hand() -> None:
    # A3D = I; A2D = [[1, .6], [.6, 1]]: two off-diagonal errors 0.6^2, (0.36 * 2) / 4 = 0.18
    got = affinity_loss(_t([[[1.0, 0.0], [0.0, 1.0]]]), _t([[[3.0, 4.0], [1.0, 0.0]]]))
    assert float(got) == pytest.approx(0.18, rel=1e-12)


def test_affinity_loss_over_visible_patches_by_hand() -> None:
    nan = float("nan")
    # sample 0: patches 0, 1 visible (patch 2 is hidden, a NaN there must not leak):
    #   A3D = I, A2D = [[1, .6], [.6, 1]]: squared errors 0.36 + 0.36 = 0.72 over 4 pairs
    # sample 1: all 3 visible: A3D = [[1,1,0],[1,1,0],[0,0,1]], A2D = [[1,0,0],[0,1,1],[0,1,1]]
    #   entries (0,1), (1,0), (1,2), (2,1) differ by 1: 4 over 9 pairs
    # pooled over all visible pairs: (0.72 + 4) / (4 + 9)
    student = _t([[[1.0, 0.0], [0.0, 1.0], [nan, nan]],
                  [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]]).requires_grad_(True)
    teacher = _t([[[3.0, 4.0], [1.0, 0.0], [0.0, 1.0]],
                  [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
    visible = torch.tensor([[True, True, False], [True, True, True]])
    got = affinity_loss(student, teacher, visible)
    assert got.item() == pytest.approx(4.72 / 13, rel=1e-12)
    got.backward()
    assert torch.isfinite(student.grad).all()
    assert torch.equal(student.grad[0, 2], torch.zeros(2, dtype=F64))  # hidden: no gradient


def test_affinity_loss_with_everything_visible_is_the_plain_loss() -> None:
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(2, 5, 4, dtype=F64, generator=gen)
    teacher = torch.randn(2, 5, 7, dtype=F64, generator=gen)
    every = torch.ones(2, 5, dtype=torch.bool)
    assert float(affinity_loss(student, teacher, every)) == pytest.approx(
        float(affinity_loss(student, teacher)), rel=1e-12)
    with pytest.raises(ValueError, match="no visible"):
        affinity_loss(student, teacher, torch.zeros(2, 5, dtype=torch.bool))


def test_affinity_loss_trains_the_student_only() -> None:
    student = _t([[[1.0, 0.0], [0.0, 1.0]]]).requires_grad_(True)
    teacher = _t([[[3.0, 4.0], [1.0, 0.0]]]).requires_grad_(True)
    affinity_loss(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and float(student.grad.abs().sum()) > 0


# ---------------------------------------------------------------- koleo_loss

def _unit_2d(degrees: float, scale: float = 1.0) -> list[float]:
    rad = math.radians(degrees)
    return [scale * math.cos(rad), scale * math.sin(rad)]


def test_koleo_loss_three_unit_vectors_by_hand() -> None:
    # 0, 90, 180 deg: 0 -> 90 (dot 0 beats -1), 90 -> 0 (tie with 180, first wins), 180 -> 90;
    # every distance is |(1,0) - (0,1)| = sqrt(2): loss -log(sqrt 2) = -ln(2) / 2
    features = _t([[_unit_2d(0), _unit_2d(90), _unit_2d(180)]], torch.float32)
    assert float(koleo_loss(features)) == pytest.approx(-math.log(2) / 2, rel=1e-6)


def test_koleo_loss_normalises_and_picks_each_nearest_neighbour() -> None:
    # 0, 60, 180 deg with norms 2, 3, 0.5 (normalised away): 0 <-> 60 at distance
    # 2 sin(30) = 1; 180 -> 60 (120 deg apart) at 2 sin(60) = sqrt(3):
    # loss = -(0 + 0 + ln sqrt(3)) / 3 = -ln(3) / 6
    features = _t([[_unit_2d(0, 2.0), _unit_2d(60, 3.0), _unit_2d(180, 0.5)]], torch.float32)
    assert float(koleo_loss(features)) == pytest.approx(-math.log(3) / 6, rel=1e-6)


def test_koleo_loss_stays_within_each_sample() -> None:
    # sample 0: (1,0), (0,1): both at sqrt(2); sample 1: (1,0), (-1,0): both at 2 (antipodal:
    # with -1 on the diagonal, as in DINOv2, argmax would pick the patch itself).
    # Mixing samples would pair the two (1,0) at distance 0. Loss -(2 ln sqrt2 + 2 ln 2) / 4
    features = _t([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [-1.0, 0.0]]], torch.float32)
    assert float(koleo_loss(features)) == pytest.approx(-3 * math.log(2) / 4, rel=1e-6)


def test_koleo_loss_duplicates_give_a_finite_gradient() -> None:
    # patches 0 and 1 coincide: d = 0 for both, -log(eps) each; patch 2 at 90 deg: sqrt(2)
    features = _t([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]], torch.float32).requires_grad_(True)
    got = koleo_loss(features, eps=1e-8)
    got.backward()
    expected = -(2 * math.log(1e-8) + math.log(math.sqrt(2) + 1e-8)) / 3
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert torch.isfinite(features.grad).all()


def test_koleo_loss_low_precision_input_is_computed_in_float32() -> None:
    features = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(3))
    reference = koleo_loss(features)
    low = koleo_loss(features.bfloat16())
    assert reference.dtype == low.dtype == torch.float32
    assert float(low) == pytest.approx(float(reference), rel=2e-2)


def test_koleo_loss_turns_autocast_off() -> None:
    # 0, -5.5, 5 and 180 deg. In float32: 0 -> 5 (d = 2 sin 2.5), -5.5 -> 0 (2 sin 2.75),
    # 5 -> 0 (2 sin 2.5), 180 -> -5.5 (174.5 deg apart, d = 2 sin 87.25). Autocast would run
    # the bmm in bf16, where cos 5 and cos 5.5 both round to 255/256 and 0 would pick -5.5.
    features = _t([[_unit_2d(0), _unit_2d(-5.5), _unit_2d(5), _unit_2d(180)]], torch.float32)
    chord = [2 * math.sin(math.radians(a)) for a in (2.5, 2.75, 2.5, 87.25)]
    expected = -sum(math.log(d) for d in chord) / 4
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = koleo_loss(features)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_koleo_loss_needs_two_patches() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        koleo_loss(torch.randn(2, 1, 4))


# ---------------------------------------------------------------- cmat_loss

def test_cmat_loss_weighting() -> None:
    rec, aff, div = torch.tensor(2.0), torch.tensor(3.0), torch.tensor(-1.0)
    # 1.0 * 2 + 0.1 * 3 + 0.2 * (-1) = 2.1, a plain sum (not divided by the weights)
    assert float(cmat_loss(rec, aff, div)) == pytest.approx(2.1, rel=1e-6)
    # 2 * 2 + 0.5 * 3 + 1 * (-1) = 4.5
    got = cmat_loss(rec, aff, div, lambda_rec=2.0, lambda_aff=0.5, lambda_div=1.0)
    assert float(got) == pytest.approx(4.5, rel=1e-6)


def test_cmat_loss_leaves_out_none_and_zero_weight_terms() -> None:
    rec, aff, div = torch.tensor(2.0), torch.tensor(3.0), torch.tensor(-1.0)
    assert float(cmat_loss(rec, None, div)) == pytest.approx(2.0 - 0.2, rel=1e-6)
    assert float(cmat_loss(None, aff, None)) == pytest.approx(0.3, rel=1e-6)
    # weight 0 drops the term even when it is infinite (0 * inf would be NaN)
    assert float(cmat_loss(rec, torch.tensor(math.inf), div, lambda_aff=0.0)) == \
        pytest.approx(1.8, rel=1e-6)
    with pytest.raises(ValueError, match="no term"):
        cmat_loss(None, None, None)
