"""The PointMAE-style encoder: shapes, masking, gradients, and the centre-target leak."""

from __future__ import annotations

import pytest
import torch

from training.point_ops import normalize_unit_sphere
from training.pointmae import PointMAE, PointMAEConfig

SMALL = dict(n_patches=16, k=8, width=32, depth=2, heads=4, decoder_depth=1)


def _clouds(batch: int = 2, n: int = 256, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return normalize_unit_sphere(torch.randn(batch, n, 3, generator=generator))[0]


def test_masks_shapes_and_gradients() -> None:
    torch.manual_seed(0)
    model = PointMAE(PointMAEConfig(**SMALL, mask_ratio=0.6))
    out = model(_clouds(), generator=torch.Generator().manual_seed(1))
    assert out.masked.shape == (2, 16) and (out.masked.sum(dim=1) == 10).all()  # round(9.6)
    assert out.visible_tokens.shape == (2, 6, 32)
    assert out.prediction.shape == out.target.shape == (2, 10, 8, 3)
    # the target is each masked patch's points centred on its centre
    assert out.target.norm(dim=-1).amax() <= 2.0 + 1e-6
    out.prediction.pow(2).mean().backward()
    assert model.embed.first[0].weight.grad.abs().sum() > 0   # reaches the patch embedding
    assert model.encoder.blocks[0].mlp[0].weight.grad.abs().sum() > 0


def test_the_same_generator_gives_the_same_mask_and_eval_is_deterministic() -> None:
    torch.manual_seed(0)
    model = PointMAE(PointMAEConfig(**SMALL)).eval()
    xyz = _clouds()
    a = model(xyz, generator=torch.Generator().manual_seed(3))
    b = model(xyz, generator=torch.Generator().manual_seed(3))
    c = model(xyz, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.masked, b.masked) and torch.equal(a.prediction, b.prediction)
    assert not torch.equal(a.masked, c.masked)


@pytest.mark.parametrize("target, leaks", [("centres", False), ("points", True)])
def test_masked_centres_reach_the_decoder_only_when_predicting_points(target: str,
                                                                      leaks: bool) -> None:
    """Predicting centres: moving the masked centres changes nothing the model sees (the MSE
    target cannot leak through positional embeddings). Predicting points: the decoder places
    each mask token at its centre, as PointMAE does."""
    torch.manual_seed(0)
    model = PointMAE(PointMAEConfig(**SMALL, target=target)).eval()
    centres, _, patches = model.patches(_clouds())
    masked = model.random_mask(2, torch.Generator().manual_seed(0))
    moved = centres.clone()
    moved[masked] += 0.3
    a = model.reconstruct(centres, patches, masked).prediction
    b = model.reconstruct(moved, patches, masked).prediction
    assert torch.equal(a, b) is not leaks


def test_presets_and_config_checks() -> None:
    assert PointMAEConfig.preset("paper").width == 384 and PointMAEConfig.preset("paper").depth == 12
    assert PointMAEConfig.preset("cpu", depth=2).depth == 2
    with pytest.raises(ValueError, match="divisible"):
        PointMAEConfig(width=100, heads=6)
    with pytest.raises(ValueError, match="mask_ratio"):
        PointMAEConfig(mask_ratio=1.0)
