"""Feature probes on hand-built points whose answers are computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from operators.metrics.probes import (accuracies, knn_predict, majority_predict, ridge_fit,
                                      ridge_predict, standardise)


def test_accuracy_and_balanced_accuracy_by_hand() -> None:
    predicted = np.array([0, 0, 1, 1, 2])
    truth = np.array([0, 1, 1, 1, 2])
    accuracy, balanced = accuracies(predicted, truth)
    assert accuracy == 4 / 5
    # recalls: class 0 1/1, class 1 2/3, class 2 1/1
    assert balanced == pytest.approx((1 + 2 / 3 + 1) / 3)


def test_knn_votes_and_breaks_ties_towards_the_nearer_class() -> None:
    train = np.array([[0.0], [1.0], [10.0], [11.0]])
    labels = np.array([0, 0, 1, 1])
    # 0.4: neighbours 0 (0.4), 1 (0.6), 10 (9.6) -> two votes for class 0; 10.6 likewise class 1
    assert knn_predict(train, labels, np.array([[0.4], [10.6]]), 2, k=3).tolist() == [0, 1]
    # k=2 between a class-0 point at 0 and a class-1 point at 2: 0.9 is nearer 0 -> class 0,
    # 1.1 is nearer 2 -> class 1 (one vote each; the nearer neighbour wins the tie)
    two = np.array([[0.0], [2.0]])
    assert knn_predict(two, np.array([0, 1]), np.array([[0.9], [1.1]]), 2, k=2).tolist() == [0, 1]
    # chunking does not change the answer
    test = np.linspace(-1, 12, 7)[:, None]
    assert (knn_predict(train, labels, test, 2, k=3, chunk=2)
            == knn_predict(train, labels, test, 2, k=3)).all()


def test_ridge_weights_by_hand() -> None:
    # two points x = -1 (class 0) and x = 1 (class 1), no penalty: X = [[-1, 1], [1, 1]] with the
    # bias column, one-hot targets = I, so the weights are X^-1 = [[-0.5, 0.5], [0.5, 0.5]].
    train, labels = np.array([[-1.0], [1.0]]), np.array([0, 1])
    weights = ridge_fit(train, labels, 2, lambda_per_sample=0.0)
    assert np.allclose(weights, [[-0.5, 0.5], [0.5, 0.5]])
    # x = 3: outputs 3 * [-0.5, 0.5] + [0.5, 0.5] = [-1, 2] -> class 1; x = -3: [2, -1] -> class 0
    assert ridge_predict(train, labels, np.array([[3.0], [-3.0]]), 2, 0.0).tolist() == [1, 0]
    # a penalty shrinks the slope towards 0 but leaves the bias alone: lambda 0.5 per sample,
    # 2 samples -> (X^T X + diag(1, 0)) w = X^T I: slope rows (2 + 1) w0 = [-1, 1] -> -1/3, 1/3
    shrunk = ridge_fit(train, labels, 2, lambda_per_sample=0.5)
    assert np.allclose(shrunk, [[-1 / 3, 1 / 3], [0.5, 0.5]])


def test_standardise_and_majority_baseline() -> None:
    train = np.array([[1.0, 5.0], [3.0, 5.0]])
    z_train, z_test = standardise(train, np.array([[2.0, 6.0]]))
    assert np.allclose(z_train, [[-1.0, 0.0], [1.0, 0.0]])  # constant channel: std floored
    assert np.allclose(z_test, [[0.0, 1e6]])
    assert majority_predict(np.array([2, 1, 2, 0]), 3, 3).tolist() == [2, 2, 2]
