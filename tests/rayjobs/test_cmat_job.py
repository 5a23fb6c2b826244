"""`partlift pretrain` / `partlift finetune` on the shared local Ray: a CMAT run with its point
cache, metric log, best weights and resume; CAST from it on 2 DDP workers with pseudo-label
targets, and the model a scorer loads; refusals before Ray."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load as load_numpy

from operators.settings import ConfigError
from operators.store.storage import RunRoot
from rayjobs.cmat_job import run_finetune, run_pretrain
from rayjobs.config import EvalJob, FinetuneJob, PretrainJob, load_config
from rayjobs.eval_job import run_eval
from training.cmat import TrainedCast
from training.runs import TrainedEncoder, load_model, read_metric_log
from training.task_loop import lr_factor

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]

# A tiny encoder for the 256 lifted points per asset of the shared root.
SMALL = ["data.val_fraction=0.3", "pretrain.points=128", "pretrain.n_patches=16", "pretrain.k=8",
         "pretrain.width=32", "pretrain.depth=1", "pretrain.heads=2", "pretrain.decoder_depth=1",
         "pretrain.batch_size=2", "pretrain.val_assets=3", "pretrain.warmup_steps=1",
         "ray.progress_bars=false"]
CAST = ["cast.fusion_depth=1", "cast.batch_size=2", "cast.steps=4", "cast.checkpoint_every=2",
        "cast.warmup_steps=1", "cast.val_samples=6"]


def pretrain_config(root: str, *extra: str) -> PretrainJob:
    return load_config((), [*SMALL, "pretrain.steps=4", "pretrain.checkpoint_every=2", *extra],
                       root=root, model=PretrainJob)


def finetune_config(root: str, *extra: str) -> FinetuneJob:
    return load_config((), [*SMALL, *CAST, *extra], root=root, model=FinetuneJob)


@pytest.fixture(scope="module")
def pretrained(dfc_root: str) -> str:
    run_pretrain(pretrain_config(dfc_root, "job.name=p1"))
    return dfc_root


def test_pretraining_caches_points_logs_every_step_and_resumes_by_name(pretrained: str) -> None:
    root = RunRoot(pretrained)
    record = root.read_json("runs/pretrain/p1/run.json")
    cached = root.list_files(record["point_cache"], ".safetensors")
    assert len(cached) == 8                                    # every asset, once
    inputs = load_numpy(root.read_bytes(f"{record['point_cache']}/"
                                        + sorted(cached)[0].rsplit("/", 1)[-1]))
    radius = np.linalg.norm(inputs["xyz"], axis=1)
    assert inputs["xyz"].shape == (128, 3) and radius.max() == pytest.approx(1.0, abs=1e-5)
    assert abs(float(inputs["xyz"].mean(axis=0).max())) < 0.2  # centred (on the 256 points)
    log = read_metric_log(root, "runs/pretrain/p1")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(np.isfinite(r[k]) for r in log for k in ("loss", "loss_rec", "loss_aff",
                                                         "loss_div"))
    assert [r["step"] for r in log if "val_loss" in r] == [2, 4]
    assert all(r["val_loss"] == pytest.approx(r["val_rec"] + 0.1 * r["val_aff"]
                                              + 0.2 * r["val_div"]) for r in log if "val_loss" in r)
    peak = 1e-4  # warm-up over 1 step, then the cosine over the other 3
    assert [r["lr"] for r in log] == pytest.approx([peak * lr_factor(s, 4, 1) for s in range(4)])
    assert log[-1]["lr"] < log[2]["lr"] < log[1]["lr"] == pytest.approx(peak)
    encoder = load_model(root, "pretrain/p1")
    assert isinstance(encoder, TrainedEncoder) and encoder.step in (2, 4)
    best = min((r for r in log if "val_loss" in r), key=lambda r: r["val_loss"])
    assert encoder.step == best["step"]                        # best = lowest validation loss
    # the same name again resumes from its last checkpoint: a finished run trains nothing more
    report = run_pretrain(pretrain_config(pretrained, "job.name=p1", "pretrain.keep_checkpoints=3"))
    assert report.run.resumed_from == 4 and report.run.steps == 4
    assert [r["step"] for r in read_metric_log(root, "runs/pretrain/p1")] == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="pretrain.lambda_div: 0.2 -> 0.0"):
        run_pretrain(pretrain_config(pretrained, "job.name=p1", "pretrain.lambda_div=0"))
    with pytest.raises(ConfigError, match="pretrain.steps: 4 -> 6"):  # the schedule would change
        run_pretrain(pretrain_config(pretrained, "job.name=p1", "pretrain.steps=6"))


@pytest.mark.slow
def test_a_killed_pretraining_resumes_without_gaps(dfc_root: str, tmp_path) -> None:
    import shutil
    import subprocess
    import sys

    from tests.rayjobs.test_train_job import kill_after_first_checkpoint
    root = tmp_path / "root"
    shutil.copytree(dfc_root, root, ignore=shutil.ignore_patterns("runs", "eval"))
    settings = [*SMALL, "pretrain.steps=80", "pretrain.checkpoint_every=10", "ray.num_cpus=2"]
    command = [sys.executable, "-m", "rayjobs.cli", "pretrain", "--root", str(root), "--name",
               "k", *[a for s in settings for a in ("--set", s)]]
    kill_after_first_checkpoint(command, root / "runs/pretrain/k")
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(resuming)" in again.stdout
    steps = [r["step"] for r in read_metric_log(RunRoot(str(root)), "runs/pretrain/k")]
    assert steps == list(range(1, 81))


def test_cast_fine_tunes_the_pretrained_encoder_on_two_ddp_workers(pretrained: str) -> None:
    report = run_finetune(finetune_config(pretrained, "job.name=f1", "cast.init=pretrain/p1",
                                          "cast.num_workers=2", "cast.targets=pseudo"))
    root = RunRoot(pretrained)
    record = root.read_json("runs/finetune/f1/run.json")
    best_step = root.read_json("runs/pretrain/p1/best/meta.json")["step"]
    assert record["init"] == "pretrain/p1" and record["init_step"] == best_step
    assert record["samples"]["train"] > 0 and record["status"] == "finished"
    log = read_metric_log(root, "runs/finetune/f1")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    checked = [r for r in log if "val_aiou" in r]
    assert [r["world_size"] for r in checked] == [2, 2]
    assert all(r["weights_spread"] == 0.0 for r in checked)
    assert all(0.0 <= r["val_aiou"] <= 1.0 and 0.0 <= r["val_image_auc"] <= 1.0
               for r in checked)
    assert report.run.metric == "val_aiou" and report.run.samples_per_s > 0
    model = load_model(root, "finetune/f1")
    assert isinstance(model, TrainedCast) and model.points == 128
    xyz = np.random.default_rng(0).normal(size=(2, 128, 3)).astype(np.float32)
    xyz /= np.linalg.norm(xyz, axis=2).max(axis=1)[:, None, None]
    text = model.embed(["which part of the mug do you pour with?", "a brand new prompt"])
    by_text = model.predict(xyz, text, None)
    by_image = model.predict(xyz[:1], None, model.exemplar("pour-with")[None])
    assert by_text.shape == (2, 128) and by_image.shape == (1, 128)
    assert ((by_text >= 0) & (by_text <= 1)).all()


def test_eval_scores_cast_models_against_chance_and_refuses_the_other_kind(
        pretrained: str) -> None:
    if not RunRoot(pretrained).exists("runs/finetune/f1/best/model.safetensors"):
        pytest.skip("needs the fine-tuned model of the test above")
    config = load_config((), ["eval.pairs=6"], root=pretrained, model=EvalJob)
    report = run_eval(config, ["cast=finetune/f1"], benchmark="affordance", name="a1")
    seen = report.results["cast"]["seen text"]
    assert seen["n_samples"] == 6 and 0.0 <= seen["aiou"] <= 1.0
    assert set(report.results) == {"chance", "cast"}
    assert "seen image" in report.results["cast"]       # the run has training exemplars
    assert RunRoot(pretrained).exists("eval/affordance/a1/table.md")
    assert "| cast | text |" in report.table
    with pytest.raises(ConfigError, match="finetune/f1 is a finetune run .* scores train/NAME"):
        run_eval(config, ["finetune/f1"], benchmark="dfc")


def test_finetune_refusals_name_the_missing_run_or_data(dfc_root: str) -> None:
    with pytest.raises(ConfigError, match="pretrain/nothing: no run at .*partlift pretrain"):
        run_finetune(finetune_config(dfc_root, "job.name=f2", "cast.init=pretrain/nothing"))
    with pytest.raises(ConfigError, match="256 lifted points per asset .* fewer than "
                                          "pretrain.points=512"):
        run_pretrain(pretrain_config(dfc_root, "job.name=p2", "pretrain.points=512"))
    with pytest.raises(ConfigError, match="expected scratch, pretrain/NAME or a run URI"):
        load_config((), ["cast.init=train/x"], root=dfc_root, model=FinetuneJob)
    with pytest.raises(ConfigError, match="mask_ratio=0.99 .* masks 16"):
        load_config((), [*SMALL, "pretrain.mask_ratio=0.99"], root=dfc_root, model=PretrainJob)


def test_an_encoder_pretrained_on_another_split_is_refused(pretrained: str) -> None:
    with pytest.raises(ConfigError, match="(?s)another split .*data.val_fraction: 0.3 there, 0.5 here"):
        run_finetune(finetune_config(pretrained, "job.name=f3", "cast.init=pretrain/p1",
                                     "data.val_fraction=0.5"))
