"""Untrusted mesh files are parsed in a child process: a crash or a hang of the native reader is
an error naming the file, and the next file is read as usual."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import open3d as o3d
import pytest

from operators.data.assets import read_mesh_file
from operators.geometry.mesh import MeshError
from operators.settings import ReadLimits


def crashing_files(folder: Path, wanted: int = 1, candidates: int = 8) -> list[Path]:
    """Seeded random 4 KiB `.obj` files that crash this open3d's reader (most of them do)."""
    found = []
    for seed in range(candidates):
        path = folder / f"random-{seed}.obj"
        path.write_bytes(np.random.default_rng(seed).bytes(4096))
        try:
            read_mesh_file(str(path))
        except MeshError as err:
            if "crashed" in str(err):
                found.append(path)
        if len(found) == wanted:
            break
    return found


@pytest.fixture
def good_mesh(tmp_path: Path) -> Path:
    path = tmp_path / "good.ply"
    o3d.io.write_triangle_mesh(str(path), o3d.geometry.TriangleMesh.create_sphere(0.5, 10))
    return path


def test_a_crashing_reader_is_an_error_row_and_the_next_file_reads(tmp_path: Path,
                                                                   good_mesh: Path) -> None:
    crashing = crashing_files(tmp_path)
    if not crashing:
        pytest.skip("no seeded random .obj crashes this open3d version any more")
    with pytest.raises(MeshError, match=rf"{crashing[0].name}: the mesh reader crashed \(SIG"):
        read_mesh_file(str(crashing[0]))
    mesh, data = read_mesh_file(str(good_mesh))  # a fresh child takes over
    assert mesh.n_faces > 0 and data == good_mesh.read_bytes()


def test_a_hanging_reader_times_out_and_the_next_file_reads(tmp_path: Path, good_mesh: Path) -> None:
    fifo = tmp_path / "stuck.obj"
    os.mkfifo(fifo)  # opening it for reading blocks until a writer comes: a reader that hangs
    with pytest.raises(MeshError, match=r"stuck\.obj: the mesh reader timed out after 1 s"):
        read_mesh_file(str(fifo), limits=ReadLimits(timeout_s=1))
    assert read_mesh_file(str(good_mesh))[0].n_faces > 0


def test_isolated_and_in_process_reads_agree_and_size_is_limited(good_mesh: Path) -> None:
    isolated, data = read_mesh_file(str(good_mesh))
    direct, same = read_mesh_file(str(good_mesh), limits=ReadLimits(isolate=False))
    assert data == same and np.array_equal(isolated.vertices, direct.vertices)
    assert np.array_equal(isolated.triangles, direct.triangles)
    with pytest.raises(MeshError, match=r"over the 0\.001 MB limit"):
        read_mesh_file(str(good_mesh), limits=ReadLimits(max_file_mb=0.001))


def test_the_time_limit_starts_once_the_child_is_ready() -> None:
    from operators.data.isolation import IsolatedCalls
    calls = IsolatedCalls()  # a cold child: interpreter and open3d take about a second
    try:
        assert calls.call("posixpath", "basename", ("a/b.obj",), timeout_s=0.5) == "b.obj"
    finally:
        calls.close()


def test_a_child_that_cannot_start_stops_the_job_with_its_reason() -> None:
    from operators.data.isolation import IsolatedCalls
    from operators.failures import InfrastructureError, infrastructure_problem
    calls = IsolatedCalls(preload=["partlift_no_such_module"])
    with pytest.raises(InfrastructureError, match="did not start .*partlift_no_such_module") as err:
        calls.call("posixpath", "basename", ("a/b.obj",), timeout_s=5)
    assert infrastructure_problem(err.value) is not None  # the job stops: every file would fail
    assert "render.isolate" in str(err.value)
