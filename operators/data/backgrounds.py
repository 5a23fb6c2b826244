"""Background augmentation of rendered views (DFC release): the object stays, the background
becomes a solid colour or a two-colour linear gradient in a random direction, and half the time
uniform noise of up to ±50 grey levels is added to the background.

The correspondence trainer applies it on the backbone-in-the-loop path; the lift stage can cache
the features of K such variants per view (`lift.background_variants`), which is all the cached
path sees of it (K fixed draws instead of a new one at every step).
"""

from __future__ import annotations

import numpy as np

NOISE_LEVEL = 50


def replace_background(rgb: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8 view with its background (mask False) replaced; the object is unchanged."""
    rgb = np.asarray(rgb)
    mask = np.asarray(mask, bool)
    height, width = mask.shape
    first, second = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
    if rng.random() < 0.5:
        background = np.broadcast_to(first, (height, width, 3)).copy()
    else:
        angle = rng.uniform(0.0, 2.0 * np.pi)
        rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
        along = cols * np.cos(angle) + rows * np.sin(angle)
        t = (along - along.min()) / max(float(along.max() - along.min()), 1e-6)
        background = first + t[..., None] * (second - first)
    if rng.random() < 0.5:
        background += rng.uniform(-NOISE_LEVEL, NOISE_LEVEL, size=background.shape)
    out = rgb.copy()
    out[~mask] = np.clip(np.rint(background[~mask]), 0, 255).astype(np.uint8)
    return out


def background_variants(rgb: np.ndarray, mask: np.ndarray, k: int, seed: int) -> np.ndarray:
    """(k, H, W, 3): variant 0 is the view as rendered, variants 1..k-1 replaced backgrounds
    drawn from `seed` (the same seed gives the same variants)."""
    rng = np.random.default_rng(seed)
    return np.stack([np.asarray(rgb)] + [replace_background(rgb, mask, rng) for _ in range(k - 1)])
