"""`partlift submit`: any partlift command as a Ray Job on a cluster (the Ray Jobs SDK).

    the command checked here (a known command, a root the cluster can reach) -> a run name
    (given, or derived from the command line: the same command resubmitted is the same run) ->
    JobSubmissionClient.submit_job(entrypoint=`python -m rayjobs.cli <command>`, runtime_env=
    {working_dir: this project, less .git/.venv/data}, metadata naming the run, a new
    submission id per attempt) -> optionally follow its logs to the end and exit with its outcome

Inside the job `RAY_ADDRESS` is set, so the command joins the cluster it runs on (`ensure_ray`).
Every stage resumes from what its root holds and a run name takes over its own stale lease, so
a resubmission of the same run picks up where the last attempt stopped. Ray refuses a
submission id it has seen, even of a finished job: each attempt gets its own.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import hashlib
import os
import secrets
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from operators.settings import ConfigError
from rayjobs.driver import check_cluster_reachable
from rayjobs.errors import ClusterError

# What a job never needs from the project directory (Ray skips .git itself and honours
# `.gitignore` and `.rayignore`; these hold when the project is not a git checkout).
EXCLUDES = [".venv", "partlift-data", "**/__pycache__", "*.egg-info", ".pytest_cache",
            ".ruff_cache", "build", "dist"]
NOT_SUBMITTABLE = {"submit", "status", "migrate", "weights"}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
RUN_KEY = "partlift.run"
AGENT_WAIT_S = 60.0   # how long a submission waits for a just-started head's job agent


@dataclass(frozen=True)
class Submission:
    submission_id: str
    run: str
    command: list[str]
    entrypoint: str
    address: str


@dataclass(frozen=True)
class JobLine:
    submission_id: str
    run: str
    status: str
    started: str
    ended: str
    command: str
    message: str


def project_dir() -> Path:
    """The project directory that ships as the job's working_dir."""
    here = Path(__file__).resolve().parents[1]
    if not (here / "pyproject.toml").exists():
        raise ConfigError(f"partlift runs from an installed copy ({here}): submit needs the "
                          "project's source directory (a checkout), or an image that has it")
    return here


def command_root(args: Sequence[str]) -> str | None:
    """The run root the command names: `--root`, else `root:` in its last config file that has
    one (None: the default root)."""
    root = None
    for flag, value in zip(args, list(args[1:]) + [""], strict=True):
        if flag == "--root":
            return value
        if flag.startswith("--root="):
            return flag.split("=", 1)[1]
        if flag in ("-c", "--config") and Path(value).is_file():
            loaded = yaml.safe_load(Path(value).read_text()) or {}
            if isinstance(loaded, dict) and loaded.get("root"):
                root = str(loaded["root"])
    return root


def check_command(args: Sequence[str], commands: dict[str, Any]) -> None:
    """A command the cluster can run: known, not a client-side one, its root reachable there."""
    if not args:
        raise ConfigError("submit: give the partlift command after `--`, e.g. "
                          "`partlift submit --address URL -- render --root s3://bucket/run`")
    command = args[0]
    if command not in commands or command in NOT_SUBMITTABLE:
        known = sorted(set(commands) - NOT_SUBMITTABLE)
        raise ConfigError(f"submit: {command!r} is not a command to submit (one of: "
                          f"{', '.join(known)})")
    root = command_root(args)
    if root is None or ("://" not in root and not Path(root).is_absolute()):
        shown = root or "the default ./partlift-data"
        raise ConfigError(f"submit: the root is {shown}, a relative path: on the cluster the job "
                          "runs in a temporary copy of the project, so give --root an absolute "
                          "path the cluster's nodes share, or an s3:// root")


def given_name(args: Sequence[str]) -> str | None:
    """The command's own `--name` (`--name X` or `--name=X`)."""
    for flag, value in zip(args, list(args[1:]) + [""], strict=True):
        if flag == "--name" and value:
            return value
        if flag.startswith("--name="):
            return flag.split("=", 1)[1]
    return None


# Commands whose --name is the run's name; for `score` and `eval` it names their output
# (scores/<name>/, eval/<benchmark>/<name>/), so the run name goes to job.name instead.
NAME_IS_RUN = {"train", "pretrain", "finetune", "affordanceclip", "sweep"}


def run_name(args: Sequence[str], given: str | None) -> str:
    """The run: the given name, the command's own --name where that names the run, else
    `<command>-<hash of the command line>` (the same command resubmitted is the same run)."""
    own = given_name(args) if args[0] in NAME_IS_RUN else None
    if given and own and given != own:
        raise ConfigError(f"submit: --name {given} and the command's --name {own} differ; "
                          "give one (the command's --name is the run's name)")
    if given or own:
        return str(given or own)
    digest = hashlib.sha1("\0".join(args).encode()).hexdigest()[:10]
    return f"{args[0]}-{digest}"


def named_command(args: Sequence[str], run: str, params: set[str]) -> list[str]:
    """The command with the run name in it: its `--name` for commands whose --name names the
    run, else `--set job.name=RUN` (a rerun under the same name takes over its own stale
    lease)."""
    args = list(args)
    if any(a.startswith("job.name=") for a in args):
        return args
    if args[0] in NAME_IS_RUN and "name" in params:
        return args if given_name(args) else [*args, "--name", run]
    if "overrides" in params:
        return [*args, "--set", f"job.name={run}"]
    return args


def submission_id(run: str) -> str:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"partlift-{run}-{stamp}-{secrets.token_hex(2)}"


def auth_hint(address: str, err: Exception) -> ClusterError:
    """Ray 2.60 token auth: a refused request becomes one line saying how to send the token."""
    text = str(err)
    if "Authentication failed" in text:
        return ClusterError(f"the Ray cluster at {address} rejected the token (403): check "
                            "RAY_AUTH_TOKEN (or the token file ~/.ray/auth_token)")
    return ClusterError(f"the Ray cluster at {address} requires a token (401): export "
                        "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the cluster's token> (or put it "
                        "in ~/.ray/auth_token)")


def client(address: str, timeout_s: float = 10.0) -> Any:
    """A JobSubmissionClient for the dashboard at `address` (http://HEAD:8265), failing in
    `timeout_s` with one line when nothing answers there."""
    from ray.dashboard.modules.job.sdk import JobSubmissionClient
    from ray.exceptions import AuthenticationError
    if "://" not in address:
        address = f"http://{address}"
    check_cluster_reachable(address, timeout_s)
    try:
        return JobSubmissionClient(address)
    except AuthenticationError as err:
        raise auth_hint(address, err) from None
    except (ConnectionError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ClusterError(f"no Ray Jobs API at {address}: {first} (give the dashboard's "
                           "address, http://HEAD:8265)") from None


def calling(address: str, call: Callable[[], Any]) -> Any:
    from ray.exceptions import AuthenticationError
    try:
        return call()
    except AuthenticationError as err:
        raise auth_hint(address, err) from None


def submit(address: str, args: Sequence[str], commands: dict[str, Any], name: str | None = None,
           entrypoint_num_cpus: float | None = None, entrypoint_num_gpus: float | None = None,
           pip_lock: bool = False) -> Submission:
    check_command(args, commands)
    run = run_name(args, name)
    params = {p.name for p in commands[args[0]].params}
    command = named_command(args, run, params)
    project = project_dir()
    env_vars = {"PYTHONUNBUFFERED": "1"}
    for key in ("HF_HUB_OFFLINE", "RAY_USAGE_STATS_ENABLED"):
        if key in os.environ:
            env_vars[key] = os.environ[key]
    runtime_env: dict[str, Any] = {"working_dir": str(project), "excludes": EXCLUDES,
                                   "env_vars": env_vars}
    if pip_lock:   # the pinned set into the job's own environment (torch comes with the image)
        pins = [line.strip() for line in (project / "requirements.lock").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
        runtime_env["pip"] = {"packages": pins, "pip_check": False}
    entrypoint = "python -m rayjobs.cli " + shlex.join(command)
    jobs = client(address)
    sid = submission_id(run)
    from ray import __version__ as ray_version
    send = functools.partial(
        jobs.submit_job, entrypoint=entrypoint, submission_id=sid, runtime_env=runtime_env,
        entrypoint_num_cpus=entrypoint_num_cpus, entrypoint_num_gpus=entrypoint_num_gpus,
        metadata={RUN_KEY: run, "partlift.command": shlex.join(command)[:1000],
                  "partlift.ray": ray_version})
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            calling(address, send)
            break
        except RuntimeError as err:
            # a head that just started has no job agent yet: wait for it, a while
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)
    return Submission(sid, run, command, entrypoint, address)


async def _tail(jobs: Any, sid: str, out: Any) -> None:
    async for lines in jobs.tail_job_logs(sid):
        out.write(lines)
        out.flush()


def follow(address: str, sid: str, out: Any = sys.stdout) -> tuple[str, str]:
    """Stream the job's logs until it ends: (final status, Ray's message about it)."""
    jobs = client(address)
    calling(address, lambda: asyncio.run(_tail(jobs, sid, out)))
    info = calling(address, lambda: jobs.get_job_info(sid))
    status = str(getattr(info.status, "value", info.status))
    while status not in TERMINAL:   # the log stream can close just before the status turns
        time.sleep(0.5)
        info = jobs.get_job_info(sid)
        status = str(getattr(info.status, "value", info.status))
    return status, (info.message or "").strip()


def stop(address: str, sid: str) -> bool:
    jobs = client(address)
    return bool(calling(address, lambda: jobs.stop_job(sid)))


def _stamp(ms: int | None) -> str:
    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def list_jobs(address: str) -> list[JobLine]:
    """The cluster's partlift jobs (those submitted with a run name), oldest first."""
    jobs = client(address)
    details = calling(address, jobs.list_jobs)
    lines = []
    for job in sorted(details, key=lambda j: j.start_time or 0):
        meta = job.metadata or {}
        if RUN_KEY not in meta or not job.submission_id:
            continue
        lines.append(JobLine(job.submission_id, meta[RUN_KEY],
                             str(getattr(job.status, "value", job.status)),
                             _stamp(job.start_time), _stamp(job.end_time),
                             meta.get("partlift.command", job.entrypoint),
                             (job.message or "").strip().splitlines()[0][:120]
                             if job.message else ""))
    return lines


def job_table(lines: list[JobLine]) -> str:
    if not lines:
        return "no partlift jobs on this cluster"
    rows = [("submission id", "run", "status", "started (UTC)", "ended (UTC)", "command")]
    rows += [(j.submission_id, j.run, j.status, j.started, j.ended, j.command[:60])
             for j in lines]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)
