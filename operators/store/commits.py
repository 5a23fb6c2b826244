"""The commit protocol: shard sets that verify.

A stage writes each batch as one shard set: one shard per table of its `StageOutput`, all under
the same name, then a **commit record** `<record_dir>/_commits/<shard>.json` naming the shards'
tables and byte sizes, the assets they hold, the stage's settings fingerprint and, per asset,
the upstream shard set it was made from (lineage). The record is written last and appears whole
(temporary name + rename locally, one PUT on S3): a shard set without one was interrupted.

What a stage's output holds is read from listings and commit records only (`read_output`), so
planning stays cheap (no shard is opened): an asset is done when its commit record is there and
every shard it names is listed with the recorded size. A missing, truncated or replaced shard
breaks its set; `prepare_output` removes broken and uncommitted sets (naming them) so their
assets are redone, and nothing is ever duplicated. Full reads are for `status --verify`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import pyarrow as pa

from operators.store.records import ERRORS_STAGE_PREFIX
from operators.store.storage import FORMAT_VERSION, RunRoot
from operators.store.tables import ERRORS, STAGE_OUTPUTS, StageOutput

COMMITS_DIR = "_commits"


def settings_hash(fingerprint: Mapping[str, Any]) -> str:
    """A short stable hash of a stage's settings fingerprint (canonical JSON)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ShardCommit:
    """The record that commits one shard set (see the module docstring)."""

    stage: str
    shard: str
    job_id: str
    fingerprint: str                   # settings_hash of the stage's settings
    assets: tuple[str, ...]
    tables: Mapping[str, int]          # table name -> shard size in bytes
    upstream: Mapping[str, str] = field(default_factory=dict)  # asset -> upstream commit id
    rows: Mapping[str, int] = field(default_factory=dict)      # table name -> rows
    format_version: int = FORMAT_VERSION

    @property
    def id(self) -> str:
        """Identifies this shard set: a redo of the same assets gets a new id (lineage)."""
        return f"{self.stage}/{self.shard}/{self.job_id}"

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "shard": self.shard, "job_id": self.job_id,
                "fingerprint": self.fingerprint, "assets": list(self.assets),
                "tables": dict(self.tables), "rows": dict(self.rows),
                "upstream": dict(self.upstream), "format_version": self.format_version,
                "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ShardCommit":
        return cls(stage=str(data["stage"]), shard=str(data["shard"]), job_id=str(data["job_id"]),
                   fingerprint=str(data["fingerprint"]), assets=tuple(data["assets"]),
                   tables={str(k): int(v) for k, v in data["tables"].items()},
                   upstream={str(k): str(v) for k, v in data.get("upstream", {}).items()},
                   rows={str(k): int(v) for k, v in data.get("rows", {}).items()},
                   format_version=int(data.get("format_version", 0)))


def commit_path(output: StageOutput, shard: str) -> str:
    return f"{output.record_dir}/{COMMITS_DIR}/{shard}.json"


def write_shard_set(root: RunRoot, output: StageOutput, shard: str, data: Mapping[str, pa.Table],
                    *, job_id: str, fingerprint: str, assets: Iterable[str],
                    upstream: Mapping[str, str] | None = None,
                    before_commit: Callable[[], None] | None = None) -> ShardCommit:
    """Write one shard set: the tables given (by name; a table the stage writes only sometimes
    may be left out, its commit table may not), in declared order, then the commit record
    (`before_commit` runs just before it, e.g. to check the writer still holds its lease)."""
    unknown = sorted(set(data) - set(output.names))
    if unknown or output.commit.name not in data:
        raise ValueError(f"{output.stage}: a shard set needs {output.commit.name} and only "
                         f"{', '.join(output.names)}; got {', '.join(sorted(data))}")
    sizes = {t.name: root.write_shard(t.name, shard, data[t.name])
             for t in output.tables if t.name in data}
    commit = ShardCommit(output.stage, shard, job_id, fingerprint, tuple(dict.fromkeys(assets)),
                         sizes, dict(upstream or {}), {name: data[name].num_rows for name in sizes})
    if before_commit is not None:
        before_commit()
    root.write_json(commit_path(output, shard), commit.to_json())
    return commit


@dataclass
class OutputState:
    """What a stage's output holds, from listings and commit records (see the module docstring)."""

    output: StageOutput
    commits: dict[str, ShardCommit]             # shard -> its valid commit record
    broken: dict[str, str]                      # shard -> why its set is not valid
    uncommitted: list[str]                      # "table/shard" without a commit record
    duplicates: dict[str, list[str]]            # asset -> every valid shard that holds it
    loose: int = 0                              # records read one by one (not in the index)
    stamps: dict[str, tuple[int, int]] = field(default_factory=dict)  # shard -> (size, mtime)

    @cached_property
    def by_asset(self) -> dict[str, ShardCommit]:
        """asset -> the shard set that holds it (of duplicates, the last in shard order)."""
        return {a: c for _, c in sorted(self.commits.items()) for a in c.assets}

    def holding(self, table: str) -> dict[str, ShardCommit]:
        """by_asset, for the shard sets that have a shard of `table` (some tables are
        optional, e.g. features/views)."""
        return {a: c for a, c in self.by_asset.items() if table in c.tables}


def _index_files(root: RunRoot, output: StageOutput) -> list[str]:
    return sorted(root.list_files(f"{output.record_dir}/{COMMITS_DIR}", ".parquet"))


def _read_index(root: RunRoot, output: StageOutput) -> dict[str, tuple[ShardCommit, tuple]]:
    """shard -> (its commit record, the record file's (size, mtime) when it was indexed). An
    unreadable index is ignored: it is a cache, the records themselves are still there."""
    indexed: dict[str, tuple[ShardCommit, tuple]] = {}
    for name in _index_files(root, output):
        try:
            rows = root.read_shard(f"{output.record_dir}/{COMMITS_DIR}", name[: -len(".parquet")])
        except Exception:
            continue
        if "mtime_ns" not in rows.column_names:  # an index of an earlier version: not trusted
            continue
        for row in rows.to_pylist():
            indexed[row["shard"]] = (ShardCommit.from_json(json.loads(row["record"])),
                                     (row["size"], row["mtime_ns"]))
    return indexed


def write_index(root: RunRoot, output: StageOutput, commits: Mapping[str, ShardCommit],
                stamps: Mapping[str, tuple[int, int]]) -> None:
    """Compact the commit records into one index object (planning then reads one object instead
    of one per shard set); older indexes are removed after it lands. Each entry keeps its record
    file's size and mtime (`stamps`): a record written again later (a set redone under the same
    name) no longer matches and is read itself."""
    old = _index_files(root, output)
    shards = sorted(commits)
    records = [json.dumps(commits[s].to_json(), sort_keys=True) for s in shards]
    name = f"index-{hashlib.sha1(chr(10).join(records).encode()).hexdigest()[:16]}"
    root.write_shard(f"{output.record_dir}/{COMMITS_DIR}", name, pa.table({
        "shard": shards, "record": records,
        "size": pa.array([stamps[s][0] for s in shards], pa.int64()),
        "mtime_ns": pa.array([stamps[s][1] for s in shards], pa.int64())}))
    for stale in old:
        if stale != f"{name}.parquet":
            root.delete(f"{output.record_dir}/{COMMITS_DIR}/{stale}")


def read_output(root: RunRoot, output: StageOutput) -> OutputState:
    """The state of a stage's output from one listing per table and its commit records (read
    from the index where it has them: one object for the many, one GET only for the others)."""
    listed = {t.name: root.shard_sizes(t.name) for t in output.tables}
    records = root.list_file_info(f"{output.record_dir}/{COMMITS_DIR}", ".json")
    indexed = _read_index(root, output)
    commits: dict[str, ShardCommit] = {}
    broken: dict[str, str] = {}
    loose = 0
    for name in sorted(records):
        shard = name[: -len(".json")]
        try:
            commit, stamp = indexed.get(shard, (None, None))
            if commit is None or stamp != records[name]:  # not indexed, or written since
                loose += 1
                commit = ShardCommit.from_json(root.read_json(commit_path(output, shard)))
        except (OSError, ValueError, KeyError, TypeError) as err:
            broken[shard] = f"its commit record cannot be read ({type(err).__name__})"
            continue
        problems = []
        for table, size in commit.tables.items():
            found = listed.get(table, {}).get(shard)
            where = f"{table}/{shard}.parquet"
            if found is None:
                problems.append(f"{where} is missing")
            elif found != size:
                problems.append(f"{where} has {found} bytes, its commit recorded {size} "
                                "(truncated or replaced)")
        if problems:
            broken[shard] = "; ".join(problems)
        else:
            commits[shard] = commit
    recorded = {name[: -len(".json")] for name in records}
    uncommitted = sorted(f"{table}/{shard}" for table, shards in listed.items()
                         for shard in shards if shard not in recorded)
    holders: dict[str, list[str]] = {}
    for shard, commit in sorted(commits.items()):
        for asset in commit.assets:
            holders.setdefault(asset, []).append(shard)
    duplicates = {a: s for a, s in holders.items() if len(s) > 1}
    stamps = {name[: -len(".json")]: stamp for name, stamp in records.items()}
    return OutputState(output, commits, broken, uncommitted, duplicates, loose,
                       {shard: stamps[shard] for shard in commits})


def drop_shard_sets(root: RunRoot, output: StageOutput, shards: Iterable[str]) -> None:
    """Delete shard sets: the commit record first (the set stops counting), then its shards.
    The index is dropped too: a set redone under the same name gets a new record."""
    shards = list(shards)
    if not shards:
        return
    for name in _index_files(root, output):
        root.delete(f"{output.record_dir}/{COMMITS_DIR}/{name}")
    for shard in shards:
        root.delete(commit_path(output, shard))
        for table in output.tables:
            root.delete(f"{table.name}/{shard}.parquet")


def compact(root: RunRoot, output: StageOutput, min_loose: int = 1) -> int:
    """After a job: fold the records not yet in the index into a new index (when there are at
    least `min_loose`); returns how many were folded in."""
    state = read_output(root, output)
    if state.loose >= min_loose and state.commits:
        write_index(root, output, state.commits, state.stamps)
    return state.loose


def clear_output(root: RunRoot, output: StageOutput) -> None:
    """Delete a stage's tables, its commit records and its errors/ rows (--overwrite)."""
    for table in output.tables:
        root.delete_table(table.name)
    root.delete_table(f"{output.record_dir}/{COMMITS_DIR}")
    root.delete_shards(ERRORS.name, ERRORS_STAGE_PREFIX.format(stage=output.stage))


def prepare_output(root: RunRoot, output: StageOutput, overwrite: bool) -> tuple[OutputState, list[str]]:
    """Before a run: with `overwrite`, clear the output; else remove broken and uncommitted
    shard sets (and leftover temporary files). Returns the state and what was removed, in
    words for the summary."""
    if overwrite:
        clear_output(root, output)
        return OutputState(output, {}, {}, [], {}), []
    state = read_output(root, output)
    for table in output.tables:
        root.remove_temporary(table.name)
    notes = [f"{output.record_dir}/{COMMITS_DIR}/{shard}.json: {why}; its assets are redone"
             for shard, why in state.broken.items()]
    drop_shard_sets(root, output, state.broken)
    for item in state.uncommitted:
        root.delete(f"{item}.parquet")
    notes += [f"{item}.parquet had no commit record (an interrupted run): removed"
              for item in state.uncommitted]
    state.broken, state.uncommitted = {}, []
    return state, notes


def outputs_downstream_of(stage: str) -> list[StageOutput]:
    """The outputs made from `stage`'s output (lineage), e.g. labels and features of render."""
    return [o for o in STAGE_OUTPUTS.values() if o.upstream == stage]

