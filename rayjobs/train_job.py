"""`partlift train`: dense functional-correspondence training on Ray Train (DFC §4.2-4.3).

    check the data, splits, catalogue, pair plan, validation pairs, text embeddings (driver,
    before Ray) -> TorchTrainer (training.trainer) running training.loop on every rank

The run lives at `<root>/runs/train/<name>/` (training.runs). Re-running with the same name
resumes from its last checkpoint; settings that change what is trained are refused then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from operators.store.lease import LeaseLostError, hold
from operators.store.storage import RunRoot
from rayjobs.config import TrainJob
from rayjobs.driver import ensure_ray
from training.correspondence import TrainReport, prepare_run, train_correspondence
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
                ("model", f"--model train/{t.name}")]
        width = max(len(k) for k, _ in rows)
        return [f"  {k.ljust(width)}  {v}" for k, v in rows]


def run_train(config: TrainJob) -> TrainJobReport:
    root = RunRoot(config.root, config.storage.options())
    root.check_reachable(create=False)
    record = config_record(config)
    name = config.job.name or default_run_name("dfc", record)
    run = run_path("train", name)
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
                               backbone, progress=lambda line: print(f"train: {line}"))
        print(f"train: run {root.display(run)}/" + (" (resuming)" if prepared.resumed else ""))
        # Train V2's controller asks the dashboard's state API about its actors: keep it on
        ensure_ray(config.ray.model_copy(update={"include_dashboard": True}))
        report = TrainJobReport(train_correspondence(prepared, config.train))
        if any(lease.lost for lease in leases):
            raise LeaseLostError(f"the lease of {run} on {root.display()} was taken over while "
                                 "this run trained; see `partlift status`")
    print("\ntrain finished:")
    print("\n".join(report.summary_lines()))
    return report
