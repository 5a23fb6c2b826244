"""The scoring arithmetic without Ray: the mask lattice, the pooled descriptor, the streamed
top-k search and the point correspondences, against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from training.scoring import pixel_lattice, point_matches, pooled_descriptor, top_matches


def test_the_lattice_samples_pixel_centres_every_stride() -> None:
    lattice = pixel_lattice(4, 6, 2)          # rows 1, 3; columns 1, 3, 5
    assert lattice.tolist() == [[1, 1], [3, 1], [5, 1], [1, 3], [3, 3], [5, 3]]


def test_the_descriptor_is_the_score_weighted_mean_normalised() -> None:
    embedding = np.array([[1, 0], [0, 1], [0, 1]], np.float32)
    # weights 3, 1, 0: mean direction (3, 1) / sqrt(10)
    assert pooled_descriptor(embedding, np.array([3, 1, 0])) == \
        pytest.approx([3 / np.sqrt(10), 1 / np.sqrt(10)])
    # NaN scores count as 0; all-zero scores pool every point equally: (1, 2) / sqrt(5)
    assert pooled_descriptor(embedding, np.array([np.nan, 0, 0])) == \
        pytest.approx([1 / np.sqrt(5), 2 / np.sqrt(5)])


def test_top_matches_streams_batches_and_keeps_the_best_k() -> None:
    query = np.array([1, 0], np.float32)
    batches = [(["a", "b"], ["pour", "pour"], np.array([[0.6, 0.8], [1, 0]])),
               (["c", "d", "q"], ["pour", "grasp", "pour"],
                np.array([[0.8, 0.6], [1, 0], [1, 0]]))]
    found = top_matches(iter(batches), query, 2, exclude=("q", "pour"), function="pour")
    assert [(m.asset_id, round(m.similarity, 6)) for m in found] == [("b", 1.0), ("c", 0.8)]
    # every function, nothing excluded: the query itself and d tie at 1
    found = top_matches(iter(batches), query, 3)
    assert sorted(m.asset_id for m in found[:3]) == ["b", "d", "q"]


def test_point_matches_pair_the_top_scoring_query_points_with_their_nearest() -> None:
    query = np.array([[1, 0], [0, 1], [0.6, 0.8]], np.float32)
    target = np.array([[0, 1], [1, 0]], np.float32)
    q, t, s = point_matches(query, np.array([0.9, 0.1, 0.5]), target, 2)
    assert q.tolist() == [0, 2]               # the two highest scores
    assert t.tolist() == [1, 0]               # (1,0) -> target 1; (0.6,0.8) -> target 0
    assert s == pytest.approx([1.0, 0.8])


def test_conditioning_several_functions_at_once_equals_one_by_one() -> None:
    import torch

    from training.model import DenseCorrespondenceModel
    torch.manual_seed(0)
    model = DenseCorrespondenceModel(feature_dim=8, text_dim=5, proj_dim=6, hidden_dim=16,
                                     out_dim=4, mask_head=True).eval()
    points, texts = torch.randn(2, 7, 6), torch.randn(3, 5)
    with torch.no_grad():
        together = list(model.condition_each(points, texts))
        for text, (descriptors, logits) in zip(texts, together, strict=True):
            alone, alone_logits = model.condition(points, text[None].expand(2, -1))
            assert torch.allclose(descriptors, alone, atol=1e-6)
            assert torch.allclose(logits, alone_logits, atol=1e-6)
