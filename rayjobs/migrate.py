"""`partlift migrate`: upgrade a run root written by an older partlift, in place.

Format 1 -> 2 (see `operators.store.integrity.FORMAT_CHANGES`):
- the manifest's paths of meshes inside the root become relative to it (a root can move);
- each stage's committed shard sets (format 1: the commit table's shard is there) get commit
  records (assets, shard sizes) and uncommitted leftovers are removed;
- each stage's settings fingerprint is computed from its last `_job.json` (older keys renamed),
  and the lineage of labels/ and features/ is set to the renders the root holds now (format 1
  recorded none: they are assumed to be the ones they were made from).
The whole migration holds every stage's lease; it can be rerun after an interruption.
"""

from __future__ import annotations

from typing import Any

import pyarrow.parquet as pq

from operators.models.registry import GROUNDING_BACKENDS
from operators.settings import ConfigError
from operators.store.commits import ShardCommit, commit_path, settings_hash
from operators.store.integrity import ROOT_MARKER, record_stage_settings, root_format
from operators.store.lease import hold
from operators.store.records import new_job_id
from operators.store.storage import FORMAT_VERSION, RunRoot, make_table, rows_to_columns, shard_name
from operators.store.tables import (ASSETS, ASSETS_OUTPUT, MESH_DIR, RENDER_OUTPUT, STAGE_OUTPUTS,
                                    StageOutput)
from rayjobs.config import JOB_MODELS, StatusJob, _set_dotted, renamed_key

STAGE_SECTIONS = {"render": "render", "label": "label", "lift": "lift"}


def _flatten(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [kv for k, v in value.items() for kv in _flatten(f"{prefix}.{k}", v)]
    return [(prefix, value)]


def upgraded_settings(stage: str, recorded_config: dict[str, Any]) -> dict[str, Any]:
    """The settings fingerprint of a stage from the config a format-1 `_job.json` recorded."""
    section = STAGE_SECTIONS[stage]
    if section not in recorded_config:
        raise ConfigError(f"migrate: the {stage} record has no '{section}' settings")
    tree: dict[str, Any] = {}
    for key, value in _flatten(section, recorded_config[section]):
        _set_dotted(tree, renamed_key(key) or key, value)
    backend = tree.get("label", {}).get("backend")
    if isinstance(backend, dict):  # format 1 recorded every backend's options
        fields = GROUNDING_BACKENDS[backend.get("name", "oracle")].model_fields
        tree["label"]["backend"] = {k: v for k, v in backend.items() if k in fields}
    job = JOB_MODELS[stage].model_validate(tree)
    return getattr(job, section).fingerprint()


def _relative(root: RunRoot, row: dict[str, Any]) -> str:
    """A mesh path inside the root, relative to it (procedural meshes live in the root, also
    when the root was moved before migrating)."""
    uri, prefix = row["uri"], root.display().rstrip("/") + "/"
    if uri.startswith(prefix):
        return uri[len(prefix):]
    if row.get("source") == "procedural":
        return f"{MESH_DIR}/{uri.rsplit('/', 1)[-1]}"
    return uri


def _migrate_manifest(root: RunRoot, job_id: str) -> int:
    old = root.list_shards(ASSETS.name)
    table = root.read_table(ASSETS.name)
    if table is None:
        return 0
    rows = {r["asset_id"]: {**r, "uri": _relative(root, r)} for r in table.to_pylist()}
    ids = sorted(rows)
    shard = shard_name(ids)
    size = root.write_shard(ASSETS.name, shard, make_table(rows_to_columns([rows[i] for i in ids])))
    commit = ShardCommit("assets", shard, job_id, settings_hash({}), tuple(ids),
                         {ASSETS.name: size}, rows={ASSETS.name: len(ids)})
    root.write_json(commit_path(ASSETS_OUTPUT, shard), commit.to_json())
    record_stage_settings(root, ASSETS_OUTPUT, {}, job_id)
    for name in old:
        if name != shard:
            root.delete_shard(ASSETS.name, name)
    return len(ids)


def _migrate_output(root: RunRoot, output: StageOutput, job_id: str,
                    renders: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Commit records for a format-1 output; returns asset -> commit id, and notes."""
    if not root.exists(output.record):
        if any(root.list_shards(t.name) for t in output.tables):
            raise ConfigError(f"migrate: {output.record} is missing, so the settings of "
                              f"{output.record_dir}/ are unknown; redo it with `partlift "
                              f"{output.stage} --overwrite` after migrating the rest")
        return {}, []
    settings = upgraded_settings(output.stage, root.read_json(output.record)["config"])
    committed = root.list_shards(output.commit.name)
    notes, ids = [], {}
    for table in output.tables:
        for shard in root.list_shards(table.name):
            if shard not in committed:
                root.delete_shard(table.name, shard)
                notes.append(f"{table.name}/{shard}.parquet had no commit (format 1): removed")
    sizes = {t.name: root.shard_sizes(t.name) for t in output.tables}
    for shard in committed:
        assets = tuple(dict.fromkeys(
            root.read_shard(output.commit.name, shard, ["asset_id"])["asset_id"].to_pylist()))
        upstream = {a: renders[a] for a in assets if a in renders} if output.upstream else {}
        tables = [t for t, s in sizes.items() if shard in s]
        rows = {t: pq.ParquetFile(root.path(t, shard + ".parquet"),
                                  filesystem=root.fs).metadata.num_rows for t in tables}
        commit = ShardCommit(output.stage, shard, job_id, settings_hash(settings), assets,
                             {t: sizes[t][shard] for t in tables}, upstream, rows)
        root.write_json(commit_path(output, shard), commit.to_json())
        ids.update({a: commit.id for a in assets})
    record_stage_settings(root, output, settings, job_id)
    return ids, notes


def migrate(config: StatusJob) -> list[str]:
    """Upgrade the root of `config` to this format version; returns what it did, in words."""
    root = RunRoot(config.root, config.storage.options())
    root.check_reachable(create=False)
    version = root_format(root)
    if version is None:
        return [f"{root.display()} is empty: nothing to migrate"]
    if version == FORMAT_VERSION:
        return [f"{root.display()} is already format {FORMAT_VERSION}: nothing to do"]
    if version > FORMAT_VERSION:
        raise ConfigError(f"{root.display()} is format {version}, newer than this partlift "
                          f"({FORMAT_VERSION}): upgrade partlift")
    job_id = new_job_id("migrate")
    with hold(root, list(STAGE_OUTPUTS), job_id):
        notes = [f"manifest: {_migrate_manifest(root, job_id)} assets, mesh paths inside the "
                 "root now relative to it"]
        renders, more = _migrate_output(root, RENDER_OUTPUT, job_id, {})
        notes += more + [f"views/, points/: {len(renders)} assets committed"]
        for output in (STAGE_OUTPUTS["label"], STAGE_OUTPUTS["lift"]):
            held, more = _migrate_output(root, output, job_id, renders)
            notes += more + ([f"{output.record_dir}/: {len(held)} assets committed, made from "
                              "the renders the root holds"] if held else [])
        root.write_json(ROOT_MARKER, {"format_version": FORMAT_VERSION, "migrated_from": version,
                                      "migrated_by": job_id})
    return notes + [f"{root.display()} is now format {FORMAT_VERSION}"]
