"""Ray Tune's MLflow logger as a sweep uses it (a module of its own: Tune pickles its callbacks
with the experiment state for `Tuner.restore`, so the class must be importable by name)."""

from __future__ import annotations

import re
from typing import Any

from ray.air.integrations.mlflow import MLflowLoggerCallback


def mlflow_name(key: str) -> str:
    """A metric name MLflow accepts (alphanumerics, _ - . space : /): val_pck@10 ->
    val_pck_at_10."""
    return re.sub(r"[^\w.\- :/]", "_", key.replace("@", "_at_"))


class StepMLflowLogger(MLflowLoggerCallback):
    """One MLflow run per trial; metrics at the trainer's step (Tune's default is its report
    count) under names MLflow accepts."""

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        run_id = self._trial_runs[trial]
        step = int(result.get("step") or iteration)
        metrics = {mlflow_name(k): v for k, v in result.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.mlflow_util.log_metrics(run_id=run_id, metrics_to_log=metrics, step=step)
