"""Run-root storage: tensor round trips, shard naming, commit protocol, S3 over real HTTP."""

from __future__ import annotations


import numpy as np
import pyarrow as pa
import pytest

from operators.store.commits import prepare_output, read_output, write_shard_set
from operators.store.ids import InvalidIdError, content_asset_id, validate_id
from operators.store.storage import (RunRoot, StorageError, StorageOptions, make_table, shard_name,
                                     table_columns)
from operators.store.tables import RENDER_OUTPUT


def _views_table(ids: list[str]) -> pa.Table:
    rng = np.random.default_rng(0)
    n = len(ids)
    return make_table({
        "asset_id": ids, "view_id": np.arange(n, dtype=np.int32),
        "rgb": rng.integers(0, 256, (n, 6, 5, 3), dtype=np.uint8),
        "depth": rng.random((n, 6, 5), dtype=np.float32),
        "mask": rng.random((n, 6, 5)) > 0.5,
        "feat": rng.random((n, 7, 4)).astype(np.float16),
    })


def test_tensor_columns_round_trip_with_dtypes_and_shapes(tmp_path) -> None:
    root = RunRoot(str(tmp_path / "run"))
    table = _views_table(["a", "a", "b"])
    root.write_shard("views", "part-x", table)
    back = table_columns(root.read_table("views"))
    original = table_columns(table)
    assert back["rgb"].shape == (3, 6, 5, 3) and back["rgb"].dtype == np.uint8
    assert back["mask"].dtype == np.bool_ and np.array_equal(back["mask"], original["mask"])
    assert back["feat"].dtype == np.float16 and np.array_equal(back["feat"], original["feat"])
    assert np.array_equal(back["depth"], original["depth"])
    assert back["asset_id"].tolist() == ["a", "a", "b"]


def test_written_shards_are_zstd_parquet_under_deterministic_names(tmp_path) -> None:
    import pyarrow.parquet as pq
    root = RunRoot(str(tmp_path))
    name = shard_name(["b", "a"])
    assert name == shard_name(["a", "b", "a"]) and name != shard_name(["a", "c"])
    root.write_shard("views", name, _views_table(["a"]))
    meta = pq.ParquetFile(tmp_path / "views" / f"{name}.parquet").metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert sorted(p.name for p in (tmp_path / "views").iterdir()) == [f"{name}.parquet"]


def test_uncommitted_shards_are_removed_before_resume(tmp_path) -> None:
    root = RunRoot(str(tmp_path))
    write_shard_set(root, RENDER_OUTPUT, "part-1", {"views": _views_table(["a"]),
                                                    "points": _views_table(["a"])},
                    job_id="j", fingerprint="f", assets=["a"])
    root.write_shard("views", "part-2", _views_table(["b"]))  # crash before its commit record
    state, notes = prepare_output(root, RENDER_OUTPUT, overwrite=False)
    assert notes == ["views/part-2.parquet had no commit record (an interrupted run): removed"]
    assert root.list_shards("views") == ["part-1"] and set(state.by_asset) == {"a"}


def test_missing_table_reads_as_none_and_empty_ids(tmp_path) -> None:
    root = RunRoot(str(tmp_path))
    assert root.read_table("views") is None and root.ids_in("views") == set()


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", "x\n", "a..b", ".hidden", "é"])
def test_unsafe_ids_are_rejected_with_the_id_in_the_message(bad: str) -> None:
    with pytest.raises(InvalidIdError, match="invalid asset_id"):
        validate_id(bad)


def test_content_asset_id_is_stable_and_safe() -> None:
    assert content_asset_id(b"mesh") == content_asset_id(b"mesh") != content_asset_id(b"mesh2")
    assert validate_id(content_asset_id(b"x")) and len(content_asset_id(b"x")) == 20


@pytest.mark.s3
def test_s3_round_trip_and_json_over_http(s3_root) -> None:
    uri, options = s3_root
    root = RunRoot(uri, options)
    root.check_reachable()
    write_shard_set(root, RENDER_OUTPUT, "part-1", {"views": _views_table(["a", "b"]),
                                                    "points": _views_table(["a", "b"])},
                    job_id="j", fingerprint="f", assets=["a", "b"])
    root.write_json("views/_job.json", {"counts": {"ok": 2}})
    assert root.list_shards("views") == ["part-1"]
    assert set(read_output(root, RENDER_OUTPUT).by_asset) == {"a", "b"}
    assert root.create_exclusive("_leases/x.json", b"1") and not root.create_exclusive(
        "_leases/x.json", b"2")  # a conditional PUT
    assert root.read_bytes("_leases/x.json") == b"1"
    assert root.read_json("views/_job.json")["counts"]["ok"] == 2
    assert table_columns(root.read_table("views"))["rgb"].shape == (2, 6, 5, 3)
    assert root.display("views") == f"{uri}/views"


@pytest.mark.s3
def test_s3_readable_by_s3fs_too(s3_root) -> None:
    import s3fs
    uri, options = s3_root
    RunRoot(uri, options).write_shard("assets", "part-1", _views_table(["a"]))
    fs = s3fs.S3FileSystem(key=options.access_key_id, secret=options.secret_access_key,
                           client_kwargs={"endpoint_url": options.endpoint_url})
    assert fs.ls(uri.removeprefix("s3://") + "/assets") == [
        uri.removeprefix("s3://") + "/assets/part-1.parquet"]


@pytest.mark.s3
def test_unreachable_endpoint_fails_fast_without_leaking_credentials() -> None:
    options = StorageOptions(endpoint_url="http://127.0.0.1:9", access_key_id="AKIDSECRETLOOKING",
                             secret_access_key="very-secret-value", connect_timeout_s=1,
                             request_timeout_s=1, max_attempts=1)
    root = RunRoot("s3://nobucket/run", options)
    with pytest.raises(StorageError) as info:
        root.check_reachable()
    message = str(info.value)
    assert "s3://nobucket/run" in message and "127.0.0.1:9" in message
    assert "very-secret-value" not in message and "AKIDSECRETLOOKING" not in message
    assert "very-secret-value" not in repr(options)


def test_s3_uri_without_bucket_is_rejected() -> None:
    with pytest.raises(StorageError, match="needs a bucket"):
        RunRoot("s3:///prefix")


@pytest.mark.s3
def test_missing_bucket_is_named_before_any_work(s3_root) -> None:
    _, options = s3_root
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        RunRoot("s3://no-such-bucket/run", options).check_reachable()


def test_local_roots_are_recorded_as_absolute_paths(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    root = RunRoot("./run")
    assert root.uri == str(tmp_path / "run") and root.display("views") == str(tmp_path / "run/views")


def test_leftover_temporary_files_of_killed_writes_are_removed(tmp_path) -> None:
    root = RunRoot(str(tmp_path))
    root.write_shard("views", "part-1", _views_table(["a"]))
    (tmp_path / "views" / ".part-2.abc.tmp").write_bytes(b"half a shard")
    prepare_output(root, RENDER_OUTPUT, overwrite=False)
    assert sorted(p.name for p in (tmp_path / "views").iterdir()) == []  # part-1 uncommitted too


def test_file_uris_and_empty_roots_are_handled_explicitly(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError, match=r"file://myrun: a file URI names an absolute path"):
        RunRoot("file://myrun")  # before: wrote into the current directory
    with pytest.raises(StorageError, match="an empty path or URI"):
        RunRoot("")
    spaced = tmp_path / "a b"
    assert RunRoot(f"file://{tmp_path}/a%20b").uri == str(spaced)  # percent-decoded
    assert RunRoot("file://localhost" + str(spaced)).uri == str(spaced)
    assert RunRoot("relative/run").uri == str(tmp_path / "relative" / "run")


def test_writes_appear_whole_and_a_stale_temp_file_is_not_a_file(tmp_path) -> None:
    root = RunRoot(str(tmp_path))
    root.write_bytes("meshes/procedural/x.ply", b"data" * 1000)
    assert [p.name for p in (tmp_path / "meshes" / "procedural").iterdir()] == ["x.ply"]
    assert root.create_exclusive("_leases/a.json", b"{}") is True
    assert root.create_exclusive("_leases/a.json", b"{}") is False
    assert sorted(p.name for p in (tmp_path / "_leases").iterdir()) == ["a.json"]  # no temp left


@pytest.mark.s3
def test_wrong_credentials_are_named_as_such(tmp_path) -> None:
    """A real S3-compatible server that checks credentials (moto with auth on)."""
    from tests.s3_server import moto_server
    with moto_server({"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as (_, url):
        options = StorageOptions(endpoint_url=url, access_key_id="AKIDWRONG",
                                 secret_access_key="wrong-secret", max_attempts=1)
        with pytest.raises(StorageError) as info:
            RunRoot("s3://bucket/run", options).check_reachable()
    message = str(info.value)
    assert "refused the credentials" in message and "AWS_ACCESS_KEY_ID" in message
    assert "wrong-secret" not in message
