"""Probes of features: how well a simple classifier recovers labels (e.g. part identity) from
per-point features. kNN (k nearest neighbours, Euclidean) and a closed-form ridge probe, with
accuracy and balanced accuracy."""

from __future__ import annotations

import numpy as np


def standardise(train: np.ndarray, test: np.ndarray,
                min_std: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """z-score both sets with the training set's mean and std (std floored at `min_std`: random
    features may have near-constant channels)."""
    mean = train.mean(axis=0)
    std = np.maximum(train.std(axis=0), min_std)
    return (train - mean) / std, (test - mean) / std


def knn_predict(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, n_classes: int,
                k: int = 5, chunk: int = 1024) -> np.ndarray:
    """Majority vote of the k nearest training points (Euclidean); a tie goes to the class whose
    members rank nearer (each vote weighs 1 + 1e-3 x (k - rank)). `chunk` test points at a time
    bound the (test x train) distance matrix."""
    k = min(k, train.shape[0])
    train_labels = np.asarray(train_labels, np.int64)
    train_sq = (train ** 2).sum(axis=1)
    weights = 1.0 + 1e-3 * (k - np.arange(k))
    predictions = np.empty(test.shape[0], np.int64)
    for start in range(0, test.shape[0], chunk):
        block = test[start:start + chunk]
        distance = train_sq[None, :] - 2.0 * block @ train.T  # + |test|^2: same for a whole row
        nearest = np.argpartition(distance, k - 1, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(distance, nearest, axis=1), axis=1)
        nearest = np.take_along_axis(nearest, order, axis=1)
        votes = np.zeros((block.shape[0], n_classes))
        np.add.at(votes, (np.repeat(np.arange(block.shape[0]), k), train_labels[nearest].ravel()),
                  np.tile(weights, block.shape[0]))
        predictions[start:start + chunk] = votes.argmax(axis=1)
    return predictions


def ridge_fit(train: np.ndarray, train_labels: np.ndarray, n_classes: int,
              lambda_per_sample: float = 1e-2) -> np.ndarray:
    """Weights (D + 1, n_classes) of closed-form ridge regression onto one-hot targets, one
    output per class (one-vs-rest); the last row is the unpenalised bias. The penalty is
    `lambda_per_sample` x training samples (scale-free for z-scored features)."""
    x = np.concatenate([train, np.ones((train.shape[0], 1))], axis=1).astype(np.float64)
    targets = np.eye(n_classes)[np.asarray(train_labels, np.int64)]
    penalty = lambda_per_sample * train.shape[0] * np.eye(x.shape[1])
    penalty[-1, -1] = 0.0
    return np.linalg.solve(x.T @ x + penalty, x.T @ targets)


def ridge_predict(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, n_classes: int,
                  lambda_per_sample: float = 1e-2) -> np.ndarray:
    """The class with the largest ridge output (`ridge_fit`) per test point."""
    weights = ridge_fit(train, train_labels, n_classes, lambda_per_sample)
    return (np.concatenate([test, np.ones((test.shape[0], 1))], axis=1) @ weights).argmax(axis=1)


def majority_predict(train_labels: np.ndarray, n_test: int, n_classes: int) -> np.ndarray:
    """Chance level: the training set's most frequent class for every test point."""
    majority = np.bincount(np.asarray(train_labels, np.int64), minlength=n_classes).argmax()
    return np.full(n_test, majority, np.int64)


def accuracies(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Accuracy and balanced accuracy (mean recall over the classes present in `truth`)."""
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    recalls = [float(np.mean(predicted[truth == c] == c)) for c in np.unique(truth)]
    return float(np.mean(predicted == truth)), float(np.mean(recalls))
