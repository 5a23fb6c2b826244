"""`partlift sweep`: a search over any config key of `train`, `pretrain` or `finetune` on Ray Tune.

    check the space against the job's config model (before Ray: a key the job lacks, or a value
    outside its range, names the key) -> Tuner (or Tuner.restore of an unfinished sweep) whose
    trials are function trainables that run the job on Ray Train with TuneReportCallback ->
    results table, best config YAML and plots under the sweep's folder

    <root>/runs/sweep/<name>/    Tune's experiment state (restore), sweep.json,
                                 results.parquet, results.md, best.yaml, metric_vs_params.png,
                                 learning_curves.png, trials/<trial_id>/ (each trial's run)

Each trial's driver takes 0.01 CPU (`tune.with_resources`; 0 is refused in Ray 2.60), so that on
2 cores a trial's worker is not starved by its own driver; the workers take
`<job>.cpus_per_worker` (default in a sweep: the cluster's CPUs, less the drivers' 0.01 each,
over the trials run at once: 0.99 for two 1-worker trials on 2 cores).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from operators.settings import ConfigError
from operators.store.storage import RunRoot
from rayjobs.config import JOB_MODELS, SweepJob, _set_dotted, describe
from rayjobs.driver import ensure_ray
from training.runs import read_metric_log, run_path
from tuning.results import (TrialRow, best_trial, best_yaml, learning_curves, markdown,
                            metric_vs_params, table_bytes)
from tuning.space import SweepSection, TrackingSection, space_for_tune

SECTIONS = {"train": "train", "pretrain": "pretrain", "finetune": "cast"}
TRIAL_CPU = 0.01   # a trial driver's CPU (Ray 2.60 refuses 0)
QUICK_MLFLOW = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def job_tree(config: SweepJob) -> dict[str, Any]:
    """The swept job's settings as a tree (python values: secrets stay SecretStr)."""
    model = JOB_MODELS[config.sweep.job]
    return {k: copy.deepcopy(v) for k, v in config.model_dump().items() if k in model.model_fields}


def trial_config(tree: dict[str, Any], job: str, params: dict[str, Any]) -> Any:
    """The job config of one trial: the base settings with the trial's values."""
    tree = copy.deepcopy(tree)
    for key, value in params.items():
        _set_dotted(tree, key, value.item() if hasattr(value, "item") else value)
    return JOB_MODELS[job].model_validate(tree)


def check_space(config: SweepJob) -> None:
    """Every swept key exists in the job's config and each candidate value is valid there."""
    job, tree = config.sweep.job, job_tree(config)
    model = JOB_MODELS[job]
    for key, dim in config.sweep.space.items():
        section = key.split(".")[0]
        if section not in model.model_fields:
            raise ConfigError(f"sweep.space: {key}: `partlift {job}` has no section {section!r} "
                              f"(its sections: {', '.join(sorted(model.model_fields))})")
        for value in dim.candidates():
            try:
                trial_config(tree, job, {key: value})
            except ValidationError as err:
                raise ConfigError(f"sweep.space: {key}={value!r} ({dim.kind}): "
                                  + str(describe(model, err, "the sweep")).split("\n", 1)[1]
                                  .strip()) from None
            except ConfigError as err:
                raise ConfigError(f"sweep.space: {key}: {err}") from None


def run_trial(params: dict[str, Any], tree: dict[str, Any], job: str, sweep: str) -> None:
    """A Tune function trainable: the job on Ray Train, its reports forwarded to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback
    trial_id = ray.tune.get_context().get_trial_id()
    config = trial_config(tree, job, params)
    config = config.model_copy(update={"job": config.job.model_copy(
        update={"name": trial_id})})
    run = f"{run_path('sweep', sweep)}/trials/{trial_id}"
    callbacks = [TuneReportCallback()]
    if job == "train":
        from rayjobs.train_job import run_train
        run_train(config, run=run, callbacks=callbacks)
    elif job == "pretrain":
        from rayjobs.cmat_job import run_pretrain
        run_pretrain(config, run=run, callbacks=callbacks)
    else:
        from rayjobs.cmat_job import run_finetune
        run_finetune(config, run=run, callbacks=callbacks)


def state_api_answers() -> bool:
    """Whether the connected cluster serves Ray's state API (its dashboard)."""
    from ray.util.state import list_nodes
    try:
        list_nodes(limit=1, timeout=10, raise_on_missing_output=False)
    except Exception:  # noqa: BLE001 - any failure means no state API
        return False
    return True


def mlflow_callback(tracking: TrackingSection, sweep: str, root: RunRoot) -> Any:
    """Ray Tune's MLflow logger, with the trainer's step as MLflow's step and metric names
    MLflow accepts. Checked here, before Ray starts: mlflow installed, the store reachable."""
    try:
        import mlflow

        from rayjobs.mlflow_logger import StepMLflowLogger
    except ImportError as err:
        raise ConfigError(f"tracking.mlflow_uri needs mlflow (the `tracking` extra: "
                          f"`pip install mlflow-skinny`): {err}") from None
    experiment = tracking.mlflow_experiment or f"partlift-sweep-{sweep}"
    # one quick try (MLflow's own default retries an HTTP store for minutes)
    saved = {k: os.environ.get(k) for k in QUICK_MLFLOW}
    os.environ.update(QUICK_MLFLOW)
    try:
        mlflow.MlflowClient(tracking_uri=tracking.mlflow_uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - any store error means no tracking: say which
        raise ConfigError(f"tracking.mlflow_uri={tracking.mlflow_uri}: the MLflow store does "
                          f"not answer: {str(err).strip().splitlines()[0][:200]}") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    return StepMLflowLogger(tracking.mlflow_uri, experiment_name=experiment, tags={
        "partlift.sweep": sweep, "partlift.root": root.display(run_path("sweep", sweep))})


def concurrency(config: SweepJob, trial_tree: dict[str, Any]) -> tuple[int, float]:
    """(trials at once, CPUs per worker): the configured values, else as many trials as the
    cluster's CPUs (and GPUs) hold with each trial's workers."""
    import ray
    section = trial_tree[SECTIONS[config.sweep.job]]
    workers = int(section["num_workers"])
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    per_worker = section.get("cpus_per_worker")
    at_once = config.sweep.max_concurrent_trials
    if at_once is None:
        at_once = max(1, int(cpus // (workers * (per_worker or 1.0))))
        if section.get("use_gpu"):
            gpus = float(ray.cluster_resources().get("GPU", 0.0))
            at_once = max(1, min(at_once, int(gpus // workers)))
    if per_worker is None:  # what is left after the trial drivers' 0.01 CPU each
        per_worker = math.floor(100 * (cpus - TRIAL_CPU * at_once) / (workers * at_once)) / 100
    if per_worker <= 0 or workers * per_worker * at_once + TRIAL_CPU * at_once > cpus + 1e-9:
        raise ConfigError(f"sweep: {at_once} trials at once x {workers} workers x "
                          f"{per_worker:g} CPUs (+ {TRIAL_CPU} per trial driver) do not fit the "
                          f"cluster's {cpus:g} CPUs: lower sweep.max_concurrent_trials or "
                          f"{SECTIONS[config.sweep.job]}.cpus_per_worker")
    return at_once, per_worker


def make_search(sweep: SweepSection, steps: int) -> tuple[Any, Any]:
    """(search algorithm, trial scheduler) of `sweep.*`: None means Tune's default (random
    sampling with grid dimensions crossed; FIFO)."""
    search_alg = scheduler = None
    if sweep.searcher == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
            search_alg = OptunaSearch(seed=0)
        except ImportError as err:
            raise ConfigError(f"sweep.searcher=optuna needs optuna (`pip install optuna`, the "
                              f"`sweep` extra): {err}") from None
    if sweep.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler
        # time = the trainer's step (reported at each checkpoint); a trial past max_t is done
        scheduler = ASHAScheduler(time_attr="step", grace_period=sweep.grace_period,
                                  reduction_factor=sweep.reduction_factor, max_t=steps)
    return search_alg, scheduler


@dataclass(frozen=True)
class SweepReport:
    name: str
    where: str
    rows: list[TrialRow]
    metric: str
    mode: str
    best: TrialRow | None
    table: str
    seconds: float
    at_once: int = 0          # trials run side by side (0: nothing ran)


def collect(root: RunRoot, sweep: str, grid: Any, keys: list[str], metric: str,
            mode: str) -> list[TrialRow]:
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = str(metrics.get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1])
        run = f"{run_path('sweep', sweep)}/trials/{trial_id}"
        log = read_metric_log(root, run)
        curve = [(int(r["step"]), float(r[metric])) for r in log if metric in r]
        values = [v for _, v in curve]
        best = (max(values) if mode == "max" else min(values)) if values else None
        params = {k: result.config.get(k) for k in keys}
        error = "" if result.error is None else str(result.error).strip().splitlines()[-1][:300]
        rows.append(TrialRow(trial_id, "error" if result.error else "finished", params,
                             values[-1] if values else None, best,
                             int(log[-1]["step"]) if log else None,
                             metrics.get("time_total_s"), root.display(run), error, curve))
    return sorted(rows, key=lambda r: r.trial_id)


def write_results(root: RunRoot, config: SweepJob, rows: list[TrialRow], keys: list[str],
                  metric: str, mode: str, where: str, base: dict[str, Any]) -> str:
    table = markdown(rows, keys, metric, mode)
    root.write_bytes(f"{where}/results.parquet", table_bytes(rows, keys, metric))
    root.write_bytes(f"{where}/results.md", table.encode())
    best = best_trial(rows, mode)
    if best is not None:
        root.write_bytes(f"{where}/best.yaml", best_yaml(base, best, config.sweep.job, metric,
                                                         config.job.name or "").encode())
    log_keys = {k for k, d in config.sweep.space.items() if d.kind == "loguniform"}
    root.write_bytes(f"{where}/metric_vs_params.png",
                     metric_vs_params(rows, keys, metric, log_keys))
    root.write_bytes(f"{where}/learning_curves.png", learning_curves(rows, metric, mode))
    return table


def base_settings(config: SweepJob) -> dict[str, Any]:
    """The job's sections as they differ from the defaults (JSON values, no secrets): the
    base of best.yaml."""
    model = JOB_MODELS[config.sweep.job]
    dumped = config.model_dump(mode="json", exclude_defaults=True)
    skip = {"storage", "job", "ray", "root"}
    return {k: v for k, v in dumped.items() if k in model.model_fields and k not in skip}


def run_sweep(config: SweepJob) -> SweepReport:
    import ray.tune as tune
    tic = time.perf_counter()
    if config.sweep is None:
        raise ConfigError("sweep: the config has no sweep section (which job, metric and search "
                          "space): give one, e.g. -c configs/sweep_correspondence.yaml")
    root = RunRoot(config.root, config.storage.options())
    root.check_reachable(create=False)
    if not config.job.name:
        raise ConfigError("sweep: give the sweep a name (--name NAME): a killed sweep resumes "
                          "under it")
    name = config.job.name
    where = run_path("sweep", name)
    check_space(config)
    metric, mode = config.sweep.objective()
    keys = list(config.sweep.space)
    if config.job.overwrite and root.exists(where):
        root.fs.delete_dir(root.path(where))
        print(f"sweep: removed {root.display(where)}/ (--overwrite)")
    record_path = f"{where}/sweep.json"
    if root.exists(record_path):
        record = root.read_json(record_path)
        if record.get("status") == "finished":
            print(f"sweep: {name} finished on {record.get('finished')}; its results "
                  f"({root.display(where)}/results.md):\n")
            table = root.read_bytes(f"{where}/results.md").decode()
            print(table)
            return SweepReport(name, root.display(where), [], metric, mode, None, table, 0.0)
        if record.get("config") != json.loads(json.dumps(config.sweep.model_dump(mode="json"))):
            raise ConfigError(f"sweep: {name} exists with another sweep.* section: a resume "
                              "continues the same search; use another --name or --overwrite")
    callbacks = ([mlflow_callback(config.tracking, name, root)]
                 if config.tracking.mlflow_uri else [])
    ensure_ray(config.ray.model_copy(update={"include_dashboard": True}))
    tree = job_tree(config)
    tree["root"] = root.uri  # absolute: Tune runs each trial in its own working directory
    if config.sweep.scheduler == "asha" and not state_api_answers():
        raise ConfigError("sweep.scheduler=asha stops trials by killing them, and Ray Train "
                          "frees a killed run's CPUs through Ray's state API, which this "
                          "cluster does not serve (it runs without its dashboard): start it "
                          "with the dashboard (`ray start --head` has it unless "
                          "--include-dashboard=false), or use sweep.scheduler=none")
    at_once, per_worker = concurrency(config, tree)
    tree[SECTIONS[config.sweep.job]]["cpus_per_worker"] = per_worker
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, tree=tree, job=config.sweep.job, sweep=name),
        {"cpu": TRIAL_CPU})
    experiment = root.path(where)
    restoring = tune.Tuner.can_restore(experiment, storage_filesystem=root.fs)
    root.write_json(record_path, {"name": name, "job": config.sweep.job, "metric": metric,
                                  "mode": mode, "status": "running",
                                  "config": config.sweep.model_dump(mode="json"),
                                  "started": dt.datetime.now(dt.timezone.utc).isoformat()})
    print(f"sweep: {name}: {config.sweep.job} trials, {metric} ({mode}), {at_once} at once, "
          f"{per_worker:g} CPUs per worker" + (" (resuming)" if restoring else ""))
    if restoring:
        # errored trials run again too: each resumes its run from its last checkpoint
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True,
                                   resume_errored=True, restart_errored=False,
                                   storage_filesystem=root.fs)
    else:
        search_alg, scheduler = make_search(config.sweep,
                                            int(tree[SECTIONS[config.sweep.job]]["steps"]))
        tuner = tune.Tuner(
            trainable, param_space=space_for_tune(config.sweep.space),
            tune_config=tune.TuneConfig(metric=metric, mode=mode,
                                        num_samples=config.sweep.num_samples,
                                        search_alg=search_alg, scheduler=scheduler,
                                        max_concurrent_trials=at_once),
            run_config=tune.RunConfig(
                name=name, storage_path=root.path(run_path("sweep", name).rsplit("/", 1)[0]),
                storage_filesystem=root.fs, callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=config.sweep.max_failures)))
    grid = tuner.fit()
    rows = collect(root, name, grid, keys, metric, mode)
    table = write_results(root, config, rows, keys, metric, mode, where, base_settings(config))
    best = best_trial(rows, mode)
    errored = [r.trial_id for r in rows if r.status == "error"]
    # a sweep with failed trials is not finished: the same name runs them again
    root.write_json(record_path, {**root.read_json(record_path),
                                  "status": "failed trials" if errored else "finished",
                                  "errored": errored,
                                  "finished": dt.datetime.now(dt.timezone.utc).isoformat(),
                                  "trials": len(rows),
                                  "best": None if best is None else {
                                      "trial": best.trial_id, metric: best.best,
                                      "params": {k: str(v) for k, v in best.params.items()}}})
    seconds = time.perf_counter() - tic
    print(f"\nsweep finished in {seconds:.1f} s: {root.display(where)}/ (results.md, "
          "results.parquet, best.yaml, metric_vs_params.png, learning_curves.png)"
          + (f"; {len(errored)} trials failed (their errors are in the table): the same "
             "--name runs them again" if errored else "") + "\n")
    print(table)
    return SweepReport(name, root.display(where), rows, metric, mode, best, table, seconds,
                       at_once)
