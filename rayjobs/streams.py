"""Streams over rendered assets, shared by the label and lift stages and `partlift run`.

A row of such a stream is one asset: its manifest fields (category, part_names, face_part), its
views stacked (V, ...) and its surface points `xyz`, either rendered in the same stream or read
back from storage by `load_views_batch`. Rows that fail leave the stream; the stage that failed
writes their `errors/` rows, and `stream_report` counts them by job id.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow.compute as pc
import ray.data

from operators.store.storage import RunRoot, StorageOptions, shard_name, table_columns
from rayjobs.assets_job import ASSETS_TABLE
from rayjobs.config import PartliftConfig, StageResources
from rayjobs.render_job import POINTS_TABLE, VIEW_ARRAYS, VIEWS_TABLE
from rayjobs.resources import map_batches_args
from rayjobs.runtime import (ERRORS_TABLE, StageReport, StageTables, ensure_ray, error_row,
                             finish_stage, new_job_id, write_errors)

# What flows from loading/rendering to the model and CPU stages, one row per asset.
STACKED_COLUMNS = (*VIEW_ARRAYS, "xyz")
AddStages = Callable[[ray.data.Dataset, PartliftConfig, str], ray.data.Dataset]


def shard_index(root: RunRoot, table: str) -> dict[str, str]:
    """asset_id -> the shard of `table` that holds it (reads only the asset_id column)."""
    index = {}
    for shard in root.list_shards(table):
        for asset_id in set(root.read_shard(table, shard, ["asset_id"])["asset_id"].to_pylist()):
            index[asset_id] = shard
    return index


def _rows_of(table, asset_id: str):
    return table.filter(pc.equal(table["asset_id"], asset_id))


def _group_by(values: Iterable[Hashable]) -> dict[Hashable, list[int]]:
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for i, value in enumerate(values):
        groups[value].append(i)
    return groups


def load_views_batch(batch: dict[str, np.ndarray], root_uri: str, storage: StorageOptions,
                     job_id: str, stage: str) -> dict[str, Any]:
    """CPU task: one row per asset with its views stacked (V, ...) and its surface points; each
    views/points shard is read once per batch."""
    root = RunRoot(root_uri, storage)
    rows: list[dict[str, Any]] = []
    errors = []
    for (views_shard, points_shard), members in _group_by(
            zip(batch["views_shard"].tolist(), batch["points_shard"].tolist())).items():
        try:
            views = root.read_shard(VIEWS_TABLE, views_shard, ["asset_id", "view_id", *VIEW_ARRAYS])
            points = root.read_shard(POINTS_TABLE, points_shard, ["asset_id", "xyz"])
        except Exception as err:  # the shard is unreadable: every asset in it fails
            errors += [error_row(stage, job_id, batch["asset_id"][i],
                                 f"shard {views_shard}/{points_shard}: {err}") for i in members]
            continue
        for i in members:
            asset_id = batch["asset_id"][i]
            cols = table_columns(_rows_of(views, asset_id).sort_by("view_id"))
            xyz = table_columns(_rows_of(points, asset_id), ["xyz"])["xyz"][0]
            rows.append(asset_row(batch, i, {**{n: cols[n] for n in VIEW_ARRAYS}, "xyz": xyz}))
    write_errors(root, stage, job_id, shard_name(e["asset_id"] for e in errors) if errors else "",
                 errors)
    return stacked_columns(rows)


def asset_row(batch: dict[str, Any], i: int, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The label stream's row for asset i of a manifest batch."""
    return {"asset_id": str(batch["asset_id"][i]), "category": str(batch["category"][i]),
            "part_names": [str(p) for p in batch["part_names"][i]],
            "face_part": np.asarray(batch["face_part"][i], dtype=np.int16), **arrays}


def stacked_columns(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {}
    return {k: (np.stack([r[k] for r in rows]) if k in STACKED_COLUMNS else [r[k] for r in rows])
            for k in rows[0]}


def items_dataset(items: list[dict], batch_size: int) -> ray.data.Dataset:
    return ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // batch_size)))


def _job_errors(root: RunRoot, job_id: str) -> list[dict]:
    table = root.read_table(ERRORS_TABLE, columns=["job_id", "asset_id", "error_type", "message"])
    if table is None:
        return []
    return table.filter(pc.equal(table["job_id"], job_id)).to_pylist()


def stream_report(root: RunRoot, stage: str, job_id: str, started: float, summaries: list[dict],
                  input_count: int, skipped: int, inputs: dict[str, str],
                  outputs: dict[str, str], removed: list[str],
                  units: dict[str, int] | None = None) -> StageReport:
    """Report of a stream whose failed rows leave it: ok from the summaries, failures from the
    errors/ rows of this job (every stage of the stream writes its own)."""
    failures = _job_errors(root, job_id)
    types: dict[str, int] = defaultdict(int)
    for f in failures:
        types[f["error_type"]] += 1
    return StageReport(
        stage=stage, job_id=job_id, root=root.display(), inputs=inputs, outputs=outputs,
        started=started, ended=time.time(), input_count=input_count, skipped_done=skipped,
        ok=sum(1 for s in summaries if s["status"] == "ok"),
        failed=len({f["asset_id"] for f in failures}), units=units or {},
        error_types=dict(types),
        error_examples=[f"{f['asset_id']}: {f['message']}" for f in failures[:5]],
        removed_uncommitted=removed)


def manifest_rows(root: RunRoot, extra: Sequence[str] = ()) -> list[dict]:
    """The manifest fields a stream row carries (plus `extra` columns), one dict per asset."""
    manifest = root.read_table(ASSETS_TABLE, columns=["asset_id", "category", "part_names",
                                                      "face_part", *extra])
    return [] if manifest is None else manifest.to_pylist()


def run_rendered_stage(config: PartliftConfig, output: StageTables, add_stages: AddStages,
                       resources: StageResources, *, record_dir: str, inputs: Mapping[str, str],
                       units: Callable[[RunRoot, list[dict]], dict[str, int]]) -> StageReport:
    """Run a stage over every rendered asset its output does not hold yet: load views and
    points (CPU tasks), then the stage's own Ray Data steps, then `_job.json` and the summary."""
    stage = output.stage
    root = RunRoot(config.root, config.storage.options())
    root.check_reachable(create=False)
    points_index = shard_index(root, POINTS_TABLE)
    manifest = manifest_rows(root)
    if not manifest or not points_index:
        raise FileNotFoundError(f"{stage}: no rendered assets under {root.display(POINTS_TABLE)}/;"
                                " run `partlift render` first")
    ensure_ray(config.ray)  # before the clock: throughput excludes cluster start-up
    started = time.time()
    job_id = new_job_id(stage)
    views_index = shard_index(root, VIEWS_TABLE)
    done, removed = output.prepare(root, config.job.overwrite)
    rendered = [r for r in manifest if r["asset_id"] in points_index and r["asset_id"] in views_index]
    items = sorted(({**r, "points_shard": points_index[r["asset_id"]],
                     "views_shard": views_index[r["asset_id"]]}
                    for r in rendered if r["asset_id"] not in done),
                   key=lambda r: (r["views_shard"], r["asset_id"]))
    summaries: list[dict] = []
    if items:
        ds = items_dataset(items, resources.batch_size).map_batches(
            load_views_batch, fn_kwargs={"root_uri": config.root,
                                         "storage": config.storage.options(), "job_id": job_id,
                                         "stage": stage},
            batch_format="numpy", **map_batches_args(resources, actors=False))
        summaries = add_stages(ds, config, job_id).take_all()
    report = stream_report(
        root, stage, job_id, started, summaries, len(rendered), len(rendered) - len(items),
        inputs={VIEWS_TABLE: root.display(VIEWS_TABLE) + "/",
                POINTS_TABLE: root.display(POINTS_TABLE) + "/", **inputs},
        outputs={t: root.display(t) + "/" for t in output.tables}, removed=removed,
        units=units(root, summaries))
    return finish_stage(root, config, report, record_dir)
