"""The trainer driver every Ray Train stage shares: scaling, storage of checkpoints under the run,
checkpoint retention, failure handling, the plan dataset. The correspondence trainer (and later
CMAT/CAST and AffordanceCLIP) hand it a loop, its config and the plan rows.

- `TorchTrainer` (Train V2) with `ScalingConfig(num_workers, use_gpu)`; gloo on CPU, NCCL on GPU.
- `RunConfig(name, storage_path=<root>/runs/<kind>, storage_filesystem=<the root's>)`: Ray's
  checkpoints land inside the run directory, local or S3 alike (the path without the scheme).
- `CheckpointConfig(num_to_keep=k)`: the last k; the loop exports the best to `best/`.
- Resume = the same (storage path, name): Ray finds its checkpoint manager snapshot there and
  `ray.train.get_checkpoint()` returns the latest checkpoint.
- The plan goes in as `datasets={"plan": ...}`, read by every rank in step order (not split:
  `DataConfig(datasets_to_split=[])`, `preserve_order`); each rank keeps the rows of its slot, so
  which pairs a rank trains at a step is fixed by the plan, and a resume skips exactly the steps
  done (rows are a few integers each, so reading the whole plan costs nothing).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from operators.settings import ConfigError
from operators.store.storage import RunRoot


@dataclass(frozen=True)
class Scaling:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float | None = None  # None: the cluster's CPUs shared by the workers
    keep_checkpoints: int = 2
    max_failures: int = 0


def worker_cpus(num_workers: int) -> float:
    """CPUs per worker when not configured: the cluster's CPUs shared by the workers (Ray sets
    each worker's torch threads to its CPUs), at least 1."""
    import ray
    total = float(ray.cluster_resources().get("CPU", 1.0))
    return max(1.0, float(int(total // num_workers)))


def check_schedulable(scaling: Scaling, cpus: float) -> None:
    """A worker group the cluster cannot hold would wait forever: refuse it, naming the keys."""
    import ray
    resources = ray.cluster_resources()
    need_cpu = scaling.num_workers * cpus
    if need_cpu > float(resources.get("CPU", 0.0)) + 1e-9:
        raise ConfigError(f"train: {scaling.num_workers} workers x {cpus:g} CPUs = {need_cpu:g} "
                          f"CPUs, the cluster has {resources.get('CPU', 0):g}: lower "
                          "train.num_workers or train.cpus_per_worker")
    if scaling.use_gpu and scaling.num_workers > float(resources.get("GPU", 0.0)) + 1e-9:
        raise ConfigError(f"train: {scaling.num_workers} workers with a GPU each, the cluster "
                          f"has {resources.get('GPU', 0):g} GPUs: lower train.num_workers or "
                          "set train.use_gpu=false")


def fit(root: RunRoot, run: str, loop: Callable[[dict[str, Any]], None],
        loop_config: dict[str, Any], plan_rows: list[dict[str, Any]], scaling: Scaling,
        callbacks: list[Any] | None = None) -> Any:
    """Run (or resume) one Ray Train run at `<root>/<run>`; returns Ray's `Result`.
    `callbacks`: Ray Train callbacks (a sweep's trial passes Tune's TuneReportCallback)."""
    import ray.data
    from ray.train import (CheckpointConfig, DataConfig, FailureConfig, RunConfig,
                           ScalingConfig)
    from ray.train.torch import TorchConfig, TorchTrainer

    parent, name = run.rsplit("/", 1)
    dataset = ray.data.from_items(plan_rows)
    dataset.context.enable_progress_bars = False  # the loop reports progress in steps
    with warnings.catch_warnings():  # Ray 2.60 warns about its own default (exclude_resources)
        warnings.filterwarnings("ignore", message=".*exclude_resources.*")
        ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    cpus = scaling.cpus_per_worker or worker_cpus(scaling.num_workers)
    check_schedulable(scaling, cpus)
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": cpus}),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name, storage_path=root.path(parent), storage_filesystem=root.fs,
            checkpoint_config=CheckpointConfig(num_to_keep=scaling.keep_checkpoints),
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            callbacks=callbacks),
        datasets={"plan": dataset},
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ingest),
    )
    return trainer.fit()
