"""`partlift assets make|scan`: build the `assets/` manifest on Ray.

Workers generate or inspect meshes (procedural meshes are written under `<root>/meshes/`); the
driver de-duplicates by asset_id and writes the manifest shards, so the manifest never holds an
asset twice. Resume compares `source_key` (file URI, or procedural category/seed/index).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

import numpy as np
import pyarrow.fs as pafs

from operators.data.assets import (MESH_EXTENSIONS, AssetRecord, category_for, inspect_mesh_file,
                              load_category_sidecar, mesh_to_ply_bytes)
from operators.store.ids import content_asset_id
from operators.data.procedural import PROCEDURAL_CATEGORIES, make_asset
from operators.store.storage import RunRoot, StorageOptions, make_table, resolve_filesystem, shard_name
from operators.data.taxonomy import load_taxonomy
from rayjobs.config import ConfigError, PartliftConfig
from rayjobs.runtime import (ERRORS_TABLE, StageReport, ensure_ray, error_row, finish_stage,
                             iter_results, new_job_id, summarise_rows, write_errors)

ASSETS_TABLE = "assets"
MESH_DIR = "meshes/procedural"
# The driver writes a manifest shard every this many new records: an interrupted scan keeps
# what it has written, and a resumed one skips those files.
MANIFEST_ROWS_PER_SHARD = 1000


def procedural_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _summary(key: str, record: AssetRecord | None = None, err: BaseException | None = None) -> dict:
    if record is not None:
        return {"source_key": key, "asset_id": record.asset_id, "status": "ok", "error_type": "",
                "message": "", "record": json.dumps(record.to_row())}
    return {"source_key": key, "asset_id": "", "status": "failed", "error_type": type(err).__name__,
            "message": str(err)[:2000], "record": ""}


def make_procedural_batch(batch: dict[str, np.ndarray], root_uri: str, storage: StorageOptions,
                          seed: int) -> dict[str, list]:
    """Ray Data task: generate procedural assets, write their meshes, return manifest records."""
    root = RunRoot(root_uri, storage)
    rows = []
    for index, category in zip(batch["index"].tolist(), batch["category"].tolist()):
        key = f"procedural:{category}:{seed}:{index}"
        try:
            asset = make_asset(category, procedural_seed(seed, index))
            data = mesh_to_ply_bytes(asset.mesh)
            asset_id = content_asset_id(data)
            relpath = f"{MESH_DIR}/{asset_id}.ply"
            if not root.exists(relpath):
                root.write_bytes(relpath, data)
            frames = np.stack([np.vstack([f.origin[None], f.axes]) for f in asset.part_frames])
            functions = sorted({fn for fns in asset.part_functions for fn in fns})
            record = AssetRecord(asset_id=asset_id, uri=root.display(relpath), category=category,
                                 functions=tuple(functions), bbox=asset.mesh.bbox(),
                                 n_vertices=asset.mesh.n_vertices, n_faces=asset.mesh.n_faces,
                                 source="procedural", source_key=key,
                                 part_names=asset.part_names, part_functions=asset.part_functions,
                                 part_frames=frames, face_part=asset.face_part)
            rows.append(_summary(key, record))
        except Exception as err:  # row-level: recorded in errors/, the batch goes on
            rows.append(_summary(key, err=err))
    return {k: [r[k] for r in rows] for k in rows[0]}


def scan_batch(batch: dict[str, np.ndarray], storage: StorageOptions,
               up_axis: str = "y") -> dict[str, list]:
    """Ray Data task: read + validate mesh files and return manifest records."""
    taxonomy = load_taxonomy()
    rows = []
    for uri, category in zip(batch["uri"].tolist(), batch["category"].tolist()):
        try:
            functions = (taxonomy.functions_of(category)
                         if category in taxonomy.categories else ())
            rows.append(_summary(uri, inspect_mesh_file(uri, category, tuple(functions), storage,
                                                        up_axis)))
        except Exception as err:  # row-level: recorded in errors/, the batch goes on
            rows.append(_summary(uri, err=err))
    return {k: [r[k] for r in rows] for k in rows[0]}


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


def _existing_manifest(root: RunRoot) -> tuple[set[str], set[str]]:
    table = root.read_table(ASSETS_TABLE, columns=["asset_id", "source_key"])
    if table is None:
        return set(), set()
    return set(table["asset_id"].to_pylist()), set(table["source_key"].to_pylist())


def _write_manifest(root: RunRoot, stage: str, job_id: str, summaries: Iterable[dict],
                    known_ids: set[str]) -> tuple[list[dict], int, list[dict]]:
    """Write new records as they arrive, a shard every MANIFEST_ROWS_PER_SHARD; of files with
    identical bytes (one asset_id) the first in input order (sorted URIs) is kept. Returns all
    summaries, how many duplicate files were skipped, and the new records."""
    seen, pending, written, errors, duplicates = [], [], [], [], 0

    def flush() -> None:
        if pending:
            columns = {k: [r[k] for r in pending] for k in pending[0]}
            root.write_shard(ASSETS_TABLE, shard_name(r["asset_id"] for r in pending),
                             make_table(columns))
            written.extend(pending)
            pending.clear()

    for row in summaries:
        seen.append(row)
        if row["status"] != "ok":
            errors.append(error_row(stage, job_id, row["asset_id"] or row["source_key"],
                                    row["message"], error_type=row["error_type"]))
            continue
        record = json.loads(row["record"])
        if record["asset_id"] in known_ids:
            duplicates += 1  # same bytes already in the manifest (a copy of a file): one row
            continue
        known_ids.add(record["asset_id"])
        pending.append(record)
        if len(pending) >= MANIFEST_ROWS_PER_SHARD:
            flush()
    flush()
    write_errors(root, stage, job_id, shard_name(e["asset_id"] for e in errors) if errors else "",
                 errors)
    return seen, duplicates, written


def _run_manifest_stage(config: PartliftConfig, stage: str, items: list[dict], fn, fn_kwargs: dict,
                        inputs: dict[str, str]) -> StageReport:
    root = RunRoot(config.root, config.storage.options())
    root.check_reachable()
    ensure_ray(config.ray)  # before the clock: throughput excludes cluster start-up
    started = time.time()
    job_id = new_job_id(stage)
    if config.job.overwrite:
        root.delete_table(ASSETS_TABLE)
        root.delete_shards(ERRORS_TABLE, f"{stage}-")
    known_ids, done_keys = _existing_manifest(root)
    pending = [item for item in items if item["source_key"] not in done_keys]
    results = iter_results(pending, fn, fn_kwargs, config.assets.resources, preserve_order=True)
    summaries, duplicates, records = _write_manifest(root, stage, job_id, results, known_ids)
    ok, failed, types, examples = summarise_rows(summaries)
    report = StageReport(stage=stage, job_id=job_id, root=config.root, inputs=inputs,
                         outputs={"assets": root.display(ASSETS_TABLE) + "/"},
                         started=started, ended=time.time(), input_count=len(items),
                         skipped_done=len(items) - len(pending), ok=ok, failed=failed,
                         units={"new manifest rows": len(records),
                                "duplicate files skipped": duplicates},
                         error_types=types, error_examples=examples)
    return finish_stage(root, config, report, ASSETS_TABLE)


def run_assets_make(config: PartliftConfig) -> StageReport:
    categories = list(config.assets.categories or PROCEDURAL_CATEGORIES)
    unknown = sorted(set(categories) - set(PROCEDURAL_CATEGORIES))
    if unknown:
        raise ConfigError(f"assets.categories: unknown procedural categories {unknown}; "
                          f"available: {', '.join(PROCEDURAL_CATEGORIES)}")
    seed, n = config.assets.seed, config.assets.n
    items = [{"index": i, "category": categories[i % len(categories)],
              "source_key": f"procedural:{categories[i % len(categories)]}:{seed}:{i}"}
             for i in range(n)]
    return _run_manifest_stage(
        config, "assets-make", items, make_procedural_batch,
        {"root_uri": config.root, "storage": config.storage.options(), "seed": seed},
        inputs={"generator": f"procedural n={n} seed={seed}"})


def run_assets_scan(config: PartliftConfig) -> StageReport:
    if not config.assets.input:
        raise ConfigError("assets scan needs an input directory: --input DIR_OR_URI "
                          "(or assets.input in a config file given with -c)")
    files = list_mesh_files(config.assets.input, config.storage.options())
    if not files:
        raise FileNotFoundError(f"assets scan: no mesh files ({', '.join(MESH_EXTENSIONS)}) "
                                f"under {config.assets.input}")
    items = [{**f, "source_key": f["uri"]} for f in files]
    return _run_manifest_stage(config, "assets-scan", items, scan_batch,
                               {"storage": config.storage.options(),
                                "up_axis": config.assets.up_axis},
                               inputs={"meshes": config.assets.input})
