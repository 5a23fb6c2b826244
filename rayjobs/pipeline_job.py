"""`partlift run`: render -> label and/or lift in ONE Ray Data stream (DESIGN 1).

Rendered arrays flow straight from the render tasks to the model actors (grounding or backbone)
and on to the CPU tasks that aggregate and write; views/ and points/ are still written (they are
outputs people keep) but not read back. Assets rendered earlier but not yet processed by the
downstream stage join the stream from storage, so a run resumes wherever the last one stopped.
With stages [render, label, lift], render -> label streams and lift follows from storage.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

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
    """render -> `downstream` (label or lift) as one stream: new assets are rendered in it,
    rendered but unprocessed ones are read back from storage."""

    id_prefix = "pipeline"

    def __init__(self, downstream: RenderedAssetsStage) -> None:
        self.downstream = downstream
        self.name = f"pipeline render->{downstream.name}"
        self.outputs = (RENDER_OUTPUT, *downstream.outputs)

    def check(self, config: PipelineJob) -> None:
        RenderStage().check(config)
        self.downstream.check(config)

    def settings(self, config: PipelineJob) -> dict[str, dict[str, Any]]:
        return {**RenderStage().settings(config), **self.downstream.settings(config)}

    def read_input(self, root: RunRoot, config: PipelineJob) -> list[dict[str, Any]]:
        manifest = read_manifest(root, [*STREAM_FIELDS, *RENDER_FIELDS])  # render reads the files
        if not manifest:
            raise FileNotFoundError(f"run: no assets under {root.display(ASSETS.name)}/; run "
                                    "`partlift assets make` or `partlift assets scan` first")
        return manifest

    def plan(self, ctx: JobContext, manifest: list[dict[str, Any]]) -> Plan:
        # What is rendered after the render output was prepared; the rest is rendered here.
        downstream = downstream_plan(ctx, self.downstream.outputs[0],
                                     RenderedAssets(manifest, ctx.outputs["render"]),
                                     renders_here=True)
        rendered = ctx.outputs["render"].by_asset
        to_render = sorted((r for r in manifest if r["asset_id"] not in rendered),
                           key=lambda r: r["asset_id"])
        to_load = downstream.items
        return Plan(to_render + to_load, input_count=len(manifest),
                    skipped_done=len(manifest) - len(to_render) - len(to_load),
                    notes=downstream.notes,
                    extra={"to_render": to_render, "to_load": to_load})

    def execute(self, ctx: JobContext, plan: Plan) -> Iterable[dict[str, Any]]:
        render = ctx.config.render
        sources: list[ray.data.Dataset] = []
        if plan.extra["to_render"]:
            sources.append(map_tasks(
                items_dataset(plan.extra["to_render"], render.resources.render.batch_size),
                render_emit_batch, render.resources.render, task=ctx.task,
                settings=render.settings(), seed=render.seed, limits=render.read_limits()))
        if plan.extra["to_load"]:
            sources.append(load_stream(plan.extra["to_load"], ctx.task, self.downstream.name,
                                       self.downstream.load_resources(ctx.config)))
        stream = sources[0] if len(sources) == 1 else sources[0].union(sources[1])
        return self.downstream.add_steps(stream, ctx).iter_rows()

    def inputs(self, ctx: JobContext) -> dict[str, str]:
        settings = {k: v for k, v in self.downstream.inputs(ctx).items()
                    if k not in (VIEWS.name, POINTS.name)}  # e.g. the backend or backbone
        return {ASSETS.name: ctx.root.display(ASSETS.name) + "/", **settings}

    def units(self, ctx: JobContext, plan: Plan, ok: int) -> dict[str, int]:
        return {"rendered in this run": len(plan.extra["to_render"]),
                "loaded from storage": len(plan.extra["to_load"])}


def run_pipeline(config: PipelineJob) -> list[StageReport]:
    """The stages of `pipeline.stages`: render and the next one in one stream, the rest in turn
    (every stage's settings are checked before the first one starts)."""
    stages = config.pipeline.stages
    for name in stages:
        SINGLE_STAGES[name].check(config)
    if stages[0] != "render" or len(stages) == 1:  # nothing to stream: run the stages in turn
        return [run_stage(config, SINGLE_STAGES[name], check=False) for name in stages]
    downstream = SINGLE_STAGES[stages[1]]
    assert isinstance(downstream, RenderedAssetsStage)
    reports = [run_stage(config, RenderThen(downstream), check=False)]
    reports += [run_stage(config, SINGLE_STAGES[name], check=False) for name in stages[2:]]
    return reports
