"""The losses of training.losses against cross-entropies written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from training.losses import functional_loss, mask_loss, spatial_loss, total_loss

TAU = 0.1


def _ce(logits: list[float], target: int = 0) -> float:
    """-log softmax(logits)[target], written out with math."""
    return -math.log(math.exp(logits[target]) / sum(math.exp(x) for x in logits))


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor([rows], dtype=torch.float64)  # (1, n, D)


# B = 1, n = 2, D = 2 unit vectors
POS_1 = [[1.0, 0.0], [0.0, 1.0]]
POS_2 = [[1.0, 0.0], [0.6, 0.8]]
NEG_1 = [[-1.0, 0.0], [0.0, -1.0]]
NEG_2 = [[0.8, -0.6], [-0.6, 0.8]]


def test_functional_loss_by_hand() -> None:
    # row 0: sim(p1+_0, p2+_0) = 1; p1+_0 . p2-_j = 0.8, -0.6; p2+_0 . p1-_j = -1, 0;
    #        p1-_0 . p2-_j = -0.8, 0.6
    row_0 = [1.0, 0.8, -0.6, -1.0, 0.0, -0.8, 0.6]
    # row 1: sim(p1+_1, p2+_1) = 0.8; p1+_1 . p2-_j = -0.6, 0.8; p2+_1 . p1-_j = -0.6, -0.8;
    #        p1-_1 . p2-_j = 0.6, -0.8
    row_1 = [0.8, -0.6, 0.8, -0.6, -0.8, 0.6, -0.8]
    expected = (_ce([x / TAU for x in row_0]) + _ce([x / TAU for x in row_1])) / 2
    got = functional_loss(_t(POS_1), _t(POS_2), _t(NEG_1), _t(NEG_2), tau=TAU)
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_functional_loss_mean_over_batch_and_default_tau() -> None:
    first = [_t(POS_1), _t(POS_2), _t(NEG_1), _t(NEG_2)]
    second = [_t(NEG_2), _t(POS_1), _t(POS_2), _t(NEG_1)]
    batched = [torch.cat([a, b]) for a, b in zip(first, second)]
    expected = (float(functional_loss(*first)) + float(functional_loss(*second))) / 2
    assert float(functional_loss(*batched)) == pytest.approx(expected, rel=1e-12)
    assert float(functional_loss(*first)) == float(functional_loss(*first, tau=0.1))


def test_swapping_positives_and_negatives_raises_the_loss() -> None:
    # part points agree across the images and the rest points away from them: low loss
    part, rest = [[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, -1.0]]
    good = functional_loss(_t(part), _t(part), _t(rest), _t(rest), tau=TAU)
    # each row: positive 1; p1+ . p2-: 0, 0; p2+ . p1-: 0, 0; p1-_i . p2-_j: (1, -1) or (-1, 1)
    row = [10.0, 0.0, 0.0, 0.0, 0.0, 10.0, -10.0]
    assert float(good) == pytest.approx(_ce(row), rel=1e-12)
    # labelling image 1's rest as its part: the "positives" of image 1 now disagree with those
    # of image 2 (sim 0) while its "negatives" equal image 2's part, so the loss must go up
    swapped = functional_loss(_t(rest), _t(part), _t(part), _t(rest), tau=TAU)
    # row i: positive 0; rest_i . rest_j: (1, -1) / (-1, 1); part . part: 1, 1; part . rest: 0, 0
    rows = [[0.0, 10.0, -10.0, 10.0, 10.0, 0.0, 0.0], [0.0, -10.0, 10.0, 10.0, 10.0, 0.0, 0.0]]
    assert float(swapped) == pytest.approx((_ce(rows[0]) + _ce(rows[1])) / 2, rel=1e-12)
    assert float(swapped) > float(good) + 5


def test_functional_loss_rejects_unequal_positive_and_negative_counts() -> None:
    pos = torch.nn.functional.normalize(torch.randn(1, 2, 3), dim=-1)
    neg = torch.nn.functional.normalize(torch.randn(1, 3, 3), dim=-1)
    with pytest.raises(ValueError, match=r"n_pos \(2\).*n_neg \(3\)"):
        functional_loss(pos, pos, neg, neg)


def test_spatial_loss_perfect_correspondence_with_orthogonal_negatives() -> None:
    # n = 3 basis vectors of R^3: each row has logit 1/tau at the target and 0 twice
    eye = torch.eye(3, dtype=torch.float64)[None]
    expected = math.log(1 + 2 * math.exp(-1 / TAU))
    assert float(spatial_loss(eye, eye, tau=TAU)) == pytest.approx(expected, rel=1e-12)


def test_spatial_loss_is_one_directional_and_averages_over_batch() -> None:
    p1 = _t([[1.0, 0.0], [1.0, 0.0]])
    p2 = _t([[1.0, 0.0], [0.0, 1.0]])
    # 1 -> 2: row 0 logits [10, 0] target 0; row 1 logits [10, 0] target 1
    forward = (_ce([10.0, 0.0], 0) + _ce([10.0, 0.0], 1)) / 2
    # 2 -> 1: row 0 logits [10, 10] target 0; row 1 logits [0, 0] target 1: log 2 each
    assert float(spatial_loss(p1, p2, tau=TAU)) == pytest.approx(forward, rel=1e-12)
    assert float(spatial_loss(p2, p1, tau=TAU)) == pytest.approx(math.log(2), rel=1e-12)
    both = spatial_loss(torch.cat([p1, p2]), torch.cat([p2, p1]), tau=TAU)
    assert float(both) == pytest.approx((forward + math.log(2)) / 2, rel=1e-12)


def test_mask_loss_is_bce_over_all_points() -> None:
    pos, neg = [2.0, -1.0], [0.5, -3.0, 1.0]
    # target 1: -log sigmoid(x) = log(1 + e^-x); target 0: -log(1 - sigmoid(x)) = log(1 + e^x)
    terms = [math.log(1 + math.exp(-x)) for x in pos] + [math.log(1 + math.exp(x)) for x in neg]
    got = mask_loss(torch.tensor([pos], dtype=torch.float64),
                    torch.tensor([neg], dtype=torch.float64))
    assert float(got) == pytest.approx(sum(terms) / 5, rel=1e-12)


def test_total_loss_normalisation() -> None:
    f, s, m = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)
    assert float(total_loss(f, s, m)) == pytest.approx((1 + 10 * 2 + 3) / 12)
    assert float(total_loss(f, s, None)) == pytest.approx((1 + 10 * 2) / 11)
    assert float(total_loss(f, None, m)) == pytest.approx((1 + 3) / 2)
    assert float(total_loss(f, None, None)) == pytest.approx(1.0)
    got = total_loss(f, s, m, lambda_spatial=5.0, lambda_mask=2.0)
    assert isinstance(got, torch.Tensor)
    assert float(got) == pytest.approx((1 + 5 * 2 + 2 * 3) / 8)


def test_total_loss_ablations_drop_their_weight() -> None:
    f, s, m = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)
    # spatial-only: lf = 0 -> (10 * 2 + 1 * 3) / 11; functional-only: ls = 0 -> (1 + 3) / 2
    assert float(total_loss(f, s, m, lambda_functional=0.0)) == pytest.approx(23 / 11)
    assert float(total_loss(f, s, m, lambda_spatial=0.0)) == pytest.approx(4 / 2)
    assert float(total_loss(None, s, None)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="no term"):
        total_loss(f, None, None, lambda_functional=0.0)
