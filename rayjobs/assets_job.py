"""`partlift assets make|scan`: build the `assets/` manifest on Ray.

Workers generate or inspect meshes (procedural meshes are written under `<root>/meshes/`); the
driver de-duplicates by asset_id and writes the manifest shards as results arrive, so the
manifest never holds an asset twice and an interrupted run keeps what it wrote. Resume compares
`source_key` (file URI, or procedural category/seed/index).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from operators.data.assets import (MESH_EXTENSIONS, AssetRecord, category_for, inspect_mesh_file,
                                   load_category_sidecar, mesh_to_ply_bytes)
from operators.data.procedural import PROCEDURAL_CATEGORIES, make_asset, procedural_seed
from operators.data.taxonomy import load_taxonomy
from operators.failures import InfrastructureError, infrastructure_problem
from operators.settings import ConfigError, ReadLimits
from operators.store.ids import content_asset_id
from operators.store.readers import read_manifest
from operators.store.storage import (RunRoot, StorageOptions, make_table, resolve_filesystem,
                                     rows_to_columns, shard_name)
from operators.store.tables import ASSETS, ASSETS_OUTPUT, MESH_DIR
from rayjobs.config import AssetsJob
from rayjobs.driver import (AssetErrors, JobContext, Plan, Stage, StageReport, TaskContext,
                            items_dataset, map_tasks, run_stage)

# The driver writes a manifest shard every this many new records: an interrupted scan keeps
# what it has written, and a resumed one skips those files.
MANIFEST_ROWS_PER_SHARD = 1000


def _summary(key: str, record: AssetRecord | None = None, err: BaseException | None = None) -> dict:
    if record is not None:
        return {"source_key": key, "asset_id": record.asset_id, "status": "ok", "error_type": "",
                "message": "", "record": json.dumps(record.to_row())}
    return {"source_key": key, "asset_id": "", "status": "failed", "error_type": type(err).__name__,
            "message": str(err)[:2000], "record": ""}


def _records(keys: list[str], make: Any) -> dict[str, list]:
    """One summary row per key: its manifest record, or why it failed (written by the driver,
    which de-duplicates and orders the records)."""
    rows = []
    for key in keys:
        try:
            rows.append(_summary(key, make(key)))
        except Exception as err:
            problem = infrastructure_problem(err)
            if problem is not None:  # storage or credentials: stop the job, not an error row
                raise InfrastructureError(f"assets: {problem}") from err
            rows.append(_summary(key, err=err))  # row-level: the driver records it in errors/
    return rows_to_columns(rows)


def make_procedural_batch(batch: dict[str, np.ndarray], task: TaskContext,
                          seed: int) -> dict[str, list]:
    """Ray Data task: generate procedural assets, write their meshes, return manifest records."""
    root = task.root()
    index_of = dict(zip(batch["source_key"].tolist(), batch["index"].tolist()))
    category_of = dict(zip(batch["source_key"].tolist(), batch["category"].tolist()))

    def make(key: str) -> AssetRecord:
        category = category_of[key]
        asset = make_asset(category, procedural_seed(seed, index_of[key]))
        data = mesh_to_ply_bytes(asset.mesh)
        asset_id = content_asset_id(data)
        relpath = f"{MESH_DIR}/{asset_id}.ply"
        info = root.fs.get_file_info(root.path(relpath))
        if info.size != len(data):  # missing, or cut short by a killed run before writes were atomic
            root.write_bytes(relpath, data)
        frames = np.stack([np.vstack([f.origin[None], f.axes]) for f in asset.part_frames])
        functions = sorted({fn for fns in asset.part_functions for fn in fns})
        # relative to the root: the root can be moved or synced (RunRoot.resolve)
        return AssetRecord(asset_id=asset_id, uri=relpath, category=category,
                           functions=tuple(functions), bbox=asset.mesh.bbox(),
                           n_vertices=asset.mesh.n_vertices, n_faces=asset.mesh.n_faces,
                           source="procedural", source_key=key, part_names=asset.part_names,
                           part_functions=asset.part_functions, part_frames=frames,
                           face_part=asset.face_part)

    return _records(batch["source_key"].tolist(), make)


def scan_batch(batch: dict[str, np.ndarray], storage: StorageOptions, up_axis: str,
               limits: ReadLimits) -> dict[str, list]:
    """Ray Data task: read + validate mesh files and return manifest records."""
    taxonomy = load_taxonomy()
    category_of = dict(zip(batch["uri"].tolist(), batch["category"].tolist()))

    def inspect(uri: str) -> AssetRecord:
        category = category_of[uri]
        functions = taxonomy.functions_of(category) if category in taxonomy.categories else ()
        return inspect_mesh_file(uri, category, tuple(functions), storage, up_axis, limits)

    return _records(batch["uri"].tolist(), inspect)


def list_mesh_files(input_uri: str, storage: StorageOptions) -> list[dict[str, str]]:
    """Mesh files under a directory/URI with their categories (sidecar, else folder name)."""
    fs, base = resolve_filesystem(input_uri, storage)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"assets scan: input {input_uri} does not exist")
    local = isinstance(fs, pafs.LocalFileSystem)  # local inputs are recorded as absolute paths
    if info.type == pafs.FileType.File:
        return [{"uri": base if local else input_uri, "category": category_for(info.base_name, {})}]
    sidecar = load_category_sidecar(fs, base)
    display_base = base if local else input_uri.rstrip("/")
    items = []
    for entry in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if entry.type != pafs.FileType.File or not entry.path.lower().endswith(MESH_EXTENSIONS):
            continue
        rel = entry.path[len(base):].lstrip("/")
        items.append({"uri": f"{display_base}/{rel}", "category": category_for(rel, sidecar)})
    return sorted(items, key=lambda item: item["uri"])


@dataclass
class ManifestWriter:
    """Driver side: writes new records as they arrive, a shard every MANIFEST_ROWS_PER_SHARD; of
    files with identical bytes (one asset_id) the first in input order (sorted URIs) is kept."""

    task: TaskContext
    errors: AssetErrors
    known_ids: set[str]
    written: int = 0
    duplicates: int = 0

    def consume(self, summaries: Iterable[dict]) -> Iterator[dict]:
        pending: list[dict] = []
        for row in summaries:
            if row["status"] != "ok":
                self.errors.record(row["asset_id"] or row["source_key"], row["message"],
                                   error_type=row["error_type"])
                continue
            self.errors.succeeded()
            yield row
            record = json.loads(row["record"])
            if record["asset_id"] in self.known_ids:
                self.duplicates += 1  # same bytes already in the manifest (a copy): one row
                continue
            self.known_ids.add(record["asset_id"])
            pending.append(record)
            if len(pending) >= MANIFEST_ROWS_PER_SHARD:
                self._flush(pending)
        self._flush(pending)
        self.errors.write()

    def _flush(self, pending: list[dict]) -> None:
        if pending:
            ids = [r["asset_id"] for r in pending]
            self.task.commit(ASSETS_OUTPUT, shard_name(ids),
                             {ASSETS.name: make_table(rows_to_columns(pending))}, assets=ids)
            self.written += len(pending)
            pending.clear()


class ManifestStage(Stage[list[dict[str, Any]]]):
    """A stage that adds records to the manifest from work items keyed by `source_key`."""

    outputs = (ASSETS_OUTPUT,)
    creates_root = True

    def plan(self, ctx: JobContext, source: list[dict[str, Any]]) -> Plan:
        keys = {r["source_key"] for r in read_manifest(ctx.root, ["source_key"])}
        items = [item for item in source if item["source_key"] not in keys]
        writer = ManifestWriter(ctx.task, AssetErrors(self.name, ctx.task),
                                known_ids=set(ctx.outputs["assets"].by_asset))
        return Plan(items, input_count=len(source), skipped_done=len(source) - len(items),
                    extra={"writer": writer})

    def tasks(self, ctx: JobContext, items: list[dict[str, Any]]) -> Any:
        raise NotImplementedError

    def execute(self, ctx: JobContext, plan: Plan) -> Iterable[dict[str, Any]]:
        resources = ctx.config.assets.resources.mesh
        ds = self.tasks(ctx, items_dataset(plan.items, resources.batch_size))
        ds.context.execution_options.preserve_order = True  # duplicates: first in input order
        return plan.extra["writer"].consume(ds.iter_rows())

    def units(self, ctx: JobContext, plan: Plan, ok: int) -> dict[str, int]:
        writer = plan.extra["writer"]
        return {"new manifest rows": writer.written, "duplicate files skipped": writer.duplicates}


class AssetsMakeStage(ManifestStage):
    name = "assets-make"

    def check(self, config: AssetsJob) -> None:
        categories = list(config.assets.categories or PROCEDURAL_CATEGORIES)
        unknown = sorted(set(categories) - set(PROCEDURAL_CATEGORIES))
        if unknown:
            raise ConfigError(f"assets.categories: unknown procedural categories {unknown}; "
                              f"available: {', '.join(PROCEDURAL_CATEGORIES)}")

    def read_input(self, root: RunRoot, config: AssetsJob) -> list[dict[str, Any]]:
        categories = list(config.assets.categories or PROCEDURAL_CATEGORIES)
        seed = config.assets.seed
        return [{"index": i, "category": categories[i % len(categories)],
                 "source_key": f"procedural:{categories[i % len(categories)]}:{seed}:{i}"}
                for i in range(config.assets.n)]

    def tasks(self, ctx: JobContext, ds: Any) -> Any:
        return map_tasks(ds, make_procedural_batch, ctx.config.assets.resources.mesh,
                         task=ctx.task, seed=ctx.config.assets.seed)

    def inputs(self, ctx: JobContext) -> dict[str, str]:
        cfg = ctx.config.assets
        return {"generator": f"procedural n={cfg.n} seed={cfg.seed}"}


class AssetsScanStage(ManifestStage):
    name = "assets-scan"

    def check(self, config: AssetsJob) -> None:
        if not config.assets.input:
            raise ConfigError("assets scan needs an input directory: --input DIR_OR_URI "
                              "(or assets.input in a config file given with -c)")

    def read_input(self, root: RunRoot, config: AssetsJob) -> list[dict[str, Any]]:
        files = list_mesh_files(config.assets.input, config.storage.options())
        if not files:
            raise FileNotFoundError(f"assets scan: no mesh files ({', '.join(MESH_EXTENSIONS)}) "
                                    f"under {config.assets.input}")
        return [{**f, "source_key": f["uri"]} for f in files]

    def tasks(self, ctx: JobContext, ds: Any) -> Any:
        cfg = ctx.config.assets
        return map_tasks(ds, scan_batch, cfg.resources.mesh, storage=ctx.config.storage.options(),
                         up_axis=cfg.up_axis, limits=cfg.read_limits())

    def inputs(self, ctx: JobContext) -> dict[str, str]:
        return {"meshes": str(ctx.config.assets.input)}


def run_assets_make(config: AssetsJob) -> StageReport:
    """Generate `assets.n` procedural assets (the ones the manifest lacks) into the manifest."""
    return run_stage(config, AssetsMakeStage())


def run_assets_scan(config: AssetsJob) -> StageReport:
    """Add the mesh files under `assets.input` (the ones the manifest lacks) to the manifest."""
    return run_stage(config, AssetsScanStage())
