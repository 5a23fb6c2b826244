"""`partlift render`: every asset of the manifest -> `views/` and `points/` on Ray Data tasks.

Each task renders a batch of assets and writes one shard per table (views first, points last:
the points shard is the commit marker). Resume = skip asset_ids already in `points/` after
removing view shards whose points shard never landed.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from operators.data.assets import read_mesh_file
from operators.geometry.mesh import to_y_up
from operators.geometry.render import render_asset
from operators.settings import ReadLimits, RenderSettings
from operators.store.ids import seed_for
from operators.store.readers import read_manifest
from operators.store.storage import RunRoot, concatenated, make_table, rows_to_columns, shard_name
from operators.store.tables import ASSETS, POINTS, RENDER_OUTPUT, VIEW_ARRAYS, VIEWS
from rayjobs.config import RenderJob
from rayjobs.driver import (AssetErrors, JobContext, Plan, Stage, StageReport, TaskContext,
                            items_dataset, map_tasks, run_stage)

STAGE = "render"
RENDER_FIELDS = ("uri", "face_part", "up_axis", "source")  # manifest fields a render task reads


def _part_labels(face_part: np.ndarray | list | None, face_id: np.ndarray, n_faces: int,
                 asset_id: str) -> np.ndarray:
    """Per-point part index for procedural assets (face_part[face_id]), -1 for scanned meshes."""
    labels = np.asarray(face_part if face_part is not None else [], dtype=np.int16)
    if labels.size == 0:
        return np.full(face_id.shape, -1, dtype=np.int16)
    if labels.size != n_faces:
        raise ValueError(f"asset {asset_id}: manifest has {labels.size} face part labels but the "
                         f"mesh has {n_faces} faces (mesh file changed after `assets make`?)")
    return labels[face_id]


@dataclass
class RenderedBatch:
    """What rendering a batch produced: the ids that worked and their arrays (kept in memory for
    a downstream stage in a streaming pipeline), and the id of the shard set that holds them."""

    ok: list[str]
    assets: list[dict[str, Any]]  # asset_id, views arrays (V, ...), xyz
    commit: str = ""


def render_and_write(batch: dict[str, Any], task: TaskContext, settings: RenderSettings,
                     seed: int, limits: ReadLimits) -> RenderedBatch:
    """Render a batch of assets and write their views/points shard (points last = commit);
    failures go to errors/."""
    root = task.root()
    ids = [str(a) for a in batch["asset_id"]]
    errors = AssetErrors(STAGE, task)

    def render(i: int) -> tuple[Any, Any, np.ndarray]:
        uri = root.resolve(str(batch["uri"][i]))
        # Meshes partlift generated itself need no isolation; every other file gets it.
        trusted = str(batch["source"][i]) == "procedural"
        read = dataclasses.replace(limits, isolate=False) if trusted else limits
        mesh = to_y_up(read_mesh_file(uri, task.storage, read)[0], str(batch["up_axis"][i]))
        rendered, samples = render_asset(mesh, settings, seed_for(seed, ids[i]), name=uri)
        return rendered, samples, _part_labels(batch["face_part"][i], samples.face_id,
                                               mesh.n_faces, ids[i])

    def describe(i: int, err: Exception) -> str:
        uri = str(batch["uri"][i])
        return str(err) if uri in str(err) else f"{uri}: {err}"

    views, points, assets = defaultdict(list), defaultdict(list), []
    for i, (rendered, samples, part) in errors.attempt(range(len(ids)), render, ids.__getitem__,
                                                       describe):
        n_views = rendered.rgb.shape[0]
        views["asset_id"] += [ids[i]] * n_views
        views["view_id"].append(np.arange(n_views, dtype=np.int32))
        for name in VIEW_ARRAYS:
            views[name].append(getattr(rendered, name))
        views["normal"].append(rendered.normal.astype(np.float16))
        points["asset_id"].append(ids[i])
        points["xyz"].append(samples.xyz[None])
        points["normal"].append(samples.normal[None])
        points["face_id"].append(samples.face_id[None])
        points["part"].append(part[None])
        assets.append({"asset_id": ids[i], "xyz": samples.xyz,
                       **{name: getattr(rendered, name) for name in VIEW_ARRAYS}})
    shard = shard_name(ids)
    commit = ""
    if points:
        ok = [a["asset_id"] for a in assets]
        commit = task.commit(RENDER_OUTPUT, shard, {VIEWS.name: make_table(concatenated(views)),
                                                    POINTS.name: make_table(concatenated(points))},
                             assets=ok).id
    errors.write(shard, root)
    return RenderedBatch([a["asset_id"] for a in assets], assets, commit)


def render_batch(batch: dict[str, Any], task: TaskContext, settings: RenderSettings,
                 seed: int, limits: ReadLimits) -> dict[str, list]:
    """Ray Data task of the render stage: one summary row per asset that rendered."""
    result = render_and_write(batch, task, settings, seed, limits)
    return rows_to_columns([{"asset_id": a, "status": "ok"} for a in result.ok])


class RenderStage(Stage[list[dict[str, Any]]]):
    name = STAGE
    outputs = (RENDER_OUTPUT,)

    def check(self, config: RenderJob) -> None:
        config.render.settings()

    def settings(self, config: RenderJob) -> dict[str, dict[str, Any]]:
        return {STAGE: config.render.fingerprint()}

    def read_input(self, root: RunRoot, config: RenderJob) -> list[dict[str, Any]]:
        manifest = read_manifest(root, RENDER_FIELDS)
        if not manifest:
            raise FileNotFoundError(f"render: no assets under {root.display(ASSETS.name)}/; "
                                    "run `partlift assets make` or `partlift assets scan` first")
        return manifest

    def plan(self, ctx: JobContext, source: list[dict[str, Any]]) -> Plan:
        done = ctx.outputs[STAGE].by_asset
        items = sorted((r for r in source if r["asset_id"] not in done),
                       key=lambda r: r["asset_id"])
        return Plan(items, input_count=len(source), skipped_done=len(source) - len(items))

    def execute(self, ctx: JobContext, plan: Plan) -> Iterable[dict[str, Any]]:
        cfg = ctx.config.render
        ds = map_tasks(items_dataset(plan.items, cfg.resources.render.batch_size), render_batch,
                       cfg.resources.render, task=ctx.task, settings=cfg.settings(),
                       seed=cfg.seed, limits=cfg.read_limits())
        return ds.iter_rows()

    def inputs(self, ctx: JobContext) -> dict[str, str]:
        return {ASSETS.name: ctx.root.display(ASSETS.name) + "/"}

    def units(self, ctx: JobContext, plan: Plan, ok: int) -> dict[str, int]:
        return {"views": ok * ctx.config.render.views, "points": ok * ctx.config.render.n_points}


def run_render(config: RenderJob) -> StageReport:
    """Render every asset of the manifest that `points/` does not hold yet."""
    return run_stage(config, RenderStage())
