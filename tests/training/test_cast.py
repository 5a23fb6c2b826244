"""CAST (CMAT §3.3): the losses on hand-computed values, feature propagation, prompt tokens and
null tokens, taking over a pretrained encoder; and the CMAT step's loss terms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.cast import CastModel, cast_loss, dice_loss, focal_loss, load_encoder, propagate
from training.cmat import pretrain_losses
from training.pointmae import PointMAE, PointMAEConfig

ENCODER = {"n_patches": 8, "k": 8, "width": 24, "depth": 1, "heads": 2, "decoder_depth": 1,
           "drop_path": 0.0}


def _cloud(batch: int = 2, n: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xyz = torch.randn(batch, n, 3, generator=g)
    return xyz / xyz.norm(dim=-1).amax(dim=1)[:, None, None]


def test_focal_loss_matches_hand_computed_values() -> None:
    # logit 0 -> p = 0.5; target 1: bce = log 2, (1 - p_t)^2 = 1/4, alpha_t = 0.25
    assert float(focal_loss(torch.zeros(1, 1), torch.ones(1, 1))) == pytest.approx(
        0.25 * 0.25 * math.log(2))
    # target 0: alpha_t = 0.75
    assert float(focal_loss(torch.zeros(1, 1), torch.zeros(1, 1))) == pytest.approx(
        0.75 * 0.25 * math.log(2))
    # gamma 0 and no alpha: plain binary cross-entropy
    logits, target = torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 0.0]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert float(focal_loss(logits, target, gamma=0.0, alpha=-1)) == pytest.approx(float(bce))
    # a confident right answer costs almost nothing, a confident wrong one a lot
    assert float(focal_loss(torch.tensor([[8.0]]), torch.ones(1, 1))) < 1e-6
    assert float(focal_loss(torch.tensor([[-8.0]]), torch.ones(1, 1))) > 1.0


def test_dice_loss_matches_hand_computed_values() -> None:
    # p ~ (1, 1), t = (1, 0): overlap 1, sums 2 + 1 -> 1 - (2 + 1) / (3 + 1)
    assert float(dice_loss(torch.tensor([[30.0, 30.0]]), torch.tensor([[1.0, 0.0]]))) == \
        pytest.approx(0.25, abs=1e-6)
    # perfect prediction -> 0; the mean over samples
    perfect = dice_loss(torch.tensor([[30.0, -30.0]]), torch.tensor([[1.0, 0.0]]))
    assert float(perfect) == pytest.approx(0.0, abs=1e-6)
    both = dice_loss(torch.tensor([[30.0, -30.0], [30.0, 30.0]]),
                     torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert float(both) == pytest.approx(0.125, abs=1e-6)
    total = cast_loss(torch.tensor([[30.0, 30.0]]), torch.tensor([[1.0, 0.0]]), 2.0, 3.0)
    assert float(total["loss"]) == pytest.approx(2 * float(total["loss_focal"])
                                                 + 3 * float(total["loss_dice"]))


def test_propagation_interpolates_centre_features_by_inverse_distance() -> None:
    centres = torch.tensor([[[0.0, 0, 0], [1.0, 0, 0], [0.0, 1, 0]]])
    features = torch.tensor([[[1.0], [2.0], [4.0]]])
    points = torch.tensor([[[0.0, 0, 0], [1.0, 0, 0], [0.5, 0, 0]]])
    out = propagate(points, centres, features, k=2)[0, :, 0]
    assert out[0] == pytest.approx(1.0, abs=1e-5) and out[1] == pytest.approx(2.0, abs=1e-5)
    assert out[2] == pytest.approx(1.5, abs=1e-5)   # equidistant from the first two centres
    constant = propagate(_cloud(), _cloud(seed=1)[:, :8], torch.full((2, 8, 3), 7.0))
    assert torch.allclose(constant, torch.full_like(constant, 7.0))


def test_a_missing_modality_is_the_null_token_and_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(0)
    model = CastModel(ENCODER, text_dim=5, image_dim=7, fusion_depth=1)
    xyz = _cloud()
    text_a, text_b = torch.randn(2, 5), torch.randn(2, 5)
    image = torch.randn(2, 7)
    no, yes = torch.zeros(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool)
    model.eval()
    with torch.no_grad():
        ignored = model(xyz, text_a, image, no, yes), model(xyz, text_b, image, no, yes)
        used = model(xyz, text_a, image, yes, yes), model(xyz, text_b, image, yes, yes)
    assert torch.equal(*ignored)               # without text, the text input does not matter
    assert not torch.allclose(*used)           # with it, it does
    model.train()
    logits = model(xyz, text_a, image, torch.tensor([True, False]), no)
    assert logits.shape == (2, 64)
    logits.sum().backward()
    # DDP (find_unused_parameters=False) needs every parameter in the graph
    assert all(p.grad is not None for p in model.parameters())


def test_the_encoder_of_a_pretrained_pointmae_loads_into_cast() -> None:
    torch.manual_seed(1)
    mae = PointMAE(PointMAEConfig(**ENCODER))
    torch.manual_seed(2)
    cast = CastModel(ENCODER, 5, 7, 1)
    assert load_encoder(cast, mae.state_dict()) == sum(
        1 for k in mae.state_dict() if k.startswith(("embed.", "position.", "encoder.")))
    mae.eval()
    cast.eval()
    xyz = _cloud()
    centres, _, patches = mae.patches(xyz)
    with torch.no_grad():
        expected = mae.encode(patches, centres)
        got = cast.encoder(cast.embed(patches), cast.position(centres))
    assert torch.allclose(expected, got)
    wider = PointMAE(PointMAEConfig(**{**ENCODER, "width": 48}))
    with pytest.raises(ValueError, match="encoder tensor"):
        load_encoder(cast, wider.state_dict())


def test_the_cmat_step_leaves_out_the_terms_of_weight_zero() -> None:
    torch.manual_seed(0)
    model = PointMAE(PointMAEConfig(**ENCODER))
    xyz = _cloud()
    features = torch.randn(2, 64, 6)
    masked = model.random_mask(2, torch.Generator().manual_seed(0))
    cfg = {"lambda_rec": 1.0, "lambda_aff": 0.1, "lambda_div": 0.2}
    torch.set_grad_enabled(False)
    try:
        _check_terms(model, xyz, features, masked, cfg)
    finally:
        torch.set_grad_enabled(True)


def _check_terms(model, xyz, features, masked, cfg) -> None:
    full = pretrain_losses(model, xyz, features, masked, cfg)
    assert set(full) == {"loss", "loss_rec", "loss_aff", "loss_div"}
    expected = full["loss_rec"] + 0.1 * full["loss_aff"] + 0.2 * full["loss_div"]
    assert float(full["loss"]) == pytest.approx(float(expected), rel=1e-6)
    rec_only = pretrain_losses(model, xyz, features, masked, {**cfg, "lambda_aff": 0.0,
                                                              "lambda_div": 0.0})
    assert set(rec_only) == {"loss", "loss_rec"}
    no_decoder = pretrain_losses(model, xyz, features, masked, {**cfg, "lambda_rec": 0.0})
    assert set(no_decoder) == {"loss", "loss_aff", "loss_div"}   # the decoder is not run
    assert float(no_decoder["loss_aff"]) == pytest.approx(float(full["loss_aff"]), rel=1e-5)
    assert float(rec_only["loss"]) == pytest.approx(float(full["loss_rec"]), rel=1e-6)
    # the affinity target: features proportional to each other give the same L_aff
    scaled = pretrain_losses(model, xyz, 3.0 * features, masked, cfg)
    assert float(scaled["loss_aff"]) == pytest.approx(float(full["loss_aff"]), rel=1e-5)
    assert np.isfinite(float(full["loss"]))
