"""Robust execution (issue 9): infrastructure failures stop a job at once in one line, a job
whose every row fails stops early, a wrong cluster address fails fast, Ctrl-C stops Ray and
exits 130, and a killed `assets make` leaves no truncated mesh behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from operators.failures import InfrastructureError
from operators.store.storage import RunRoot
from rayjobs.assets_job import run_assets_make
from rayjobs.render_job import run_render
from tests.rayjobs.test_jobs import SMALL, small_config

CLI = [sys.executable, "-m", "rayjobs.cli"]


@pytest.mark.parametrize("address, message", [
    ("127.0.0.1:1", "cannot reach the Ray cluster at 127.0.0.1:1 (Connection refused)"),
    ("127.0.0.1:abc", "Ray address '127.0.0.1:abc': expected host:port"),
])
def test_a_wrong_cluster_address_fails_fast_in_one_line(tmp_path: Path, address: str,
                                                          message: str) -> None:
    done = subprocess.run([*CLI, "assets", "make", "--n", "1", "--root", str(tmp_path / "run"),
                           "--address", address], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": str(tmp_path)})
    assert done.returncode == 1 and message in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("how, code", [
    pytest.param("ctrl-c", 130, id="ctrl-c to the terminal's process group"),
    pytest.param("sigterm", 143, id="SIGTERM to the driver", marks=pytest.mark.slow),
])
def test_stopping_a_job_stops_ray_and_its_agents_and_a_rerun_resumes(tmp_path: Path, how: str,
                                                                      code: int) -> None:
    import psutil
    root = tmp_path / "run"
    small = ["render.views=6", "render.n_points=2000", "render.resources.render.batch_size=1",
             "ray.num_cpus=1"]
    run_assets_make(small_config(str(root), "assets.n=16", *small))
    proc = subprocess.Popen([*CLI, "render", "--root", str(root),
                             *[a for s in (*SMALL, *small) for a in ("--set", s)]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(RunRoot(str(root)).list_shards("points")) < 1:
        time.sleep(0.2)
    children = psutil.Process(proc.pid).children(recursive=True)
    if how == "ctrl-c":  # a terminal signals the whole foreground process group
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    stopped = "interrupted" if how == "ctrl-c" else "terminated"
    assert proc.returncode == code and stopped in err and "Traceback" not in err, err[-2000:]
    time.sleep(2)
    left = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert left == [], f"Ray processes left running: {[c.name() for c in left]}"
    again = run_render(small_config(str(root), *small))  # resumes, nothing duplicated
    assert again.ok + again.skipped_done == 16
    views = RunRoot(str(root)).read_table("views", columns=["asset_id", "view_id"]).to_pylist()
    assert len(views) == 16 * 6 and len({(v["asset_id"], v["view_id"]) for v in views}) == 96


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.usefixtures("ray_session")
def test_storage_that_goes_down_mid_render_stops_the_job_in_one_line(tmp_path: Path) -> None:
    import boto3

    from tests.s3_server import moto_server
    with moto_server() as (server, endpoint):
        deadline = time.time() + 30
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="k",
                          aws_secret_access_key="s", region_name="us-east-1")
        s3.create_bucket(Bucket="doomed")
        storage = [f"storage.endpoint_url={endpoint}", "storage.access_key_id=k",
                   "storage.secret_access_key=s", "storage.max_attempts=1",
                   "storage.connect_timeout_s=1", "storage.request_timeout_s=2"]
        run_assets_make(small_config("s3://doomed/run", "assets.n=10", *storage))

        def kill_after_first_commit() -> None:
            while time.time() < deadline + 60:
                listed = s3.list_objects_v2(Bucket="doomed", Prefix="run/views/_commits/")
                if listed.get("KeyCount", 0):
                    server.kill()
                    return
                time.sleep(0.1)

        killer = threading.Thread(target=kill_after_first_commit, daemon=True)
        killer.start()
        with pytest.raises(InfrastructureError) as info:
            run_render(small_config("s3://doomed/run", "render.resources.render.batch_size=1",
                                    *storage))
        killer.join(timeout=10)
    message = str(info.value)
    assert "unreachable" in message and "a rerun resumes" in message
    assert len(message.splitlines()) == 1 and "Traceback" not in message


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_a_job_whose_every_row_fails_stops_early(tmp_path: Path) -> None:
    uri = str(tmp_path / "run")
    run_assets_make(small_config(uri, "assets.n=12"))
    for mesh in (tmp_path / "run" / "meshes" / "procedural").iterdir():
        mesh.unlink()  # every asset fails the same way: a problem of the job, not the inputs
    with pytest.raises(InfrastructureError, match=r"3 assets in a row failed \(the last, \w+: "):
        run_render(small_config(uri, "render.resources.render.batch_size=1",
                                "job.max_consecutive_failures=3", "job.max_error_fraction=1"))
    errors = RunRoot(uri).read_table("errors", columns=["asset_id"]).num_rows
    assert 3 <= errors < 12  # it stopped; the rows that failed are recorded


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_a_truncated_mesh_of_a_killed_make_is_written_again(tmp_path: Path) -> None:
    uri = str(tmp_path / "run")
    run_assets_make(small_config(uri, "assets.n=2"))
    meshes = sorted((tmp_path / "run" / "meshes" / "procedural").iterdir())
    whole = {m.name: m.read_bytes() for m in meshes}
    shutil_root = tmp_path / "again"
    (shutil_root / "meshes" / "procedural").mkdir(parents=True)
    for m in meshes:  # a run killed while writing: cut-short files, no manifest yet
        (shutil_root / "meshes" / "procedural" / m.name).write_bytes(whole[m.name][:100])
    run_assets_make(small_config(str(shutil_root), "assets.n=2"))
    assert {m.name: m.read_bytes() for m in (shutil_root / "meshes" / "procedural").iterdir()} == whole
    assert run_render(small_config(str(shutil_root))).ok == 2
