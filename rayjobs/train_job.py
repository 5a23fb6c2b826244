"""`partlift train`: dense functional-correspondence training on Ray Train (DFC §4.2-4.3).

    check the data and config (driver, before Ray) -> scan the training assets into the
    catalogue (Ray Data tasks) -> pair plan, validation pairs, text embeddings (driver)
    -> TorchTrainer (training.trainer) running training.loop on every rank

The run lives at `<root>/runs/train/<name>/` (training.runs). Re-running with the same name
resumes from its last checkpoint; settings that change what is trained are refused then.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from operators.store.lease import LeaseLostError, hold
from operators.store.readers import RootReader
from operators.store.storage import RunRoot
from rayjobs.config import StepResources, TrainJob
from rayjobs.driver import ensure_ray, map_tasks
from training.correspondence import TrainReport, prepare_run, train_correspondence
from training.pairs import AssetScan, scan_asset
from training.runs import default_run_name, run_path

# Keys that may change when a run resumes: they do not change what a step trains on.
RESUMABLE_KEYS = {"train.steps", "train.keep_checkpoints", "train.max_failures",
                  "train.cache_assets", "train.cpus_per_worker", "train.use_gpu"}


def config_record(config: TrainJob) -> dict[str, Any]:
    """The settings that define a run, flattened (`train.lr`: 0.0001, ...)."""
    out = {}
    for section in ("train", "data", "eval"):
        for key, value in getattr(config, section).model_dump(mode="json").items():
            dotted = f"{section}.{key}"
            if dotted not in RESUMABLE_KEYS:
                out[dotted] = value
    if config.train.input == "backbone":
        out |= config.lift.backbone.fingerprint("lift.backbone")
    return out


SCAN_RESOURCES = StepResources(num_cpus=1.0, batch_size=4)  # assets per catalogue-scan task
# From this many training assets the catalogue is scanned on Ray tasks; below, the driver scans
# them before Ray starts (a second or two), so a root that cannot give pairs fails before Ray.
SCAN_ON_RAY_FROM = 64


def scan_batch(batch: dict[str, Any], root: RunRoot, masks: str, min_part_pixels: int,
               min_shared_points: int) -> dict[str, list]:
    """CPU task: a batch of manifest rows (JSON) -> their catalogue scans (JSON)."""
    reader = RootReader(root)
    rows = [json.loads(str(text)) for text in batch["row"]]
    out = []
    for row in rows:
        try:
            scan = scan_asset(reader, row, masks, min_part_pixels=min_part_pixels,
                              min_shared_points=min_shared_points)
        except (OSError, KeyError, ValueError) as err:
            raise RuntimeError(f"train: scanning asset {row['asset_id']} for the catalogue: "
                               f"{type(err).__name__}: {err}") from err
        out.append("" if scan is None else json.dumps(scan.to_json()))
    return {"asset_id": [row["asset_id"] for row in rows], "scan": out}


def scan_on_ray(config: TrainJob, root: RunRoot, rows: list[dict]) -> list[AssetScan | None]:
    """The catalogue scan of the training assets as one Ray Data stream of CPU tasks (the
    order of the scans follows `rows`, so the catalogue is the sequential one)."""
    import ray.data
    ensure_ray(config.ray.model_copy(update={"include_dashboard": True}))
    ds = ray.data.from_items([{"row": json.dumps(row, default=float)} for row in rows])
    ds = map_tasks(ds, scan_batch, SCAN_RESOURCES, root=root, masks=config.train.masks,
                   min_part_pixels=config.train.min_part_pixels,
                   min_shared_points=config.train.min_shared_points)
    found = {str(r["asset_id"]): str(r["scan"]) for r in ds.take_all()}
    return [AssetScan.from_json(json.loads(found[row["asset_id"]]))
            if found[row["asset_id"]] else None for row in rows]


@dataclass(frozen=True)
class TrainJobReport:
    train: TrainReport

    def summary_lines(self) -> list[str]:
        t = self.train
        rows = [("run", t.name), ("steps", f"{t.steps}" + (f" (resumed from {t.resumed_from})"
                                                          if t.resumed_from else "")),
                ("steps/s (training)", f"{t.steps_per_s:.2f}"),
                ("last loss", "-" if t.last_loss is None else f"{t.last_loss:.4f}"),
                ("best val PCK@10", "-" if t.best_score is None else
                 f"{t.best_score:.3f} at step {t.best_step}"),
                ("wall time", f"{t.seconds:.1f} s"), ("output", t.run + "/"),
                ("model", "--model " + (f"train/{t.name}" if t.run.endswith(f"runs/train/{t.name}")
                                        else t.run))]
        width = max(len(k) for k, _ in rows)
        return [f"  {k.ljust(width)}  {v}" for k, v in rows]


def run_train(config: TrainJob, run: str | None = None,
              callbacks: list[Any] | None = None) -> TrainJobReport:
    """`partlift train`; `run` (a run directory under the root, default runs/train/<name>) and
    Ray Train `callbacks` are what a sweep's trial sets."""
    root = RunRoot(config.root, config.storage.options())
    root.check_reachable(create=False)
    record = config_record(config)
    name = config.job.name or default_run_name("dfc", record)
    run = run or run_path("train", name)
    backbone = None
    if config.train.input == "backbone":
        options = config.lift.backbone
        options.check_available()
        backbone = {"name": options.name, "model_path": options.model_path,
                    "stride": options.stride, "allow_download": options.allow_download,
                    "fingerprint": options.fingerprint("lift.backbone")}
    # one writer per run (the stages' lease): another live `partlift train` of this name is refused
    with hold(root, [run], name, timeout_s=config.job.lease_timeout_s,
              force=config.job.force) as leases:
        if config.job.overwrite and root.exists(f"{run}/run.json"):
            root.fs.delete_dir(root.path(run))  # --overwrite: start the run over
            print(f"train: removed {root.display(run)}/ (--overwrite)")
        prepared = prepare_run(root, run, name, config.train, config.data, config.eval, record,
                               backbone, progress=lambda line: print(f"train: {line}"),
                               scan=lambda rows: (scan_on_ray(config, root, rows)
                                                  if len(rows) >= SCAN_ON_RAY_FROM else None))
        print(f"train: run {root.display(run)}/" + (" (resuming)" if prepared.resumed else ""))
        # Train V2's controller asks the dashboard's state API about its actors: keep it on
        ensure_ray(config.ray.model_copy(update={"include_dashboard": True}))
        report = TrainJobReport(train_correspondence(prepared, config.train, callbacks))
        if any(lease.lost for lease in leases):
            raise LeaseLostError(f"the lease of {run} on {root.display()} was taken over while "
                                 "this run trained; see `partlift status`")
    print("\ntrain finished:")
    print("\n".join(report.summary_lines()))
    return report
