"""The one place that turns a stage's resources into `map_batches` arguments.

Ray has renamed these arguments before (`concurrency` -> `compute=`); a rename is a change here only.
"""

from __future__ import annotations

from typing import Any

import ray
import ray.data

from rayjobs.config import StepResources


def map_batches_args(resources: StepResources, *, actors: bool) -> dict[str, Any]:
    """kwargs for `Dataset.map_batches`: batch size, CPUs/GPUs per worker, and the compute
    strategy (an actor pool for stateful UDFs such as models, a task pool otherwise)."""
    args: dict[str, Any] = {"batch_size": resources.batch_size, "num_cpus": resources.num_cpus}
    num_gpus = resources.num_gpus
    if num_gpus is None:  # GPU when present: model actors take one GPU each on a GPU cluster
        num_gpus = 1.0 if actors and ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    if num_gpus:
        args["num_gpus"] = num_gpus
    if actors:
        args["compute"] = ray.data.ActorPoolStrategy(size=resources.concurrency or 1)
    else:
        args["compute"] = ray.data.TaskPoolStrategy(size=resources.concurrency)
    return args
