"""`partlift render`: every asset of the manifest -> `views/` and `points/` on Ray Data tasks.

Each task renders a batch of assets and writes one shard per table (views first, points last:
the points shard is the commit marker). Resume = skip asset_ids already in `points/` after
removing view shards whose points shard never landed.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from operators.data.assets import read_mesh_file
from operators.geometry.mesh import to_y_up
from operators.settings import RenderSettings
from operators.geometry.render import render_asset
from operators.store.storage import RunRoot, StorageOptions, make_table, shard_name
from rayjobs.assets_job import ASSETS_TABLE
from rayjobs.config import PartliftConfig
from rayjobs.runtime import (StageReport, StageTables, ensure_ray, error_row, finish_stage,
                             new_job_id, run_batches, seed_for, summarise_rows, write_errors)

VIEWS_TABLE = "views"
POINTS_TABLE = "points"
STAGE = "render"
RENDER_OUTPUT = StageTables(STAGE, (VIEWS_TABLE, POINTS_TABLE), commit=POINTS_TABLE)
# Per-view arrays a downstream stage needs (normals stay in the table only).
VIEW_ARRAYS = ("rgb", "depth", "mask", "face_id", "K", "cam_to_world")


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
    """What rendering a batch produced: per-asset summaries and, for the assets that worked,
    their arrays (kept in memory for a downstream stage in a streaming pipeline)."""

    summaries: list[dict]
    assets: list[dict[str, Any]]  # asset_id, views arrays (V, ...), xyz


def render_and_write(batch: dict[str, Any], root: RunRoot, storage: StorageOptions,
                     settings: RenderSettings, seed: int, job_id: str) -> RenderedBatch:
    """Render a batch of assets and write their views/points shard (points last = commit);
    failures go to errors/."""
    views, points = defaultdict(list), defaultdict(list)
    summaries, errors, assets = [], [], []
    ids = [str(a) for a in batch["asset_id"]]
    for asset_id, uri, face_part, up_axis in zip(ids, batch["uri"], batch["face_part"],
                                                 batch["up_axis"]):
        started = time.perf_counter()
        try:
            mesh = to_y_up(read_mesh_file(str(uri), storage)[0], str(up_axis))
            rendered, samples = render_asset(mesh, settings, seed_for(seed, asset_id), name=uri)
            part = _part_labels(face_part, samples.face_id, mesh.n_faces, asset_id)
        except Exception as err:  # row-level: recorded in errors/, the batch goes on
            errors.append(error_row(STAGE, job_id, asset_id, f"{uri}: {err}" if uri not in str(err)
                                    else err, error_type=type(err).__name__))
            summaries.append({"asset_id": asset_id, "status": "failed",
                              "error_type": type(err).__name__, "message": str(err)[:2000],
                              "seconds": time.perf_counter() - started})
            continue
        n_views = rendered.rgb.shape[0]
        views["asset_id"] += [asset_id] * n_views
        views["view_id"].append(np.arange(n_views, dtype=np.int32))
        for name in VIEW_ARRAYS:
            views[name].append(getattr(rendered, name))
        views["normal"].append(rendered.normal.astype(np.float16))
        points["asset_id"].append(asset_id)
        points["xyz"].append(samples.xyz[None])
        points["normal"].append(samples.normal[None])
        points["face_id"].append(samples.face_id[None])
        points["part"].append(part[None])
        summaries.append({"asset_id": asset_id, "status": "ok", "error_type": "", "message": "",
                          "seconds": time.perf_counter() - started})
        assets.append({"asset_id": asset_id, "xyz": samples.xyz,
                       **{name: getattr(rendered, name) for name in VIEW_ARRAYS}})
    shard = shard_name(ids)
    if points:
        tables = {
            VIEWS_TABLE: make_table({k: v if k == "asset_id" else np.concatenate(v)
                                     for k, v in views.items()}),
            POINTS_TABLE: make_table({k: v if k == "asset_id" else np.concatenate(v)
                                      for k, v in points.items()}),
        }
        root.write_shard_set(shard, tables, commit_table=POINTS_TABLE)
    write_errors(root, STAGE, job_id, shard, errors)
    return RenderedBatch(summaries, assets)


def render_batch(batch: dict[str, Any], root_uri: str, storage: StorageOptions,
                 settings: RenderSettings, seed: int, job_id: str) -> dict[str, list]:
    """Ray Data task of the render stage: one summary row per asset (ok or failed)."""
    result = render_and_write(batch, RunRoot(root_uri, storage), storage, settings, seed, job_id)
    return {k: [s[k] for s in result.summaries] for k in result.summaries[0]}


def run_render(config: PartliftConfig) -> StageReport:
    root = RunRoot(config.root, config.storage.options())
    root.check_reachable(create=False)
    settings = config.render.settings()
    manifest = root.read_table(ASSETS_TABLE, columns=["asset_id", "uri", "face_part", "up_axis"])
    if manifest is None or manifest.num_rows == 0:
        raise FileNotFoundError(f"render: no assets under {root.display(ASSETS_TABLE)}/; "
                                "run `partlift assets make` or `partlift assets scan` first")
    ensure_ray(config.ray)  # before the clock: throughput excludes cluster start-up
    started = time.time()
    job_id = new_job_id(STAGE)
    done, removed = RENDER_OUTPUT.prepare(root, config.job.overwrite)
    items = [row for row in manifest.to_pylist() if row["asset_id"] not in done]
    items.sort(key=lambda row: row["asset_id"])
    summaries = run_batches(items, render_batch,
                            {"root_uri": config.root, "storage": config.storage.options(),
                             "settings": settings, "seed": config.render.seed, "job_id": job_id},
                            config.render.resources)
    ok, failed, types, examples = summarise_rows(summaries)
    report = StageReport(
        stage=STAGE, job_id=job_id, root=config.root,
        inputs={"assets": root.display(ASSETS_TABLE) + "/"},
        outputs={VIEWS_TABLE: root.display(VIEWS_TABLE) + "/",
                 POINTS_TABLE: root.display(POINTS_TABLE) + "/"},
        started=started, ended=time.time(), input_count=manifest.num_rows,
        skipped_done=manifest.num_rows - len(items), ok=ok, failed=failed,
        units={"views": ok * settings.views, "points": ok * settings.n_points},
        error_types=types, error_examples=examples, removed_uncommitted=removed)
    return finish_stage(root, config, report, VIEWS_TABLE)
