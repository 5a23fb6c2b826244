"""The data contract (tables, readers, job records, errors/ rows) on hand-built run roots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import SecretStr

from operators.settings import Section
from operators.store.readers import (AssetNotFoundError, RootReader, ShardReadError, TableReader,
                                     read_manifest, shard_index)
from operators.store.records import (AssetCounts, ErrorSummary, JobRecord, error_row, job_errors,
                                     redact, redact_url, write_errors, write_job_record)
from operators.store.commits import prepare_output, write_shard_set
from operators.store.storage import RunRoot, make_table
from operators.store.tables import (ASSETS, ASSETS_OUTPUT, LABEL_MASKS, LABEL_OUTPUT, POINTS,
                                    RENDER_OUTPUT, STAGE_OUTPUTS, TABLES, VIEWS)


def test_every_stage_output_commits_last_and_tables_are_declared_once() -> None:
    assert len(TABLES) == len({t.name for t in TABLES.values()})
    for output in STAGE_OUTPUTS.values():
        assert output.commit is output.tables[-1]
        assert all(TABLES[t.name] is t for t in output.tables)
        assert output.record == f"{output.record_dir}/_job.json"
    assert STAGE_OUTPUTS["render"].commit is POINTS


def _views(asset_ids: list[str], n_views: int) -> dict:
    """Views of a few assets, rows deliberately in reverse view order."""
    rows = [(a, v) for a in asset_ids for v in reversed(range(n_views))]
    return {"asset_id": [a for a, _ in rows],
            "view_id": np.array([v for _, v in rows], np.int32),
            "rgb": np.stack([np.full((2, 3, 3), 10 * v, np.uint8) for _, v in rows]),
            "depth": np.stack([np.full((2, 3), float(v), np.float32) for _, v in rows])}


def _commit_views(root: RunRoot, shard: str, views: dict, assets: list[str]) -> None:
    points = make_table({"asset_id": assets})
    write_shard_set(root, RENDER_OUTPUT, shard, {"views": make_table(views), "points": points},
                    job_id="render-1-aaaaaa", fingerprint="f", assets=assets)


def test_table_reader_reads_an_asset_sorted_by_its_keys(tmp_path: Path) -> None:
    root = RunRoot(str(tmp_path))
    _commit_views(root, "part-a", _views(["x", "y"], 3), ["x", "y"])
    _commit_views(root, "part-b", _views(["z"], 2), ["z"])
    root.write_shard("views", "part-c", make_table(_views(["w"], 1)))  # not committed: unseen
    assert shard_index(root, VIEWS) == {"x": "part-a", "y": "part-a", "z": "part-b"}
    reader = TableReader(root, VIEWS)
    arrays = reader.arrays("y", ["view_id", "rgb"])
    assert arrays["view_id"].tolist() == [0, 1, 2]  # sorted by the key, not by row order
    assert arrays["rgb"].shape == (3, 2, 3, 3) and arrays["rgb"][2, 0, 0, 0] == 20
    assert "z" in reader and "w" not in reader
    with pytest.raises(AssetNotFoundError, match="holds no rows of asset w"):
        reader.arrays("w")
    views = RootReader(root).views("z", ["depth"])
    assert views["view_id"].tolist() == [0, 1] and views["depth"].shape == (2, 2, 3)


def test_a_damaged_shard_is_named(tmp_path: Path) -> None:
    root = RunRoot(str(tmp_path))
    _commit_views(root, "part-a", _views(["x"], 2), ["x"])
    path = tmp_path / "views" / "part-a.parquet"
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(ShardReadError, match="views/part-a.parquet: cannot read it"):
        TableReader(root, VIEWS, index={"x": "part-a"}).arrays("x")


def test_label_masks_of_one_function_and_part(tmp_path: Path) -> None:
    root = RunRoot(str(tmp_path))
    n = 4
    rows = {"asset_id": ["x"] * n, "view_id": np.array([1, 0, 1, 0], np.int32),
            "function": ["pour-with", "pour-with", "cut-with", "cut-with"],
            "part": ["spout", "spout", "blade", "blade"],
            "mask": np.stack([np.full((2, 2), i % 2 == 0) for i in range(n)])}
    write_shard_set(root, LABEL_OUTPUT, "part-a", {LABEL_MASKS.name: make_table(rows),
                                                   "labels/points": make_table({"asset_id": ["x"]})},
                    job_id="label-1-aaaaaa", fingerprint="f", assets=["x"])
    masks = RootReader(root).label_masks("x", "pour-with", "spout")
    assert masks["view_id"].tolist() == [0, 1]
    assert masks["mask"].dtype == np.bool_ and masks["mask"][1].all() and not masks["mask"][0].any()


def test_manifest_reader_keeps_columns_once(tmp_path: Path) -> None:
    root = RunRoot(str(tmp_path))
    assert read_manifest(root) == []
    write_shard_set(root, ASSETS_OUTPUT, "part-a", {ASSETS.name: make_table(
        {"asset_id": ["a"], "uri": ["u"], "category": ["mug"]})}, job_id="j", fingerprint="f",
        assets=["a"])
    assert read_manifest(root, ["uri", "uri", "asset_id"]) == [{"asset_id": "a", "uri": "u"}]


class _Inner(Section):
    token: SecretStr
    url: str


class _Outer(Section):
    inner: _Inner
    values: list[str]


def test_redaction_is_by_type_not_by_key_name() -> None:
    config = _Outer(inner=_Inner(token=SecretStr("hunter2"), url="https://me:pw@host/v1"),
                    values=["s3://bucket/run", "http://user:topsecret@h"])
    dumped = redact(config)
    assert dumped == {"inner": {"token": "***", "url": "https://me:***@host/v1"},
                      "values": ["s3://bucket/run", "http://user:***@h"]}
    assert "hunter2" not in json.dumps(dumped) and "topsecret" not in json.dumps(dumped)
    assert redact_url("http://host:8000/v1") == "http://host:8000/v1"  # a port is no password


def test_job_record_is_written_beside_every_output(tmp_path: Path) -> None:
    root = RunRoot(str(tmp_path))
    counts = AssetCounts(input=5, skipped_done=1, ok=3, failed=1, units={"views": 57})
    record = JobRecord(stage="render", job_id="render-1-abcdef", root=root.display(),
                       config={"render": {"views": 19}}, inputs={}, outputs={}, started=0.0,
                       ended=2.5, name="run-a", counts=counts,
                       errors=ErrorSummary({"MeshError": 1}, ["x: bad"]))
    places = write_job_record(root, record, ["views", "labels"])
    assert [Path(p).relative_to(tmp_path).as_posix() for p in places] == [
        "views/_job.json", "labels/_job.json", "_jobs/render-1-abcdef.json"]
    data = root.read_json("labels/_job.json")
    assert data["counts"] == {"input": 5, "skipped_done": 1, "waiting_upstream": 0,
                              "processed": 4, "ok": 3, "failed": 1, "views": 57}
    assert (data["started"], data["ended"]) == ("1970-01-01T00:00:00+00:00", "1970-01-01T00:00:02+00:00")
    assert data["name"] == "run-a" and data["stage"] == "render" and data["format_version"] == 2
    assert data["errors"]["by_type"] == {"MeshError": 1}
    # a job without assets (training, a sweep) has no counts block
    plain = JobRecord(stage="train", job_id="train-1-aaaaaa", root=root.display(), config={},
                      inputs={}, outputs={}, started=0.0, ended=1.0)
    assert "counts" not in plain.to_json() and "errors" not in plain.to_json()


def test_a_jobs_errors_are_found_by_its_id(tmp_path: Path) -> None:
    root = RunRoot(str(tmp_path))
    mine, other = "render-1-aaaaaa", "render-2-bbbbbb"
    write_errors(root, "render", mine, "part-x", [error_row("render", mine, "a1", ValueError("no"))])
    write_errors(root, "render", other, "part-x", [error_row("render", other, "a2", "gone")])
    rows = job_errors(root, mine)
    assert [(r["asset_id"], r["error_type"], r["message"]) for r in rows] == [("a1", "ValueError", "no")]
    assert ErrorSummary.of(rows).examples == ["a1: no"]


def test_overwrite_clears_the_stage_and_its_errors_only(tmp_path: Path) -> None:
    root = RunRoot(str(tmp_path))
    _commit_views(root, "part-a", _views(["x"], 1), ["x"])
    root.write_shard("views", "part-b", make_table(_views(["y"], 1)))  # killed before its commit
    write_errors(root, "render", "render-1-aaaaaa", "s", [error_row("render", "j", "y", "boom")])
    write_errors(root, "label", "label-1-bbbbbb", "s", [error_row("label", "j", "x", "boom")])
    state, removed = prepare_output(root, RENDER_OUTPUT, overwrite=False)
    assert set(state.by_asset) == {"x"} and removed == [
        "views/part-b.parquet had no commit record (an interrupted run): removed"]
    state, removed = prepare_output(root, RENDER_OUTPUT, overwrite=True)
    assert (state.by_asset, removed) == ({}, [])
    assert root.list_shards("views") == [] and root.list_shards("points") == []
    assert not (tmp_path / "views" / "_commits").exists()
    assert [s.split("-")[0] for s in root.list_shards("errors")] == ["label"]


def test_read_arrays_gives_each_asset_once_and_skips_optional_tables(tmp_path: Path) -> None:
    from operators.store.readers import read_arrays
    from operators.store.tables import FEATURE_POINTS, LIFT_OUTPUT
    root = RunRoot(str(tmp_path))
    _commit_views(root, "part-a", _views(["x", "y"], 2), ["x", "y"])
    _commit_views(root, "part-b", _views(["y"], 2), ["y"])  # y twice (a root from before leases)
    arrays = read_arrays(root, "views", ["rgb"])
    assert arrays["asset_id"].tolist() == ["x", "x", "y", "y"] and arrays["rgb"].shape == (4, 2, 3, 3)
    assert read_arrays(root, "views", asset_ids=["y"])["view_id"].tolist() == [0, 1]
    # lift.cache_view_features=false: a shard set without features/views
    write_shard_set(root, LIFT_OUTPUT, "part-f", {FEATURE_POINTS.name: make_table({"asset_id": ["x"]})},
                    job_id="lift-1-aaaaaa", fingerprint="f", assets=["x"])
    assert read_arrays(root, "features/views") == {}
    with pytest.raises(AssetNotFoundError):
        RootReader(root).view_features("x")


def test_the_commit_index_is_a_cache_that_planning_reads_instead_of_every_record(tmp_path: Path) -> None:
    from operators.store.commits import compact, drop_shard_sets, read_output
    root = RunRoot(str(tmp_path))
    for i in range(5):
        _commit_views(root, f"part-{i}", _views([f"a{i}"], 1), [f"a{i}"])
    assert read_output(root, RENDER_OUTPUT).loose == 5  # one record read per shard set
    assert compact(root, RENDER_OUTPUT) == 5
    state = read_output(root, RENDER_OUTPUT)
    assert state.loose == 0 and set(state.by_asset) == {f"a{i}" for i in range(5)}
    _commit_views(root, "part-5", _views(["a5"], 1), ["a5"])  # written after the index
    assert read_output(root, RENDER_OUTPUT).loose == 1
    # a set dropped and redone under the same name must not come back from the index
    drop_shard_sets(root, RENDER_OUTPUT, ["part-0"])
    write_shard_set(root, RENDER_OUTPUT, "part-0", {"views": make_table(_views(["a0"], 1)),
                                                    "points": make_table({"asset_id": ["a0"]})},
                    job_id="render-2-bbbbbb", fingerprint="f", assets=["a0"])
    assert read_output(root, RENDER_OUTPUT).by_asset["a0"].job_id == "render-2-bbbbbb"
    assert compact(root, RENDER_OUTPUT) == 6  # the index holds part-1 again
    (tmp_path / "views" / "_commits" / "part-1.json").unlink()  # a record lost by hand
    assert "a1" not in read_output(root, RENDER_OUTPUT).by_asset  # the index does not revive it
    # ... and when a later job writes that set again, its new record counts, not the indexed one
    prepare_output(root, RENDER_OUTPUT, overwrite=False)  # removes part-1's uncommitted shards
    write_shard_set(root, RENDER_OUTPUT, "part-1", {"views": make_table(_views(["a1"], 1)),
                                                    "points": make_table({"asset_id": ["a1"]})},
                    job_id="render-3-cccccc", fingerprint="f", assets=["a1"])
    state = read_output(root, RENDER_OUTPUT)
    assert state.by_asset["a1"].job_id == "render-3-cccccc" and not state.broken


def test_a_migrated_root_mixing_tensor_encodings_reads_as_one(tmp_path: Path) -> None:
    """Format-1 shards hold Arrow fixed-shape tensors; shards written after `partlift migrate`
    hold fixed-size binary: readers give one array, values intact."""
    import pyarrow as pa
    from operators.store.readers import read_arrays
    root = RunRoot(str(tmp_path))
    old = _views(["x"], 2)
    rgb = pa.FixedShapeTensorArray.from_numpy_ndarray(old["rgb"])
    depth = pa.FixedShapeTensorArray.from_numpy_ndarray(old["depth"])
    legacy = pa.table({"asset_id": old["asset_id"], "view_id": old["view_id"], "rgb": rgb,
                       "depth": depth})
    write_shard_set(root, RENDER_OUTPUT, "part-old", {"views": legacy,
                                                      "points": make_table({"asset_id": ["x"]})},
                    job_id="render-1-aaaaaa", fingerprint="f", assets=["x"])
    _commit_views(root, "part-new", _views(["y"], 2), ["y"])
    arrays = read_arrays(root, "views", ["rgb", "depth"])
    assert arrays["asset_id"].tolist() == ["x", "x", "y", "y"]
    assert arrays["rgb"].shape == (4, 2, 3, 3) and arrays["rgb"][:, 0, 0, 0].tolist() == [0, 10] * 2
    assert arrays["depth"][:, 1, 2].tolist() == [0.0, 1.0, 0.0, 1.0]
    table = root.read_table("views", ["asset_id", "rgb"])
    assert table.num_rows == 4 and table.schema.field("rgb").type == pa.binary(2 * 3 * 3)
