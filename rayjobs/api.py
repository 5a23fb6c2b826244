"""partlift from Python: every job as a function of a config object (the CLI is a thin layer over
these). Build a config with the job's model (keyword sections, dicts or section objects) or with
`load_config(files, overrides, model=...)`, then call the job; each returns what the CLI prints
(a `StageReport`, or a list of them).

    from rayjobs.api import RenderJob, render
    report = render(RenderJob(root="./run", render={"views": 8, "n_points": 20_000}))
    print(report.ok, report.failed, report.outputs)

Jobs start a private local Ray unless `ray.address` (or RAY_ADDRESS) names a cluster, and leave
it running for the next call in the same process (`ray.shutdown()` to stop it). This module is
light to import: Ray, open3d and torch load when a job runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rayjobs.config import (AffordanceClipJob, AssetsJob, DemoJob, EvalJob, FinetuneJob,
                            LabelJob, LiftJob, PipelineJob, PretrainJob, RenderJob, ScoreJob, StatusJob, SweepJob,
                            TrainJob, load_config)

if TYPE_CHECKING:
    from rayjobs.cmat_job import CmatJobReport
    from rayjobs.driver import StageReport
    from rayjobs.eval_job import EvalReport
    from rayjobs.score_job import QueryReport
    from rayjobs.sweep_job import SweepReport
    from rayjobs.train_job import TrainJobReport

__all__ = ["AssetsJob", "RenderJob", "LabelJob", "LiftJob", "PipelineJob", "TrainJob",
           "PretrainJob", "FinetuneJob", "EvalJob", "DemoJob", "StatusJob", "load_config",
           "assets_make", "assets_scan", "render", "label", "lift", "run", "train", "pretrain",
           "finetune", "sweep", "SweepJob", "evaluate", "ScoreJob", "score", "demo", "status",
           "migrate", "AffordanceClipJob", "affordanceclip"]


def assets_make(config: AssetsJob) -> "StageReport":
    """Procedural assets into the manifest (`partlift assets make`)."""
    from rayjobs.assets_job import run_assets_make
    return run_assets_make(config)


def assets_scan(config: AssetsJob) -> "StageReport":
    """Mesh files under `assets.input` into the manifest (`partlift assets scan`)."""
    from rayjobs.assets_job import run_assets_scan
    return run_assets_scan(config)


def render(config: RenderJob) -> "StageReport":
    """Views and surface points of every asset (`partlift render`)."""
    from rayjobs.render_job import run_render
    return run_render(config)


def label(config: LabelJob) -> "StageReport":
    """Functional-part pseudo-labels of every rendered asset (`partlift label`)."""
    from rayjobs.label_job import run_label
    return run_label(config)


def lift(config: LiftJob) -> "StageReport":
    """Backbone features lifted onto every rendered asset's points (`partlift lift`)."""
    from rayjobs.lift_job import run_lift
    return run_lift(config)


def run(config: PipelineJob) -> list["StageReport"]:
    """The stages of `pipeline.stages` streamed together (`partlift run`)."""
    from rayjobs.pipeline_job import run_pipeline
    return run_pipeline(config)


def train(config: TrainJob) -> "TrainJobReport":
    """Dense functional-correspondence training on Ray Train (`partlift train`); the same
    job.name resumes."""
    from rayjobs.train_job import run_train
    return run_train(config)


def pretrain(config: PretrainJob) -> "CmatJobReport":
    """CMAT pretraining of the point encoder on Ray Train (`partlift pretrain`)."""
    from rayjobs.cmat_job import run_pretrain
    return run_pretrain(config)


def finetune(config: FinetuneJob) -> "CmatJobReport":
    """CAST on a pretrained or scratch encoder on Ray Train (`partlift finetune`)."""
    from rayjobs.cmat_job import run_finetune
    return run_finetune(config)


def affordanceclip(config: AffordanceClipJob) -> "CmatJobReport":
    """AffordanceCLIP's FPN on referring composites, on Ray Train (`partlift affordanceclip`)."""
    from rayjobs.affordanceclip_job import run_affordanceclip
    return run_affordanceclip(config)


def sweep(config: SweepJob) -> "SweepReport":
    """A Ray Tune search over a learning job's settings (`partlift sweep`); the same name
    resumes an unfinished sweep."""
    from rayjobs.sweep_job import run_sweep
    return run_sweep(config)


def evaluate(config: EvalJob, models: list[str], benchmark: str = "dfc", name: str | None = None,
             checkpoint: str = "best", data: str | None = None) -> "EvalReport":
    """A benchmark on trained models and the baselines (`partlift eval`); `data` = the
    dataset directory or "procedural" for soco, instructpart, agd20k."""
    from rayjobs.eval_job import run_eval
    return run_eval(config, models, benchmark=benchmark, name=name, checkpoint=checkpoint,
                    data=data)


def score(config: ScoreJob) -> tuple["StageReport", "QueryReport | None"]:
    """Score the root's rendered assets with trained models (`partlift score`)."""
    from rayjobs.score_job import run_score
    return run_score(config)


def demo(config: DemoJob) -> list["StageReport"]:
    """The embedded default end to end, with pictures (`partlift demo`)."""
    from rayjobs.demo import run_demo
    return run_demo(config)


def migrate(config: StatusJob) -> list[str]:
    """Upgrade a run root of an older format in place (`partlift migrate`); what it did."""
    from rayjobs.migrate import migrate as run_migrate
    return run_migrate(config)


def status(config: StatusJob, verify: bool = False, repair: bool = False) -> None:
    """Print what a run root holds (`partlift status`; `verify` reads every shard, `repair`
    also removes the shard sets that fail)."""
    from rayjobs.status import print_status
    print_status(config, check_all=verify, repair=repair)
