"""AffordanceCLIP (affordanceclip.txt §3): the tiny CLIP, freezing, shapes, the §3.4 loss on
hand-computed values, an overfit check on one composite; and the object-level referring
composites (no part or function words, masks and texts that match what was pasted)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from operators.settings import ConfigError
from training.affordanceclip import (AffordanceCLIP, build_tiny_clip, fpn_depths, load_clip,
                                     pixel_text_loss)
from training.referring_data import (ObjectCrop, ReferringSample, assert_no_part_words, compose,
                                     crops_from_views, forbidden_words, referring_batch)

SIZE = 64  # tiny images: image_size 64 at patch 8 -> an 8x8 token grid, a 16x16 output map
RED, BLUE, GREEN = (210, 30, 30), (30, 60, 220), (40, 170, 60)


def _model(seed: int = 0) -> AffordanceCLIP:
    clip, tokenize = build_tiny_clip(seed, image_size=SIZE, patch_size=8)
    torch.manual_seed(seed)  # the FPN's initialisation
    return AffordanceCLIP(clip, tokenize)


def _ellipse(colour: tuple[int, int, int], category: str, h: int = 40, w: int = 28) -> ObjectCrop:
    yy, xx = np.mgrid[:h, :w]
    mask = ((yy - (h - 1) / 2) / (h / 2)) ** 2 + ((xx - (w - 1) / 2) / (w / 2)) ** 2 <= 1.0
    rgb = np.full((h, w, 3), 7, np.uint8)  # off-mask pixels must never be pasted
    rgb[mask] = colour
    return ObjectCrop(rgb=rgb, mask=mask, category=category)


def _bce(logit: float, positive: bool) -> float:
    """-log sigma(x) = log(1 + e^-x); -log(1 - sigma(x)) = log(1 + e^x)."""
    return math.log1p(math.exp(-logit if positive else logit))


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def test_tiny_clip_is_deterministic_per_seed() -> None:
    a, tokenize = build_tiny_clip(0, image_size=SIZE, patch_size=8)
    b, _ = build_tiny_clip(0, image_size=SIZE, patch_size=8)
    c, _ = build_tiny_clip(1, image_size=SIZE, patch_size=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.config.vision_config.image_size == SIZE
    # the referring words are real tokens, not <unk>
    ids, mask = tokenize(["the red mug on the left", "knife"])
    assert ids.shape == mask.shape and ids.dtype == torch.long
    unk = 1  # build_tiny_tokenizer's <unk> id
    assert int((ids[0][mask[0].bool()] == unk).sum()) == 0


def test_fpn_depths_are_evenly_spaced_and_include_the_last_block() -> None:
    assert fpn_depths(12) == (12, 8, 4)
    assert fpn_depths(4) == (4, 3, 1)
    assert fpn_depths(4, 1) == (4,)
    with pytest.raises(ValueError):
        fpn_depths(2, 3)


def test_clip_stays_frozen_and_only_the_fpn_learns() -> None:
    model = _model()
    model.train()
    assert model.training and not model.clip.training
    before = {k: v.clone() for k, v in model.clip.state_dict().items()}
    pixel_values = torch.randn(2, 3, SIZE, SIZE)
    text = model.embed_prompts(["the red mug on the left", "the blue knife on the right"])
    masks = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    masks[:, 10:30, 5:25] = True
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    loss = pixel_text_loss(model(pixel_values, text), masks)
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in model.clip.parameters())
    trainable = dict((n, p) for n, p in model.named_parameters() if not n.startswith("clip."))
    assert {"logit_scale", "logit_bias"} <= set(trainable)
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in trainable.values())
    optimizer.step()
    after = model.clip.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_logits_and_heatmaps_have_the_inputs_shapes() -> None:
    model = _model()
    logits = model(torch.randn(3, 3, SIZE, SIZE), model.embed_prompts(["a mug", "a knife", "a pan"]))
    assert logits.shape == (3, SIZE, SIZE)
    pixels = model.pixel_embeddings(torch.randn(1, 3, SIZE, SIZE))
    assert pixels.shape == (1, 64, 16, 16)  # finest level: stride patch / 2
    assert torch.allclose(pixels.norm(dim=1), torch.ones(1, 16, 16), atol=1e-5)
    images = np.random.default_rng(0).integers(0, 256, (2, 48, 40, 3), dtype=np.uint8)
    maps = model.heatmaps(images, ["the red mug on the left", "pour with the spout"])
    assert maps.shape == (2, 48, 40) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0 and maps.std() > 0
    assert model.training  # heatmaps restored the mode it found (nn.Module starts in train)
    with pytest.raises(ValueError):
        model.heatmaps(images, ["a", "b", "c"])


def test_load_clip_round_trips_a_local_directory_and_names_a_missing_one(tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    from operators.models.backbones import build_tiny_tokenizer

    clip, tokenize = build_tiny_clip(0, image_size=SIZE, patch_size=8)
    clip.save_pretrained(tmp_path)
    PreTrainedTokenizerFast(tokenizer_object=build_tiny_tokenizer(), pad_token="<pad>", unk_token="<unk>",
                            bos_token="<bos>", eos_token="<eos>").save_pretrained(tmp_path)
    loaded, loaded_tokenize = load_clip(str(tmp_path))
    state = loaded.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in clip.state_dict().items())
    ids, mask = loaded_tokenize(["the mug", "knife"])
    assert torch.equal(ids, tokenize(["the mug", "knife"])[0]) and mask.dtype == torch.long
    with pytest.raises(ConfigError, match="no-clip-here"):
        load_clip(str(tmp_path / "no-clip-here"))


# ---------------------------------------------------------------------------------------------
# Loss (§3.4 eq. 7-8)
# ---------------------------------------------------------------------------------------------


def test_pixel_text_loss_matches_hand_computed_values() -> None:
    logits = torch.tensor([[[2.0, -1.0], [0.0, 3.0]]])
    mask = torch.tensor([[[True, False], [False, False]]])
    terms = [_bce(2.0, True), _bce(-1.0, False), _bce(0.0, False), _bce(3.0, False)]
    assert float(pixel_text_loss(logits, mask)) == pytest.approx(sum(terms) / 4, rel=1e-5)
    balanced = 0.5 * terms[0] + 0.5 * sum(terms[1:]) / 3
    assert float(pixel_text_loss(logits, mask, balanced=True)) == pytest.approx(balanced, rel=1e-5)
    # the batch mean is the mean of the per-image means
    both = pixel_text_loss(torch.cat([logits, -logits]), torch.cat([mask, mask]))
    other = pixel_text_loss(-logits, mask)
    assert float(both) == pytest.approx((sum(terms) / 4 + float(other)) / 2, rel=1e-5)


def test_pixel_text_loss_prefers_the_right_map() -> None:
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, 2:4, 2:4] = True
    masks[1, 5:, :3] = True
    perfect = torch.where(masks, 4.0, -4.0)
    for balanced in (False, True):
        good = float(pixel_text_loss(perfect, masks, balanced=balanced))
        bad = float(pixel_text_loss(-perfect, masks, balanced=balanced))
        assert good < 0.05 < 4.0 < bad
    # balanced: a map that calls everything background is punished for the small mask
    background = torch.full((2, 8, 8), -4.0)
    miss, hit = _bce(-4.0, True), _bce(-4.0, False)
    plain = ((4 * miss + 60 * hit) / 64 + (9 * miss + 55 * hit) / 64) / 2
    assert float(pixel_text_loss(background, masks)) == pytest.approx(plain, rel=1e-5)
    assert float(pixel_text_loss(background, masks, balanced=True)) == pytest.approx(
        (miss + hit) / 2, rel=1e-5)
    with pytest.raises(ValueError):
        pixel_text_loss(perfect, masks[:, :4])


def test_a_few_steps_on_one_composite_overfit_it() -> None:
    model = _model()
    model.train()
    sample = compose([_ellipse(RED, "mug"), _ellipse(BLUE, "knife")], np.random.default_rng(3),
                     SIZE, target=0, background="plain")
    pixel_values, texts, masks = referring_batch([sample], model.preprocess)
    assert pixel_values.shape == (1, 3, SIZE, SIZE) and masks.shape == (1, SIZE, SIZE)
    text = model.embed_prompts(texts)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = pixel_text_loss(model(pixel_values, text), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.4 * losses[0]
    # better than any spatially constant map (whose best loss is the mask's binary entropy):
    # the FPN localised the object, the bias alone could not get here
    p = float(masks.float().mean())
    assert losses[-1] < 0.5 * -(p * math.log(p) + (1 - p) * math.log(1 - p))


# ---------------------------------------------------------------------------------------------
# Referring composites
# ---------------------------------------------------------------------------------------------


def test_forbidden_words_are_parts_and_functions_but_not_categories() -> None:
    words = forbidden_words()
    assert {"handle", "blade", "spout", "pour", "pour-with", "cut"} <= words
    assert not {"mug", "bowl", "stick", "knife", "red", "left"} & words  # bowl/stick: categories
    assert_no_part_words("the red bowl on the left", words)
    with pytest.raises(ValueError, match="handle"):
        assert_no_part_words("the Handle of the red mug", words)
    with pytest.raises(ValueError, match="pour"):
        assert_no_part_words("something to pour-with", words)


def test_compose_pastes_the_target_and_names_it_truthfully() -> None:
    rng = np.random.default_rng(0)
    forbidden = forbidden_words()
    colours = {"red": RED, "blue": BLUE, "green": GREEN}
    categories = ["mug", "bowl", "water bottle", "knife", "hammer", "pan"]
    for _ in range(50):
        n = int(rng.integers(2, 4))
        names = rng.choice(list(colours), size=n, replace=False)
        objects = [_ellipse(colours[c], str(rng.choice(categories)), int(rng.integers(20, 60)),
                            int(rng.integers(12, 40))) for c in names]
        target = int(rng.integers(n))
        sample = compose(objects, rng, SIZE, target=target, background="plain")
        assert isinstance(sample, ReferringSample)
        assert sample.image.shape == (SIZE, SIZE, 3) and sample.mask.shape == (SIZE, SIZE)
        # the mask is exactly the target's pasted pixels (its colour is unique in the image)
        pasted = (sample.image == np.array(colours[names[target]], np.uint8)).all(axis=-1)
        assert sample.mask.sum() == pasted.sum() > 0
        assert np.array_equal(sample.mask, pasted)
        # the slot: the mask lies in the target's column band
        cols = np.nonzero(sample.mask.any(axis=0))[0]
        band = SIZE // n
        assert cols[0] >= target * band and (cols[-1] < (target + 1) * band or target == n - 1)
        expected_position = ("left", "middle", "right")[target] if n == 3 else ("left", "right")[target]
        assert sample.position == expected_position
        where = ("in the " if expected_position == "middle" else "on the ") + expected_position
        assert sample.category == objects[target].category
        assert f"{sample.category} {where}" in sample.text
        assert sample.colour == names[target] and names[target] in sample.text
        assert not set(sample.text.replace(",", " ").split()) & forbidden


def test_compose_noise_background_and_bad_inputs() -> None:
    rng = np.random.default_rng(1)
    objects = [_ellipse(RED, "mug"), _ellipse(BLUE, "bowl"), _ellipse(GREEN, "pan")]
    sample = compose(objects, rng, SIZE, target=1, background="noise")
    assert sample.position == "middle" and "bowl" in sample.text and sample.mask.any()
    with pytest.raises(ValueError, match="handle"):
        compose([_ellipse(RED, "handle"), _ellipse(BLUE, "mug")], rng, SIZE, target=0)
    with pytest.raises(ValueError):
        compose(objects[:1], rng, SIZE)


def test_crops_from_views_are_tight_and_skip_nearly_empty_views() -> None:
    rgb = np.zeros((3, 32, 32, 3), np.uint8)
    mask = np.zeros((3, 32, 32), bool)
    mask[0, 4:20, 6:16] = True  # 160 px
    mask[1, 0:3, 0:3] = True  # 9 px: skipped
    mask[2, 10:30, 2:30] = True
    mask[2, 12, 5] = False
    rgb[mask] = (200, 100, 50)
    crops = crops_from_views(rgb, mask, "mug")
    assert len(crops) == 2
    assert crops[0].mask.shape == (16, 10) and crops[0].mask.all()
    assert crops[1].mask.shape == (20, 28) and crops[1].mask.sum() == mask[2].sum()
    assert all(c.category == "mug" and (c.rgb[c.mask] == (200, 100, 50)).all() for c in crops)
    with pytest.raises(ValueError):
        crops_from_views(rgb, mask[:, :16], "mug")
