"""`partlift status`: what a run root holds (tables from the data contract, last job per stage)."""

from __future__ import annotations

import pyarrow.parquet as pq

from operators.store.storage import PARQUET_SUFFIX, RunRoot
from operators.store.tables import STAGE_OUTPUTS, TABLES
from rayjobs.config import StatusJob


def table_counts(root: RunRoot) -> dict[str, tuple[int, int]]:
    """table -> (shards, rows), from Parquet footers only (no data is read)."""
    counts = {}
    for table in TABLES:
        shards = root.list_shards(table)
        if shards:
            rows = sum(pq.ParquetFile(root.path(table, s + PARQUET_SUFFIX),
                                      filesystem=root.fs).metadata.num_rows for s in shards)
            counts[table] = (len(shards), rows)
    return counts


def print_status(config: StatusJob) -> None:
    root = RunRoot(config.root, config.storage.options())
    root.check_reachable(create=False)  # a mistyped local root is an error, not "empty"
    counts = table_counts(root)
    print(f"run root {root.display()}")
    if not counts:
        print("  (empty: run `partlift assets make` or `partlift demo`)")
    for table, (shards, rows) in counts.items():
        print(f"  {table:<16} {rows:>9} rows in {shards} shards")
    shown = set()
    for output in STAGE_OUTPUTS.values():
        if root.exists(output.record):
            job = root.read_json(output.record)
            if job["job_id"] in shown:
                continue
            shown.add(job["job_id"])
            c = job["counts"]
            print(f"  last {job['stage']}: {job['ended']}  ok {c['ok']}, failed {c['failed']}, "
                  f"skipped {c['skipped_done']}  ({job['job_id']})")
