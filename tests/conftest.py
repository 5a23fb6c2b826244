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
    # address="local": a private cluster, never one that `ray start` left on this machine.
    # The dashboard serves the state API, through which Ray Train frees the placement group of a
    # run whose controller was killed (a trial that ASHA stops); without it that group leaks.
    ray.init(address="local", num_cpus=2, include_dashboard=True, logging_level="ERROR",
             log_to_driver=False)
    import ray.data
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


# A root the learning stages train and evaluate on: 8 procedural assets (mug, cup, bowl, pan,
# bottle, kettle, knife, spoon), 4 views of 56 px, oracle labels, tiny-ViT block cache. With
# data.val_fraction=0.3 the mug, cup and spoon validate (they share pour-with and scoop-with).
DFC_ROOT_SETTINGS = ["assets.n=8", "render.views=4", "render.width=56", "render.height=56",
                     "render.n_points=3000", "label.trials=1", "lift.n_points=256",
                     "ray.progress_bars=false"]
# A small correspondence run on it (each value is a train.* preset value scaled down).
DFC_TRAIN_SETTINGS = ["data.val_fraction=0.3", "train.steps=4", "train.checkpoint_every=2",
                      "train.min_part_pixels=8", "train.min_shared_points=16", "train.points=16",
                      "train.functional_pairs=2", "train.spatial_pairs=2", "train.val_pairs=4",
                      "eval.max_gt_points=200", "eval.pairs=6", "train.proj_dim=64",
                      "train.hidden_dim=128", "train.out_dim=32", "ray.progress_bars=false"]


@pytest.fixture(scope="session")
def dfc_root(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    from rayjobs.assets_job import run_assets_make
    from rayjobs.config import DemoJob, load_config
    from rayjobs.label_job import run_label
    from rayjobs.lift_job import run_lift
    from rayjobs.render_job import run_render
    uri = str(tmp_path_factory.mktemp("dfc") / "root")
    config = load_config((), DFC_ROOT_SETTINGS, root=uri, model=DemoJob)
    run_assets_make(config)
    run_render(config)
    run_label(config)
    run_lift(config)
    return uri


@pytest.fixture(scope="session")
def mask_model(dfc_root: str) -> str:
    """`train/sm` on the shared root: a small correspondence run with a mask head (scoring and
    the InstructPart / SOCO benchmarks read it)."""
    from rayjobs.config import TrainJob, load_config
    from rayjobs.train_job import run_train
    run_train(load_config((), [*DFC_TRAIN_SETTINGS, "train.mask_head=true", "job.name=sm"],
                          root=dfc_root, model=TrainJob))
    return "train/sm"


@pytest.fixture(scope="session")
def cast_model(dfc_root: str) -> str:
    """`finetune/sc` on the shared root: a 2-step CAST run from scratch (scoring and the
    InstructPart benchmark read it)."""
    from rayjobs.cmat_job import run_finetune
    from rayjobs.config import FinetuneJob, load_config
    from tests.rayjobs.test_cmat_job import CAST, SMALL
    run_finetune(load_config((), [*SMALL, *CAST, "cast.steps=2", "cast.checkpoint_every=2",
                                  "job.name=sc"], root=dfc_root, model=FinetuneJob))
    return "finetune/sc"
