"""Batched point operations of the PointMAE-style encoder against plain references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from operators.metrics.correspondence import farthest_point_sampling
from training.point_ops import farthest_point_sample, group, knn, normalize_unit_sphere


def test_farthest_point_sample_matches_the_numpy_reference_per_cloud() -> None:
    clouds = torch.from_numpy(np.random.default_rng(0).normal(size=(3, 500, 3)))
    got = farthest_point_sample(clouds, 32, start=5)
    assert got.shape == (3, 32) and got.dtype == torch.long
    for b in range(3):  # batching changes nothing: each cloud as the reference picks it
        expected = farthest_point_sampling(clouds[b].numpy(), 32, start=5)
        np.testing.assert_array_equal(got[b].numpy(), expected)
        assert len(set(got[b].tolist())) == 32


def test_farthest_point_sample_on_a_line_and_with_duplicates() -> None:
    # points at x = 0, 1, 2, 3, 10, from index 0: the farthest is x=10 (index 4); then the
    # distances to the nearest chosen are 1, 2, 3 for x = 1, 2, 3 -> x=3 (index 3); then x=1 and
    # x=2 are both 1 away (from 0 and from 3): the tie goes to the lower index, 1
    line = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0], [10, 0, 0]]])
    assert farthest_point_sample(line, 4).tolist() == [[0, 4, 3, 1]]
    twice = torch.tensor([[[0.0, 0, 0], [0, 0, 0], [1, 0, 0]]])  # a duplicate of the start
    assert farthest_point_sample(twice, 3).tolist() == [[0, 2, 1]]  # never picks 0 again
    with pytest.raises(ValueError, match="m must be in"):
        farthest_point_sample(line, 6)


def test_knn_and_groups_are_the_nearest_points_centred() -> None:
    rng = np.random.default_rng(1)
    xyz = torch.from_numpy(rng.normal(size=(2, 200, 3)))
    centres = xyz[:, :7]
    index = knn(xyz, centres, 16)
    assert index.shape == (2, 7, 16)
    for b in range(2):
        for c in range(7):
            distance = ((xyz[b] - centres[b, c]) ** 2).sum(-1).numpy()
            expected = np.argsort(distance, kind="stable")[:16]
            np.testing.assert_array_equal(np.sort(index[b, c].numpy()), np.sort(expected))
            assert index[b, c, 0] == c  # a centre is its own nearest point
    patches = group(xyz, centres, index)
    assert patches.shape == (2, 7, 16, 3)
    torch.testing.assert_close(patches[1, 3], xyz[1, index[1, 3]] - centres[1, 3])
    torch.testing.assert_close(patches[:, :, 0], torch.zeros(2, 7, 3, dtype=xyz.dtype))


def test_normalization_puts_the_farthest_point_on_the_unit_sphere() -> None:
    xyz = torch.tensor([[[1.0, 1, 1], [3, 1, 1], [1, 5, 1], [3, 5, 1]]])
    normalised, centre, scale = normalize_unit_sphere(xyz)
    torch.testing.assert_close(centre, torch.tensor([[2.0, 3.0, 1.0]]))
    torch.testing.assert_close(scale, torch.tensor([5.0 ** 0.5]))  # |(+-1, +-2, 0)|
    torch.testing.assert_close(normalised.norm(dim=-1), torch.ones(1, 4))
    torch.testing.assert_close(normalised * scale + centre[:, None], xyz)
