"""Sweep configuration: which job, which metric, and a search space over any config key of it.

In YAML (`configs/sweep_*.yaml`), beside the job's own sections:

    sweep:
      job: train                      # train | pretrain | finetune
      metric: val_pck@10              # default: the job's validation metric (train val_pck@10,
                                      # pretrain val_rec, finetune val_aiou)
      mode: max                       # default: that metric's direction
      searcher: random                # random (grid dimensions are crossed) | optuna
      num_samples: 4                  # samples of the random dimensions (x the grid)
      space:
        train.lambda_spatial: {loguniform: [1, 30]}
        train.lambda_mask: {grid: [0.1, 1, 10]}
        lift.backbone: {choice: [dinov2-small, dinov2-random-tiny]}
        train.seed: {randint: [0, 100]}

Imports no Ray: `space_from_tune` turns the space into Ray Tune's sampling objects when the
sweep runs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from operators.settings import Section

KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
# The job's validation metric and its direction (never the training loss: it is normalised
# by the loss weights a sweep changes).
# For pretraining, the reconstruction term: the weighted objective changes with the weights.
DEFAULT_METRICS = {"train": ("val_pck@10", "max"), "pretrain": ("val_rec", "min"),
                   "finetune": ("val_aiou", "max")}
LOWER_IS_BETTER = ("loss", "val_rec", "val_aff", "val_div", "mae", "kld")


class Dimension(Section):
    """One swept key: exactly one of the kinds."""

    choice: list[Any] | None = None
    grid: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "Dimension":
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(KINDS)} (got "
                             f"{', '.join(given) or 'none'})")
        kind = given[0]
        value = getattr(self, kind)
        if kind in ("choice", "grid") and not value:
            raise ValueError(f"{kind} needs at least one value")
        if kind in ("uniform", "loguniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"{kind} needs low < high, got {list(value)}")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError(f"loguniform needs low > 0, got {value[0]}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    def candidates(self) -> list[Any]:
        """Values that must each be valid for the key: every listed value, or the bounds
        (randint's high is exclusive, as in Ray Tune)."""
        value = getattr(self, self.kind)
        if self.kind in ("choice", "grid"):
            return list(value)
        if self.kind == "randint":
            return [value[0], value[1] - 1]
        return [value[0], value[1]]

    def sample(self, u: float) -> Any:
        """The value at quantile u in [0, 1) (for plots and tests; Tune samples for sweeps)."""
        value = getattr(self, self.kind)
        if self.kind in ("choice", "grid"):
            return value[min(int(u * len(value)), len(value) - 1)]
        low, high = value
        if self.kind == "uniform":
            return low + u * (high - low)
        if self.kind == "loguniform":
            return math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
        return int(low + u * (high - low))


class SweepSection(Section):
    """`sweep.*`: what a `partlift sweep` searches."""

    job: Literal["train", "pretrain", "finetune"] = Field("train", description="the job each trial runs")
    metric: str | None = Field(None, description="the metric to optimise (default: the job's validation metric: val_pck@10, val_rec, val_aiou)")
    mode: Literal["max", "min"] | None = Field(None, description="its direction (default: the metric's)")
    space: dict[str, Dimension] = Field(..., description="config key -> one of choice, grid, uniform, loguniform, randint")
    searcher: Literal["random", "optuna"] = Field("random", description="random sampling (grid dimensions crossed), or Optuna's TPE")
    num_samples: int = Field(2, ge=1, description="samples of the space (each grid point gets as many)")
    scheduler: Literal["none", "asha"] = Field("none", description="ASHA stops weak trials early at their checkpoints (time = the trainer's step)")
    grace_period: int = Field(1, ge=1, description="ASHA: steps before a trial can be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA's reduction factor")
    max_concurrent_trials: int | None = Field(None, ge=1, description="trials at once (default: what the cluster's CPUs/GPUs hold with each trial's workers)")
    max_failures: int = Field(1, ge=0, description="retries of a failed trial")

    @field_validator("space")
    @classmethod
    def _not_empty(cls, value: dict[str, Dimension]) -> dict[str, Dimension]:
        if not value:
            raise ValueError("the search space is empty: name at least one key")
        for key in value:
            if key.startswith("sweep.") or "." not in key:
                raise ValueError(f"{key!r} is not a config key of the swept job "
                                 "(SECTION.KEY, e.g. train.lr)")
        return value

    @model_validator(mode="after")
    def _optuna_grid(self) -> "SweepSection":
        if self.searcher == "optuna" and any(d.kind == "grid" for d in self.space.values()):
            raise ValueError("sweep.searcher=optuna does not take grid dimensions; use choice")
        return self

    def objective(self) -> tuple[str, str]:
        metric, mode = DEFAULT_METRICS[self.job]
        if self.metric is not None and self.metric != metric:
            lower = any(part in self.metric for part in LOWER_IS_BETTER)
            return self.metric, self.mode or ("min" if lower else "max")
        return metric, self.mode or mode


class TrackingSection(Section):
    """`tracking.*`: where a sweep's trials are logged besides TensorBoard (which is always on:
    each trial's folder under the sweep holds its event files)."""

    mlflow_uri: str | None = Field(None, description="an MLflow tracking URI: one run per trial (params = the swept values, metrics = every report); a local `sqlite:///path.db` store needs no server, `http(s)://` is a tracking server")
    mlflow_experiment: str | None = Field(None, description="the MLflow experiment (default: partlift-sweep-<name>)")

    @field_validator("mlflow_uri")
    @classmethod
    def _absolute_sqlite(cls, value: str | None) -> str | None:
        """A relative sqlite path would be resolved in whichever directory the logger runs."""
        if value is None:
            return None
        prefix = "sqlite:///"
        if value.startswith(prefix) and not value[len(prefix):].startswith("/"):
            return prefix + str(Path(value[len(prefix):]).resolve())
        if "://" not in value and not value.startswith("databricks"):
            raise ValueError(f"{value!r} is not a tracking URI (sqlite:///path.db, "
                             "http://host:5000, file:///dir, databricks)")
        return value


def space_for_tune(space: dict[str, Dimension]) -> dict[str, Any]:
    """The Ray Tune param_space of a search space (keys stay dotted)."""
    from ray import tune
    out = {}
    for key, dim in space.items():
        value = getattr(dim, dim.kind)
        if dim.kind == "choice":
            out[key] = tune.choice(list(value))
        elif dim.kind == "grid":
            out[key] = tune.grid_search(list(value))
        elif dim.kind == "uniform":
            out[key] = tune.uniform(*value)
        elif dim.kind == "loguniform":
            out[key] = tune.loguniform(*value)
        else:
            out[key] = tune.randint(*value)
    return out
