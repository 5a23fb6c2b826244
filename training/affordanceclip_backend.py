"""The `affordanceclip` grounding backend of the label stage: a trained AffordanceCLIP run's
heat map per view for the function's action ("pour with"), turned into nested level-set boxes
(`operators.models.grounding.heat_boxes`), so its maps become 3D pseudo-labels through the same
box-vote aggregation as every backend. Registered here (training/ owns the model); importing
`training.config` registers it before the configs are built."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator

from operators.models.grounding import Box, heat_boxes
from operators.models.registry import GroundingOptions, register_grounding
from operators.settings import ConfigError


@register_grounding
class AffordanceClipOptions(GroundingOptions):
    """A trained AffordanceCLIP run (`partlift affordanceclip`): heat maps -> level-set boxes."""

    name: Literal["affordanceclip"] = "affordanceclip"
    model: str = Field(..., min_length=1, description="the AffordanceCLIP run's directory: <root>/runs/affordanceclip/NAME (a path or URI)")
    checkpoint: str = Field("best", description="best, last or a step")
    levels: list[float] = Field([0.25, 0.5, 0.75], min_length=1, description="heat levels (fractions of the way from a view's minimum to its maximum) whose regions become boxes")
    factory: ClassVar[str] = "training.affordanceclip_backend:make_backend"

    @field_validator("levels")
    @classmethod
    def _levels(cls, value: list[float]) -> list[float]:
        if any(not 0 < v < 1 for v in value):
            raise ValueError(f"label.backend.levels={value}: each must lie in (0, 1)")
        return value

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint(cls, value: str) -> str:
        if value not in ("best", "last") and not value.isdigit():
            raise ValueError(f"label.backend.checkpoint={value!r}: expected best, last or a step")
        return value

    @field_validator("model")
    @classmethod
    def _uri(cls, value: str) -> str:
        if "://" not in value and not value.startswith("/"):
            raise ValueError(f"label.backend.model={value!r}: give the run's directory as an "
                             "absolute path or URI (<root>/runs/affordanceclip/NAME)")
        return value

    def default_template(self) -> str:
        return "zero-shot"

    def factory_kwargs(self, *, device: str, seed: int, template: str) -> dict[str, Any]:
        return {"model": self.model, "checkpoint": self.checkpoint, "levels": self.levels,
                "device": device}


class AffordanceClipBackend:
    name: ClassVar[str] = "affordanceclip"
    prompt_from_function: ClassVar[bool] = True

    def __init__(self, model: Any, levels: Sequence[float]) -> None:
        self.model, self.levels = model, tuple(levels)

    def __repr__(self) -> str:
        return f"AffordanceClipBackend(levels={self.levels})"

    def ground(self, images: np.ndarray, prompts: Sequence[str], trial: int = 0
               ) -> list[list[Box]]:
        heat = self.model.heatmaps(np.asarray(images), list(prompts))
        return [heat_boxes(h, self.levels) for h in heat]


def make_backend(model: str, checkpoint: str, levels: Sequence[float],
                 device: str = "cpu") -> AffordanceClipBackend:
    from operators.store.storage import RunRoot
    from training.affordanceclip_train import TrainedAffordanceClip
    from training.runs import load_model
    which: str | int = int(checkpoint) if checkpoint.isdigit() else checkpoint
    loaded = load_model(RunRoot(model), model, which)
    if not isinstance(loaded, TrainedAffordanceClip):
        raise ConfigError(f"label.backend.model={model}: not an AffordanceCLIP run")
    return AffordanceClipBackend(loaded.model.to(device).eval(), levels)
