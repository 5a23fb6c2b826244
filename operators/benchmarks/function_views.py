"""What the InstructPart and AGD20K stand-ins share: fresh procedural assets rendered, and per
asset and function the view that shows the function's parts best, with the mask of every part
performing it (the ground truth both benchmarks derive theirs from)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FunctionViewSettings:
    categories: tuple[str, ...] = ()   # () = every procedural category
    assets_per_category: int = 2
    views: int = 6
    size: int = 224
    min_part_pixels: int = 150         # a function shown by fewer pixels gives no sample
    seed: int = 0


@dataclass(frozen=True, eq=False)
class FunctionView:
    category: str
    index: int                          # the asset's index within its category
    seed: int                           # the generator's (and the render's) seed
    view: int
    function: str
    part_names: tuple[str, ...]         # the asset's parts
    parts: tuple[int, ...]              # the parts performing the function
    rgb: np.ndarray                     # (H, W, 3) uint8
    part_mask: np.ndarray               # (H, W) bool: the function's parts
    object_mask: np.ndarray             # (H, W) bool

    @property
    def stem(self) -> str:
        return f"{self.category}_{self.index:03d}_{self.view:02d}"


def function_views(settings: FunctionViewSettings, salt: int) -> Iterator[FunctionView]:
    """The samples in a fixed order; `salt` keeps each benchmark's assets its own."""
    from operators.data.procedural import PROCEDURAL_CATEGORIES, make_asset
    from operators.geometry.render import render_views
    from operators.settings import RenderSettings
    render = RenderSettings(views=settings.views, width=settings.size, height=settings.size,
                            n_points=1000)
    for c, category in enumerate(settings.categories or PROCEDURAL_CATEGORIES):
        for i in range(settings.assets_per_category):
            seed = int(np.random.SeedSequence([settings.seed, salt, c, i]).generate_state(1)[0])
            asset = make_asset(category, seed)
            views = render_views(asset.mesh, render, seed)
            face_part = np.asarray(asset.face_part)
            part_of = np.where(views.face_id >= 0, face_part[np.maximum(views.face_id, 0)], -1)
            for function in dict.fromkeys(f[0] for f in asset.part_functions if f):
                parts = tuple(p for p, f in enumerate(asset.part_functions) if function in f)
                mask = np.isin(part_of, parts)
                view = int(np.argmax(mask.sum(axis=(1, 2))))
                if mask[view].sum() < settings.min_part_pixels:
                    continue
                yield FunctionView(category, i, seed, view, function, asset.part_names, parts,
                                   views.rgb[view], mask[view], views.mask[view])
