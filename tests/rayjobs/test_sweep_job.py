"""`partlift sweep` on the shared local Ray: two correspondence trials (Ray Train runs inside
Tune trials), their table, best config and plots; a finished sweep shown again by name; a
sweep killed half-way restored without re-running its finished trials."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from operators.settings import ConfigError
from operators.store.storage import RunRoot
from rayjobs.config import SweepJob, TrainJob, load_config
from rayjobs.sweep_job import run_sweep
from tests.conftest import DFC_TRAIN_SETTINGS
from training.runs import read_metric_log

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]

SPACE = "sweep.space={train.lambda_spatial: {grid: [1.0, 10.0]}}"


def sweep_config(root: str, *extra: str) -> SweepJob:
    return load_config((), [*DFC_TRAIN_SETTINGS, "sweep.job=train", SPACE, "sweep.num_samples=1",
                            *extra], root=root, model=SweepJob)


def test_a_two_trial_sweep_writes_its_table_best_config_and_plots(dfc_root: str, capsys,
                                                                  monkeypatch,
                                                                  tmp_path: Path) -> None:
    # a relative root, as `make demo` gives: the trials run in their own working directories
    monkeypatch.chdir(Path(dfc_root).parent)
    store = f"sqlite:///{tmp_path}/mlflow.db"
    report = run_sweep(sweep_config(Path(dfc_root).name, "job.name=s1",
                                    f"tracking.mlflow_uri={store}"))
    root = RunRoot(dfc_root)
    assert [r.status for r in report.rows] == ["finished", "finished"]
    assert sorted(r.params["train.lambda_spatial"] for r in report.rows) == [1.0, 10.0]
    for row in report.rows:   # each trial is a full run: every step logged, validated at 2, 4
        log = read_metric_log(root, f"runs/sweep/s1/trials/{row.trial_id}")
        assert [r["step"] for r in log] == [1, 2, 3, 4]
        assert row.best == max(r["val_pck@10"] for r in log if "val_pck@10" in r)
        assert row.steps == 4
    table = pq.read_table(io.BytesIO(root.read_bytes("runs/sweep/s1/results.parquet")))
    assert table.num_rows == 2 and "train.lambda_spatial" in table.column_names
    best = report.best
    text = root.read_bytes("runs/sweep/s1/best.yaml").decode()
    loaded = yaml.safe_load(text)
    assert loaded["train"]["lambda_spatial"] == best.params["train.lambda_spatial"]
    assert loaded["train"]["steps"] == 4                    # the base settings come along
    path = Path(dfc_root) / "best.yaml"
    path.write_text(text)
    config = load_config((str(path),), (), root=dfc_root, model=TrainJob)
    assert config.train.lambda_spatial == best.params["train.lambda_spatial"]
    for picture in ("metric_vs_params.png", "learning_curves.png"):
        assert root.read_bytes(f"runs/sweep/s1/{picture}")[:4] == b"\x89PNG"
    assert np.isfinite(best.best)
    # MLflow: one finished run per trial, the swept value as a param, the validation curve
    # at the trainer's steps (2 and 4)
    import mlflow
    client = mlflow.MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("partlift-sweep-s1")
                               .experiment_id])
    assert sorted(r.data.params["train.lambda_spatial"] for r in runs) == ["1.0", "10.0"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    by_value = {float(r.data.params["train.lambda_spatial"]): r for r in runs}
    for row in report.rows:
        run = by_value[row.params["train.lambda_spatial"]]
        history = client.get_metric_history(run.info.run_id, "val_pck_at_10")
        assert [m.step for m in history] == [2, 4]
        assert history[-1].value == pytest.approx(row.last)
    # `partlift status` lists the sweep and the trials' runs are not mistaken for train runs
    from rayjobs.config import StatusJob
    from rayjobs.status import print_status
    capsys.readouterr()
    print_status(StatusJob(root=dfc_root))
    listed = capsys.readouterr().out
    assert "sweep/s1" in listed and "2 trials, best val_pck@10" in listed
    # the same name again shows the finished sweep instead of running it
    again = run_sweep(sweep_config(dfc_root, "job.name=s1"))
    assert again.rows == [] and "finished on" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="give the sweep a name"):
        run_sweep(sweep_config(dfc_root))


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_rerunning_finished_trials(dfc_root: str,
                                                                  tmp_path: Path) -> None:
    """Three trials one at a time; SIGKILL the driver once the first trial's run finished;
    the rerun restores the Tuner and the first trial's run is not trained again."""
    import os
    import time

    from tests.rayjobs.test_train_job import kill_after_first_checkpoint  # noqa: F401
    root = tmp_path / "root"
    shutil.copytree(dfc_root, root, ignore=shutil.ignore_patterns("runs", "eval"))
    settings = [*DFC_TRAIN_SETTINGS, "sweep.job=train", "sweep.num_samples=1",
                "sweep.space={train.lambda_spatial: {grid: [1.0, 3.0, 10.0]}}",
                "sweep.max_concurrent_trials=1", "ray.num_cpus=2"]
    command = [sys.executable, "-m", "rayjobs.cli", "sweep", "--root", str(root), "--name", "k",
               *[a for s in settings for a in ("--set", s)]]
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "0"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)
    trials = root / "runs/sweep/k/trials"
    deadline = time.time() + 300
    finished: list[Path] = []
    while time.time() < deadline and not finished:
        finished = [p for p in trials.glob("*/run.json")
                    if '"finished"' in p.read_text()]
        time.sleep(0.2)
    assert finished, proc.communicate(timeout=60)[1][-3000:]
    time.sleep(2)  # let Tune record the trial's end
    import signal
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    first = finished[0]
    stamp = (first.parent / "metrics.jsonl").stat().st_mtime
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(resuming)" in again.stdout
    table = pq.read_table(root / "runs/sweep/k/results.parquet").to_pydict()
    assert sorted(table["train.lambda_spatial"]) == ["1.0", "10.0", "3.0"]
    assert (first.parent / "metrics.jsonl").stat().st_mtime == stamp   # not trained again


@pytest.mark.slow
def test_an_optuna_sweep_with_asha_runs_its_samples(dfc_root: str) -> None:
    """The model-based searcher and the early-stopping scheduler on real trials: 3 samples of a
    log-uniform weight, one at a time; ASHA may stop a trial at step 2, never before."""
    report = run_sweep(load_config((), [
        *DFC_TRAIN_SETTINGS, "sweep.job=train", "sweep.num_samples=3", "sweep.searcher=optuna",
        "sweep.scheduler=asha", "sweep.grace_period=2", "sweep.max_concurrent_trials=1",
        "sweep.space={train.lambda_mask: {loguniform: [0.1, 10.0]}}", "job.name=opt"],
        root=dfc_root, model=SweepJob))
    assert len(report.rows) == 3 and {r.status for r in report.rows} == {"finished"}
    values = [r.params["train.lambda_mask"] for r in report.rows]
    assert all(0.1 <= v <= 10.0 for v in values) and len(set(values)) == 3
    assert all(r.steps in (2, 3, 4) for r in report.rows)
    assert report.best is not None and report.best.best == max(r.best for r in report.rows)
