"""`partlift affordanceclip`: AffordanceCLIP's FPN on Ray Train (training.affordanceclip_train)
with the shared trainer driver, at `<root>/runs/affordanceclip/<name>/`; the same name again
resumes from the last checkpoint, settings that change what is trained are refused."""

from __future__ import annotations

from typing import Any

from rayjobs.cmat_job import CmatJobReport, _run
from rayjobs.config import AffordanceClipJob
from training.affordanceclip_train import MODEL_KIND, prepare_affordanceclip

# may change on a resume: they do not change what a step trains on
RESUMABLE = {"keep_checkpoints", "max_failures", "cpus_per_worker"}


def config_record(config: AffordanceClipJob) -> dict[str, Any]:
    out = {f"affordanceclip.{k}": v
           for k, v in config.affordanceclip.model_dump(mode="json").items()
           if k not in RESUMABLE}
    return out | {f"data.{k}": v for k, v in config.data.model_dump(mode="json").items()}


def run_affordanceclip(config: AffordanceClipJob, run: str | None = None,
                       callbacks: list[Any] | None = None) -> CmatJobReport:
    record = config_record(config)
    return _run(config, MODEL_KIND, "aclip", record,  # type: ignore[arg-type]
                lambda root, run, name: prepare_affordanceclip(
                    root, run, name, config.affordanceclip, config.data, record,
                    progress=lambda line: print(f"affordanceclip: {line}")),
                run, callbacks)
