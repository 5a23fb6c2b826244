"""DenseCorrespondenceModel, sample_grid and raw_descriptors against hand computations and the
project's numpy reference sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from operators.geometry.lift import sample_patch_grid
from training.model import DenseCorrespondenceModel, raw_descriptors, sample_grid

B, N_BLOCKS, GH, GW, C, TEXT = 2, 3, 4, 5, 8, 6
IMAGE = (28, 35)  # (H, W): strides 7 x 7, non-square grid


def _inputs(seed: int = 0, n_points: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randn(B, N_BLOCKS, GH, GW, C, generator=g)
    uv = torch.rand(B, n_points, 2, generator=g) * torch.tensor([IMAGE[1], IMAGE[0]])
    text = torch.randn(B, TEXT, generator=g)
    return blocks, uv, text


def _model(mask_head: bool = False) -> DenseCorrespondenceModel:
    torch.manual_seed(0)
    return DenseCorrespondenceModel(C, TEXT, n_blocks=N_BLOCKS, proj_dim=16, hidden_dim=32,
                                    out_dim=12, mask_head=mask_head)


def test_shapes_unit_norm_and_no_mask_by_default() -> None:
    blocks, uv, text = _inputs()
    descriptors, mask = _model()(blocks, uv, IMAGE, text)
    assert descriptors.shape == (B, 7, 12)
    assert mask is None
    torch.testing.assert_close(descriptors.norm(dim=-1), torch.ones(B, 7))


def test_block_weights_uniform_at_init_and_sum_to_one() -> None:
    model = _model()
    torch.testing.assert_close(model.block_weights, torch.full((3,), 1 / 3))
    with torch.no_grad():
        model.block_logits.copy_(torch.tensor([0.0, 1.0, 2.0]))
    e = [1.0, np.e, np.e ** 2]
    expected = torch.tensor([x / sum(e) for x in e], dtype=torch.float32)
    torch.testing.assert_close(model.block_weights, expected)
    assert float(model.block_weights.detach().sum()) == pytest.approx(1.0)


def test_construction_is_deterministic_under_manual_seed() -> None:
    first, second = _model(mask_head=True).state_dict(), _model(mask_head=True).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_sample_grid_matches_the_numpy_reference_including_borders() -> None:
    g = torch.Generator().manual_seed(1)
    grid = torch.randn(B, 5, GH, GW, generator=g)  # (B, C, h, w)
    height, width = IMAGE
    inside = torch.rand(B, 40, 2, generator=g) * torch.tensor([width, height])
    # image corners and edges, points between the border and the outermost patch centres
    # (u < 3.5 or u > W - 3.5), and a few points slightly off the image
    special = torch.tensor([[0.0, 0.0], [width, height], [width, 0.0], [0.0, height],
                            [1.0, 14.0], [34.0, 2.0], [17.5, 27.9], [-2.0, 5.0], [40.0, 30.0],
                            [3.5, 3.5], [31.5, 24.5]])
    uv = torch.cat([inside, special.expand(B, -1, -1)], dim=1)
    got = sample_grid(grid, uv, IMAGE)
    assert got.shape == (B, uv.shape[1], 5)
    for b in range(B):
        expected = sample_patch_grid(grid[b].permute(1, 2, 0).numpy(), uv[b].numpy(), IMAGE)
        np.testing.assert_allclose(got[b].numpy(), expected, atol=1e-5, rtol=0)


def test_sample_grid_at_a_patch_centre_returns_that_patch_exactly() -> None:
    # power-of-two sizes keep the coordinate arithmetic exact, so the weights are exactly 1/0
    grid = torch.randn(1, 3, 4, 8, generator=torch.Generator().manual_seed(2))
    height, width = 32, 64
    centres = [(i, j) for i in range(4) for j in range(8)]
    uv = torch.tensor([[[(j + 0.5) * width / 8, (i + 0.5) * height / 4] for i, j in centres]])
    got = sample_grid(grid, uv, (height, width))
    expected = torch.stack([grid[0, :, i, j] for i, j in centres])
    assert torch.equal(got[0], expected)


def test_raw_descriptors_by_hand_on_a_2x2_grid() -> None:
    # two blocks whose per-cell means are (3, 4), (1, 0), (0, 2), (-5, 0) -> after
    # normalisation cells (0,0)=(.6,.8), (0,1)=(1,0), (1,0)=(0,1), (1,1)=(-1,0)
    block_0 = [[[2.0, 4.0], [3.0, 0.0]], [[0.0, 1.0], [-4.0, 1.0]]]
    block_1 = [[[4.0, 4.0], [-1.0, 0.0]], [[0.0, 3.0], [-6.0, -1.0]]]
    blocks = torch.tensor([[block_0, block_1]])  # (1, 2, 2, 2, 2)
    # 4 x 4 image: patch centres at u, v in {1, 3}
    uv = torch.tensor([[[2.0, 1.0],    # halfway between (0,0) and (0,1)
                        [2.0, 2.0],    # middle of all four cells
                        [0.0, 0.0],    # clamped to cell (0,0)
                        [3.0, 1.5]]])  # column 1, a quarter of the way from row 0 to row 1
    expected = torch.tensor([[[0.8, 0.4],
                              [(0.6 + 1 + 0 - 1) / 4, (0.8 + 0 + 1 + 0) / 4],
                              [0.6, 0.8],
                              [0.75 * 1 + 0.25 * -1, 0.0]]])
    torch.testing.assert_close(raw_descriptors(blocks, uv, (4, 4)), expected)


def test_forward_equals_an_independent_composition() -> None:
    model = _model(mask_head=True)
    with torch.no_grad():
        model.block_logits.copy_(torch.tensor([0.5, -1.0, 2.0]))
    blocks, uv, text = _inputs(seed=3)
    descriptors, mask = model(blocks, uv, IMAGE, text)

    sd = {k: v.double().numpy() for k, v in model.state_dict().items()}
    logits = np.array([0.5, -1.0, 2.0])
    weights = np.exp(logits) / np.exp(logits).sum()
    for b in range(B):
        projected = blocks[b].double().numpy() @ sd["proj.weight"].T  # (n, h, w, 16)
        combined = (weights[:, None, None, None] * projected).sum(axis=0)
        combined /= np.linalg.norm(combined, axis=-1, keepdims=True)
        points = sample_patch_grid(combined, uv[b].numpy(), IMAGE).astype(np.float64)
        x = np.concatenate([points, np.repeat(text[b].double().numpy()[None], 7, 0)], axis=1)
        x = np.maximum(x @ sd["mlp.0.weight"].T + sd["mlp.0.bias"], 0)
        x = np.maximum(x @ sd["mlp.2.weight"].T + sd["mlp.2.bias"], 0)
        x = x @ sd["mlp.4.weight"].T
        x /= np.linalg.norm(x, axis=-1, keepdims=True)
        np.testing.assert_allclose(descriptors[b].detach().numpy(), x, atol=1e-5, rtol=0)
        m = x @ sd["mask_head.weight"][0] + sd["mask_head.bias"][0]
        np.testing.assert_allclose(mask[b].detach().numpy(), m, atol=1e-5, rtol=0)


def test_mask_head_logits_shape() -> None:
    blocks, uv, text = _inputs()
    descriptors, mask = _model(mask_head=True)(blocks, uv, IMAGE, text)
    assert descriptors.shape == (B, 7, 12)
    assert mask is not None and mask.shape == (B, 7)


def test_gradients_reach_block_weights_and_shared_projection() -> None:
    model = _model()
    blocks, uv, text = _inputs()
    descriptors, _ = model(blocks, uv, IMAGE, text)
    (descriptors * torch.randn(descriptors.shape, generator=torch.Generator().manual_seed(5))
     ).sum().backward()
    assert model.block_logits.grad is not None and model.block_logits.grad.abs().max() > 0
    assert model.proj.weight.grad is not None and model.proj.weight.grad.abs().max() > 0


def test_wrong_block_count_is_rejected() -> None:
    blocks, uv, text = _inputs()
    with pytest.raises(ValueError, match="blocks must be"):
        _model()(blocks[:, :2], uv, IMAGE, text)
