"""Session fixtures: one local Ray for the integration tests, one real S3-compatible HTTP server
(moto's server in a subprocess on 127.0.0.1) for the storage tests."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

S3_KEY, S3_SECRET = "partlift-test-key", "partlift-test-secret"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of a real S3-compatible server for this test session."""
    from tests.s3_server import moto_server
    with moto_server() as (_, url):
        yield url


@pytest.fixture
def s3_root(s3_endpoint: str) -> tuple[str, "object"]:
    """A fresh bucket on the test server: (s3 URI of a prefix in it, StorageOptions)."""
    from operators.store.storage import StorageOptions
    options = StorageOptions(endpoint_url=s3_endpoint, access_key_id=S3_KEY,
                             secret_access_key=S3_SECRET, region="us-east-1")
    import boto3
    bucket = f"partlift-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id=S3_KEY,
                 aws_secret_access_key=S3_SECRET, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/run", options


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    import ray
    # address="local": a private cluster, never one that `ray start` left on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    import ray.data
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()
