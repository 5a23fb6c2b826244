"""The label stage on a real local Ray: row counts implied by the input, resume, bad rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open3d as o3d
import pytest

from operators.data.taxonomy import load_taxonomy
from operators.models.labeling import prompts_for
from operators.store.storage import RunRoot, table_columns
from rayjobs.assets_job import run_assets_make, run_assets_scan
from rayjobs.config import ConfigError, PipelineJob, load_config
from rayjobs.errors import JobFailedError
from rayjobs.label_job import run_label
from rayjobs.render_job import run_render

from tests.rayjobs.test_jobs import small_config

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]
TRIALS = 2


def expected_counts(root: RunRoot, views: int) -> dict[str, int]:
    """Rows each label table must hold: prompts x views x trials per asset, from the manifest."""
    taxonomy = load_taxonomy()
    prompts = sum(len(prompts_for(taxonomy, r["category"], r["part_names"]))
                  for r in root.read_table("assets").to_pylist() if r["source"] == "procedural")
    return {"labels/points": prompts, "labels/masks": prompts * views,
            "labels/boxes": prompts * views * TRIALS}


def label_counts(root: RunRoot) -> dict[str, int]:
    return {t: root.read_table(t, columns=["asset_id"]).num_rows
            for t in ("labels/points", "labels/masks", "labels/boxes")}


def test_label_counts_resume_and_contents(tmp_path: Path) -> None:
    uri = str(tmp_path / "run")
    root = RunRoot(uri)
    run_assets_make(small_config(uri, "assets.n=3"))
    run_render(small_config(uri))
    report = run_label(small_config(uri, f"label.trials={TRIALS}"))
    assert (report.ok, report.failed) == (3, 0)
    assert label_counts(root) == expected_counts(root, views=4)

    again = run_label(small_config(uri, f"label.trials={TRIALS}"))
    assert (again.ok, again.skipped_done) == (0, 3)
    assert label_counts(root) == expected_counts(root, views=4)

    points = table_columns(root.read_table("labels/points"))
    assert points["score"].dtype == np.float16 and points["score"].shape[1] == 300
    assert float(points["score"].max()) == 1.0 and float(points["score"].min()) >= 0.0
    masks = table_columns(root.read_table("labels/masks"))
    assert masks["mask"].dtype == np.bool_ and masks["mask"].shape[1:] == (24, 32)
    boxes = root.read_table("labels/boxes").to_pylist()
    assert {b["trial"] for b in boxes} == {0, 1}
    assert all(len(b["boxes"]) == len(b["scores"]) for b in boxes)
    assert all(0 <= x <= 32 for b in boxes for box in b["boxes"] for x in box[0::2])
    record = root.read_json("labels/_job.json")
    assert record["config"]["label"]["backend"]["name"] == "oracle"
    assert record["counts"]["skipped_done"] == 3  # the last run (the no-op one) wrote it


def test_unlabellable_asset_goes_to_errors_and_the_rest_lands(tmp_path: Path) -> None:
    meshes = tmp_path / "meshes" / "spaceship"
    meshes.mkdir(parents=True)
    o3d.io.write_triangle_mesh(str(meshes / "s.ply"), o3d.geometry.TriangleMesh.create_box())
    uri = str(tmp_path / "run")
    run_assets_make(small_config(uri, "assets.n=2"))
    run_assets_scan(small_config(uri, f"assets.input={tmp_path / 'meshes'}"))
    run_render(small_config(uri))
    with pytest.raises(JobFailedError, match="1 of 3 assets failed"):
        run_label(small_config(uri, f"label.trials={TRIALS}"))
    root = RunRoot(uri)
    assert label_counts(root) == expected_counts(root, views=4)  # the two procedural assets
    error = [e for e in root.read_table("errors").to_pylist() if e["stage"] == "label"][0]
    assert "spaceship" in error["message"] and "kettle" in error["message"]  # lists known ones


def test_label_before_render_and_missing_model_path_are_clear(tmp_path: Path) -> None:
    uri = str(tmp_path / "run")
    run_assets_make(small_config(uri, "assets.n=1"))
    with pytest.raises(FileNotFoundError, match="partlift render"):
        run_label(small_config(uri))
    with pytest.raises(ConfigError, match="label.backend.model_path is required"):
        run_label(load_config((), ["label.backend=hf-zero-shot"], root=uri))
    with pytest.raises(ConfigError, match=r"no model there (.|\n)* `hf download"):
        run_label(load_config((), ["label.backend=hf-zero-shot",
                                   f"label.backend.model_path={tmp_path / 'nothing'}"], root=uri))


def test_streaming_pipeline_renders_new_assets_and_reads_back_rendered_ones(tmp_path: Path) -> None:
    from rayjobs.pipeline_job import run_pipeline
    uri = str(tmp_path / "run")
    root = RunRoot(uri)
    run_assets_make(small_config(uri, "assets.n=2"))
    run_render(small_config(uri))                     # two assets rendered, not labelled
    run_assets_make(small_config(uri, "assets.n=4"))  # two more, not rendered
    [report] = run_pipeline(small_config(uri, f"label.trials={TRIALS}", model=PipelineJob))
    assert (report.ok, report.failed) == (4, 0)
    assert report.units == {"rendered in this run": 2, "loaded from storage": 2}
    assert root.read_table("views", columns=["asset_id"]).num_rows == 4 * 4  # no re-render
    assert label_counts(root) == expected_counts(root, views=4)
    [again] = run_pipeline(small_config(uri, f"label.trials={TRIALS}", model=PipelineJob))
    assert (again.ok, again.skipped_done) == (0, 4)
    assert label_counts(root) == expected_counts(root, views=4)
    assert root.read_json("views/_job.json")["stage"] == "pipeline render->label"


def test_pipeline_stage_order_is_validated() -> None:
    with pytest.raises(ConfigError, match="sub-sequence"):
        load_config((), ["pipeline.stages=[label, render]"], model=PipelineJob)


def test_transformers_detector_backend_on_the_actor_pool(tmp_path: Path) -> None:
    """hf-zero-shot with a tiny random OWLv2 saved to disk: model loaded in the actor, every
    prompt/view/trial grounded, boxes in view pixels, tables complete. (Not pretrained: the
    boxes are random; this checks the wiring, not quality.)"""
    from tests.tiny_models import build_owlv2
    model = tmp_path / "owlv2"
    build_owlv2(model)
    uri = str(tmp_path / "run")
    run_assets_make(small_config(uri, "assets.n=2", "assets.categories=[mug, knife]"))
    run_render(small_config(uri))
    report = run_label(small_config(uri, "label.backend=hf-zero-shot", f"label.backend.model_path={model}",
                                    "label.backend.box_threshold=0.0", f"label.trials={TRIALS}"))
    root = RunRoot(uri)
    assert (report.ok, report.failed) == (2, 0)
    assert label_counts(root) == expected_counts(root, views=4)
    boxes = root.read_table("labels/boxes").to_pylist()
    assert sum(len(b["boxes"]) for b in boxes) > 0
    assert all(0 <= x <= 32 and 0 <= y <= 24 for b in boxes for x0, y0, x1, y1 in b["boxes"]
               for x, y in ((x0, y0), (x1, y1)))
    assert root.read_json("labels/_job.json")["inputs"]["backend"] == "hf-zero-shot"


def test_openai_endpoint_backend_and_malformed_answers(tmp_path: Path) -> None:
    """The openai backend through the actor pool against a real local chat-completions server:
    answers with Qwen JSON boxes land as labels; an asset whose answers carry no parseable
    boxes becomes an error row (label.backend.strict_output) and the other asset still lands."""
    from tests.chat_server import ChatServer

    def script(index: int, body: dict) -> tuple[int, dict, float]:
        prompt = [c for c in body["messages"][-1]["content"] if c["type"] == "text"][0]["text"]
        answer = ("I think so, maybe." if "knife" in prompt.lower() or "blade" in prompt.lower()
                  else '```json\n[{"bbox_2d": [4, 3, 20, 18], "label": "part"}]\n```')
        return 200, {"choices": [{"message": {"role": "assistant", "content": answer}}]}, 0.0

    server = ChatServer(script)
    try:
        uri = str(tmp_path / "run")
        run_assets_make(small_config(uri, "assets.n=2", "assets.categories=[mug, knife]"))
        run_render(small_config(uri))
        settings = ["label.backend=openai", f"label.backend.base_url={server.url}",
                    "label.backend.model=tiny", "label.backend.style=qwen", "label.trials=1", "job.max_error_fraction=0.5"]
        report = run_label(small_config(uri, *settings))
    finally:
        server.close()
    root = RunRoot(uri)
    assert (report.ok, report.failed) == (1, 1) and len(server.requests) > 0
    error = [e for e in root.read_table("errors").to_pylist() if e["stage"] == "label"][0]
    assert error["error_type"] == "GroundingOutputError" and "I think so" in error["message"]
    labelled = root.read_table("labels/boxes").to_pylist()
    assert labelled and all(b["boxes"] == [[4.0, 3.0, 20.0, 18.0]] for b in labelled)


def test_generative_vlm_backend_on_the_actor_pool(tmp_path: Path) -> None:
    """hf-vlm with a tiny random LLaVA saved to disk: generation runs in the actor for every
    prompt, view and trial. Its random text has no boxes: with strict_output=false the labels
    land empty (all-zero scores); with the default strict_output every asset is an error row
    that quotes the model's answer."""
    from tests.tiny_models import build_llava
    model = tmp_path / "llava"
    build_llava(model)
    uri = str(tmp_path / "run")
    run_assets_make(small_config(uri, "assets.n=1", "assets.categories=[knife]"))
    run_render(small_config(uri))
    vlm = ["label.backend=hf-vlm", f"label.backend.model_path={model}", "label.backend.max_new_tokens=8",
           "label.trials=1"]
    with pytest.raises(JobFailedError, match="1 of 1 assets failed"):
        run_label(small_config(uri, *vlm))
    root = RunRoot(uri)
    [error] = [e for e in root.read_table("errors").to_pylist() if e["stage"] == "label"]
    assert error["error_type"] == "GroundingOutputError"
    report = run_label(small_config(uri, *vlm, "label.backend.strict_output=false"))
    assert (report.ok, report.failed) == (1, 0)
    assert label_counts(root) == expected_counts(root, views=4) | {
        "labels/boxes": expected_counts(root, views=4)["labels/boxes"] // TRIALS}
    scores = table_columns(root.read_table("labels/points"))["score"]
    assert float(np.abs(scores.astype(np.float32)).max()) == 0.0
