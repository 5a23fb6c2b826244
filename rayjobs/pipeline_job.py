"""`partlift run`: render -> label and/or lift in ONE Ray Data stream (DESIGN 1).

Rendered arrays flow straight from the render tasks to the model actors (grounding or backbone)
and on to the CPU tasks that aggregate and write; views/ and points/ are still written (they are
outputs people keep) but not read back. Assets rendered earlier but not yet processed by the
downstream stage join the stream from storage, so a run resumes wherever the last one stopped.
With stages [render, label, lift], render -> label streams and lift follows from storage.
"""

from __future__ import annotations

import time
from typing import Any

import ray.data

from operators.settings import RenderSettings
from operators.store.storage import RunRoot, StorageOptions
from rayjobs.assets_job import ASSETS_TABLE
from rayjobs.config import PartliftConfig
from rayjobs.label_job import LABEL_OUTPUT, add_label_stages, check_label_config, run_label
from rayjobs.lift_job import LIFT_OUTPUT, add_lift_stages, check_lift_config, run_lift
from rayjobs.render_job import (POINTS_TABLE, RENDER_OUTPUT, VIEWS_TABLE, render_and_write,
                                run_render)
from rayjobs.resources import map_batches_args
from rayjobs.runtime import StageReport, ensure_ray, finish_stage, new_job_id
from rayjobs.streams import (asset_row, items_dataset, load_views_batch, manifest_rows,
                             shard_index, stacked_columns, stream_report)

STAGE = "pipeline"


def render_emit_batch(batch: dict[str, Any], root_uri: str, storage: StorageOptions,
                      settings: RenderSettings, seed: int, job_id: str) -> dict[str, Any]:
    """Render task of the stream: writes views/points like `partlift render`, then passes the
    arrays on instead of a summary."""
    result = render_and_write(batch, RunRoot(root_uri, storage), storage, settings, seed, job_id)
    position = {str(a): i for i, a in enumerate(batch["asset_id"])}
    return stacked_columns([asset_row(batch, position[a["asset_id"]], a) for a in result.assets])


def run_pipeline(config: PartliftConfig) -> list[StageReport]:
    stages = config.pipeline.stages
    single = {"render": run_render, "label": run_label, "lift": run_lift}
    if stages[0] != "render" or len(stages) == 1:  # nothing to stream: run the stages in turn
        return [single[stage](config) for stage in stages]
    downstream = stages[1]
    if "label" in stages:  # check every stage before the first one starts
        check_label_config(config.label)
    if "lift" in stages:
        check_lift_config(config.lift)
    reports = [stream_after_render(config, downstream)]
    reports += [single[stage](config) for stage in stages[2:]]
    return reports


def stream_after_render(config: PartliftConfig, downstream: str) -> StageReport:
    """render -> `downstream` (label or lift) as one Ray Data stream."""
    if downstream == "label":
        check_label_config(config.label)
        output, add_stages, record_dir = LABEL_OUTPUT, add_label_stages, "labels"
        batch_size = config.label.aggregate.batch_size
    else:
        check_lift_config(config.lift)
        output, add_stages, record_dir = LIFT_OUTPUT, add_lift_stages, "features"
        batch_size = config.lift.project.batch_size
    root = RunRoot(config.root, config.storage.options())
    root.check_reachable(create=False)
    manifest = manifest_rows(root, extra=("uri", "up_axis"))  # render needs the files
    if not manifest:
        raise FileNotFoundError(f"run: no assets under {root.display(ASSETS_TABLE)}/; run "
                                "`partlift assets make` or `partlift assets scan` first")
    ensure_ray(config.ray)
    started = time.time()
    job_id = new_job_id(STAGE)
    _, removed = RENDER_OUTPUT.prepare(root, config.job.overwrite)
    done, removed_downstream = output.prepare(root, config.job.overwrite)
    points_index, views_index = shard_index(root, POINTS_TABLE), shard_index(root, VIEWS_TABLE)
    todo = [r for r in manifest if r["asset_id"] not in done]
    to_render = sorted((r for r in todo if r["asset_id"] not in points_index),
                       key=lambda r: r["asset_id"])
    to_load = sorted(({**r, "points_shard": points_index[r["asset_id"]],
                       "views_shard": views_index[r["asset_id"]]} for r in todo
                      if r["asset_id"] in points_index),
                     key=lambda r: (r["views_shard"], r["asset_id"]))
    storage = config.storage.options()
    sources: list[ray.data.Dataset] = []
    if to_render:
        sources.append(items_dataset(to_render, config.render.resources.batch_size).map_batches(
            render_emit_batch, fn_kwargs={"root_uri": config.root, "storage": storage,
                                          "settings": config.render.settings(),
                                          "seed": config.render.seed, "job_id": job_id},
            batch_format="numpy", **map_batches_args(config.render.resources, actors=False)))
    if to_load:
        sources.append(items_dataset(to_load, batch_size).map_batches(
            load_views_batch, fn_kwargs={"root_uri": config.root, "storage": storage,
                                         "job_id": job_id, "stage": downstream},
            batch_format="numpy", **map_batches_args(config.render.resources, actors=False)))
    summaries: list[dict] = []
    if sources:
        stream = sources[0] if len(sources) == 1 else sources[0].union(sources[1])
        summaries = add_stages(stream, config, job_id).take_all()
    report = stream_report(
        root, f"{STAGE} render->{downstream}", job_id, started, summaries, len(manifest),
        len(manifest) - len(todo),
        inputs={ASSETS_TABLE: root.display(ASSETS_TABLE) + "/"},
        outputs={t: root.display(t) + "/" for t in (*RENDER_OUTPUT.tables, *output.tables)},
        removed=removed + removed_downstream,
        units={"rendered in this run": len(to_render), "loaded from storage": len(to_load)})
    root.write_json(f"{VIEWS_TABLE}/_job.json", report.to_json(config))
    return finish_stage(root, config, report, record_dir)
