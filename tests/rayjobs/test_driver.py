"""The stage driver's pieces that need no cluster: how Ray is started or joined, and the
per-asset "do it, or record an error row" helper."""

from __future__ import annotations

from pathlib import Path

import pytest

from operators.failures import InfrastructureError
from operators.store.records import job_errors
from operators.store.storage import StorageOptions
from rayjobs.config import RayConfig
from rayjobs.driver import AssetErrors, TaskContext, ray_init_kwargs


def test_a_private_local_ray_unless_an_address_is_given() -> None:
    local = ray_init_kwargs(RayConfig(num_cpus=2), environ={})
    # never a bare ray.init(): it would join a cluster `ray start` left on the machine
    assert local["address"] == "local" and local["num_cpus"] == 2
    assert local["dashboard_host"] == "127.0.0.1"
    # inside a submitted Ray Job RAY_ADDRESS is set: join it as it is (no CPU count)
    joined = ray_init_kwargs(RayConfig(num_cpus=2), environ={"RAY_ADDRESS": "10.0.0.1:6379"})
    assert joined["address"] == "10.0.0.1:6379" and "num_cpus" not in joined
    explicit = ray_init_kwargs(RayConfig(address="ray://head:10001"), environ={"RAY_ADDRESS": "x"})
    assert explicit["address"] == "ray://head:10001"


def test_asset_errors_keep_the_good_items_and_record_the_bad(tmp_path: Path) -> None:
    task = TaskContext(str(tmp_path), StorageOptions(), "render-20261130T000000-abc123")
    errors = AssetErrors("render", task)
    items = {"a": 1, "b": 0, "c": 4}
    done = list(errors.attempt(items, lambda k: 8 // items[k], asset_of=str,
                               describe=lambda k, err: f"file {k}.obj: {err}"))
    assert done == [("a", 8), ("c", 2)]
    errors.write("part-x")
    [row] = job_errors(task.root(), task.job_id)
    assert (row["asset_id"], row["error_type"], row["message"]) == (
        "b", "ZeroDivisionError", "file b.obj: integer division or modulo by zero")


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_the_breaker_counts_failures_in_a_row_across_workers_and_successes_reset_it(
        tmp_path: Path) -> None:
    """Two workers share the job's monitor: failures interleaved with successes never trip
    it; as many failures in a row as job.max_consecutive_failures do, and the rows are kept."""
    from rayjobs.driver import JobMonitor
    task = TaskContext(str(tmp_path), StorageOptions(), "render-20261130T000000-abc123",
                       breaker=JobMonitor.remote(), max_consecutive_failures=3)
    first, second = AssetErrors("render", task), AssetErrors("render", task)
    works = {"ok1": 1, "bad1": 0, "bad2": 0, "ok2": 1, "bad3": 0, "bad4": 0, "ok3": 1}
    for name, worker in zip(works, [first, second] * 4):  # two failures in a row at most
        list(worker.attempt([name], lambda k: 1 // works[k], asset_of=str))
    more = {"bad5": 0, "bad6": 0, "bad7": 0}
    with pytest.raises(InfrastructureError, match=r"render: 3 assets in a row failed \(the last, "
                                                  r"bad7: "):
        for name, worker in zip(more, [first, second, first]):
            list(worker.attempt([name], lambda k: 1 // more[k], asset_of=str))
    second.write("part-y")
    failed = {row["asset_id"] for row in job_errors(task.root(), task.job_id)}
    assert failed == {"bad1", "bad2", "bad3", "bad4", "bad5", "bad6", "bad7"}
