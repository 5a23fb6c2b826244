"""One writer per stage and root: the lease's rules, on a local root (the S3 conditional PUT
is in test_storage)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from operators.store.lease import LeaseHeldError, acquire, hold
from operators.store.storage import RunRoot


def _foreign_holder(root: Path, run_name: str, host: str = "another-host", pid: int = 4242,
                    age_s: float = 0.0) -> None:
    (root / "_leases").mkdir(parents=True, exist_ok=True)
    now = time.time()
    (root / "_leases" / "render.json").write_text(json.dumps({
        "run_name": run_name, "host": host, "pid": pid, "ray_job_id": "raysubmit_1",
        "token": "t", "started": now - age_s, "renewed": now - age_s}))


def test_a_second_writer_is_refused_naming_the_holder(tmp_path: Path) -> None:
    root = RunRoot(str(tmp_path))
    lease = acquire(root, "render", "run-a")
    with pytest.raises(LeaseHeldError) as info:
        acquire(root, "render", "run-b")
    message = str(info.value)
    assert f"run 'run-a' on {socket.gethostname()} (pid {os.getpid()}" in message
    assert "--force" in message and "same run name" in message
    lease.release()
    assert not (tmp_path / "_leases" / "render.json").exists()
    acquire(root, "render", "run-b").release()  # free again


def test_takeover_by_the_same_run_name_staleness_a_gone_holder_or_force(tmp_path: Path) -> None:
    root = RunRoot(str(tmp_path))
    _foreign_holder(tmp_path, "nightly")  # alive elsewhere, as far as anyone can tell
    with pytest.raises(LeaseHeldError, match="Ray job raysubmit_1"):
        acquire(root, "render", "other")
    acquire(root, "render", "nightly").release()  # a resubmission of the same run takes over
    _foreign_holder(tmp_path, "old", age_s=600)
    acquire(root, "render", "other", timeout_s=120).release()  # stale after the timeout
    _foreign_holder(tmp_path, "crashed", host=socket.gethostname(), pid=2**22 + 12345)
    acquire(root, "render", "other").release()  # same host, process gone
    _foreign_holder(tmp_path, "busy")
    acquire(root, "render", "other", force=True).release()  # --force breaks any lease


def test_a_held_lease_is_renewed_and_hold_releases_in_order(tmp_path: Path) -> None:
    root = RunRoot(str(tmp_path))
    with hold(root, ["render", "label"], "run-a", timeout_s=4.0):
        first = json.loads((tmp_path / "_leases" / "render.json").read_text())["renewed"]
        deadline = time.time() + 10
        while time.time() < deadline:
            renewed = json.loads((tmp_path / "_leases" / "render.json").read_text())["renewed"]
            if renewed > first:
                break
            time.sleep(0.2)
        assert renewed > first  # renewed every timeout/4 = 1 s while held
        assert sorted(p.name for p in (tmp_path / "_leases").iterdir()) == ["label.json",
                                                                            "render.json"]
    assert list((tmp_path / "_leases").iterdir()) == []


def test_a_job_whose_lease_was_taken_over_commits_nothing_more(tmp_path: Path) -> None:
    from operators.store.commits import read_output, write_shard_set
    from operators.store.lease import LeaseLostError, check_held
    from operators.store.storage import make_table
    from operators.store.tables import ASSETS_OUTPUT
    root = RunRoot(str(tmp_path))
    mine = acquire(root, "assets", "run-a")
    check_held(root, "assets", mine.holder.token)  # still mine
    acquire(root, "assets", "run-b", force=True)  # broken and taken by another run
    with pytest.raises(LeaseLostError, match="now held by run 'run-b'"):
        write_shard_set(root, ASSETS_OUTPUT, "part-x", {"assets": make_table({"asset_id": ["a"]})},
                        job_id="j", fingerprint="f", assets=["a"],
                        before_commit=lambda: check_held(root, "assets", mine.holder.token))
    assert read_output(root, ASSETS_OUTPUT).by_asset == {}  # its shard stays uncommitted
    mine.release()  # does not delete the other run's lease
    assert json.loads((tmp_path / "_leases" / "assets.json").read_text())["run_name"] == "run-b"


def test_an_unreadable_lease_is_held_until_forced(tmp_path: Path) -> None:
    root = RunRoot(str(tmp_path))
    (tmp_path / "_leases").mkdir()
    (tmp_path / "_leases" / "render.json").write_text("{garbage")
    with pytest.raises(LeaseHeldError, match="cannot be read"):
        acquire(root, "render", "run-a")
    acquire(root, "render", "run-a", force=True).release()
