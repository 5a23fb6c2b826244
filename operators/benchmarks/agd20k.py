"""AGD20K (Luo et al. 2022; AffordanceCLIP §4 evaluates on its test sets): a loader of its test
layout, and the procedural stand-in written in the same layout.

Layout read (a missing piece is one ConfigError naming it):

    <data>/<Seen|Unseen>/testset/egocentric/<affordance>/<object>/<image>.jpg
    <data>/<Seen|Unseen>/testset/GT/<affordance>/<object>/<image>.png   (grey heat map, 0-255)

An image without its GT heat map is an error naming both paths. The query of a sample is its
affordance folder name with `_` as a space (AGD20K's affordances are verbs: "hold", "cut_with").
The stand-in: rendered procedural assets; affordance = a function of the taxonomy, object = the
category, the GT = the mask of the function's parts blurred by a Gaussian (AGD20K's GT maps are
Gaussian-smoothed annotations) and scaled to 0-255.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from operators.settings import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG")


@dataclass(frozen=True)
class HeatSample:
    image: Path
    gt: Path
    affordance: str
    object: str

    @property
    def prompt(self) -> str:
        return self.affordance.replace("_", " ")


def load_samples(data: Path | str, split: str = "Seen", limit: int | None = None
                 ) -> list[HeatSample]:
    base = Path(data).expanduser() / split / "testset"
    images, gts = base / "egocentric", base / "GT"
    for needed in (images, gts):
        if not needed.is_dir():
            raise ConfigError(f"agd20k: {data} has no {split}/testset/{needed.name}/ (expected "
                              "<data>/Seen|Unseen/testset/{egocentric,GT}/<affordance>/<object>/)")
    samples = []
    for path in sorted(p for p in images.rglob("*") if p.suffix in IMAGE_SUFFIXES):
        affordance, obj = path.parent.parent.name, path.parent.name
        gt = gts / affordance / obj / f"{path.stem}.png"
        if not gt.is_file():
            raise ConfigError(f"agd20k: {path} has no ground-truth heat map {gt}")
        samples.append(HeatSample(path, gt, affordance, obj))
        if limit is not None and len(samples) >= limit:
            break
    return samples


def read_heatmap(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """float64 (H, W) in [0, 1]; resized bilinearly to (H, W) when given."""
    with Image.open(path) as image:
        grey = image.convert("L")
        if size is not None and grey.size != (size[1], size[0]):
            grey = grey.resize((size[1], size[0]), Image.BILINEAR)
        return np.asarray(grey, np.float64) / 255.0


@dataclass(frozen=True)
class StandinSettings:
    categories: tuple[str, ...] = ()   # () = every procedural category
    assets_per_category: int = 2
    views: int = 6
    size: int = 224
    sigma: float = 6.0
    min_part_pixels: int = 150
    seed: int = 0


def write_standin(out: Path | str, settings: StandinSettings = StandinSettings(),
                  split: str = "Seen") -> int:
    """One sample per (asset, function): the view showing the function's parts best."""
    from scipy.ndimage import gaussian_filter

    from operators.data.procedural import PROCEDURAL_CATEGORIES, make_asset
    from operators.geometry.render import render_views
    from operators.settings import RenderSettings
    base = Path(out) / split / "testset"
    render = RenderSettings(views=settings.views, width=settings.size, height=settings.size,
                            n_points=1000)
    written = 0
    for c, category in enumerate(settings.categories or PROCEDURAL_CATEGORIES):
        for i in range(settings.assets_per_category):
            seed = int(np.random.SeedSequence([settings.seed, 6151, c, i]).generate_state(1)[0])
            asset = make_asset(category, seed)
            views = render_views(asset.mesh, render, seed)
            face_part = np.asarray(asset.face_part)
            part_of = np.where(views.face_id >= 0, face_part[np.maximum(views.face_id, 0)], -1)
            for function in dict.fromkeys(f[0] for f in asset.part_functions if f):
                parts = [p for p, f in enumerate(asset.part_functions) if function in f]
                mask = np.isin(part_of, parts)
                view = int(np.argmax(mask.sum(axis=(1, 2))))
                if mask[view].sum() < settings.min_part_pixels:
                    continue
                heat = gaussian_filter(mask[view].astype(np.float64), settings.sigma)
                heat = np.round(255 * heat / heat.max()).astype(np.uint8)
                affordance = function.replace("-", "_")
                for folder in ("egocentric", "GT"):
                    (base / folder / affordance / category).mkdir(parents=True, exist_ok=True)
                stem = f"{category}_{i:03d}_{view:02d}"
                Image.fromarray(views.rgb[view]).save(
                    base / "egocentric" / affordance / category / f"{stem}.jpg", quality=95)
                Image.fromarray(heat).save(base / "GT" / affordance / category / f"{stem}.png")
                written += 1
    return written
