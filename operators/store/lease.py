"""One writer per stage and root: a lease object in the root.

`<root>/_leases/<name>.json` is created exclusively (O_EXCL locally, a conditional PUT with
`If-None-Match: *` on S3), holds who holds it (run name, host, process, Ray job id, when) and is
renewed by a background thread while the job runs. A second job is refused with a message naming
the holder, unless the lease is stale (not renewed for `timeout_s`), its holder is provably gone
(same host, process not running), the same run name takes it over (a resubmission or a KubeRay
retry must not wait for staleness), or `force` breaks it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from operators.store.storage import RunRoot

LEASES_DIR = "_leases"


class LeaseHeldError(RuntimeError):
    """Another job holds the lease; the message names it and the ways forward."""


class LeaseLostError(RuntimeError):
    """This job's lease was taken over (or broken with --force) while it ran: it stops before
    committing more, so two writers never both commit."""


@dataclass(frozen=True)
class Holder:
    run_name: str
    host: str
    pid: int
    ray_job_id: str
    token: str
    started: float
    renewed: float

    def describe(self) -> str:
        started = dt.datetime.fromtimestamp(self.started, dt.timezone.utc).isoformat(timespec="seconds")
        ray = f", Ray job {self.ray_job_id}" if self.ray_job_id else ""
        return (f"run '{self.run_name}' on {self.host} (pid {self.pid}{ray}), started {started}, "
                f"renewed {time.time() - self.renewed:.0f} s ago")


def _ray_job_id() -> str:
    """The submission id of the Ray Job this process runs in, if any."""
    return os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("RAY_JOB_ID") or ""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """A held lease; `release()` (or leaving `hold`) gives it back."""

    def __init__(self, root: RunRoot, name: str, holder: Holder, renew_s: float) -> None:
        self.root, self.name, self.holder = root, name, holder
        self.path = f"{LEASES_DIR}/{name}.json"
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, args=(renew_s,), daemon=True,
                                        name=f"partlift-lease-{name}")
        self._thread.start()

    def _renew(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                current = _read(self.root, self.path)
                if current is None or current.token != self.holder.token:
                    self.lost = True  # taken over or broken elsewhere: never recreate it
                    return
                renewed = Holder(**{**asdict(self.holder), "renewed": time.time()})
                if not self._stop.is_set():
                    self.root.write_bytes(self.path, json.dumps(asdict(renewed)).encode())
            except OSError:
                continue  # storage hiccup: try again at the next tick

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            current = _read(self.root, self.path)
            if current is not None and current.token == self.holder.token:
                self.root.delete(self.path)
        except OSError:  # storage is gone: the lease goes stale after its timeout instead
            pass


def _raw(root: RunRoot, path: str) -> bytes | None:
    try:
        return root.read_bytes(path)
    except FileNotFoundError:
        return None


def _parse(raw: bytes, path: str) -> Holder:
    try:
        return Holder(**json.loads(raw))
    except (ValueError, TypeError):  # never written half (created whole): damaged by hand
        now = time.time()
        return Holder(f"unknown (the lease {path} cannot be read)", "?", -1, "", "", now, now)


def _read(root: RunRoot, path: str) -> Holder | None:
    raw = _raw(root, path)
    return None if raw is None else _parse(raw, path)


def check_held(root: RunRoot, stage: str, token: str) -> None:
    """Fencing: raise LeaseLostError unless the lease of `stage` still holds `token` (called
    before a shard set is committed)."""
    current = _read(root, f"{LEASES_DIR}/{stage}.json")
    if current is None or current.token != token:
        holder = current.describe() if current is not None else "nobody (it was broken)"
        raise LeaseLostError(f"the lease of stage '{stage}' on {root.display()} is now held by "
                             f"{holder}: this job stopped before committing more")


def acquire(root: RunRoot, name: str, run_name: str, *, timeout_s: float = 120.0,
            force: bool = False, what: str | None = None) -> Lease:
    """Take the lease `name` for `run_name` (see the module docstring)."""
    now = time.time()
    me = Holder(run_name, socket.gethostname(), os.getpid(), _ray_job_id(), uuid.uuid4().hex,
                now, now)
    path = f"{LEASES_DIR}/{name}.json"
    for _ in range(3):
        if root.create_exclusive(path, json.dumps(asdict(me)).encode()):
            return Lease(root, name, me, renew_s=max(1.0, timeout_s / 4))
        raw = _raw(root, path)
        if raw is None:
            continue  # released in between: try again
        current = _parse(raw, path)
        gone = current.host == me.host and current.pid > 0 and not _process_alive(current.pid)
        stale = time.time() - current.renewed > timeout_s
        same_run = current.run_name == run_name and not (current.host == me.host
                                                         and _process_alive(current.pid))
        if not (force or gone or stale or same_run):
            raise LeaseHeldError(
                f"{what or name} on {root.display()} is being written by {current.describe()}. "
                "One writer at a time: wait for it, or, if it is no longer running, rerun with "
                f"the same run name (job.name) to take over, wait {timeout_s:.0f} s after its "
                "last renewal, or break the lease with --force.")
        if _raw(root, path) == raw:  # nobody took it meanwhile
            root.delete(path)
    raise LeaseHeldError(f"{what or name} on {root.display()}: could not take the lease "
                         "(others are taking it at the same time)")


@contextmanager
def hold(root: RunRoot, names: Sequence[str], run_name: str, *, timeout_s: float = 120.0,
         force: bool = False) -> Iterator[list[Lease]]:
    """Hold the leases `names` (in a fixed order, so two jobs never wait on each other) while
    the block runs."""
    leases: list[Lease] = []
    try:
        for name in sorted(names):
            leases.append(acquire(root, name, run_name, timeout_s=timeout_s, force=force,
                                  what=f"stage '{name}'" if "/" not in name else name))
        yield leases
    finally:
        for lease in reversed(leases):
            lease.release()
