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

from operators.benchmarks.function_views import FunctionViewSettings, function_views
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


def load_samples(data: Path | str, split: str = "Seen") -> list[HeatSample]:
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
    return samples


def read_heatmap(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """float64 (H, W) in [0, 1]; resized bilinearly to (H, W) when given."""
    with Image.open(path) as image:
        grey = image.convert("L")
        if size is not None and grey.size != (size[1], size[0]):
            grey = grey.resize((size[1], size[0]), Image.BILINEAR)
        return np.asarray(grey, np.float64) / 255.0


@dataclass(frozen=True)
class StandinSettings(FunctionViewSettings):
    sigma: float = 6.0   # the Gaussian that turns a part mask into a heat map, pixels


def write_standin(out: Path | str, settings: StandinSettings = StandinSettings(),
                  split: str = "Seen") -> int:
    """One sample per (asset, function): the view showing the function's parts best."""
    from scipy.ndimage import gaussian_filter
    base = Path(out) / split / "testset"
    written = 0
    for shown in function_views(settings, salt=6151):
        heat = gaussian_filter(shown.part_mask.astype(np.float64), settings.sigma)
        heat = np.round(255 * heat / heat.max()).astype(np.uint8)
        affordance = shown.function.replace("-", "_")
        for folder in ("egocentric", "GT"):
            (base / folder / affordance / shown.category).mkdir(parents=True, exist_ok=True)
        Image.fromarray(shown.rgb).save(
            base / "egocentric" / affordance / shown.category / f"{shown.stem}.jpg", quality=95)
        Image.fromarray(heat).save(base / "GT" / affordance / shown.category /
                                   f"{shown.stem}.png")
        written += 1
    return written
