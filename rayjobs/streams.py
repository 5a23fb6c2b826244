"""Streams over rendered assets, shared by the label and lift stages and `partlift run`.

A row of such a stream is one asset: its manifest fields (category, part_names, face_part), its
views stacked (V, ...) and its surface points `xyz`, either rendered in the same stream or read
back from storage by `load_views_batch`. Rows that fail leave the stream; the step that failed
writes their `errors/` rows (see `rayjobs.driver`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.data

from operators.store.readers import TableReader, read_manifest, shard_index
from operators.store.storage import RunRoot
from operators.store.tables import POINTS, VIEW_ARRAYS, VIEWS
from rayjobs.config import StepResources
from rayjobs.driver import (AssetErrors, JobContext, Plan, Stage, TaskContext, items_dataset,
                            map_tasks)

# What flows from loading/rendering to the model and CPU steps, one row per asset.
STACKED_COLUMNS = (*VIEW_ARRAYS, "xyz")
STREAM_FIELDS = ("category", "part_names", "face_part")  # manifest fields a stream row carries


def load_views_batch(batch: dict[str, np.ndarray], task: TaskContext, stage: str) -> dict[str, Any]:
    """CPU task: one row per asset with its views stacked (V, ...) and its surface points; each
    views/points shard is read once per batch (the items come sorted by shard)."""
    root = task.root()
    ids = [str(a) for a in batch["asset_id"]]
    views = TableReader(root, VIEWS, dict(zip(ids, batch["views_shard"].tolist())))
    points = TableReader(root, POINTS, dict(zip(ids, batch["points_shard"].tolist())))
    errors = AssetErrors(stage, task)

    def load(i: int) -> dict[str, Any]:
        arrays = views.arrays(ids[i], VIEW_ARRAYS)
        return asset_row(batch, i, {**arrays, "xyz": points.arrays(ids[i], ["xyz"])["xyz"][0]})

    rows = [row for _, row in errors.attempt(range(len(ids)), load, asset_of=ids.__getitem__)]
    errors.write(root=root)
    return stacked_columns(rows)


def asset_row(batch: dict[str, Any], i: int, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The stream row of asset i of a manifest batch."""
    return {"asset_id": str(batch["asset_id"][i]), "category": str(batch["category"][i]),
            "part_names": [str(p) for p in batch["part_names"][i]],
            "face_part": np.asarray(batch["face_part"][i], dtype=np.int16), **arrays}


def stacked_columns(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {}
    return {k: (np.stack([r[k] for r in rows]) if k in STACKED_COLUMNS else [r[k] for r in rows])
            for k in rows[0]}


def keep_rows(batch: dict[str, Any], keep: list[int], names: Iterable[str]) -> dict[str, Any]:
    """Columns `names` of the rows `keep` of a batch (lists or arrays)."""
    return {k: ([batch[k][i] for i in keep] if isinstance(batch[k], list) else batch[k][keep])
            for k in names}


@dataclass(frozen=True)
class RenderedAssets:
    """The rendered assets of a root: manifest rows (stream fields) and where their views and
    points shards are."""

    manifest: list[dict[str, Any]]
    views_index: dict[str, str]
    points_index: dict[str, str]

    def with_shards(self, rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Load items for `rows`, sorted by views shard so each shard is read once per task."""
        return sorted(({**r, "points_shard": self.points_index[r["asset_id"]],
                        "views_shard": self.views_index[r["asset_id"]]} for r in rows),
                      key=lambda r: (r["views_shard"], r["asset_id"]))

    def rendered(self) -> list[dict[str, Any]]:
        return [r for r in self.manifest
                if r["asset_id"] in self.points_index and r["asset_id"] in self.views_index]


def read_rendered(root: RunRoot, extra: tuple[str, ...] = ()) -> RenderedAssets:
    """Manifest rows (stream fields + `extra`) and the views/points shard indexes."""
    manifest = read_manifest(root, [*STREAM_FIELDS, *extra])
    return RenderedAssets(manifest, shard_index(root, VIEWS), shard_index(root, POINTS))


def load_stream(items: list[dict[str, Any]], task: TaskContext, stage: str,
                resources: StepResources) -> ray.data.Dataset:
    """Stream rows read back from storage for load items (`RenderedAssets.with_shards`)."""
    return map_tasks(items_dataset(items, resources.batch_size), load_views_batch, resources,
                     task=task, stage=stage)


class RenderedAssetsStage(Stage[RenderedAssets]):
    """A stage over every rendered asset its output does not hold yet: load views and points
    (CPU tasks), then the stage's own steps (`add_steps`)."""

    def load_resources(self, config: Any) -> StepResources:
        raise NotImplementedError

    def add_steps(self, ds: ray.data.Dataset, ctx: JobContext) -> ray.data.Dataset:
        """The stage's steps after a stream of asset rows; the last yields summary rows."""
        raise NotImplementedError

    def read_input(self, root: RunRoot, config: Any) -> RenderedAssets:
        source = read_rendered(root)
        if not source.manifest or not source.points_index:
            raise FileNotFoundError(f"{self.name}: no rendered assets under "
                                    f"{root.display(POINTS.name)}/; run `partlift render` first")
        return source

    def plan(self, ctx: JobContext, source: RenderedAssets, done: set[str]) -> Plan:
        rendered = source.rendered()
        items = source.with_shards(r for r in rendered if r["asset_id"] not in done)
        return Plan(items, input_count=len(rendered), skipped_done=len(rendered) - len(items))

    def execute(self, ctx: JobContext, plan: Plan) -> Iterable[dict[str, Any]]:
        stream = load_stream(plan.items, ctx.task, self.name, self.load_resources(ctx.config))
        return self.add_steps(stream, ctx).iter_rows()

    def inputs(self, ctx: JobContext) -> dict[str, str]:
        return {VIEWS.name: ctx.root.display(VIEWS.name) + "/",
                POINTS.name: ctx.root.display(POINTS.name) + "/"}

