"""Shared driver plumbing: starting Ray, running a sharded stage, `_job.json`, errors, summaries."""

from __future__ import annotations

import collections
import hashlib
import datetime as dt
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data

from operators.store.storage import RunRoot, make_table
from rayjobs.config import PartliftConfig, RayConfig, StageResources
from rayjobs.resources import map_batches_args

ERRORS_TABLE = "errors"


class JobFailedError(RuntimeError):
    """Too many rows failed (above job.max_error_fraction); the message says where to look."""


def ensure_ray(cfg: RayConfig) -> None:
    """Connect to `ray.address` or start a local Ray (dashboard on 127.0.0.1 only)."""
    if ray.is_initialized():
        return
    if cfg.address is None:
        # A private local cluster: Ray 2.60's token auth only adds a warning and a file here.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=cfg.include_dashboard,
                 dashboard_host=cfg.dashboard_host, log_to_driver=True,
                 configure_logging=True, logging_level="WARNING")
    else:
        ray.init(address=cfg.address, log_to_driver=True, logging_level="WARNING")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress_bars
    ctx.print_on_execution_start = False


def new_job_id(stage: str) -> str:
    return f"{stage}-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


def error_row(stage: str, job_id: str, asset_id: str, err: BaseException | str,
              view_id: int = -1, error_type: str | None = None) -> dict[str, Any]:
    return {"stage": stage, "job_id": job_id, "asset_id": asset_id, "view_id": view_id,
            "error_type": error_type or type(err).__name__, "message": str(err)[:2000],
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def write_errors(root: RunRoot, stage: str, job_id: str, shard: str, rows: Sequence[dict]) -> None:
    """Row-level failures go to the `errors/` table (one shard per failing batch and job)."""
    if rows:
        columns = {k: [r[k] for r in rows] for k in rows[0]}
        root.write_shard(ERRORS_TABLE, f"{stage}-{shard}-{job_id[-6:]}", make_table(columns))


@dataclass(frozen=True)
class StageTables:
    """The tables a stage writes, in order; `commit` (written last) marks a shard as done."""

    stage: str
    tables: tuple[str, ...]
    commit: str

    def prepare(self, root: RunRoot, overwrite: bool) -> tuple[set[str], list[str]]:
        """Asset ids already done and the uncommitted shards removed; with `overwrite`, delete
        the tables and this stage's errors/ rows and start from nothing."""
        if overwrite:
            for table in self.tables:
                root.delete_table(table)
            root.delete_shards(ERRORS_TABLE, f"{self.stage}-")
            return set(), []
        removed = root.remove_uncommitted(self.tables, self.commit)
        return root.ids_in(self.commit), removed


def iter_results(items: Sequence[dict], fn: Callable[..., dict], fn_kwargs: Mapping[str, Any],
                 resources: StageResources, preserve_order: bool = False) -> Iterator[dict]:
    """Run `fn` over `items` in Ray Data task batches; yield the per-item summary rows as they
    arrive (in input order with `preserve_order`)."""
    if not items:
        return
    blocks = max(1, -(-len(items) // resources.batch_size))
    ds = ray.data.from_items(list(items), override_num_blocks=blocks)
    ds = ds.map_batches(fn, fn_kwargs=dict(fn_kwargs), batch_format="numpy",
                        **map_batches_args(resources, actors=False))
    ds.context.execution_options.preserve_order = preserve_order
    yield from ds.iter_rows()


def run_batches(items: Sequence[dict], fn: Callable[..., dict], fn_kwargs: Mapping[str, Any],
                resources: StageResources) -> list[dict]:
    """All per-item summary rows of `iter_results`."""
    return list(iter_results(items, fn, fn_kwargs, resources))


def git_commit() -> str:
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_version() -> str:
    try:
        return metadata.version("partlift")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class StageReport:
    """What a stage did; written as `_job.json` and printed as the closing summary."""

    stage: str
    job_id: str
    root: str
    inputs: dict[str, str]
    outputs: dict[str, str]
    started: float
    ended: float
    input_count: int
    skipped_done: int
    ok: int
    failed: int
    units: dict[str, int] = field(default_factory=dict)  # e.g. {"views": 456}
    error_types: dict[str, int] = field(default_factory=dict)
    error_examples: list[str] = field(default_factory=list)
    removed_uncommitted: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.ended - self.started

    def to_json(self, config: PartliftConfig) -> dict[str, Any]:
        return {
            "stage": self.stage, "job_id": self.job_id, "root": self.root,
            "package_version": package_version(), "git_commit": git_commit(),
            "config": config.redacted(), "inputs": self.inputs, "outputs": self.outputs,
            "started": _iso(self.started), "ended": _iso(self.ended),
            "seconds": round(self.seconds, 3),
            "counts": {"input": self.input_count, "skipped_done": self.skipped_done,
                       "processed": self.ok + self.failed, "ok": self.ok, "failed": self.failed,
                       **self.units},
            "errors": {"by_type": self.error_types, "examples": self.error_examples,
                       "table": f"{self.root.rstrip('/')}/{ERRORS_TABLE}/"},
            "removed_uncommitted_shards": self.removed_uncommitted,
        }

    def summary_lines(self) -> list[str]:
        processed = self.ok + self.failed
        rate = lambda n: f"{n / self.seconds:.2f}/s" if self.seconds > 0 and n else "-"  # noqa: E731
        rows = [("stage", self.stage), ("input assets", str(self.input_count)),
                ("already done (skipped)", str(self.skipped_done)),
                ("processed ok", f"{self.ok}  ({rate(self.ok)})"),
                ("failed", f"{self.failed}" + (f"  -> {self.root.rstrip('/')}/{ERRORS_TABLE}/"
                                              if self.failed else ""))]
        rows += [(name, f"{n}  ({rate(n)})") for name, n in self.units.items()]
        rows += [("wall time", f"{self.seconds:.1f} s")]
        rows += [(f"output {k}", v) for k, v in self.outputs.items()]
        if processed == 0:
            rows.append(("note", "nothing to do: every input is already done (use --overwrite to redo)"))
        width = max(len(k) for k, _ in rows)
        return [f"  {k.ljust(width)}  {v}" for k, v in rows]


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")


def summarise_rows(rows: Sequence[dict]) -> tuple[int, int, dict[str, int], list[str]]:
    """ok count, failed count, error types, a few example messages from per-item summaries."""
    failed = [r for r in rows if r["status"] != "ok"]
    types = collections.Counter(str(r["error_type"]) for r in failed)
    examples = [f"{r['asset_id']}: {r['message']}" if r["asset_id"] else str(r["message"])
                for r in failed[:5]]
    return len(rows) - len(failed), len(failed), dict(types), examples


def finish_stage(root: RunRoot, config: PartliftConfig, report: StageReport,
                 record_dir: str) -> StageReport:
    """Write `<record_dir>/_job.json` (+ a copy under `_jobs/`), print the summary, and fail the
    job when the error fraction passes `job.max_error_fraction`."""
    record = report.to_json(config)
    root.write_json(f"{record_dir}/_job.json", record)
    root.write_json(f"_jobs/{report.job_id}.json", record)
    print(f"\n{report.stage} finished:")
    print("\n".join(report.summary_lines()))
    processed = report.ok + report.failed
    if processed and report.failed / processed > config.job.max_error_fraction:
        raise JobFailedError(
            f"{report.stage}: {report.failed} of {processed} assets failed "
            f"({report.failed / processed:.0%} > job.max_error_fraction="
            f"{config.job.max_error_fraction:g}); the good rows were written. First errors:\n  "
            + "\n  ".join(report.error_examples)
            + f"\nAll errors: {root.display(ERRORS_TABLE)}/, record: {root.display(record_dir, '_job.json')}")
    return report


def seed_for(seed: int, asset_id: str) -> int:
    """A per-asset seed that does not depend on batch composition or worker."""
    digest = int(hashlib.sha256(asset_id.encode()).hexdigest()[:15], 16)
    return int(np.random.SeedSequence([seed, digest]).generate_state(1)[0])
