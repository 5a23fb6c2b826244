"""`partlift submit` against a real `ray start --head` cluster (token auth on, its own temp dir
and ports, started from this venv so that jobs find the project's Python): a failing job shows
its error and exits non-zero, a render job runs to success and its outputs land, the same run
resubmitted resumes with nothing redone, `status --address` lists the runs, and a client
without the token gets one line saying how to send it."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from operators.settings import ConfigError
from rayjobs.cli import main
from rayjobs.submit import check_command, named_command, run_name

RENDER = ["--set", "render.views=2", "--set", "render.width=32", "--set", "render.height=32",
          "--set", "render.n_points=300", "--set", "ray.progress_bars=false"]


def test_a_command_is_checked_and_named_before_anything_is_sent() -> None:
    commands = main.commands
    with pytest.raises(ConfigError, match="relative path: on the cluster"):
        check_command(["render", "--root", "partlift-data"], commands)
    with pytest.raises(ConfigError, match="the default ./partlift-data"):
        check_command(["render"], commands)
    with pytest.raises(ConfigError, match="'status' is not a command to submit"):
        check_command(["status", "--root", "/r"], commands)
    check_command(["render", "--root", "s3://bucket/run"], commands)
    # the same command line is the same run; another one is another run
    args = ["render", "--root", "/r", *RENDER]
    assert run_name(args, None) == run_name(list(args), None) != run_name(args[:3], None)
    assert run_name(["train", "--name", "t1", "--root", "/r"], None) == "t1"
    assert run_name(["train", "--name=t1", "--root", "/r"], None) == "t1"
    with pytest.raises(ConfigError, match="--name r and the command's --name t1 differ"):
        run_name(["train", "--name", "t1"], "r")
    # score's --name names its output, not the run: the run name goes to job.name
    assert named_command(["score", "--root", "/r", "--name", "s"], "r1",
                         {"name", "overrides"})[-2:] == ["--set", "job.name=r1"]
    assert named_command(["train", "--name=t1"], "t1", {"name", "overrides"}) == \
        ["train", "--name=t1"]
    # the name reaches the command: its --name where it has one, else job.name
    assert named_command(["train", "--root", "/r"], "t1", {"name", "overrides"})[-2:] == \
        ["--name", "t1"]
    assert named_command(["render", "--root", "/r"], "r1", {"overrides"})[-2:] == \
        ["--set", "job.name=r1"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def head() -> Iterator[tuple[str, dict[str, str]]]:
    """A token-auth head node of its own: (dashboard URL, a client environment with the
    token)."""
    temp = tempfile.mkdtemp(prefix="plhead", dir="/tmp")   # short: Ray's socket paths
    token = secrets.token_hex(16)
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    # every port its own: the shared test cluster already holds Ray's default agent ports
    ports = [f"--{name}={free_port()}" for name in (
        "port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "metrics-export-port", "runtime-env-agent-port", "ray-client-server-port")]
    subprocess.run([f"{venv_bin}/ray", "start", "--head", *ports,
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                    "--num-cpus=2", f"--temp-dir={temp}", "--include-dashboard=true"],
                   env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        # `ray stop` would stop every Ray on the machine: stop only this cluster's processes
        # (its agents rename themselves `ray::...`: take the named processes' children too)
        named = [p for p in psutil.process_iter(["cmdline"])
                 if any(temp in part for part in (p.info["cmdline"] or []))]
        mine = list({p.pid: p for p in named + [c for p in named
                                                 for c in p.children(recursive=True)]}.values())
        for proc in mine:
            proc.kill()
        psutil.wait_procs(mine, timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def partlift(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rayjobs.cli", *args], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.ray
def test_submitted_jobs_run_resume_fail_and_are_listed(head: tuple[str, dict[str, str]],
                                                        dfc_root: str, tmp_path: Path) -> None:
    address, env = head
    root = tmp_path / "root"    # the shared root's assets, nothing rendered yet
    shutil.copytree(dfc_root, root, ignore=lambda d, names: [
        n for n in names if d == dfc_root and n not in ("assets", "meshes", "_partlift.json")])
    # no token: one line saying how to send it
    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    refused = partlift(no_token, "status", "--address", address)
    assert refused.returncode == 1
    assert "requires a token (401): export RAY_AUTH_MODE=token" in refused.stderr
    # a job that fails: its error reaches the user, the exit code is not 0
    failed = partlift(env, "submit", "--address", address, "--follow", "--",
                      "render", "--root", str(tmp_path / "empty"), *RENDER)
    assert failed.returncode == 1, failed.stdout[-2000:]
    assert f"error: run root {tmp_path / 'empty'} does not exist" in failed.stdout
    assert "failed; resubmit with --name" in failed.stderr
    # a render job to success; its outputs are in the root
    done = partlift(env, "submit", "--address", address, "--follow", "--name", "r1", "--",
                    "render", "--root", str(root), *RENDER)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "SUCCEEDED" in done.stdout
    views = pq.read_table(root / "views", columns=["asset_id", "view_id"])
    assert views.num_rows == 8 * 2
    # the same run again: a new submission that resumes, nothing redone
    again = partlift(env, "submit", "--address", address, "--follow", "--name", "r1", "--",
                     "render", "--root", str(root), *RENDER)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "already done (skipped)  8" in again.stdout and "processed ok            0" in \
        again.stdout
    assert pq.read_table(root / "views", columns=["asset_id"]).num_rows == 8 * 2
    # stopping a job that ended: said so, nothing stopped
    finished_id = done.stdout.split("submitted ", 1)[1].split()[0]
    stopped = partlift(env, "submit", "--address", address, "--stop", finished_id)
    assert stopped.returncode == 0 and f"{finished_id}: already ended" in stopped.stdout
    listed = partlift(env, "status", "--address", address)
    lines = [line for line in listed.stdout.splitlines() if line.startswith("partlift-")]
    assert len(lines) == 3 and sum(" r1 " in line and "SUCCEEDED" in line for line in lines) == 2
    assert sum("FAILED" in line for line in lines) == 1
