"""`partlift pretrain` (CMAT §3.2) and `partlift finetune` (CAST, §3.3) on Ray Train.

    check the tables and config (driver, before Ray) -> point inputs (and, for finetune, the
    samples' image exemplars) of assets not yet cached, on Ray tasks from 64 assets on ->
    plan, prompts, run.json (driver) -> TorchTrainer (training.trainer) running
    training.task_loop on every rank

Runs live at `<root>/runs/pretrain/<name>/` and `<root>/runs/finetune/<name>/`; the same name
again resumes from the last checkpoint, and settings that change what is trained are refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pickle

from operators.store.lease import LeaseLostError, hold
from operators.store.storage import RunRoot
from rayjobs.config import FinetuneJob, PretrainJob, StepResources
from rayjobs.driver import ensure_ray, map_tasks
from training.cmat import (PreparedTask, TaskReport, local_map, pretrain_config_record,
                           prepare_finetune, prepare_pretrain, run_task)
from training.runs import default_run_name, run_path

# Keys that may change when a run resumes: they do not change what a step trains on. (Not
# `steps`: the cosine schedule of every step depends on it; not `use_gpu`: bf16 autocast.)
RESUMABLE = {"keep_checkpoints", "max_failures", "cpus_per_worker"}
MAP_ON_RAY_FROM = 64   # from this many items the per-asset work runs on Ray tasks
MAP_RESOURCES = StepResources(num_cpus=1.0, batch_size=1)


def _apply(batch: dict[str, Any], fn: bytes) -> dict[str, list]:
    """CPU task: fn (pickled) on each item (JSON) of the batch."""
    work = pickle.loads(fn)
    return {"index": list(batch["index"]),
            "result": [pickle.dumps(work(json.loads(str(item)))) for item in batch["item"]]}


def ray_mapper(config: PretrainJob) -> Callable[[Callable[[Any], Any], list[Any]], list[Any]]:
    """A mapper that runs small jobs here and large ones as one Ray Data stream of CPU tasks
    (results in item order)."""
    def mapper(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        if len(items) < MAP_ON_RAY_FROM:
            return local_map(fn, items)
        import ray.data
        ensure_ray(config.ray.model_copy(update={"include_dashboard": True}))
        ds = ray.data.from_items([{"index": i, "item": json.dumps(item, default=float)}
                                  for i, item in enumerate(items)])
        ds = map_tasks(ds, _apply, MAP_RESOURCES, fn=pickle.dumps(fn))
        found = {int(r["index"]): pickle.loads(r["result"]) for r in ds.take_all()}
        return [found[i] for i in range(len(items))]
    return mapper


def resumable_keys(section: str) -> set[str]:
    return {f"{section}.{k}" for k in RESUMABLE}


def finetune_config_record(config: FinetuneJob) -> dict[str, Any]:
    out = pretrain_config_record(config.pretrain, config.data, resumable_keys("pretrain"))
    # only the scratch encoder's shape matters here (a pretrained one brings its own)
    shape = {f"pretrain.{k}" for k in (*config.pretrain.encoder(), "points")}
    out = {k: v for k, v in out.items() if not k.startswith("pretrain.")
           or (config.cast.init == "scratch" and k in shape)}
    for key, value in config.cast.model_dump(mode="json").items():
        if f"cast.{key}" not in resumable_keys("cast"):
            out[f"cast.{key}"] = value
    return out


@dataclass(frozen=True)
class CmatJobReport:
    run: TaskReport

    def summary_lines(self) -> list[str]:
        t = self.run
        rows = [("run", t.name), ("steps", f"{t.steps}" + (f" (resumed from {t.resumed_from})"
                                                          if t.resumed_from else "")),
                ("steps/s (training)", f"{t.steps_per_s:.2f}"),
                ("samples/s (all ranks)", f"{t.samples_per_s:.1f}"),
                ("last loss", "-" if t.last_loss is None else f"{t.last_loss:.4f}"),
                (f"best {t.metric}", "-" if t.best_score is None else
                 f"{t.best_score:.4f} at step {t.best_step}"),
                ("wall time", f"{t.seconds:.1f} s"), ("output", t.run + "/"),
                ("model", f"{t.kind}/{t.name}" if t.run.endswith(f"runs/{t.kind}/{t.name}")
                 else t.run)]
        width = max(len(k) for k, _ in rows)
        return [f"  {k.ljust(width)}  {v}" for k, v in rows]


def _run(config: PretrainJob, kind: str, prefix: str, record: dict[str, Any],
         prepare: Callable[[RunRoot, str, str], PreparedTask], run: str | None,
         callbacks: list[Any] | None) -> CmatJobReport:
    root = RunRoot(config.root, config.storage.options())
    root.check_reachable(create=False)
    name = config.job.name or default_run_name(prefix, record)
    run = run or run_path(kind, name)
    with hold(root, [run], name, timeout_s=config.job.lease_timeout_s,
              force=config.job.force) as leases:
        if config.job.overwrite and root.exists(f"{run}/run.json"):
            root.fs.delete_dir(root.path(run))  # --overwrite: start the run over
            print(f"{kind}: removed {root.display(run)}/ (--overwrite)")
        prepared = prepare(root, run, name)
        print(f"{kind}: run {root.display(run)}/" + (" (resuming)" if prepared.resumed else ""))
        # Train V2's controller asks the dashboard's state API about its actors: keep it on
        ensure_ray(config.ray.model_copy(update={"include_dashboard": True}))
        report = CmatJobReport(run_task(prepared, callbacks))
        if any(lease.lost for lease in leases):
            raise LeaseLostError(f"the lease of {run} on {root.display()} was taken over while "
                                 "this run trained; see `partlift status`")
    print(f"\n{kind} finished:")
    print("\n".join(report.summary_lines()))
    return report


def run_pretrain(config: PretrainJob, run: str | None = None,
                 callbacks: list[Any] | None = None) -> CmatJobReport:
    """`partlift pretrain`; `run` and `callbacks` as in rayjobs.train_job.run_train."""
    record = pretrain_config_record(config.pretrain, config.data, resumable_keys("pretrain"))
    return _run(config, "pretrain", "cmat", record, lambda root, run, name: prepare_pretrain(
        root, run, name, config.pretrain, config.data, record,
        progress=lambda line: print(f"pretrain: {line}"), mapper=ray_mapper(config)),
        run, callbacks)


def run_finetune(config: FinetuneJob, run: str | None = None,
                 callbacks: list[Any] | None = None) -> CmatJobReport:
    """`partlift finetune`; `run` and `callbacks` as in rayjobs.train_job.run_train."""
    record = finetune_config_record(config)
    return _run(config, "finetune", "cast", record, lambda root, run, name: prepare_finetune(
        root, run, name, config.cast, config.pretrain, config.data, record,
        progress=lambda line: print(f"finetune: {line}"), mapper=ray_mapper(config)),
        run, callbacks)
