"""The sweep's search space and results, without Ray: what is refused before Ray starts (naming
the key), the candidate values checked, the table, the best config as YAML a job loads, and the
plots."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from operators.settings import ConfigError
from operators.store.storage import RunRoot
from rayjobs.config import SweepJob, TrainJob, load_config
from rayjobs.sweep_job import check_space
from tuning.results import (TrialRow, best_trial, best_yaml, learning_curves, markdown,
                            metric_vs_params, table_bytes)
from tuning.space import Dimension, SweepSection


def sweep(*sets: str) -> SweepJob:
    return load_config((), list(sets), model=SweepJob)


def test_dimensions_take_exactly_one_kind_with_valid_bounds() -> None:
    assert Dimension(loguniform=(1e-4, 1e-2)).candidates() == [1e-4, 1e-2]
    assert Dimension(randint=(0, 10)).candidates() == [0, 9]        # high is exclusive
    assert Dimension(grid=[1, 2, 3]).candidates() == [1, 2, 3]
    assert Dimension(loguniform=(1.0, 100.0)).sample(0.5) == pytest.approx(10.0)
    for bad, message in (({}, "exactly one"), ({"choice": [1], "grid": [2]}, "exactly one"),
                         ({"uniform": (1, 0)}, "low < high"), ({"loguniform": (0, 1)}, "low > 0"),
                         ({"choice": []}, "at least one")):
        with pytest.raises(ValueError, match=message):
            Dimension(**bad)


def test_the_metric_defaults_to_the_job_s_validation_metric() -> None:
    space = {"train.lr": {"choice": [1e-4]}}
    assert SweepSection(space=space).objective() == ("val_pck@10", "max")
    assert SweepSection(job="pretrain", space={"pretrain.lr": {"choice": [1e-4]}}
                        ).objective() == ("val_rec", "min")
    assert SweepSection(job="finetune", space={"cast.lr": {"choice": [1e-4]}}
                        ).objective() == ("val_aiou", "max")
    assert SweepSection(metric="val_loss", space=space).objective() == ("val_loss", "min")


def test_keys_and_values_the_job_does_not_take_are_refused_naming_them() -> None:
    check_space(sweep("sweep.space={train.lambda_spatial: {loguniform: [1, 30]}, "
                      "train.seed: {randint: [0, 5]}, lift.backbone: {choice: [dinov2-small]}}"))
    with pytest.raises(ConfigError, match="train.lrr=0.1 .*unknown config key 'train.lrr'"):
        check_space(sweep("sweep.space={train.lrr: {choice: [0.1]}}"))
    with pytest.raises(ConfigError, match="train.lr=-1 .*greater than 0"):
        check_space(sweep("sweep.space={train.lr: {choice: [0.001, -1]}}"))
    with pytest.raises(ConfigError, match="`partlift pretrain` has no section 'train'"):
        check_space(sweep("sweep.job=pretrain", "sweep.space={train.lr: {choice: [0.1]}}"))
    with pytest.raises(ConfigError, match="backbone"):
        check_space(sweep("sweep.space={lift.backbone: {choice: [no-such-model]}}"))
    with pytest.raises(ConfigError, match="optuna does not take grid"):
        sweep("sweep.searcher=optuna", "sweep.space={train.lr: {grid: [0.1, 0.2]}}")
    for path in ("configs/sweep_correspondence.yaml", "configs/sweep_cmat.yaml"):
        check_space(load_config((path,), (), model=SweepJob))


def _rows() -> list[TrialRow]:
    return [TrialRow("t1", "finished", {"train.lambda_spatial": 1.0, "train.n_blocks": 3}, 0.2,
                     0.25, 4, 12.0, "root/runs/sweep/s/trials/t1", curve=[(2, 0.25), (4, 0.2)]),
            TrialRow("t2", "finished", {"train.lambda_spatial": 10.0, "train.n_blocks": 1}, 0.3,
                     0.3, 4, 11.0, "root/runs/sweep/s/trials/t2", curve=[(2, 0.1), (4, 0.3)]),
            TrialRow("t3", "error", {"train.lambda_spatial": 30.0, "train.n_blocks": 3}, None,
                     None, None, 1.0, "root/runs/sweep/s/trials/t3", error="RuntimeError: boom")]


def test_the_results_table_lists_every_trial_best_first_with_errors() -> None:
    rows, keys = _rows(), ["train.lambda_spatial", "train.n_blocks"]
    assert best_trial(rows, "max").trial_id == "t2" and best_trial(rows, "min").trial_id == "t1"
    table = pq.read_table(io.BytesIO(table_bytes(rows, keys, "val_pck@10"))).to_pydict()
    assert table["trial_id"] == ["t1", "t2", "t3"] and table["status"][2] == "error"
    assert table["val_pck@10 (best)"] == [0.25, 0.3, None]
    assert table["error"][2] == "RuntimeError: boom"
    text = markdown(rows, keys, "val_pck@10", "max")
    lines = text.splitlines()
    assert lines[2].startswith("| t2 |") and lines[3].startswith("| t1 |")
    assert "error: RuntimeError: boom" in lines[4]


def test_the_best_config_is_yaml_the_job_loads() -> None:
    best = best_trial(_rows(), "max")
    text = best_yaml({"train": {"steps": 4, "lambda_spatial": 99.0}, "data": {"val_fraction": 0.3}},
                     best, "train", "val_pck@10", "s")
    assert text.startswith("# best trial t2 of sweep s: val_pck@10 = 0.3")
    loaded = yaml.safe_load(text)
    assert loaded["train"] == {"steps": 4, "lambda_spatial": 10.0, "n_blocks": 1}
    config = load_config((), [f"{k}={v}" for k, v in {
        "train.steps": 4, "train.lambda_spatial": 10.0, "train.n_blocks": 1,
        "data.val_fraction": 0.3}.items()], model=TrainJob)
    assert config.train.lambda_spatial == 10.0 and config.train.n_blocks == 1


def test_plots_have_one_panel_per_swept_key() -> None:
    rows = _rows()
    panels = Image.open(io.BytesIO(metric_vs_params(rows, ["train.lambda_spatial",
                                                           "train.n_blocks"], "m",
                                                    {"train.lambda_spatial"})))
    curves = Image.open(io.BytesIO(learning_curves(rows, "m", "max")))
    assert panels.size[0] == 2 * panels.size[1] * 320 // 220 and curves.size[0] > curves.size[1]
    empty = Image.open(io.BytesIO(metric_vs_params(rows[2:], ["train.n_blocks"], "m", set())))
    assert empty.size[1] == 220


def test_optuna_and_asha_are_built_from_the_section() -> None:
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from rayjobs.sweep_job import make_search
    from tuning.space import space_for_tune
    section = SweepSection(searcher="optuna", scheduler="asha", grace_period=2,
                           space={"train.lr": {"loguniform": [1e-5, 1e-3]},
                                  "train.n_blocks": {"choice": [1, 3]}})
    search, scheduler = make_search(section, steps=100)
    assert isinstance(search, OptunaSearch) and isinstance(scheduler, ASHAScheduler)
    assert scheduler._time_attr == "step" and scheduler._max_t == 100
    assert scheduler._reduction_factor == 2.0
    space = space_for_tune(section.space)
    assert space["train.lr"].lower == 1e-5 and space["train.n_blocks"].categories == [1, 3]
    assert make_search(SweepSection(space={"train.lr": {"grid": [1e-4]}}), 10) == (None, None)


def test_tracking_uris_are_checked_before_ray_starts(tmp_path: Path, monkeypatch) -> None:
    from rayjobs.sweep_job import mlflow_callback
    from tuning.space import TrackingSection
    monkeypatch.chdir(tmp_path)
    # a relative sqlite store is pinned to where the command ran
    assert TrackingSection(mlflow_uri="sqlite:///m.db").mlflow_uri == \
        f"sqlite:///{tmp_path}/m.db"
    with pytest.raises(ValueError, match="is not a tracking URI"):
        TrackingSection(mlflow_uri="mlflow.db")
    # a server that does not answer: one line naming the URI, no retries for minutes
    with pytest.raises(ConfigError, match=r"tracking.mlflow_uri=http://127.0.0.1:9: the MLflow "
                                          r"store does not answer"):
        mlflow_callback(TrackingSection(mlflow_uri="http://127.0.0.1:9"), "s", RunRoot(str(tmp_path)))
