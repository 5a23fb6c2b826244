"""The papers' benchmarks as data: loaders of their public layouts and procedural stand-ins
written in the same layouts (SOCO, InstructPart, AGD20K). Plain IO and geometry, no models:
the predictors and the eval loop live in `training/`, the job in `rayjobs/eval_job.py`."""

from pathlib import Path

import numpy as np


def read_image(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) RGB of an image file (any PIL format)."""
    from PIL import Image
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), np.uint8)
