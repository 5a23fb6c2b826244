"""Background augmentation: the object is untouched, the background is replaced, seeded."""

from __future__ import annotations

import numpy as np

from operators.data.backgrounds import NOISE_LEVEL, background_variants, replace_background


def test_the_object_stays_and_the_background_is_solid_or_a_gradient() -> None:
    rgb = np.full((20, 30, 3), 255, np.uint8)
    rgb[5:15, 10:20] = [10, 200, 30]
    mask = np.zeros((20, 30), bool)
    mask[5:15, 10:20] = True
    kinds = set()
    for seed in range(40):
        out = replace_background(rgb, mask, np.random.default_rng(seed))
        np.testing.assert_array_equal(out[mask], rgb[mask])
        background = out[~mask].astype(int)
        spread = background.max(axis=0) - background.min(axis=0)
        # solid: one colour (+ noise up to +-50, i.e. a spread <= 100); gradient: wider
        kinds.add("solid" if spread.max() <= 2 * NOISE_LEVEL else "gradient")
        assert not np.array_equal(out[~mask], rgb[~mask])
    assert kinds == {"solid", "gradient"}


def test_variants_keep_the_render_first_and_repeat_with_the_seed() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    mask = np.eye(8, dtype=bool)
    variants = background_variants(rgb, mask, 3, seed=5)
    assert variants.shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(variants[0], rgb)
    np.testing.assert_array_equal(variants, background_variants(rgb, mask, 3, seed=5))
    assert not np.array_equal(variants[1], variants[2])
