"""The lift stage on a real local Ray: features for every rendered asset, resume, bad config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open3d as o3d
import pytest
from click.testing import CliRunner

from operators.models.backbones import load_backbone
from operators.models.registry import BackboneNotFoundError
from operators.store.readers import RootReader
from operators.store.storage import RunRoot, table_columns
from rayjobs.assets_job import run_assets_make, run_assets_scan
from rayjobs.cli import main
from rayjobs.config import PipelineJob
from rayjobs.lift_job import run_lift
from rayjobs.render_job import run_render

from tests.rayjobs.test_jobs import small_config


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_lift_writes_point_and_view_features_and_resumes(tmp_path: Path) -> None:
    uri = str(tmp_path / "run")
    root = RunRoot(uri)
    run_assets_make(small_config(uri, "assets.n=3"))
    run_render(small_config(uri))
    report = run_lift(small_config(uri, "lift.n_points=128", "lift.background_variants=2"))
    assert (report.ok, report.failed) == (3, 0)
    points = table_columns(root.read_table("features/points"))
    assert points["features"].shape[:2] == (3, 128) and points["features"].dtype == np.float16
    assert np.isfinite(points["features"].astype(np.float32)).all()
    assert points["xyz"].shape == (3, 128, 3) and (points["n_views_seen"] <= 4).all()
    assert all(len(set(idx.tolist())) == 128 for idx in points["point_index"])  # distinct points
    views = table_columns(root.read_table("features/views"))
    # 4 views of 24x32 px at stride 14 -> resized to 28x28 -> a 2x2 grid of 64-d tiny features
    assert views["features"].shape == (12, 2, 2, 64)
    # the trainer's cache: the tiny model's last 3 of 4 blocks before its final LayerNorm, for
    # the render's background (variant 0) and one replaced background (variant 1)
    blocks = table_columns(root.read_table("features/blocks"))
    assert blocks["blocks"].shape == (24, 3, 2, 2, 64) and blocks["blocks"].dtype == np.float16
    assert (blocks["variant"] == np.tile([0, 1], 12)).all()
    asset = str(blocks["asset_id"][0])
    rgb = RootReader(root).views(asset, ["rgb"])["rgb"]
    expected = load_backbone("dinov2-random-tiny").block_features(rgb, 3).astype(np.float16)
    np.testing.assert_allclose(RootReader(root).view_blocks(asset).astype(np.float32),
                               expected.astype(np.float32), atol=2e-3)
    assert np.abs(RootReader(root).view_blocks(asset, 1).astype(np.float32)
                  - expected.astype(np.float32)).max() > 1e-2  # another background
    again = run_lift(small_config(uri, "lift.n_points=128", "lift.background_variants=2"))
    assert (again.ok, again.skipped_done) == (0, 3)
    assert root.read_table("features/points", columns=["asset_id"]).num_rows == 3
    assert root.read_json("features/_job.json")["inputs"]["backbone"] == "dinov2-random-tiny"


def test_missing_pretrained_backbone_fails_fast_naming_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(BackboneNotFoundError, match="import-onnx"):
        run_lift(small_config(str(tmp_path), "lift.backbone=dinov2-small",
                              f"lift.backbone.model_path={tmp_path / 'nothing-here'}"))


def test_unknown_backbone_is_a_one_line_cli_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["lift", "--root", str(tmp_path), "--backbone", "dino9"])
    assert result.exit_code == 2 and "dinov2-small" in result.output
    assert "Traceback" not in result.output


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_render_label_lift_stream_in_one_pipeline(tmp_path: Path) -> None:
    from rayjobs.pipeline_job import run_pipeline
    uri = str(tmp_path / "run")
    root = RunRoot(uri)
    run_assets_make(small_config(uri, "assets.n=2"))
    three = ["pipeline.stages=[render, label, lift]", "lift.n_points=64", "label.trials=1"]
    reports = run_pipeline(small_config(uri, *three, model=PipelineJob))
    assert [r.stage for r in reports] == ["pipeline render->label->lift"]  # one stream
    assert [r.ok for r in reports] == [2]
    assert root.read_table("views", columns=["asset_id"]).num_rows == 8  # rendered once
    assert root.read_table("features/points", columns=["asset_id"]).num_rows == 2
    assert len(set(root.read_table("labels/points", columns=["asset_id"])["asset_id"].to_pylist())) == 2
    # two assets rendered and lifted but not labelled, one not even rendered: the stream
    # renders the new one, labels three, lifts one, and redoes nothing
    run_assets_make(small_config(uri, "assets.n=4"))
    run_render(small_config(uri, "label.trials=1"))
    run_lift(small_config(uri, "lift.n_points=64"))
    run_assets_make(small_config(uri, "assets.n=5"))
    [mixed] = run_pipeline(small_config(uri, *three, model=PipelineJob))
    assert (mixed.ok, mixed.skipped_done) == (3, 2)
    assert mixed.units == {"rendered in this run": 1, "loaded from storage": 2}
    assert root.read_table("views", columns=["asset_id"]).num_rows == 5 * 4
    assert root.read_table("features/points", columns=["asset_id"]).num_rows == 5
    labelled = root.read_table("labels/points", columns=["asset_id"])["asset_id"].to_pylist()
    assert len(set(labelled)) == 5
    run_assets_make(small_config(uri, "assets.n=6"))  # one new asset: render -> lift streams it
    [stream] = run_pipeline(small_config(uri, "pipeline.stages=[render, lift]", "lift.n_points=64",
                                          model=PipelineJob))
    assert (stream.ok, stream.skipped_done) == (1, 5)
    assert stream.units == {"rendered in this run": 1, "loaded from storage": 0}
    assert root.read_table("features/points", columns=["asset_id"]).num_rows == 6
    # an asset that label fails (a category without the functions) is still lifted in the
    # stream, and counted failed, not ok; the one the last stream did not label is labelled
    meshes = tmp_path / "meshes" / "spaceship"
    meshes.mkdir(parents=True)
    o3d.io.write_triangle_mesh(str(meshes / "s.ply"), o3d.geometry.TriangleMesh.create_box())
    run_assets_scan(small_config(uri, f"assets.input={tmp_path / 'meshes'}"))
    [unlabellable] = run_pipeline(small_config(uri, *three, "job.max_error_fraction=1",
                                               model=PipelineJob))
    assert (unlabellable.ok, unlabellable.failed, unlabellable.skipped_done) == (1, 1, 5)
    assert root.read_table("features/points", columns=["asset_id"]).num_rows == 7
    labelled = root.read_table("labels/points", columns=["asset_id"])["asset_id"].to_pylist()
    assert len(set(labelled)) == 6
    [error] = [e for e in root.read_table("errors").to_pylist() if e["stage"] == "label"]
    assert "spaceship" in error["message"]


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_more_lift_points_than_rendered_is_an_error_per_asset(tmp_path: Path) -> None:
    from rayjobs.errors import JobFailedError
    uri = str(tmp_path / "run")
    run_assets_make(small_config(uri, "assets.n=1"))
    run_render(small_config(uri))
    with pytest.raises(JobFailedError, match=r"lift.n_points=500 exceeds the 300 surface points"):
        run_lift(small_config(uri, "lift.n_points=500"))


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_gpu_actors_only_when_the_cluster_has_gpus() -> None:
    from rayjobs.config import StepResources
    from rayjobs.resources import map_batches_args
    assert "num_gpus" not in map_batches_args(StepResources(), actors=True)  # CPU-only cluster
    assert map_batches_args(StepResources(num_gpus=0.5), actors=True)["num_gpus"] == 0.5
    assert "num_gpus" not in map_batches_args(StepResources(), actors=False)
