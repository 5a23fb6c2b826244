"""`partlift run`: render -> label and/or lift in ONE Ray Data stream (DESIGN 1).

Rendered arrays flow straight from the render tasks to the model actors (grounding or backbone)
and on to the CPU tasks that aggregate and write; views/ and points/ are still written (they are
outputs people keep) but not read back. Assets rendered earlier but not yet processed by the
downstream stage join the stream from storage, so a run resumes wherever the last one stopped.
With stages [render, label, lift], render -> label streams and lift follows from storage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import ray
import ray.data

from operators.settings import ReadLimits, RenderSettings
from operators.store.readers import read_manifest
from operators.store.storage import RunRoot
from operators.store.tables import ASSETS, POINTS, RENDER_OUTPUT, VIEWS
from rayjobs.config import PipelineJob
from rayjobs.driver import (JobContext, Plan, Stage, StageReport, TaskContext, items_dataset,
                            map_tasks, run_stage)
from rayjobs.label_job import LabelStage
from rayjobs.lift_job import LiftStage
from rayjobs.render_job import RENDER_FIELDS, RenderStage, render_and_write
from rayjobs.streams import (STREAM_FIELDS, RenderedAssets, RenderedAssetsStage, asset_row,
                             downstream_plan,
                             load_stream, stacked_columns)

SINGLE_STAGES: dict[str, Stage[Any]] = {"render": RenderStage(), "label": LabelStage(),
                                        "lift": LiftStage()}


def render_emit_batch(batch: dict[str, Any], task: TaskContext, settings: RenderSettings,
                      seed: int, limits: ReadLimits) -> dict[str, Any]:
    """Render task of the stream: writes views/points like `partlift render`, then passes the
    arrays on instead of a summary."""
    result = render_and_write(batch, task, settings, seed, limits)
    position = {str(a): i for i, a in enumerate(batch["asset_id"])}
    return stacked_columns([asset_row(batch, position[a["asset_id"]], a, result.commit)
                            for a in result.assets])


class RenderThen(Stage[list[dict[str, Any]]]):
    """render -> the `downstream` stages (label, lift, or label then lift) as one stream: new
    assets are rendered in it, rendered ones are read back from storage; each row is flagged
    with the stages it still needs (`todo_<stage>`), and each stage passes the others on."""

    id_prefix = "pipeline"

    def __init__(self, downstream: Sequence[RenderedAssetsStage]) -> None:
        self.downstream = list(downstream)
        self.name = "pipeline " + "->".join(["render", *(s.name for s in self.downstream)])
        self.outputs = (RENDER_OUTPUT, *(o for s in self.downstream for o in s.outputs))

    def check(self, config: PipelineJob) -> None:
        RenderStage().check(config)
        for stage in self.downstream:
            stage.check(config)

    def settings(self, config: PipelineJob) -> dict[str, dict[str, Any]]:
        merged = RenderStage().settings(config)
        for stage in self.downstream:
            merged.update(stage.settings(config))
        return merged

    def read_input(self, root: RunRoot, config: PipelineJob) -> list[dict[str, Any]]:
        manifest = read_manifest(root, [*STREAM_FIELDS, *RENDER_FIELDS])  # render reads the files
        if not manifest:
            raise FileNotFoundError(f"run: no assets under {root.display(ASSETS.name)}/; run "
                                    "`partlift assets make` or `partlift assets scan` first")
        return manifest

    def plan(self, ctx: JobContext, manifest: list[dict[str, Any]]) -> Plan:
        # What is rendered after the render output was prepared; the rest is rendered here.
        source = RenderedAssets(manifest, ctx.outputs["render"])
        plans = {s.name: downstream_plan(ctx, s.outputs[0], source, renders_here=True)
                 for s in self.downstream}
        rendered = ctx.outputs["render"].by_asset
        needs = {name: {r["asset_id"] for r in plan.items} for name, plan in plans.items()}
        flags = lambda asset: {f"todo_{name}": (asset not in rendered or asset in needs[name])  # noqa: E731
                               for name in needs}
        to_render = sorted(({**r, **flags(r["asset_id"])} for r in manifest
                            if r["asset_id"] not in rendered), key=lambda r: r["asset_id"])
        wanted = set().union(*needs.values())
        to_load = source.load_items({**r, **flags(r["asset_id"])} for r in manifest
                                    if r["asset_id"] in wanted)
        return Plan(to_render + to_load, input_count=len(manifest),
                    skipped_done=len(manifest) - len(to_render) - len(to_load),
                    notes=[n for plan in plans.values() for n in plan.notes],
                    extra={"to_render": to_render, "to_load": to_load,
                           "per_stage": {name: len(to_render) + len(need)
                                         for name, need in needs.items()}})

    def execute(self, ctx: JobContext, plan: Plan) -> Iterable[dict[str, Any]]:
        config, note = fit_actors(ctx.config, [s.name for s in self.downstream])
        if note:
            print(f"note: {note}")
        ctx = dataclasses.replace(ctx, config=config)
        render = ctx.config.render
        sources: list[ray.data.Dataset] = []
        if plan.extra["to_render"]:
            sources.append(map_tasks(
                items_dataset(plan.extra["to_render"], render.resources.render.batch_size),
                render_emit_batch, render.resources.render, task=ctx.task,
                settings=render.settings(), seed=render.seed, limits=render.read_limits()))
        if plan.extra["to_load"]:
            first = self.downstream[0]
            sources.append(load_stream(plan.extra["to_load"], ctx.task, first.name,
                                       first.load_resources(ctx.config)))
        stream = sources[0] if len(sources) == 1 else sources[0].union(sources[1])
        for i, stage in enumerate(self.downstream):
            stream = stage.add_steps(stream, ctx, forward=i < len(self.downstream) - 1)
        return stream.iter_rows()

    def inputs(self, ctx: JobContext) -> dict[str, str]:
        settings = {k: v for s in self.downstream for k, v in s.inputs(ctx).items()
                    if k not in (VIEWS.name, POINTS.name)}  # e.g. the backend or backbone
        return {ASSETS.name: ctx.root.display(ASSETS.name) + "/", **settings}

    def units(self, ctx: JobContext, plan: Plan, ok: int) -> dict[str, int]:
        return {"rendered in this run": len(plan.extra["to_render"]),
                "loaded from storage": len(plan.extra["to_load"])}


ACTOR_STEPS = {"label": "grounding", "lift": "backbone"}  # each stage's model actor pool


def fit_actors(config: PipelineJob, stages: Sequence[str]) -> tuple[PipelineJob, str]:
    """Model actors of several stages in one stream hold their CPUs for the whole run; when
    they would take every CPU of the cluster, the tasks that feed them (render, load) could
    never run. Then their CPU requests are scaled down to leave one CPU to the tasks."""
    total = float(ray.cluster_resources().get("CPU", 0.0))
    steps = {s: getattr(getattr(config, s).resources, ACTOR_STEPS[s]) for s in stages}
    wanted = sum(step.num_cpus * (step.concurrency or 1) for step in steps.values())
    if len(steps) < 2 or wanted <= total - 1:
        return config, ""
    scale = max(total - 1.0, 0.2) / wanted
    for stage, step in steps.items():
        section = getattr(config, stage)
        resources = section.resources.model_copy(update={ACTOR_STEPS[stage]: step.model_copy(
            update={"num_cpus": max(0.05, round(step.num_cpus * scale, 2))})})
        config = config.model_copy(update={stage: section.model_copy(update={"resources": resources})})
    return config, (f"the stream's model actors ask for {wanted:g} of the cluster's {total:g} "
                    f"CPUs: they get {scale:.2f} of their request, so the render and load tasks "
                    "keep a CPU (set label/lift.resources.*.num_cpus to choose)")


def run_pipeline(config: PipelineJob) -> list[StageReport]:
    """The stages of `pipeline.stages` in one stream when they start with render (every
    stage's settings are checked before the first one starts); otherwise in turn."""
    stages = config.pipeline.stages
    for name in stages:
        SINGLE_STAGES[name].check(config)
    if stages[0] != "render" or len(stages) == 1:  # nothing to stream: run the stages in turn
        return [run_stage(config, SINGLE_STAGES[name], check=False) for name in stages]
    downstream = [SINGLE_STAGES[name] for name in stages[1:]]
    assert all(isinstance(s, RenderedAssetsStage) for s in downstream)
    return [run_stage(config, RenderThen(downstream), check=False)]  # type: ignore[arg-type]
