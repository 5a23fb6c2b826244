"""The stage driver: the skeleton every data job shares, written once.

A stage (`Stage`) declares its name, the outputs it writes (`operators.store.tables`), how it
checks its settings, reads its input, plans the work from what its outputs already hold, and
runs that work as a Ray Data stream. `run_stage` owns the rest, in this order:

    check settings -> reach the run root -> read the input (before Ray: a missing input is an
    error naming the command that makes it) -> start or join Ray -> job id, the outputs'
    leases, clock -> prepare the outputs (remove uncommitted shards, or clear them with
    --overwrite) -> plan -> run -> count ok rows and this job's errors/ rows -> `_job.json`
    beside every output -> summary -> fail when the error fraction passes
    job.max_error_fraction.

Workers report failures through `AssetErrors`: a failed asset becomes an `errors/` row and leaves
the stream, the rest of the batch goes on. A job's failures are counted from its own errors/
rows, so ok + failed = processed holds whichever step of a stream failed.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import ray
import ray.data

from operators.failures import InfrastructureError, infrastructure_problem
from operators.store.commits import (OutputState, ShardCommit, compact, outputs_downstream_of,
                                     prepare_output, read_output, settings_hash, write_shard_set)
from operators.store.integrity import check_root_format, check_stage_settings, record_stage_settings
from operators.store.lease import LeaseLostError, check_held, hold
from operators.store.records import (AssetCounts, ErrorSummary, JobRecord, error_row, job_errors,
                                     new_job_id, write_errors, write_job_record)
from operators.store.storage import RunRoot, StorageError, StorageOptions, shard_name
from operators.store.tables import ERRORS, StageOutput
from rayjobs.config import JobBase, RayConfig, StepResources
from rayjobs.errors import ClusterError, JobFailedError
from rayjobs.resources import map_batches_args

T = TypeVar("T")
R = TypeVar("R")


# ----------------------------------------------------------------------------- Ray


def ray_init_kwargs(cfg: RayConfig, environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """How to start or join Ray. An address (`ray.address`, else `RAY_ADDRESS`, which a submitted
    Ray Job has) joins that cluster as it is: no CPU count, auth as the cluster has it. Without
    one, a private local Ray: `address="local"`, because a bare `ray.init()` joins whatever
    cluster `ray start` left recorded on the machine."""
    address = cfg.address or environ.get("RAY_ADDRESS") or "local"
    if address != "local":
        return {"address": address, "log_to_driver": True, "logging_level": "WARNING"}
    return {"address": "local", "num_cpus": cfg.num_cpus, "include_dashboard": cfg.include_dashboard,
            "dashboard_host": cfg.dashboard_host, "log_to_driver": True,
            "configure_logging": True, "logging_level": "WARNING"}


def check_cluster_reachable(address: str, timeout_s: float) -> None:
    """Fail in `timeout_s` with one line when nothing answers at a cluster's host:port (a bare
    `ray.init` on a wrong address retries for minutes)."""
    if address in ("auto", "local"):
        return
    location = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = location.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"Ray address {address!r}: expected host:port, ray://host:port or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        reason = (f"no answer within {timeout_s:g} s" if isinstance(err, TimeoutError)
                  else err.strerror or type(err).__name__)
        raise ClusterError(f"cannot reach the Ray cluster at {address} ({reason}): check "
                           "--address / RAY_ADDRESS and that the head node is up") from err


def ensure_ray(cfg: RayConfig) -> None:
    """Join the configured cluster or start a private local Ray (dashboard on 127.0.0.1)."""
    if not ray.is_initialized():
        kwargs = ray_init_kwargs(cfg)
        if kwargs["address"] == "local":
            # A private cluster: Ray 2.60's token auth would only add a warning and a file here.
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        else:
            check_cluster_reachable(kwargs["address"], cfg.connect_timeout_s)
        on_sigterm = signal.getsignal(signal.SIGTERM)
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ClusterError(f"cannot join the Ray cluster at {kwargs['address']}: "
                               f"{first}") from err
        if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
            # ray.init replaces a SIGTERM handler with sys.exit(15); keep the one the caller
            # set (the CLI's stops the job like Ctrl-C and exits 143)
            signal.signal(signal.SIGTERM, on_sigterm)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = cfg.progress_bars
    context.print_on_execution_start = False


# ----------------------------------------------------------------------------- workers


@dataclass(frozen=True)
class TaskContext:
    """What a Ray task or actor of a job needs to reach the root, commit its shard sets and
    report (picklable). `fingerprints`: stage -> the settings hash its commits record."""

    root_uri: str
    storage: StorageOptions
    job_id: str
    fingerprints: Mapping[str, str] = field(default_factory=dict)
    leases: Mapping[str, str] = field(default_factory=dict)  # stage -> this job's lease token
    breaker: Any = None                  # the job's FailureBreaker actor (None: no breaker)
    max_consecutive_failures: int = 0

    def root(self) -> RunRoot:
        return RunRoot(self.root_uri, self.storage)

    def commit(self, output: StageOutput, shard: str, data: Mapping[str, Any],
               assets: Iterable[str], upstream: Mapping[str, str] | None = None) -> ShardCommit:
        """Write one shard set of `output` and its commit record, if this job still holds the
        stage's lease (fencing: a job whose lease was taken over commits nothing more)."""
        root = self.root()
        token = self.leases.get(output.stage)
        check = (lambda: check_held(root, output.stage, token)) if token else None
        try:
            return write_shard_set(root, output, shard, data, job_id=self.job_id,
                                   fingerprint=self.fingerprints[output.stage], assets=assets,
                                   upstream=upstream, before_commit=check)
        except OSError as err:  # a write to the root failing is never one asset's fault
            if infrastructure_problem(err) is not None:
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise StorageError(f"cannot write {output.record_dir}/ shard {shard} under "
                               f"{root.display()}: {first}") from err


@ray.remote(num_cpus=0)
class JobMonitor:
    """One per job, beside its workers: the circuit breaker (assets that failed in a row; any
    success resets it) and the channel that carries why a worker stopped the job to the driver
    (Ray Data hands the driver only the text of a worker's exception)."""

    def __init__(self) -> None:
        self.in_a_row = 0
        self.reason = ""

    def failed(self) -> int:
        self.in_a_row += 1
        return self.in_a_row

    def succeeded(self) -> None:
        self.in_a_row = 0

    def stop(self, reason: str) -> None:
        self.reason = self.reason or reason

    def stopped(self) -> str:
        return self.reason


def _report_stop(monitor: Any, err: BaseException) -> None:
    """In a worker: if `err` stops the job (infrastructure), tell the driver why."""
    problem = _infrastructure(err)
    if problem is not None and monitor is not None:
        ray.get(monitor.stop.remote(problem))


def _reporting_task(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A task function that reports an infrastructure failure to the job's monitor."""
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            task = kwargs.get("task")
            _report_stop(getattr(task, "breaker", None), err)
            raise
    return call


def _reporting_actor(cls: type) -> type:
    """An actor class whose construction and calls report infrastructure failures likewise."""
    class Reporting(cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._monitor = getattr(kwargs.get("task"), "breaker", None)
            try:
                super().__init__(*args, **kwargs)
            except Exception as err:
                _report_stop(self._monitor, err)
                raise

        def __call__(self, batch: Any) -> Any:
            try:
                return super().__call__(batch)
            except Exception as err:
                _report_stop(self._monitor, err)
                raise

    Reporting.__name__ = Reporting.__qualname__ = cls.__name__
    return Reporting


class AssetErrors:
    """The per-asset "do it, or record an error row" pattern of every worker.

    `attempt(items, work, asset_of)` yields (item, result) for the items whose `work` succeeded.
    A row error (this input is bad) becomes an `errors/` row for `asset_of(item)` and the batch
    goes on; an infrastructure error (storage, credentials, endpoint, device: see
    operators.failures) stops the job at once; so does the circuit breaker when
    `job.max_consecutive_failures` assets in a row failed. `write` puts the batch's rows into
    one errors/ shard."""

    def __init__(self, stage: str, task: TaskContext) -> None:
        self.stage, self.task = stage, task
        self.rows: list[dict[str, Any]] = []
        self.failed: set[str] = set()  # every asset recorded, written or not
        self._told_success = False  # the breaker knows this worker's last asset succeeded

    def succeeded(self) -> None:
        """An asset succeeded: reset the breaker's count (one message per failure-to-success
        turn; Ray keeps one caller's messages to an actor in order, so it lands before the
        failures that follow)."""
        if self.task.breaker is not None and not self._told_success:
            self.task.breaker.succeeded.remote()
            self._told_success = True

    def record(self, asset_id: str, err: BaseException | str, error_type: str | None = None,
               view_id: int = -1) -> None:
        self.rows.append(error_row(self.stage, self.task.job_id, asset_id, err, view_id=view_id,
                                   error_type=error_type))
        self.failed.add(asset_id)
        self._told_success = False
        if self.task.breaker is not None and self.task.max_consecutive_failures:
            in_a_row = ray.get(self.task.breaker.failed.remote())
            if in_a_row >= self.task.max_consecutive_failures:
                self.write()  # the rows that tripped it are kept
                raise InfrastructureError(
                    f"{self.stage}: {in_a_row} assets in a row failed (the last, {asset_id}: "
                    f"{str(err)[:200]}): the job stopped, as every asset fails the same way "
                    "(job.max_consecutive_failures); see errors/ and fix the common cause")

    def attempt(self, items: Iterable[T], work: Callable[[T], R], asset_of: Callable[[T], str],
                describe: Callable[[T, Exception], str] | None = None) -> Iterator[tuple[T, R]]:
        for item in items:
            try:
                result = work(item)
            except Exception as err:  # row-level: recorded in errors/, the batch goes on
                problem = infrastructure_problem(err)
                if problem is not None:  # not this input's fault: stop the job
                    self.write()  # the error rows of this batch so far are kept
                    raise InfrastructureError(f"{self.stage}: {problem}") from err
                message = describe(item, err) if describe is not None else str(err)
                self.record(asset_of(item), message, error_type=type(err).__name__)
                continue
            self.succeeded()
            yield item, result

    def write(self, shard: str | None = None, root: RunRoot | None = None) -> None:
        """Write this batch's rows (`shard` names the batch; default: from the failed ids)."""
        if self.rows:
            name = shard or shard_name(r["asset_id"] for r in self.rows)
            write_errors(root or self.task.root(), self.stage, self.task.job_id, name, self.rows)
            self.rows = []  # written once, even when a batch is stopped and written early


def items_dataset(items: Sequence[dict], batch_size: int) -> ray.data.Dataset:
    """A dataset of work items in blocks of one task batch each."""
    return ray.data.from_items(list(items), override_num_blocks=max(1, -(-len(items) // batch_size)))


def map_tasks(ds: ray.data.Dataset, fn: Callable[..., Any], resources: StepResources,
              **fn_kwargs: Any) -> ray.data.Dataset:
    """A step of stateless CPU tasks."""
    return ds.map_batches(_reporting_task(fn), fn_kwargs=fn_kwargs, batch_format="numpy",
                          **map_batches_args(resources, actors=False))


def map_actors(ds: ray.data.Dataset, cls: type, resources: StepResources,
               **constructor_kwargs: Any) -> ray.data.Dataset:
    """A step on an actor pool (models loaded once per actor; GPUs when the cluster has them)."""
    return ds.map_batches(_reporting_actor(cls), fn_constructor_kwargs=constructor_kwargs,
                          batch_format="numpy", **map_batches_args(resources, actors=True))


# ----------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class JobContext:
    """One run of a stage: its config, root, job id, clock, settings fingerprints and the state
    of its outputs after they were prepared (stage -> OutputState)."""

    config: JobBase
    root: RunRoot
    job_id: str
    started: float
    fingerprints: Mapping[str, str]
    outputs: Mapping[str, OutputState]
    leases: Mapping[str, str] = field(default_factory=dict)
    breaker: Any = None

    @property
    def task(self) -> TaskContext:
        return TaskContext(self.config.root, self.config.storage.options(), self.job_id,
                           dict(self.fingerprints), dict(self.leases), self.breaker,
                           self.config.job.max_consecutive_failures)


@dataclass
class Plan:
    """The work of one run: `items` (one dict per asset or file to process now), how many
    inputs there are in all, how many of those are already done, how many wait for an upstream
    stage, and notes for the summary (what is redone and why)."""

    items: list[dict[str, Any]]
    input_count: int
    skipped_done: int
    waiting: int = 0
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class Stage(Generic[T]):
    """A data stage: a declaration plus its stream. Subclasses set `name` and `outputs` and
    implement `read_input`, `plan` and `execute`; the rest has defaults."""

    name: str = ""                       # recorded in _job.json and the summary
    id_prefix: str = ""                  # job ids start with it (default: name)
    outputs: tuple[StageOutput, ...] = ()
    creates_root: bool = False           # a missing local root is created, not an error

    def check(self, config: Any) -> None:
        """Settings checks that need no Ray (raise ConfigError)."""

    def read_input(self, root: RunRoot, config: Any) -> T:
        """The stage's input, read before Ray starts; FileNotFoundError when there is none."""
        raise NotImplementedError

    def settings(self, config: Any) -> dict[str, dict[str, Any]]:
        """Per output stage, the settings that shape its rows (its fingerprint)."""
        return {output.stage: {} for output in self.outputs}

    def plan(self, ctx: JobContext, source: T) -> Plan:
        """The work left, from the input and `ctx.outputs` (what the outputs hold)."""
        raise NotImplementedError

    def execute(self, ctx: JobContext, plan: Plan) -> Iterable[dict[str, Any]]:
        """Run the planned work; yields one summary row (asset_id, status) per finished item."""
        raise NotImplementedError

    def inputs(self, ctx: JobContext) -> dict[str, str]:
        """Input URIs and settings recorded in _job.json."""
        return {}

    def units(self, ctx: JobContext, plan: Plan, ok: int) -> dict[str, int]:
        """Named counts for the summary (views, points, ...)."""
        return {}


@dataclass(frozen=True)
class StageReport:
    """What a stage run did: its job record (written as `_job.json`) and what resume removed;
    printed as the summary."""

    record: JobRecord
    notes: list[str]

    stage = property(lambda self: self.record.stage)
    job_id = property(lambda self: self.record.job_id)
    outputs = property(lambda self: dict(self.record.outputs))
    seconds = property(lambda self: self.record.seconds)
    counts = property(lambda self: self.record.counts)
    ok = property(lambda self: self.counts.ok)
    failed = property(lambda self: self.counts.failed)
    skipped_done = property(lambda self: self.counts.skipped_done)
    units = property(lambda self: dict(self.counts.units))

    def summary_lines(self) -> list[str]:
        rate = lambda n: f"{n / self.seconds:.2f}/s" if self.seconds > 0 and n else "-"  # noqa: E731
        errors_at = f"{self.record.root.rstrip('/')}/{ERRORS.name}/"
        rows = [("stage", self.stage), ("input assets", str(self.counts.input)),
                ("already done (skipped)", str(self.skipped_done))]
        if self.counts.waiting:
            rows.append(("waiting for an upstream stage", str(self.counts.waiting)))
        rows += [
                ("processed ok", f"{self.ok}  ({rate(self.ok)})"),
                ("failed", f"{self.failed}" + (f"  -> {errors_at}" if self.failed else ""))]
        rows += [(name, f"{n}  ({rate(n)})") for name, n in self.units.items()]
        rows += [("wall time", f"{self.seconds:.1f} s")]
        rows += [(f"output {k}", v) for k, v in self.outputs.items()]
        if self.counts.processed == 0:
            rows.append(("note", "nothing to do: every input is already done (use --overwrite "
                                 "to redo)" if not self.counts.waiting else
                         "nothing to do yet: the rest waits for an upstream stage"))
        width = max(len(k) for k, _ in rows)
        return [f"  {k.ljust(width)}  {v}" for k, v in rows]


def run_stage(config: JobBase, stage: Stage[Any], *, check: bool = True) -> StageReport:
    """Run `stage` on `config` (see the module docstring); `check=False` when its settings were
    checked already (a pipeline checks all its stages before the first starts)."""
    if check:
        stage.check(config)
    root = RunRoot(config.root, config.storage.options())
    root.check_reachable(create=stage.creates_root)
    check_root_format(root, mark=False)
    source = stage.read_input(root, config)
    settings = stage.settings(config)
    overwrite = config.job.overwrite
    if not overwrite:  # one table never mixes two settings
        for output in stage.outputs:
            check_stage_settings(root, output, settings[output.stage], stage.name)
    ensure_ray(config.ray)  # a wrong cluster address fails here, before the root is touched
    job_id = new_job_id(stage.id_prefix or stage.name)
    with hold(root, [o.stage for o in stage.outputs], config.job.name or job_id,
              timeout_s=config.job.lease_timeout_s, force=config.job.force) as leases:
        check_root_format(root, mark=True)
        if not overwrite:  # again under the lease: another job may have written meanwhile
            for output in stage.outputs:
                check_stage_settings(root, output, settings[output.stage], stage.name)
        started = time.time()
        states, notes = {}, []
        for output in stage.outputs:
            if overwrite:
                notes += stale_downstream(root, output, also_redone=stage.outputs)
            states[output.stage], removed = prepare_output(root, output, overwrite)
            notes += removed
            record_stage_settings(root, output, settings[output.stage], job_id)
        ctx = JobContext(config, root, job_id, started,
                         {stage_: settings_hash(s) for stage_, s in settings.items()}, states,
                         {lease.name: lease.holder.token for lease in leases}, JobMonitor.remote())
        plan = stage.plan(ctx, source)
        notes += plan.notes
        for note in notes:
            print(f"note: {note}")
        ok = 0
        try:
            for row in (stage.execute(ctx, plan) if plan.items else ()):
                ok += row["status"] == "ok"
        except Exception as err:  # infrastructure (storage, lease, breaker...): one line
            problem = ray.get(ctx.breaker.stopped.remote()) or _infrastructure(err)
            if not problem:
                raise
            raise InfrastructureError(
                f"{problem} ({stage.name} stopped after {ok} of {len(plan.items)} assets; what "
                "was committed is kept and a rerun resumes from there)") from err
        lost_leases = [lease.name for lease in leases if lease.lost]
        if lost_leases:
            raise LeaseLostError(f"the lease of {', '.join(lost_leases)} on {root.display()} was "
                                 "taken over while this job ran; see `partlift status`")
        for output in stage.outputs:  # the next plan reads one index, not a record per set
            compact(root, output)
    failures = job_errors(root, ctx.job_id)
    counts = AssetCounts(input=plan.input_count, skipped_done=plan.skipped_done, ok=ok,
                         failed=len({f["asset_id"] for f in failures}), waiting=plan.waiting,
                         units=stage.units(ctx, plan, ok))
    record = JobRecord(
        stage=stage.name, job_id=ctx.job_id, root=root.display(), config=config.redacted(),
        inputs=stage.inputs(ctx),
        outputs={t.name: root.display(t.name) + "/" for o in stage.outputs for t in o.tables},
        started=ctx.started, ended=time.time(), name=config.job.name, counts=counts,
        errors=ErrorSummary.of(failures),
        extra={"notes": notes, "settings": {k: settings_hash(v) for k, v in settings.items()}})
    return finish(root, config, StageReport(record, notes), [o.record_dir for o in stage.outputs])


def _infrastructure(err: BaseException) -> str | None:
    """The infrastructure problem in err's cause chain (Ray wraps a worker's exceptions)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        problem = infrastructure_problem(current)
        if problem is not None:
            return problem
        seen.add(id(current))
        current = current.__cause__ or getattr(current, "cause", None) or current.__context__
    return None


def stale_downstream(root: RunRoot, output: StageOutput,
                     also_redone: Sequence[StageOutput] = ()) -> list[str]:
    """What redoing `output` makes stale: the outputs made from it (but those this job redoes
    too), with how many assets."""
    notes = []
    for downstream in outputs_downstream_of(output.stage):
        if downstream in also_redone:
            continue
        held = len(read_output(root, downstream).by_asset)
        if held:
            notes.append(f"{downstream.record_dir}/ holds {held} assets made from the "
                         f"{output.stage} output this run replaces: the next "
                         f"`partlift {downstream.stage}` redoes them")
    return notes


def finish(root: RunRoot, config: JobBase, report: StageReport,
           record_dirs: Sequence[str]) -> StageReport:
    """Write the job record beside every output, print the summary, and fail the job when the
    error fraction passes `job.max_error_fraction`."""
    places = write_job_record(root, report.record, record_dirs)
    print(f"\n{report.stage} finished:")
    print("\n".join(report.summary_lines()))
    processed = report.counts.processed
    if processed and report.failed / processed > config.job.max_error_fraction:
        raise JobFailedError(
            f"{report.stage}: {report.failed} of {processed} assets failed "
            f"({report.failed / processed:.0%} > job.max_error_fraction="
            f"{config.job.max_error_fraction:g}); the good rows were written. First errors:\n  "
            + "\n  ".join(report.record.errors.examples)
            + f"\nAll errors: {root.display(ERRORS.name)}/, record: {places[0]}")
    return report
