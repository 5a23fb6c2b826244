"""Settings every layer's configuration builds on, importing nothing heavy (no open3d, torch or
transformers), so the command-line client validates a config without them.

- `Section`: the base of every config model (operators' model options, `training/` and `tuning/`
  sections, the job configs `rayjobs` composes): unknown keys are errors, values are frozen.
- `ConfigError`: a configuration problem, phrased for the person who wrote the config.
- The operators' own settings dataclasses (`RenderSettings`, `LabelSettings`): what an operator
  needs, free of how a job schedules it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict

DISTRIBUTIONS = ("fibonacci", "rings")


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


class Section(BaseModel):
    """Base of every config model: unknown keys are errors, values are frozen."""

    # `--set job.name=2024` parses as a YAML int: string fields take it as text. Inputs stay out
    # of pydantic's own error text (a misspelled secret key must not be echoed).
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True,
                              coerce_numbers_to_str=True, hide_input_in_errors=True)


@dataclass(frozen=True)
class RenderSettings:
    """How to render one asset. Angles in degrees; sizes in pixels."""

    views: int = 19                      # DFC A.4 renders 19 views incl. from above and below
    width: int = 224
    height: int = 224
    fov_deg: float = 40.0                # vertical field of view
    # "fibonacci": elevations evenly spread (in sin(elevation), i.e. by sphere area) from
    # elevation_min_deg to elevation_max_deg, azimuths stepped by the golden angle.
    # "rings": one view at each elevation limit plus rings of azimuths at elevations in between.
    distribution: str = "fibonacci"
    elevation_min_deg: float = -60.0     # negative = from below
    elevation_max_deg: float = 80.0
    distance_margin: float = 1.15        # camera distance so the bbox's bounding sphere fits, times this
    background: tuple[int, int, int] = (255, 255, 255)
    ambient: float = 0.35                # albedo * (ambient + (1-ambient) * max(0, n.l))
    n_points: int = 100_000              # DFC A.4 aggregates onto 100K surface points

    def __post_init__(self) -> None:
        def fail(field: str, requirement: str) -> None:
            raise ValueError(f"RenderSettings.{field} {requirement}, got {getattr(self, field)!r}")

        for field in ("views", "width", "height", "n_points"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                fail(field, "must be an integer")
        if self.views < 1:
            fail("views", "must be >= 1")
        if self.width < 8:
            fail("width", "must be >= 8 pixels")
        if self.height < 8:
            fail("height", "must be >= 8 pixels")
        if not 1.0 < self.fov_deg < 170.0:
            fail("fov_deg", "must be in (1, 170) degrees")
        if self.distribution not in DISTRIBUTIONS:
            fail("distribution", f"must be one of {DISTRIBUTIONS}")
        if not -90.0 <= self.elevation_min_deg <= 90.0:
            fail("elevation_min_deg", "must be in [-90, 90] degrees")
        if not -90.0 <= self.elevation_max_deg <= 90.0:
            fail("elevation_max_deg", "must be in [-90, 90] degrees")
        if self.elevation_min_deg > self.elevation_max_deg:
            raise ValueError(
                f"RenderSettings.elevation_min_deg ({self.elevation_min_deg}) must be <= "
                f"elevation_max_deg ({self.elevation_max_deg})")
        if not (np.isfinite(self.distance_margin) and self.distance_margin >= 1.0):
            fail("distance_margin", "must be >= 1 (below 1 the object is cropped)")
        if not 0.0 <= self.ambient <= 1.0:
            fail("ambient", "must be in [0, 1]")
        if self.n_points < 1:
            fail("n_points", "must be >= 1")
        background = tuple(self.background)
        if len(background) != 3 or not all(
                isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c <= 255
                for c in background):
            fail("background", "must be three integers in 0..255 (RGB)")


@dataclass(frozen=True)
class LabelSettings:
    trials: int = 4                   # DFC A.4: four queries per view and part
    template: str = "cogvlm"          # key of operators.models.grounding.PROMPT_TEMPLATES
    consensus: bool = False           # keep only the largest cluster of a view's trial boxes
    consensus_radius_frac: float = 0.15
    zoom: bool = False                # second, zoomed query for small boxes (A.4 step 2)
    zoom_max_area_frac: float = 0.05  # a box smaller than this fraction of the image is "small"
    zoom_pad_frac: float = 0.25
    min_boxes_per_view: int = 1       # views with fewer boxes over their trials are skipped
    visibility_rel_tol: float = 0.01
    visibility_abs_tol: float = 2e-3  # metres
    mask_sigma: float = 1.0           # pixels, smoothing of splatted scores
    closing_iterations: int = 2

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ValueError(f"LabelSettings.trials must be >= 1, got {self.trials}")
        if not 0 < self.zoom_max_area_frac <= 1:
            raise ValueError("LabelSettings.zoom_max_area_frac must be in (0, 1]")


@dataclass(frozen=True)
class ReadLimits:
    """How untrusted mesh files are read: in a child process (`isolate`), which is killed after
    `timeout_s`; files over `max_file_mb` are refused before reading."""

    timeout_s: float = 30.0
    max_file_mb: float = 1024.0
    isolate: bool = True
