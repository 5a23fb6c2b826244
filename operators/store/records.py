"""What happened in a run root: the job record (`_job.json`) of every kind of job, and the
`errors/` rows of failed inputs.

`JobRecord` is the one record every job writes (data stages, train, pretrain, sweep, score,
submit): what ran (stage, job id, run name, package version, git commit), with which resolved
config (redacted by type: `SecretStr` values and the passwords of URLs never appear), on which
inputs, what it wrote, when, and for jobs over assets an `AssetCounts` block where
ok + failed = processed and processed + skipped = input. `write_job_record` puts it beside each
output (`<dir>/_job.json`) and keeps every job's copy under `_jobs/<job_id>.json`.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pyarrow.compute as pc
from pydantic import BaseModel, SecretStr

from operators.store.storage import FORMAT_VERSION, RunRoot, make_table, rows_to_columns
from operators.store.tables import ERRORS, JOB_RECORD

REDACTED = "***"
JOBS_DIR = "_jobs"
ERROR_MESSAGE_CHARS = 2000


# ----------------------------------------------------------------------------- redaction


def redact(value: Any) -> Any:
    """A JSON-ready copy of a config value with secrets removed by type: every `SecretStr`
    becomes "***" and the password of a URL `scheme://user:password@host` becomes "***",
    whatever the key is called."""
    if isinstance(value, SecretStr):
        return REDACTED
    if isinstance(value, BaseModel):
        return {name: redact(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, Mapping):
        return {str(k): redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, Path):
        return str(value)
    return value


def redact_url(text: str) -> str:
    """`scheme://user:password@host/...` -> `scheme://user:***@host/...`; other text unchanged."""
    if "://" not in text or "@" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    if parts.password is None:
        return text
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:{REDACTED}@{host}"))


# ----------------------------------------------------------------------------- job records


def new_job_id(stage: str) -> str:
    return f"{stage}-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


def git_commit() -> str:
    here = Path(__file__).resolve().parents[2]
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


def iso_time(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class AssetCounts:
    """Per-asset accounting of a job over assets: ok + failed = processed, and processed +
    skipped_done + waiting = input. `units` adds named counts (views, points, ...)."""

    input: int
    skipped_done: int
    ok: int
    failed: int
    units: Mapping[str, int] = field(default_factory=dict)
    waiting: int = 0  # inputs an upstream stage has not made yet (e.g. assets not rendered)

    @property
    def processed(self) -> int:
        return self.ok + self.failed

    def to_json(self) -> dict[str, int]:
        return {"input": self.input, "skipped_done": self.skipped_done,
                "waiting_upstream": self.waiting, "processed": self.processed, "ok": self.ok,
                "failed": self.failed, **dict(self.units)}


@dataclass(frozen=True)
class ErrorSummary:
    """Failures of one job: counts by error type and the first few messages."""

    by_type: Mapping[str, int] = field(default_factory=dict)
    examples: Sequence[str] = ()

    @classmethod
    def of(cls, rows: Sequence[Mapping[str, Any]], n_examples: int = 5) -> "ErrorSummary":
        """From `errors/` rows (error_type, asset_id, message)."""
        types = Counter(str(r["error_type"]) for r in rows)
        examples = [f"{r['asset_id']}: {r['message']}" if r.get("asset_id") else str(r["message"])
                    for r in rows[:n_examples]]
        return cls(dict(types), examples)


@dataclass(frozen=True)
class JobRecord:
    """One job's record, written as `_job.json` (see the module docstring)."""

    stage: str
    job_id: str
    root: str
    config: Mapping[str, Any]  # already redacted (`redact(config)`)
    inputs: Mapping[str, str]
    outputs: Mapping[str, str]
    started: float
    ended: float
    name: str | None = None
    counts: AssetCounts | None = None
    errors: ErrorSummary | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.ended - self.started

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "stage": self.stage, "job_id": self.job_id, "name": self.name, "root": self.root,
            "format_version": FORMAT_VERSION, "package_version": package_version(),
            "git_commit": git_commit(),
            "config": dict(self.config), "inputs": dict(self.inputs),
            "outputs": dict(self.outputs), "started": iso_time(self.started),
            "ended": iso_time(self.ended), "seconds": round(self.seconds, 3), **dict(self.extra)}
        if self.counts is not None:
            record["counts"] = self.counts.to_json()
        if self.errors is not None:
            record["errors"] = {"by_type": dict(self.errors.by_type),
                                "examples": list(self.errors.examples),
                                "table": f"{self.root.rstrip('/')}/{ERRORS.name}/"}
        return record


def write_job_record(root: RunRoot, record: JobRecord, record_dirs: Sequence[str]) -> list[str]:
    """Write `<dir>/_job.json` for each of `record_dirs` and `_jobs/<job_id>.json`; returns
    where they are."""
    data = record.to_json()
    places = [f"{d.rstrip('/')}/{JOB_RECORD}" for d in dict.fromkeys(record_dirs)]
    places.append(f"{JOBS_DIR}/{record.job_id}.json")
    return [root.write_json(place, data) for place in places]


# ----------------------------------------------------------------------------- errors/ rows


def error_row(stage: str, job_id: str, asset_id: str, err: BaseException | str,
              view_id: int = -1, error_type: str | None = None) -> dict[str, Any]:
    """One `errors/` row: which stage and job failed on which input, and why."""
    return {"stage": stage, "job_id": job_id, "asset_id": asset_id, "view_id": view_id,
            "error_type": error_type or type(err).__name__,
            "message": str(err)[:ERROR_MESSAGE_CHARS],
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


# errors/ shards start with the stage that wrote them (so --overwrite finds a stage's rows).
ERRORS_STAGE_PREFIX = "{stage}-"


def error_shard(stage: str, shard: str, job_id: str) -> str:
    """Name of an `errors/` shard: the stage first, the job's suffix last (so a job's rows are
    found without reading other jobs')."""
    return f"{ERRORS_STAGE_PREFIX.format(stage=stage)}{shard}-{job_id[-6:]}"


def write_errors(root: RunRoot, stage: str, job_id: str, shard: str,
                 rows: Sequence[Mapping[str, Any]]) -> None:
    """Row-level failures go to the `errors/` table (one shard per failing batch and job)."""
    if rows:
        columns = rows_to_columns(rows)
        columns["view_id"] = np.asarray(columns["view_id"], np.int32)  # as in every table
        root.write_shard(ERRORS.name, error_shard(stage, shard, job_id), make_table(columns))


def job_errors(root: RunRoot, job_id: str) -> list[dict[str, Any]]:
    """The `errors/` rows one job wrote (reads only that job's shards)."""
    suffix = f"-{job_id[-6:]}"
    rows: list[dict[str, Any]] = []
    for shard in root.list_shards(ERRORS.name):
        if shard.endswith(suffix):
            data = root.read_shard(ERRORS.name, shard, ["job_id", "asset_id", "error_type",
                                                        "message"])
            rows += data.filter(pc.equal(data["job_id"], job_id)).to_pylist()
    return rows
