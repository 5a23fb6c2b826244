"""`partlift eval --benchmark soco|instructpart|agd20k` end to end on the shared root's models
and small procedural stand-ins, and `partlift affordanceclip` on Ray Train (a run, a resume
with other settings refused, its heat maps scored on AGD20K's layout). Outputs land under
<root>/eval/<benchmark>/<name>/."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from operators.settings import ConfigError
from tests.operators.benchmarks.test_instructpart_agd20k import write_instructpart
from operators.store.storage import RunRoot
from rayjobs.affordanceclip_job import run_affordanceclip
from rayjobs.cli import main
from rayjobs.config import AffordanceClipJob, EvalJob, load_config
from rayjobs.eval_job import run_eval

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]

SMALL_SOCO = ["soco.categories=[mug, cup]", "soco.standin_assets=2", "soco.standin_views=4",
              "soco.standin_pairs=2", "soco.image_size=112"]
SMALL_PARTS = ["instructpart.categories=[mug, knife]", "instructpart.standin_assets=1"]


def eval_config(root: str, *settings: str) -> EvalJob:
    return load_config((), list(settings), root=root, model=EvalJob)


def test_soco_scores_chance_raw_features_and_the_model_on_the_stand_in(dfc_root: str,
                                                                       mask_model: str) -> None:
    report = run_eval(eval_config(dfc_root, *SMALL_SOCO), [mask_model], "soco", name="s",
                      data="procedural")
    root = RunRoot(dfc_root)
    metrics = root.read_json("eval/soco/s/metrics.json")
    rows = metrics["results"]
    assert set(rows) == {"chance", "raw features (dinov2-random-tiny)", "sm"}
    assert metrics["backbone"] == "dinov2-random-tiny"          # the model's own backbone
    for row in rows.values():
        assert set(row["tasks"]) == {"CC", "SOC", "Cross-SOC"}
        for task in row["tasks"].values():
            assert 0 <= task["per_img"] <= 100 and task["pairs"] >= 1
    assert rows["sm"]["conditioned"] > 0.5           # pour-with / scoop-with concepts are known
    table = root.read_bytes("eval/soco/s/table.md").decode()
    assert "| sm |" in table and "DINOv2-B/14 (paper)" in table
    assert root.read_bytes("eval/soco/s/pairs.png")[:4] == b"\x89PNG"
    predicted = json.loads(root.read_bytes("eval/soco/s/predictions.json"))
    assert len(predicted["sm"]["SOC"]) == metrics["pairs"]["intra"]   # one entry per pair
    assert report.where.endswith("eval/soco/s")
    # another backbone than the model's is refused, naming the key
    with pytest.raises(ConfigError, match="lift.backbone.name='dinov2-random-tiny'"):
        run_eval(eval_config(dfc_root, *SMALL_SOCO, "lift.backbone.name=dinov2-small"),
                 [mask_model], "soco", data="procedural")


def test_instructpart_scores_boxes_the_mask_head_and_cast(dfc_root: str, mask_model: str,
                                                           cast_model: str) -> None:
    run_eval(eval_config(dfc_root, *SMALL_PARTS), [mask_model, cast_model], "instructpart",
             name="p", data="procedural")
    metrics = RunRoot(dfc_root).read_json("eval/instructpart/p/metrics.json")
    rows = metrics["results"]
    assert set(rows) == {"object mask", "oracle boxes (ground truth + noise)", "sm mask head",
                         "sc (CAST)"}
    for row in rows.values():
        for task in ("TRPS", "ORPS"):
            values = row["tasks"][task]
            assert values["samples"] == metrics["samples"] >= 3
            assert 0 <= values["P@50:95"] <= values["P@50"] <= 100
    packed = np.load(io.BytesIO(RunRoot(dfc_root).read_bytes(
        "eval/instructpart/p/predictions.npz")))
    assert len(packed.files) == len(rows) * 2 * metrics["samples"]   # predictor x task x sample
    routed = rows["sm mask head"]["routed_to_affordance"]
    assert set(routed) == {"TRPS", "ORPS"} and all(0 <= v <= 1 for v in routed.values())


def test_affordanceclip_steps_learn_and_agd20k_scores_the_baselines(dfc_root: str) -> None:
    """The fast half: the run's steps in this process (the trainer driver's own test is the
    slow one below), and the AGD20K protocol end to end on the prompt-free baselines."""
    from training.affordanceclip_train import prepare_affordanceclip
    from training.task_loop import run_in_process
    config = load_config((), ["affordanceclip.steps=3", "affordanceclip.batch_size=2",
                              "affordanceclip.composite_size=64", "affordanceclip.image_size=32",
                              "affordanceclip.val_samples=4", "data.val_fraction=0.3"],
                         root=dfc_root, model=AffordanceClipJob)
    prepared = prepare_affordanceclip(RunRoot(dfc_root), "runs/affordanceclip/local", "local",
                                      config.affordanceclip, config.data, {},
                                      progress=lambda line: None)
    assert [r["step"] for r in prepared.plan] == [0, 1, 2]
    _, scores, _ = run_in_process(prepared.task, prepared.plan)
    assert 0 <= scores["val_miou"] <= 1 and np.isfinite(scores["val_bce"])
    run_eval(eval_config(dfc_root, "agd20k.categories=[mug]", "agd20k.standin_assets=1"), [],
             "agd20k", name="baselines", data="procedural")
    metrics = RunRoot(dfc_root).read_json("eval/agd20k/baselines/metrics.json")
    assert set(metrics["results"]) == {"uniform", "centre prior"}
    packed = np.load(io.BytesIO(RunRoot(dfc_root).read_bytes(
        "eval/agd20k/baselines/predictions.npz")))
    assert len(packed.files) == 2 * metrics["samples"]          # predictor x sample
    # a centred Gaussian is closer to part heat maps than a flat map (KLD lower, SIM higher)
    uniform, centre = metrics["results"]["uniform"], metrics["results"]["centre prior"]
    assert centre["KLD"] < uniform["KLD"] and centre["SIM"] > uniform["SIM"]


@pytest.mark.slow
def test_affordanceclip_trains_on_ray_and_is_scored_on_agd20k(dfc_root: str) -> None:
    settings = ["affordanceclip.steps=2", "affordanceclip.checkpoint_every=1",
                "affordanceclip.batch_size=2", "affordanceclip.composite_size=64",
                "affordanceclip.image_size=32", "affordanceclip.val_samples=4",
                "data.val_fraction=0.3", "job.name=ac", "ray.progress_bars=false"]
    report = run_affordanceclip(load_config((), settings, root=dfc_root,
                                            model=AffordanceClipJob))
    assert (report.run.steps, report.run.resumed_from) == (2, 0)
    assert report.run.best_score is not None and 0 <= report.run.best_score <= 1
    with pytest.raises(ConfigError, match="exists with other settings"):
        run_affordanceclip(load_config((), [*settings, "affordanceclip.lr=0.1"],
                                       root=dfc_root, model=AffordanceClipJob))
    run_eval(eval_config(dfc_root, "agd20k.categories=[mug]", "agd20k.standin_assets=1"),
             ["affordanceclip/ac"], "agd20k", name="h", data="procedural")
    metrics = RunRoot(dfc_root).read_json("eval/agd20k/h/metrics.json")
    rows = metrics["results"]
    assert set(rows) == {"uniform", "centre prior",
                         "ac (AffordanceCLIP, random-tiny CLIP: NOT pretrained)"}
    assert all(row["samples"] == metrics["samples"] >= 2 for row in rows.values())
    assert rows["uniform"]["nss_skipped"] == metrics["samples"]   # a flat map has no NSS


def test_the_eval_command_names_a_missing_or_wrong_data_argument(dfc_root: str, cast_model: str,
                                                                 tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["eval", "--benchmark", "soco", "--root", dfc_root])
    assert result.exit_code == 2 and "needs --data" in result.output
    result = runner.invoke(main, ["eval", "--benchmark", "agd20k", "--root", dfc_root,
                                  "--data", "/no/such/agd"])
    assert result.exit_code == 2 and "--data /no/such/agd: no such directory" in result.output
    result = runner.invoke(main, ["eval", "--benchmark", "instructpart", "--root", dfc_root,
                                  "--data", "procedural", "--model", "train/nope"])
    assert result.exit_code == 2 and "train/nope" in result.output
    result = runner.invoke(main, ["eval", "--benchmark", "instructpart", "--root", dfc_root,
                                  "--data", str(write_instructpart(tmp_path)), "--model",
                                  "finetune/sc"])
    assert result.exit_code == 2 and "the 3D asset behind each image" in result.output
    result = runner.invoke(main, ["eval", "--benchmark", "dfc", "--root", dfc_root,
                                  "--backbone", "dinov2-small"])
    assert result.exit_code == 2 and "--backbone is for --benchmark soco" in result.output
    result = runner.invoke(main, ["eval", "--benchmark", "soco", "--root", dfc_root, "--data",
                                  dfc_root, "--set", "soco.standin_assets=5"])
    assert result.exit_code == 2 and "soco.standin_assets shape(s) the procedural stand-in" \
        in result.output
