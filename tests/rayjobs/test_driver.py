"""The stage driver's pieces that need no cluster: how Ray is started or joined, and the
per-asset "do it, or record an error row" helper."""

from __future__ import annotations

from pathlib import Path

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
