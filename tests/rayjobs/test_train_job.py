"""`partlift train` / `partlift eval` on the shared local Ray: a 1-worker run and its resume, a
2-worker DDP run, loading models, the DFC evaluation, and configs that do not match the data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from operators.settings import ConfigError
from operators.store.storage import RunRoot
from rayjobs.config import EvalJob, TrainJob, load_config
from rayjobs.eval_job import run_eval
from rayjobs.train_job import run_train
from tests.conftest import DFC_TRAIN_SETTINGS
from training.runs import load_model, read_metric_log

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]


def train_config(root: str, *extra: str) -> TrainJob:
    return load_config((), [*DFC_TRAIN_SETTINGS, *extra], root=root, model=TrainJob)


@pytest.fixture(scope="module")
def trained(dfc_root: str) -> str:
    """One 1-worker run of 4 steps (checkpoints at 2 and 4)."""
    run_train(train_config(dfc_root, "job.name=one"))
    return dfc_root


def test_a_run_logs_checkpoints_exports_the_best_and_resumes_under_its_name(
        trained: str) -> None:
    root = RunRoot(trained)
    log = read_metric_log(root, "runs/train/one")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in log)
    validated = [r for r in log if "val_pck@10" in r]
    assert [r["step"] for r in validated] == [2, 4]
    assert all(0.0 <= r["val_pck@10"] <= 1.0 for r in validated)
    best = max(validated, key=lambda r: r["val_pck@10"])
    record = root.read_json("runs/train/one/run.json")
    assert record["status"] == "finished" and record["splits"]["val"] == 3
    assert set(record["fingerprints"]) == {"render", "lift", "label"}
    model = load_model(root, "train/one")  # best
    assert model.step == best["step"]
    assert load_model(root, "train/one", "last").step == 4
    assert load_model(root, "train/one", 2).step == 2
    assert model.text.shape == (len(model.functions), 384)  # minilm-text
    assert root.list_files("runs/train/one/tensorboard")
    with pytest.raises(ConfigError, match="steps: 2, 4"):
        load_model(root, "train/one", 3)
    # the same name resumes from the last checkpoint (more steps may be asked for)
    again = run_train(train_config(trained, "job.name=one", "train.steps=6")).train
    assert (again.steps, again.resumed_from) == (6, 4)
    log = read_metric_log(root, "runs/train/one")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]  # no gap, no repeat
    assert load_model(root, "train/one", "last").step == 6
    with pytest.raises(ConfigError, match=r"train.lr: 0.0001 -> 0.001.*another --name"):
        run_train(train_config(trained, "job.name=one", "train.lr=1e-3"))


@pytest.mark.s3
def test_two_workers_train_with_ddp_on_s3_and_stay_in_sync(dfc_root: str, s3_root) -> None:
    """A 2-rank DDP run whose root (data, checkpoints, log, best/) is on the S3 test server."""
    import pyarrow.fs as pafs
    uri, options = s3_root
    root = RunRoot(uri, options)
    pafs.copy_files(dfc_root, root.base, destination_filesystem=root.fs)  # the data, as made
    storage = [f"storage.endpoint_url={options.endpoint_url}",
               f"storage.access_key_id={options.access_key_id}",
               f"storage.secret_access_key={options.secret_access_key}"]
    report = run_train(train_config(uri, "job.name=ddp", "train.num_workers=2",
                                    "train.cpus_per_worker=0.5", "train.steps=2",
                                    *storage)).train
    assert report.steps == 2 and report.run == f"{uri}/runs/train/ddp"
    log = read_metric_log(root, "runs/train/ddp")
    assert [r["step"] for r in log] == [1, 2]
    checked = [r for r in log if "weights_spread" in r]
    # the checksums of both ranks' weights agree to the last bit after DDP steps
    assert [(r["world_size"], r["weights_spread"]) for r in checked] == [(2, 0.0)]
    assert [d for d in root.list_dirs("runs/train/ddp") if d.startswith("checkpoint_")]
    model = load_model(root, "train/ddp", "last")  # from the bucket
    assert model.step == 2 and model.where.startswith("s3://")


def test_eval_compares_the_model_with_chance_and_raw_features(trained: str) -> None:
    config = load_config((), DFC_TRAIN_SETTINGS[-6:-4], root=trained, model=EvalJob)
    report = run_eval(config, ["full=train/one"], name="t")
    root = RunRoot(trained)
    metrics = root.read_json("eval/dfc/t/metrics.json")
    assert set(metrics["results"]) == {"chance", "raw features", "full"}
    for name, subsets in metrics["results"].items():
        val = subsets["val"]
        assert val["pairs"] == 6
        assert 0 <= val["pck@10"] <= val["pck@15"] <= val["pck@23"] <= 1  # looser = more
        assert 0 <= val["ap@5"] <= val["ap@10"] <= val["ap@23"] <= 1
        assert subsets["val-within"]["pairs"] + subsets["val-across"]["pairs"] == 6
    table = root.read_bytes("eval/dfc/t/table.md").decode()
    assert table == report.table and "| raw features |" in table and "| full |" in table
    assert root.read_bytes("eval/dfc/t/pairs.png")[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_refuses_features_other_than_the_model_s(trained: str, tmp_path: Path) -> None:
    root = RunRoot(trained)
    shutil.copytree(Path(trained) / "runs/train/one", Path(trained) / "runs/train/other")
    record = root.read_json("runs/train/other/run.json")
    lift = record["fingerprints"]["lift"]
    lift["settings"]["lift.backbone.name"] = "dinov2-small"
    lift["hash"] = "0" * 16
    root.write_json("runs/train/other/run.json", record)
    config = load_config((), [], root=trained, model=EvalJob)
    with pytest.raises(ConfigError, match=r"lift.backbone.name: 'dinov2-small' when trained, "
                                          r"'dinov2-random-tiny' now"):
        run_eval(config, ["train/other"])


def test_data_that_cannot_train_fails_before_ray_naming_the_command(dfc_root: str,
                                                                    tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(dfc_root, bare, ignore=shutil.ignore_patterns("runs", "eval"))
    shutil.rmtree(bare / "labels")
    with pytest.raises(ConfigError, match="run `partlift label --root"):
        run_train(train_config(str(bare), "job.name=x"))
    for table in ("features",):
        shutil.rmtree(bare / table)
    with pytest.raises(ConfigError, match="run `partlift lift --root"):
        run_train(train_config(str(bare), "job.name=x", "train.masks=gt"))
    with pytest.raises(ConfigError, match="functional pairs need two"):
        shutil.rmtree(bare)
        shutil.copytree(dfc_root, bare, ignore=shutil.ignore_patterns("runs", "eval"))
        run_train(train_config(str(bare), "job.name=x", "train.masks=gt",
                               "data.holdout_categories=[bowl, pan, bottle, kettle]"))
    assert json.loads((Path(dfc_root) / "views/_job.json").read_text())["stage"] == "render"


@pytest.mark.slow
def test_a_driver_killed_after_its_first_checkpoint_resumes_without_gaps(dfc_root: str,
                                                                         tmp_path: Path) -> None:
    """SIGKILL the `partlift train` driver once its first checkpoint is written; the rerun of
    the same name continues from it and the metric log has each step exactly once."""
    import subprocess
    import sys

    root = tmp_path / "root"
    shutil.copytree(dfc_root, root, ignore=shutil.ignore_patterns("runs", "eval"))
    settings = [*DFC_TRAIN_SETTINGS[:-4], "train.steps=60", "train.checkpoint_every=10",
                "ray.num_cpus=2"]
    command = [sys.executable, "-m", "rayjobs.cli", "train", "--root", str(root), "--name", "k",
               *[a for s in settings for a in ("--set", s)]]
    kill_after_first_checkpoint(command, root / "runs/train/k")
    run = root / "runs/train/k"
    done_before = max(json.loads(p.read_text())["step"] for p in run.glob("checkpoint_*/meta.json"))
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(resuming)" in again.stdout and "resumed from" in again.stdout
    steps = [r["step"] for r in read_metric_log(RunRoot(str(root)), "runs/train/k")]
    assert steps == list(range(1, 61)) and done_before >= 10


def kill_after_first_checkpoint(command: list[str], run: Path) -> None:
    """Start `command` (a training CLI run), SIGKILL it and its private Ray once `run` holds a
    checkpoint."""
    import os
    import signal
    import subprocess
    import time

    import psutil
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list(run.glob("checkpoint_*/meta.json")):
        time.sleep(0.1)
    assert list(run.glob("checkpoint_*/meta.json")), proc.communicate(timeout=60)[1][-3000:]
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait(timeout=30)
    for child in children:  # the private Ray it started would otherwise linger
        if child.is_running():
            child.kill()
    os.killpg(proc.pid, signal.SIGKILL) if _group_alive(proc.pid) else None


def _group_alive(pgid: int) -> bool:
    import os
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_the_protocol_gives_a_perfect_describer_full_marks(dfc_root: str) -> None:
    """End to end through the DFC protocol: a describer that knows each pixel's surface point
    (random Fourier features of it, similarity ~ exp(-d^2 / 2 sigma^2)). On a view paired with
    itself the ground truth is the identity and it scores PCK 1; across two views of one
    part it stays far above chance (the protocol's one-to-one matching of both views' part pixels
    also pairs points only one view sees, so not 1)."""
    from operators.geometry.correspondence import part_mask, unproject
    from operators.store.readers import RootReader
    from training.evaluation import _pair, chance_describer, score_pair
    reader = RootReader(RunRoot(dfc_root))
    row = next(r for r in reader.manifest() if r["category"] == "mug")
    views = reader.views(row["asset_id"], ["face_id", "depth", "K", "cam_to_world", "mask"])
    part = row["part_names"].index("body")
    counts = part_mask(views["face_id"], np.asarray(row["face_part"]), [part]).sum(axis=(1, 2))
    v1, v2 = (int(v) for v in np.argsort(counts)[-2:])
    rng = np.random.default_rng(0)
    weights, phase = rng.normal(0, 1 / 0.01, (2048, 3)), rng.uniform(0, 2 * np.pi, 2048)

    def oracle(features, uv, size, function, key):
        view = int(key.split("/")[1])
        xyz = unproject(uv, views["depth"][view], views["K"][view], views["cam_to_world"][view])
        out = np.cos(xyz @ weights.T + phase)
        return out / np.linalg.norm(out, axis=1, keepdims=True), None

    features = np.zeros((3, 4, 4, 8), np.float32)
    same = _pair([row], [views], "roll-onto", (0, v2, part), (0, v2, part), 200, 1)
    np.testing.assert_array_equal(same.truth[:, :2], same.truth[:, 2:])
    exact = score_pair(oracle, same, features, features, (56, 56))
    assert exact["pck@10"] == 1.0 and exact["normalized_dist"] == 0.0
    # discovery matches every object pixel, the ground truth covers the part's: a perfect
    # describer's matches off the part count as wrong, so AP stays below 1 (0.92 here)
    assert exact["ap@5"] > 0.85 and exact["best_f1@5"] > 0.85
    two = _pair([row], [views], "roll-onto", (0, v1, part), (0, v2, part), 200, 1)
    perfect = score_pair(oracle, two, features, features, (56, 56))
    chance = score_pair(chance_describer(0), two, features, features, (56, 56))
    assert perfect["pck@10"] > 2 * chance["pck@10"] and perfect["ap@10"] > chance["ap@10"]


def test_model_references_take_an_optional_row_label() -> None:
    from rayjobs.eval_job import split_label
    assert split_label("full=train/dfc-01") == ("full", "train/dfc-01")
    assert split_label("train/dfc-01") == (None, "train/dfc-01")
    assert split_label("s3://bucket/run/runs/train/a=b") == (None, "s3://bucket/run/runs/train/a=b")
    with pytest.raises(ConfigError, match="LABEL=KIND/NAME"):
        split_label("=train/dfc-01")


def test_a_run_another_job_is_writing_is_refused(dfc_root: str) -> None:
    from operators.store.lease import LeaseHeldError, acquire
    lease = acquire(RunRoot(dfc_root), "runs/train/busy", "someone-else")
    try:
        with pytest.raises(LeaseHeldError, match="runs/train/busy .* is being written by"):
            run_train(train_config(dfc_root, "job.name=busy"))
    finally:
        lease.release()
