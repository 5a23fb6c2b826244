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

from operators.store.commits import OutputState, drop_shard_sets, read_output
from operators.store.readers import TableReader, read_manifest
from operators.store.storage import RunRoot
from operators.store.tables import POINTS, RENDER_OUTPUT, VIEW_ARRAYS, VIEWS, StageOutput
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
    index = dict(zip(ids, batch["render_shard"].tolist()))  # one shard set: views + points
    views, points = TableReader(root, VIEWS, index), TableReader(root, POINTS, index)
    errors = AssetErrors(stage, task)

    def load(i: int) -> dict[str, Any]:
        arrays = views.arrays(ids[i], VIEW_ARRAYS)
        xyz = points.arrays(ids[i], ["xyz"])["xyz"][0]
        return asset_row(batch, i, {**arrays, "xyz": xyz}, str(batch["render_commit"][i]))

    rows = [row for _, row in errors.attempt(range(len(ids)), load, asset_of=ids.__getitem__)]
    errors.write(root=root)
    return stacked_columns(rows)


def asset_row(batch: dict[str, Any], i: int, arrays: dict[str, np.ndarray],
              render_commit: str) -> dict[str, Any]:
    """The stream row of asset i of a manifest batch; `render_commit` names the render shard
    set its arrays come from (what the downstream shard records as its lineage)."""
    flags = {k: bool(v[i]) for k, v in batch.items() if k.startswith("todo_")}
    return {"asset_id": str(batch["asset_id"][i]), "category": str(batch["category"][i]),
            "part_names": [str(p) for p in batch["part_names"][i]],
            "face_part": np.asarray(batch["face_part"][i], dtype=np.int16),
            "render_commit": render_commit, **flags, **arrays}


def stacked_columns(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {}
    return {k: (np.stack([r[k] for r in rows]) if k in STACKED_COLUMNS else [r[k] for r in rows])
            for k in rows[0]}


def todo(batch: dict[str, Any], stage: str, i: int) -> bool:
    """Whether row i still needs `stage` (a stream of several stages flags each row per stage,
    `todo_<stage>`; without the flag, every row does)."""
    flags = batch.get(f"todo_{stage}")
    return True if flags is None else bool(flags[i])


def failed_stages(batch: dict[str, Any], rows: Iterable[int], stage: str,
                  failed: set[int]) -> list[str]:
    """The `failed_stage` column of a stream that goes on to another stage: per row, the first
    stage that failed it ("" for none). A row a stage failed still reaches the stages after it
    (its render is fine); the last stage reports it as failed, not ok."""
    before = batch.get("failed_stage")
    return [str(before[i]) if before is not None and before[i] else (stage if i in failed else "")
            for i in rows]


def keep_rows(batch: dict[str, Any], keep: list[int], names: Iterable[str]) -> dict[str, Any]:
    """Columns `names` of the rows `keep` of a batch (lists or arrays)."""
    return {k: ([batch[k][i] for i in keep] if isinstance(batch[k], list) else batch[k][keep])
            for k in names}


@dataclass(frozen=True)
class RenderedAssets:
    """The manifest (stream fields) and what the render output holds (its prepared state)."""

    manifest: list[dict[str, Any]]
    render: OutputState

    def load_items(self, rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Load items for rendered `rows`, sorted by shard so each is read once per task."""
        by_asset = self.render.by_asset
        return sorted(({**r, "render_shard": by_asset[r["asset_id"]].shard,
                        "render_commit": by_asset[r["asset_id"]].id} for r in rows),
                      key=lambda r: (r["render_shard"], r["asset_id"]))


def downstream_plan(ctx: JobContext, output: StageOutput, source: RenderedAssets,
                    renders_here: bool = False) -> Plan:
    """What a stage over rendered assets (label, lift) has left to do, by lineage: an asset is
    done when the output holds it made from its current render; a shard set holding an asset
    whose render changed since is removed and its assets redone. Assets not rendered wait
    (counted, named in a note) unless this job renders them (`renders_here`)."""
    held, root = ctx.outputs[output.stage], ctx.root
    current = {asset: commit.id for asset, commit in source.render.by_asset.items()}
    changed = {a for c in held.commits.values() for a in c.assets
               if c.upstream.get(a) != current.get(a)}
    stale = sorted(shard for shard, c in held.commits.items() if changed & set(c.assets))
    notes = []
    if stale:
        redo = sum(len(held.commits[s].assets) for s in stale)
        notes.append(f"{redo} assets of {output.record_dir}/ are redone: {len(changed)} were "
                     "re-rendered (or their render is gone) since"
                     + (f", {redo - len(changed)} share a shard set with them" if redo > len(changed)
                        else ""))
        drop_shard_sets(root, output, stale)
    done = {a for shard, c in held.commits.items() if shard not in stale for a in c.assets}
    rendered = [r for r in source.manifest if r["asset_id"] in current]
    items = source.load_items(r for r in rendered if r["asset_id"] not in done)
    waiting = 0 if renders_here else len(source.manifest) - len(rendered)
    if waiting:
        notes.append(f"{waiting} assets of the manifest have no renders yet: run `partlift render`"
                     + "".join(f"; {why}" for why in source.render.broken.values()))
    return Plan(items, input_count=len(source.manifest), skipped_done=len(rendered) - len(items),
                waiting=waiting, notes=notes)


def read_rendered(root: RunRoot, extra: tuple[str, ...] = ()) -> RenderedAssets:
    """Manifest rows (stream fields + `extra`) and the state of the render output."""
    return RenderedAssets(read_manifest(root, [*STREAM_FIELDS, *extra]),
                          read_output(root, RENDER_OUTPUT))


def load_stream(items: list[dict[str, Any]], task: TaskContext, stage: str,
                resources: StepResources) -> ray.data.Dataset:
    """Stream rows read back from storage for load items (`RenderedAssets.load_items`)."""
    return map_tasks(items_dataset(items, resources.batch_size), load_views_batch, resources,
                     task=task, stage=stage)


class RenderedAssetsStage(Stage[RenderedAssets]):
    """A stage over every rendered asset its output does not hold yet (made from its current
    render): load views and points (CPU tasks), then the stage's own steps (`add_steps`)."""

    def load_resources(self, config: Any) -> StepResources:
        raise NotImplementedError

    def add_steps(self, ds: ray.data.Dataset, ctx: JobContext,
                  forward: bool = False) -> ray.data.Dataset:
        """The stage's steps after a stream of asset rows; the last yields summary rows, or with
        `forward` the rows themselves for the next stage of the stream."""
        raise NotImplementedError

    def read_input(self, root: RunRoot, config: Any) -> RenderedAssets:
        source = read_rendered(root)
        if not source.manifest or not source.render.by_asset:
            raise FileNotFoundError(f"{self.name}: no rendered assets under "
                                    f"{root.display(POINTS.name)}/; run `partlift render` first")
        return source

    def plan(self, ctx: JobContext, source: RenderedAssets) -> Plan:
        return downstream_plan(ctx, self.outputs[0], source)

    def execute(self, ctx: JobContext, plan: Plan) -> Iterable[dict[str, Any]]:
        stream = load_stream(plan.items, ctx.task, self.name, self.load_resources(ctx.config))
        return self.add_steps(stream, ctx).iter_rows()

    def inputs(self, ctx: JobContext) -> dict[str, str]:
        return {VIEWS.name: ctx.root.display(VIEWS.name) + "/",
                POINTS.name: ctx.root.display(POINTS.name) + "/"}
