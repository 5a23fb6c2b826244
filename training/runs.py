"""Runs and models, shared by every learning stage.

A run lives at `<root>/runs/<kind>/<name>/` (kind: train, pretrain, finetune, affordanceclip;
sweep holds a sweep's trials):

    run.json              kind, name, resolved config, model shape, functions, the
                          fingerprints of the tables it trained on, status
    text.safetensors      the function-name embeddings (one row per function, run.json order)
    catalogue.json        what the pair plan draws from (training.pairs)
    metrics.jsonl         one row per step (the project's log: Ray keeps one per checkpoint),
                          rewritten at each checkpoint, truncated to the checkpoint on resume
    best/                 model.safetensors + meta.json of the best validation checkpoint
    checkpoint_*/         Ray Train's checkpoints (model.safetensors, train_state.pt, meta.json)
    tensorboard/          TensorBoard event files

A model is referenced as `KIND/NAME` (under the root's runs/) or by the run's URI;
`load_model(root, ref, checkpoint="best"|"last"|N)` reads config and weights (safetensors and
`torch.load(weights_only=True)`: no pickle) and is what evaluation, scoring and sweeps use.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load as load_numpy
from safetensors.numpy import save as save_numpy
from safetensors.torch import load as load_torch
from safetensors.torch import save as save_torch

from operators.settings import ConfigError
from operators.store.ids import validate_id
from operators.store.storage import RunRoot
from training.model import DenseCorrespondenceModel

RUN_KINDS = ("train", "pretrain", "finetune", "sweep", "affordanceclip")
RUN_RECORD = "run.json"
TEXT_FILE = "text.safetensors"
METRICS_FILE = "metrics.jsonl"
BEST_DIR = "best"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
CHECKPOINT_PREFIX = "checkpoint_"


def run_path(kind: str, name: str) -> str:
    """`runs/<kind>/<name>`, relative to the root (names are validated like ids)."""
    if kind not in RUN_KINDS:
        raise ConfigError(f"unknown run kind {kind!r}; known: {', '.join(RUN_KINDS)}")
    validate_id(name, what="run name")
    return f"runs/{kind}/{name}"


def default_run_name(prefix: str, config: dict[str, Any]) -> str:
    """A readable name from the time and the config: e.g. dfc-20261130-0812-3f2a1c."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    return f"{prefix}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{digest[:6]}"


@dataclass(frozen=True)
class ModelRef:
    root: RunRoot   # the root the run lives under (the run's own directory for a URI ref)
    path: str       # the run directory relative to `root` ('' for a URI ref)

    def display(self) -> str:
        return self.root.display(self.path)


def parse_model_ref(root: RunRoot, ref: str) -> ModelRef:
    """`KIND/NAME` under root/runs, or a run directory URI (s3://..., file://..., /abs/path)."""
    if "://" in ref or ref.startswith("/"):
        return ModelRef(RunRoot(ref, root.options), "")
    kind, _, name = ref.partition("/")
    if not name or "/" in name:
        raise ConfigError(f"model {ref!r}: expected KIND/NAME (e.g. train/dfc-01) or a run URI")
    return ModelRef(root, run_path(kind, name))


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


# ------------------------------------------------------------------------------ weights


def weights_bytes(model: torch.nn.Module) -> bytes:
    return save_torch({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})


def text_bytes(functions: list[str], embeddings: np.ndarray) -> bytes:
    return save_numpy({"embeddings": np.ascontiguousarray(embeddings, np.float32)},
                      metadata={"functions": json.dumps(functions)})


def read_text(data: bytes) -> np.ndarray:
    return load_numpy(data)["embeddings"]


def state_bytes(optimizer: torch.optim.Optimizer, step: int) -> bytes:
    """Optimiser, step and RNG state (tensors and plain containers: loadable with
    weights_only=True)."""
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "step": step,
                "torch_rng": torch.get_rng_state()}, buffer)
    return buffer.getvalue()


def read_state(data: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(data), weights_only=True)


# ------------------------------------------------------------------------------ metric log


class MetricLog:
    """The per-step metric log of a run (rank 0 keeps it; JSON lines)."""

    def __init__(self, root: RunRoot, run: str) -> None:
        self.root, self.path = root, _join(run, METRICS_FILE)
        self.rows: list[dict[str, Any]] = []

    def load(self, up_to_step: int) -> None:
        """Read the log and drop rows after `up_to_step` (the checkpoint a resume starts from:
        steps after it are trained again)."""
        self.rows = []
        if up_to_step > 0 and self.root.exists(self.path):
            for line in self.root.read_bytes(self.path).decode().splitlines():
                if line.strip():
                    row = json.loads(line)
                    if int(row["step"]) <= up_to_step:
                        self.rows.append(row)

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def write(self) -> None:
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows)
        self.root.write_bytes(self.path, text.encode())


def read_metric_log(root: RunRoot, run: str) -> list[dict[str, Any]]:
    path = _join(run, METRICS_FILE)
    if not root.exists(path):
        return []
    return [json.loads(line) for line in root.read_bytes(path).decode().splitlines() if line]


# ------------------------------------------------------------------------------ loading


@dataclass
class TrainedModel:
    """A trained correspondence model with what it needs to run: the function embeddings."""

    model: DenseCorrespondenceModel
    record: dict[str, Any]          # run.json
    functions: list[str]
    text: torch.Tensor              # (n_functions, d_text)
    step: int
    where: str                      # the weights' location (for messages and reports)

    def text_of(self, function: str) -> torch.Tensor:
        try:
            return self.text[self.functions.index(function)]
        except ValueError:
            raise ConfigError(f"{self.where}: the model was not trained on function "
                              f"{function!r}; it knows {', '.join(self.functions)}") from None


def checkpoints(ref: ModelRef) -> dict[int, str]:
    """step -> checkpoint directory (relative to ref.root) of the run's Ray checkpoints."""
    found = {}
    for name in ref.root.list_dirs(ref.path):
        if name.startswith(CHECKPOINT_PREFIX):
            meta = _join(ref.path, name, META_FILE)
            if ref.root.exists(meta):
                found[int(ref.root.read_json(meta)["step"])] = _join(ref.path, name)
    return found


def build_model(record: dict[str, Any]) -> torch.nn.Module:
    """The untrained model a run record describes (its `model_kind`)."""
    kind = record.get("model_kind", "dense-correspondence")
    if kind == "dense-correspondence":
        return DenseCorrespondenceModel(**record["model"])
    if kind == "pointmae":
        from training.pointmae import PointMAE, PointMAEConfig
        return PointMAE(PointMAEConfig(**record["model"]["encoder"]))
    if kind == "cast":
        from training.cmat import build_cast
        return build_cast(record)
    if kind == "affordanceclip":
        from training.affordanceclip_train import build_affordanceclip
        return build_affordanceclip(record["clip"])
    raise ConfigError(f"run {record.get('name')}: unknown model kind {kind!r}")


@dataclass
class TrainedEncoder:
    """A CMAT-pretrained PointMAE (encoder + decoder)."""

    model: torch.nn.Module
    record: dict[str, Any]
    step: int
    where: str


def load_model(root: RunRoot, ref: str, checkpoint: str | int = "best") -> Any:
    """Config + weights of a run's `best` (best validation), `last` or step-N checkpoint:
    a `TrainedModel` (train/), `TrainedEncoder` (pretrain/) or `training.cmat.TrainedCast`
    (finetune/: the encoder + head with its prompt tables)."""
    where = parse_model_ref(root, ref)
    record_path = _join(where.path, RUN_RECORD)
    if not where.root.exists(record_path):
        raise ConfigError(f"model {ref}: no run at {where.display()} ({RUN_RECORD} is missing; "
                          "train one with `partlift train|pretrain|finetune --name NAME`)")
    record = where.root.read_json(record_path)
    if checkpoint == "best":
        folder = _join(where.path, BEST_DIR)
        if not where.root.exists(_join(folder, WEIGHTS_FILE)):
            raise ConfigError(f"model {ref}: the run has no validated checkpoint yet "
                              f"({where.root.display(folder)} is missing)")
    else:
        found = checkpoints(where)
        if not found:
            raise ConfigError(f"model {ref}: the run has no checkpoint yet")
        step = max(found) if checkpoint == "last" else int(checkpoint)
        if step not in found:
            raise ConfigError(f"model {ref}: no checkpoint at step {step}; steps: "
                              f"{', '.join(map(str, sorted(found)))}")
        folder = found[step]
    meta = where.root.read_json(_join(folder, META_FILE))
    model = build_model(record)
    try:
        model.load_state_dict(load_torch(where.root.read_bytes(_join(folder, WEIGHTS_FILE))))
    except RuntimeError as err:  # e.g. a run made by an older version of the model code
        raise ConfigError(f"model {ref}: the weights at {where.root.display(folder)} do not fit "
                          f"the {record.get('model_kind', 'dense-correspondence')} model this "
                          f"partlift builds ({str(err).splitlines()[1].strip()}); retrain it") \
            from None
    model.eval()
    step, display = int(meta["step"]), where.root.display(folder)
    kind = record.get("model_kind", "dense-correspondence")
    if kind == "pointmae":
        return TrainedEncoder(model, record, step, display)
    if kind == "affordanceclip":
        from training.affordanceclip_train import TrainedAffordanceClip
        return TrainedAffordanceClip(model, record, step, display)  # type: ignore[arg-type]
    if kind == "cast":
        from training.cmat import PROMPTS_FILE, trained_cast
        return trained_cast(model, record, step, display,
                            where.root.read_bytes(_join(where.path, PROMPTS_FILE)))
    text = torch.from_numpy(read_text(where.root.read_bytes(_join(where.path, TEXT_FILE))))
    return TrainedModel(model, record, list(record["functions"]), text, step, display)
