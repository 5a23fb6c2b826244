"""Row errors vs infrastructure errors, from the exceptions the libraries really raise."""

from __future__ import annotations

import errno

import pytest

from operators.failures import InfrastructureError, infrastructure_problem
from operators.geometry.mesh import MeshError
from operators.models.grounding import GroundingOutputError
from operators.models.grounding_backends import GroundingEndpointError
from operators.store.storage import StorageError


@pytest.mark.parametrize("err, expected", [
    (MeshError("a.obj: the mesh reader timed out after 30 s"), None),
    (MeshError("a.obj: the mesh reader crashed (SIGSEGV)"), None),
    (FileNotFoundError("s3://bucket/meshes/a.obj: no such file"), None),
    (GroundingOutputError("answer without boxes"), None),
    (ValueError("lift.n_points=500 exceeds the 300 surface points"), None),
    (GroundingEndpointError("openai: HTTP 400 from http://h/v1", "http://h/v1", status=400), None),
    (StorageError("cannot reach run root s3://b/run"), "cannot reach run root"),
    (OSError("When writing to 'b/run/views/part-1.parquet': AWS Error NETWORK_CONNECTION during "
             "PutObject operation: curlCode: 7, Couldn't connect to server"), "unreachable"),
    (OSError("When reading information for key 'run' in bucket 'b': AWS Error ACCESS_DENIED "
             "during HeadObject operation: No response body."), "refused the credentials"),
    (GroundingEndpointError("openai: http://h/v1 unreachable after 3 retries", "http://h/v1"),
     "unreachable"),
    (ConnectionRefusedError(111, "Connection refused"), "unreachable"),
    # an unreadable input file is the file's problem, a full disk is everyone's
    (PermissionError(errno.EACCES, "Permission denied", "/data/meshes/a.obj"), None),
    (OSError(errno.ENOSPC, "No space left on device"), "disk is full"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only"),
    # "403" or "timed out" in some text is not a storage answer; a client's timeout is
    (OSError("mesh server said HTTP 403 for a.obj"), None),
    (ValueError("the parser timed out on face 12"), None),
    (TimeoutError("timed out"), "unreachable"),
    (GroundingEndpointError("openai: HTTP 401 from http://h/v1", "http://h/v1", status=401),
     "refused the API key"),
])
def test_what_stops_a_job_and_what_is_an_error_row(err: BaseException, expected: str | None) -> None:
    problem = infrastructure_problem(err)
    assert (problem is None) if expected is None else (expected in problem)


def test_a_cuda_out_of_memory_is_about_the_device() -> None:
    import torch
    problem = infrastructure_problem(
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert problem is not None and "lower the batch size" in problem
    assert infrastructure_problem(InfrastructureError("x")) == "x"


def test_ray_killing_a_worker_for_node_memory_is_not_a_device_problem() -> None:
    import ray.exceptions
    problem = infrastructure_problem(ray.exceptions.OutOfMemoryError(
        "Task was killed due to the node running low on memory."))
    assert problem is not None and "node ran out of memory" in problem and "batch_size" in problem
