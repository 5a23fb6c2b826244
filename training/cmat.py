"""CMAT pretraining (CMAT §3.2) and CAST fine-tuning (§3.3): everything before, in and after
Ray Train, on the shared trainer driver (training.trainer), loop (training.task_loop) and run
layout (training.runs).

    prepare_pretrain / prepare_finetune (driver, before Ray): check the tables, assign splits,
        fill the point-input cache, draw the plan, embed the prompts, write run.json
    PretrainTask / CastTask: one step and one validation, on every rank
    run_task: the TorchTrainer run and its report
    TrainedCast (load_model("finetune/NAME")): the encoder + head, scoring points with a text
        or image prompt
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from operators.metrics.affordance import affordance_metrics
from operators.settings import ConfigError
from operators.store.commits import settings_hash
from operators.store.integrity import stage_settings
from operators.store.readers import RootReader
from operators.store.storage import RunRoot
from operators.store.tables import FEATURE_POINTS, FEATURE_VIEWS, LABEL_POINTS, LIFT_OUTPUT
from training.affordance_data import (QUESTION, PointInputs, Sample, asset_exemplars,
                                      asset_samples, cache_path, cached_assets, fill_inputs,
                                      gt_target, label_functions, prompt_texts, pseudo_target,
                                      random_features)
from training.cast import CastModel, cast_loss, load_encoder
from training.cmat_losses import (affinity_loss, centre_mse, chamfer_l2, cmat_loss,
                                  koleo_loss, pool_patch_features)
from training.config import CastSection, DataSection, PretrainSection
from training.correspondence import check_fingerprints, data_fingerprints
from training.pointmae import PointMAE, PointMAEConfig, random_patch_mask
from training.runs import (BEST_DIR, META_FILE, RUN_RECORD, WEIGHTS_FILE, ModelRef, checkpoints,
                           parse_model_ref, read_metric_log)
from training.splits import assign_splits
from training.task_loop import StepTask, task_loop_per_worker
from training.trainer import Scaling, fit

Progress = Callable[[str], None]
# fn, items -> [fn(item) for item in items], possibly on Ray tasks (rayjobs passes one)
Mapper = Callable[[Callable[[Any], Any], list[Any]], list[Any]]
PROMPTS_FILE = "prompts.safetensors"
MODALITIES = {"both": (0, 1, 2), "text": (1,), "image": (2,)}  # 0 both, 1 text only, 2 image


def local_map(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    return [fn(item) for item in items]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# ------------------------------------------------------------------------------ plans


def index_stream(n: int, seed: int) -> Iterator[int]:
    """0..n-1 in a new random order every epoch (an endless stream)."""
    rng = np.random.default_rng(seed)
    while True:
        yield from rng.permutation(n).tolist()


def pretrain_plan(n_assets: int, steps: int, world_size: int, batch_size: int,
                  seed: int) -> list[dict[str, Any]]:
    """One row per step and rank: the indices of the training assets it trains on."""
    stream = index_stream(n_assets, seed)
    return [{"step": step, "slot": slot, "items": [next(stream) for _ in range(batch_size)]}
            for step in range(steps) for slot in range(world_size)]


def cast_plan(samples: list[Sample], steps: int, world_size: int, batch_size: int,
              prompts: str, seed: int, has_exemplar: list[bool] | None = None
              ) -> list[dict[str, Any]]:
    """One row per step and rank: samples, text phrasings, exemplar samples (another training
    sample with the function and an exemplar, else itself) and prompt modalities."""
    rng = np.random.default_rng(seed + 1)
    stream = index_stream(len(samples), seed)
    by_function: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        if has_exemplar is None or has_exemplar[i]:
            by_function.setdefault(sample.function, []).append(i)
    rows = []
    for step in range(steps):
        for slot in range(world_size):
            items = [next(stream) for _ in range(batch_size)]
            exemplars = []
            for i in items:
                others = [j for j in by_function.get(samples[i].function, [])
                          if samples[j].asset_id != samples[i].asset_id] or [i]
                exemplars.append(int(others[rng.integers(len(others))]))
            rows.append({"step": step, "slot": slot, "items": items,
                         "texts": rng.integers(4, size=batch_size).tolist(),
                         "exemplars": exemplars,
                         "modality": rng.choice(MODALITIES[prompts], size=batch_size).tolist()})
    return rows


# ------------------------------------------------------------------------------ data checks


@dataclass(frozen=True)
class Data:
    manifest: dict[str, dict[str, Any]]
    splits: dict[str, str]
    cache: str                          # the point-input cache folder
    feature_dim: int

    def ids(self, split: str) -> list[str]:
        return sorted(a for a, s in self.splits.items() if s == split)


def check_data(root: RunRoot, stage: str, data: DataSection, n_points: int,
               progress: Progress, mapper: Mapper) -> Data:
    """The checks every point-based run makes before Ray, then the point-input cache filled
    for the train, val and holdout assets."""
    reader = RootReader(root)
    where = root.display()
    lifted = reader.table(FEATURE_POINTS).index
    _require(bool(lifted), f"{stage}: {where} has no features/points/ (the lifted per-point "
             f"features): run `partlift lift --root {root.uri}`")
    lift = stage_settings(root, LIFT_OUTPUT) or {}
    lifted_points = int(lift.get("lift.n_points") or 0)
    _require(lifted_points == 0 or lifted_points >= n_points,
             f"{stage}: {where} has {lifted_points} lifted points per asset "
             f"(lift.n_points), fewer than pretrain.points={n_points}: lower pretrain.points or "
             f"re-run `partlift lift --root {root.uri} --set lift.n_points={n_points} "
             "--overwrite`")
    manifest = {row["asset_id"]: row for row in reader.manifest()}
    categories = {r["category"] for r in manifest.values()}
    unknown = sorted(set(data.holdout_categories) - categories)
    _require(not unknown, f"{stage}: data.holdout_categories names {unknown}, which no asset "
             f"under {where} has; categories: {', '.join(sorted(categories))}")
    splits = assign_splits({a: r["category"] for a, r in manifest.items()}, data.val_fraction,
                           data.holdout_categories, data.split_seed)
    missing = sorted(a for a in manifest if a not in lifted)
    _require(not missing, f"{stage}: {len(missing)} assets have no features/points/ rows (e.g. "
             f"{', '.join(missing[:3])}): run `partlift lift --root {root.uri}`")
    counts = {s: sum(v == s for v in splits.values()) for s in ("train", "val", "holdout")}
    _require(counts["train"] > 0 and counts["val"] > 0,
             f"{stage}: {counts['train']} training and {counts['val']} validation assets under "
             f"{where} (data.val_fraction={data.val_fraction}); both are needed: add assets or "
             "change data.val_fraction")
    cache = cache_path(root, n_points)
    todo = sorted(set(manifest) - cached_assets(root, cache))
    if todo:
        progress(f"point inputs: farthest-point sampling {n_points} points of {len(todo)} "
                 f"assets into {root.display(cache)}/")
        tic = time.perf_counter()
        chunks = [todo[i:i + 8] for i in range(0, len(todo), 8)]
        try:
            mapper(partial(fill_inputs, root, cache, n_points=n_points), chunks)
        except ValueError as err:
            raise ConfigError(f"{stage}: {err}") from None
        progress(f"point inputs: {len(todo)} assets in {time.perf_counter() - tic:.1f} s")
    first = PointInputs(root, cache)(next(iter(sorted(manifest))))
    return Data(manifest, splits, cache, int(first["features"].shape[1]))


def _write_record(root: RunRoot, run: str, name: str, stage: str, record: dict[str, Any],
                  lineage: dict[str, Any]) -> bool:
    """Write run.json; on a resume, refuse other settings or other data. True when resuming."""
    resumed = root.exists(f"{run}/{RUN_RECORD}")
    if resumed:
        before = root.read_json(f"{run}/{RUN_RECORD}")
        changed = sorted(k for k in set(before["config"]) | set(record["config"])
                         if before["config"].get(k) != record["config"].get(k))
        _require(not changed, f"{stage}: run {name} exists with other settings ("
                 + ", ".join(f"{k}: {before['config'].get(k)!r} -> {record['config'].get(k)!r}"
                             for k in changed)
                 + "): a resume continues the same run; use another --name")
        check_fingerprints(before["fingerprints"], record["fingerprints"],
                           f"{stage}: resuming run {name}")
        for key, value in lineage.items():
            _require(before.get(key) == value,
                     f"{stage}: resuming run {name}: its {key.replace('_', ' ')} changed since it "
                     "started (assets were added or removed, or the encoder it starts from was "
                     "retrained); a resume continues the same plan: use another --name")
        record["created"] = before.get("created")
    else:
        record["created"] = dt.datetime.now(dt.timezone.utc).isoformat()
    record |= lineage
    record["status"] = "running"
    root.write_json(f"{run}/{RUN_RECORD}", record)
    return resumed


# ------------------------------------------------------------------------------ pretraining


class PretrainStep(nn.Module):
    """The PointMAE and the CMAT objective in one forward (what DDP wraps)."""

    def __init__(self, model: PointMAE, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, xyz: Tensor, features: Tensor, masked: Tensor) -> dict[str, Tensor]:
        return pretrain_losses(self.model, xyz, features, masked, self.cfg)


def pretrain_losses(model: PointMAE, xyz: Tensor, features: Tensor, masked: Tensor,
                    cfg: dict[str, Any]) -> dict[str, Tensor]:
    """L_rec, L_aff, L_div and their weighted sum (CMAT Eq. 6) of one batch."""
    centres, _, patches = model.patches(xyz)
    visible = ~masked
    losses: dict[str, Tensor] = {}
    l_rec = l_aff = l_div = None
    if cfg["lambda_rec"] > 0:
        out = model.reconstruct(centres, patches, masked)
        prediction, target = out.prediction.float(), out.target.float()
        if model.config.target == "points":
            l_rec = chamfer_l2(prediction.flatten(0, 1), target.flatten(0, 1))
        else:
            l_rec = centre_mse(prediction.flatten(0, 1), target.flatten(0, 1))
        losses["loss_rec"] = l_rec
        tokens = out.visible_tokens.float()
    else:  # no decoder: the encoder's visible tokens only
        tokens = model.encode(patches, centres, visible).float()
    if cfg["lambda_aff"] > 0:
        teacher = pool_patch_features(features, xyz, centres)                  # Eq. (1)
        student = tokens.new_zeros(*masked.shape, tokens.shape[-1])
        student[visible] = tokens.reshape(-1, tokens.shape[-1])
        l_aff = affinity_loss(student, teacher, visible)                       # Eq. (3)-(4)
        losses["loss_aff"] = l_aff
    if cfg["lambda_div"] > 0:
        l_div = koleo_loss(tokens)                                             # Eq. (5)
        losses["loss_div"] = l_div
    losses["loss"] = cmat_loss(l_rec, l_aff, l_div, cfg["lambda_rec"], cfg["lambda_aff"],
                               cfg["lambda_div"])
    return losses


class PretrainTask(StepTask):
    stage = "pretrain"
    metric = "val_loss"      # the weighted objective (Eq. 6) on the validation assets
    higher_is_better = False

    def __init__(self, root: RunRoot, run: str, cfg: dict[str, Any], cache: str,
                 train_ids: list[str], val_ids: list[str], feature_dim: int) -> None:
        super().__init__(root, run, cfg)
        self.cache, self.train_ids, self.val_ids = cache, train_ids, val_ids
        self.feature_dim = feature_dim
        self.inputs: PointInputs | None = None

    def encoder_config(self) -> PointMAEConfig:
        return PointMAEConfig(**self.cfg["encoder"])

    def build(self) -> nn.Module:
        return PointMAE(self.encoder_config())

    def find_unused(self) -> bool:
        return self.cfg["lambda_rec"] == 0  # the decoder then has no gradient

    def start(self, device: torch.device) -> None:
        self.inputs = PointInputs(self.root, self.cache, keep=self.cfg["cache_assets"])
        self.device = device

    def step_module(self, model: nn.Module) -> nn.Module:
        return PretrainStep(model, self.cfg)

    def arrays(self, asset_ids: list[str]) -> tuple[Tensor, Tensor]:
        xyz, features = [], []
        for asset_id in asset_ids:
            data = self.inputs(asset_id)
            xyz.append(np.asarray(data["xyz"], np.float32))
            if self.cfg["teacher"] == "random":
                features.append(random_features(asset_id, len(data["xyz"]), self.feature_dim,
                                                 self.cfg["seed"]))
            else:
                features.append(np.asarray(data["features"], np.float32))
        return (torch.as_tensor(np.stack(xyz), device=self.device),
                torch.as_tensor(np.stack(features), device=self.device))

    def masks(self, batch: int, seed: int) -> Tensor:
        encoder = self.cfg["encoder"]
        return random_patch_mask(batch, encoder["n_patches"], encoder["mask_ratio"],
                                 torch.Generator().manual_seed(seed), self.device)

    def batch(self, row: dict[str, Any], rank: int, device: torch.device) -> Any:
        xyz, features = self.arrays([self.train_ids[i] for i in row["items"]])
        # a different mask per step and rank, the same on a resume
        seed = self.cfg["seed"] * 1_000_003 + int(row["step"]) * 101 + rank
        return xyz, features, self.masks(len(row["items"]), seed)

    def losses(self, module: nn.Module, batch: Any) -> dict[str, Tensor]:
        return module(*batch)

    @torch.no_grad()
    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """The objective's terms on the validation assets with fixed masks (no drop-path)."""
        model.eval()
        ids = self.val_ids
        size = self.cfg["batch_size"]
        totals: dict[str, float] = {}
        for start in range(0, len(ids), size):
            chunk = ids[start:start + size]
            xyz, features = self.arrays(chunk)
            masked = self.masks(len(chunk), start)
            for key, value in pretrain_losses(model, xyz, features, masked, self.cfg).items():
                totals[key] = totals.get(key, 0.0) + float(value) * len(chunk)
        model.train()
        return {"val_" + key.removeprefix("loss_"): value / len(ids)
                for key, value in sorted(totals.items())}


def pretrain_config_record(pretrain: PretrainSection, data: DataSection,
                           resumable: set[str]) -> dict[str, Any]:
    out = {}
    for section, model in (("pretrain", pretrain), ("data", data)):
        for key, value in model.model_dump(mode="json").items():
            if f"{section}.{key}" not in resumable:
                out[f"{section}.{key}"] = value
    return out


@dataclass
class PreparedTask:
    task: StepTask
    plan: list[dict[str, Any]]
    record: dict[str, Any]
    resumed: bool
    scaling: Scaling


def _scaling(section: PretrainSection | CastSection) -> Scaling:
    return Scaling(section.num_workers, section.use_gpu, section.cpus_per_worker,
                   section.keep_checkpoints, section.max_failures)


def prepare_pretrain(root: RunRoot, run: str, name: str, pretrain: PretrainSection,
                     data: DataSection, config_record: dict[str, Any],
                     progress: Progress = print, mapper: Mapper = local_map) -> PreparedTask:
    found = check_data(root, "pretrain", data, pretrain.points, progress, mapper)
    train_ids, val_ids = found.ids("train"), found.ids("val")[:pretrain.val_assets]
    plan = pretrain_plan(len(train_ids), pretrain.steps, pretrain.num_workers,
                         pretrain.batch_size, pretrain.seed)
    cfg = pretrain.model_dump(mode="json") | {"encoder": pretrain.encoder(), "cache_assets": 512}
    record = {"kind": "pretrain", "name": name, "model_kind": "pointmae",
              "config": config_record, "model": {"encoder": pretrain.encoder(),
                                                 "points": pretrain.points},
              "fingerprints": data_fingerprints(root, "gt"),
              "splits": {s: len(found.ids(s)) for s in ("train", "val", "holdout")},
              "point_cache": found.cache, "feature_dim": found.feature_dim}
    lineage = {"assets_hash": settings_hash([train_ids, val_ids])}
    resumed = _write_record(root, run, name, "pretrain", record, lineage)
    task = PretrainTask(root, run, cfg, found.cache, train_ids, val_ids, found.feature_dim)
    progress(f"{len(train_ids)} training assets, {len(val_ids)} validation assets, "
             f"{pretrain.steps} steps of {pretrain.batch_size} per rank x "
             f"{pretrain.num_workers} ranks")
    return PreparedTask(task, plan, record, resumed, _scaling(pretrain))


# ------------------------------------------------------------------------------ CAST


@dataclass(frozen=True)
class Prompts:
    """What a CAST run's prompts are: the text table and every sample's exemplar."""

    texts: list[str]
    text: np.ndarray                    # (T, Dt) embeddings of `texts`
    sample_texts: np.ndarray            # (S, 4) indices into texts, per phrasing
    exemplars: np.ndarray               # (S, Di) pooled exemplars (zeros where none)
    has_exemplar: np.ndarray            # (S,) bool


class CastTask(StepTask):
    stage = "finetune"
    metric = "val_aiou"
    higher_is_better = True

    def __init__(self, root: RunRoot, run: str, cfg: dict[str, Any], cache: str,
                 manifest: dict[str, dict], samples: list[Sample], prompts: Prompts,
                 val: list[dict[str, Any]], init_weights: dict[str, Tensor] | None,
                 holdout: list[dict[str, Any]] | None = None) -> None:
        super().__init__(root, run, cfg)
        self.cache, self.manifest, self.samples, self.prompts = cache, manifest, samples, prompts
        self.val, self.init_weights, self.holdout = val, init_weights, holdout or []

    def build(self) -> nn.Module:
        model = CastModel(self.cfg["encoder"], self.prompts.text.shape[1],
                          self.prompts.exemplars.shape[1], self.cfg["fusion_depth"])
        if self.init_weights is not None:
            load_encoder(model, self.init_weights)
        return model

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        groups = [{"params": model.head_parameters(), "lr": self.cfg["lr"]}]
        if self.cfg["lr_encoder"] > 0:
            groups.insert(0, {"params": model.encoder_parameters(), "lr": self.cfg["lr_encoder"]})
        else:
            for p in model.encoder_parameters():
                p.requires_grad_(False)
        return groups

    def start(self, device: torch.device) -> None:
        self.inputs = PointInputs(self.root, self.cache, keep=512)
        self.reader = RootReader(self.root)
        self.device = device

    def target(self, sample: Sample, mode: str) -> np.ndarray:
        data = self.inputs(sample.asset_id)
        if mode == "gt":
            return gt_target(data, list(self.manifest[sample.asset_id]["part_names"]),
                             sample.parts)
        return pseudo_target(self.reader, sample.asset_id, data["point_index"], sample.function)

    def tensors(self, items: list[int], texts: list[int], exemplars: list[int],
                modality: list[int], modes: list[str]) -> tuple[Tensor, ...]:
        p = self.prompts
        xyz = np.stack([np.asarray(self.inputs(self.samples[i].asset_id)["xyz"], np.float32)
                        for i in items])
        target = np.stack([self.target(self.samples[i], m) for i, m in zip(items, modes)])
        text = p.text[[p.sample_texts[i, t] for i, t in zip(items, texts)]]
        image = p.exemplars[exemplars]
        use_text = np.isin(modality, (0, 1))
        use_image = np.isin(modality, (0, 2)) & p.has_exemplar[exemplars]
        as_tensor = partial(torch.as_tensor, device=self.device)
        return (as_tensor(xyz), as_tensor(text, dtype=torch.float32),
                as_tensor(image, dtype=torch.float32), as_tensor(use_text),
                as_tensor(use_image), as_tensor(target))

    def batch(self, row: dict[str, Any], rank: int, device: torch.device) -> Any:
        return self.tensors(list(row["items"]), list(row["texts"]), list(row["exemplars"]),
                            list(row["modality"]), [self.cfg["targets"]] * len(row["items"]))

    def losses(self, module: nn.Module, batch: Any) -> dict[str, Tensor]:
        *inputs, target = batch
        return cast_loss(module(*inputs), target, self.cfg["lambda_focal"],
                         self.cfg["lambda_dice"], self.cfg["focal_gamma"],
                         self.cfg["focal_alpha"])

    @torch.no_grad()
    def predict(self, model: nn.Module, entries: list[dict[str, Any]],
                modality: int) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and ground truth (B, N) of validation entries with one modality."""
        model.eval()
        preds, truths = [], []
        size = self.cfg["batch_size"]
        for start in range(0, len(entries), size):
            chunk = entries[start:start + size]
            *inputs, target = self.tensors([e["sample"] for e in chunk], [QUESTION] * len(chunk),
                                           [e["exemplar"] for e in chunk],
                                           [modality] * len(chunk), [e["truth"] for e in chunk])
            preds.append(torch.sigmoid(model(*inputs).float()).cpu().numpy())
            truths.append(target.cpu().numpy())
        model.train()
        return np.concatenate(preds), np.concatenate(truths)

    def predict_truth(self, entries: list[dict[str, Any]]) -> np.ndarray:
        """The ground truth (B, N) of scoring entries."""
        return np.stack([self.target(self.samples[e["sample"]], e["truth"]) for e in entries])

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """aIoU (and AUC, SIM, MAE) of the validation samples with the question prompt; with
        image prompts trained, also with the exemplar alone (val_image_*)."""
        out = {}
        trained = [m for m in ("text", "image") if self.cfg["prompts"] in (m, "both")]
        for i, name in enumerate(trained):
            scores = self.score(model, self.val, name)
            prefix = "val_" if i == 0 else f"val_{name}_"
            out |= {prefix + k: v for k, v in scores.items()}
        return out

    def score(self, model: nn.Module, entries: list[dict[str, Any]],
              prompt: str) -> dict[str, float]:
        """aIoU, AUC, SIM, MAE of `entries` prompted by "text", "image" or "both"."""
        modality = {"both": 0, "text": 1, "image": 2}[prompt]
        pred, truth = self.predict(model, entries, modality)
        scores = affordance_metrics(pred, truth)
        return {k: float(scores[k]) for k in ("aiou", "auc", "sim", "mae")}


def embed_texts(options: Any, texts: list[str]) -> np.ndarray:
    from operators.models.backbones import load_text_encoder
    encoder = load_text_encoder(options.name, options.model_path,
                                allow_download=options.allow_download)
    with torch.no_grad():
        return np.asarray(encoder.embed(texts), np.float32)


def _asset_samples_and_exemplars(root: RunRoot, targets: str,
                                 row: dict[str, Any]) -> tuple[list[Sample], dict[str, Any]]:
    """A CPU task: one asset's samples and their exemplars."""
    reader = RootReader(root)
    functions = label_functions(reader, row["asset_id"]) if targets == "pseudo" else None
    samples = asset_samples(row, functions)
    try:
        return samples, asset_exemplars(reader, row, samples, targets)
    except (OSError, KeyError) as err:
        raise RuntimeError(f"finetune: exemplars of asset {row['asset_id']}: "
                           f"{type(err).__name__}: {err}") from err


def resolve_init(root: RunRoot, init: str, pretrain: PretrainSection, data: DataSection
                 ) -> tuple[dict[str, Any], int, dict[str, Tensor] | None, dict[str, Any]]:
    """(encoder kwargs, points, weights or None, lineage) of cast.init. A pretrained encoder
    must come from the same split: with another, it would have trained on this run's
    validation or held-out assets."""
    if init == "scratch":
        return pretrain.encoder(), pretrain.points, None, {"init": "scratch"}
    from safetensors.torch import load as load_torch
    ref = parse_model_ref(root, init)
    record_path = f"{ref.path}/{RUN_RECORD}".lstrip("/")
    _require(ref.root.exists(record_path), f"finetune: --from {init}: no run at "
             f"{ref.display()} (pretrain one with `partlift pretrain --name NAME`)")
    record = ref.root.read_json(record_path)
    _require(record.get("model_kind") == "pointmae", f"finetune: --from {init} is a "
             f"{record.get('kind')} run, not a CMAT pretraining (pretrain/NAME)")
    differ = [f"{key}: {record['config'].get(key)!r} there, {value!r} here"
              for key, value in ((f"data.{k}", v) for k, v in data.model_dump(mode="json").items())
              if record["config"].get(key) != value]
    _require(not differ, f"finetune: --from {init} was pretrained on another split of the "
             "assets (it may have seen this run's validation or held-out assets):\n  "
             + "\n  ".join(differ) + "\nuse its data.* settings, or pretrain with these")
    best = f"{ref.path}/{BEST_DIR}".lstrip("/")
    _require(ref.root.exists(f"{best}/{WEIGHTS_FILE}"), f"finetune: --from {init}: the run has "
             f"no validated checkpoint yet ({ref.root.display(best)} is missing)")
    meta = ref.root.read_json(f"{best}/{META_FILE}")
    weights = load_torch(ref.root.read_bytes(f"{best}/{WEIGHTS_FILE}"))
    lineage = {"init": init, "init_step": int(meta["step"]),
               "init_hash": settings_hash({"created": record.get("created"),
                                           "step": meta["step"]})}
    return record["model"]["encoder"], int(record["model"]["points"]), weights, lineage


def prepare_finetune(root: RunRoot, run: str, name: str, cast: CastSection,
                     pretrain: PretrainSection, data: DataSection,
                     config_record: dict[str, Any], progress: Progress = print,
                     mapper: Mapper = local_map) -> PreparedTask:
    encoder, points, weights, lineage = resolve_init(root, cast.init, pretrain, data)
    reader = RootReader(root)
    if cast.targets == "pseudo":
        _require(bool(reader.table(LABEL_POINTS).index), f"finetune: cast.targets=pseudo reads "
                 f"labels/points/, which {root.display()} lacks: run `partlift label --root "
                 f"{root.uri}`, or cast.targets=gt on procedural assets")
    _require(bool(reader.table(FEATURE_VIEWS).index), f"finetune: {root.display()} has no "
             f"features/views/ (the image prompts' patch grids): run `partlift lift`")
    found = check_data(root, "finetune", data, points, progress, mapper)
    if cast.targets == "gt":
        no_truth = [a for a in found.ids("train") if not found.manifest[a].get("part_names")]
        _require(not no_truth, f"finetune: cast.targets=gt needs procedural ground truth; "
                 f"{len(no_truth)} training assets have none (e.g. {', '.join(no_truth[:3])}): "
                 "use cast.targets=pseudo")
    rows = [found.manifest[a] for a in sorted(found.manifest)]
    progress(f"prompts: samples and image exemplars of {len(rows)} assets")
    tic = time.perf_counter()
    scanned = mapper(partial(_asset_samples_and_exemplars, root, cast.targets), rows)
    samples: list[Sample] = []
    exemplar_rows: list[np.ndarray | None] = []
    for asset_samples_, exemplars in scanned:
        for sample in asset_samples_:
            samples.append(sample)
            exemplar_rows.append(exemplars.get(sample.function))
    by_split = {s: [i for i, x in enumerate(samples) if found.splits[x.asset_id] == s]
                for s in ("train", "val", "holdout")}
    _require(bool(by_split["train"]) and bool(by_split["val"]), f"finetune: "
             f"{len(by_split['train'])} training and {len(by_split['val'])} validation samples "
             f"(asset, function) under {root.display()}: both are needed")
    texts: list[str] = []
    position: dict[str, int] = {}
    sample_texts = np.zeros((len(samples), 4), np.int64)
    for i, sample in enumerate(samples):
        for j, text in enumerate(prompt_texts(sample.category, sample.function, sample.parts)):
            sample_texts[i, j] = position.setdefault(text, len(position))
    texts = list(position)
    embedded = embed_texts(cast.text_encoder, texts)
    dim = next((len(e) for e in exemplar_rows if e is not None), found.feature_dim)
    exemplars = np.stack([e if e is not None else np.zeros(dim, np.float32)
                          for e in exemplar_rows])
    has = np.asarray([e is not None for e in exemplar_rows])
    progress(f"prompts: {len(samples)} samples, {len(texts)} texts, {int(has.sum())} "
             f"exemplars ({time.perf_counter() - tic:.1f} s)")
    train_samples = [samples[i] for i in by_split["train"]]
    needs_labels = [s.asset_id for s in samples if s.asset_id in found.manifest
                    and not found.manifest[s.asset_id].get("part_names")]
    _require(not needs_labels or bool(reader.table(LABEL_POINTS).index),
             f"finetune: {len(set(needs_labels))} assets have no procedural parts (e.g. "
             f"{needs_labels[0] if needs_labels else ''}): they are scored against their "
             f"pseudo-labels, and {root.display()} has no labels/points/: run `partlift label`")
    prompts = Prompts(texts, embedded, sample_texts[by_split["train"]],
                      exemplars[by_split["train"]], has[by_split["train"]])
    # validation (and held-out) entries are appended to the training-sample table; their
    # exemplar is a training sample's, and their own exemplars are never used
    val_entries, val_picked = entries_for(samples, by_split["val"], train_samples,
                                          has[by_split["train"]], cast.val_samples, cast.seed,
                                          found.manifest, len(train_samples))
    holdout_entries, holdout_picked = entries_for(
        samples, by_split["holdout"], train_samples, has[by_split["train"]], cast.val_samples,
        cast.seed, found.manifest, len(train_samples) + len(val_picked))
    extra = val_picked + holdout_picked
    prompts = Prompts(texts, embedded,
                      np.concatenate([prompts.sample_texts, sample_texts[extra]]),
                      np.concatenate([prompts.exemplars, np.zeros((len(extra), dim), np.float32)]),
                      np.concatenate([prompts.has_exemplar, np.zeros(len(extra), bool)]))
    all_samples = train_samples + [samples[i] for i in extra]
    plan = cast_plan(train_samples, cast.steps, cast.num_workers, cast.batch_size,
                     cast.prompts, cast.seed, has[by_split["train"]].tolist())
    cfg = cast.model_dump(mode="json") | {"encoder": encoder, "points": points}
    record = {"kind": "finetune", "name": name, "model_kind": "cast", "config": config_record,
              "model": {"encoder": encoder, "points": points, "text_dim": int(embedded.shape[1]),
                        "image_dim": int(exemplars.shape[1]), "fusion_depth": cast.fusion_depth},
              "fingerprints": data_fingerprints(root, cast.targets),
              "splits": {s: len(found.ids(s)) for s in ("train", "val", "holdout")},
              "samples": {s: len(v) for s, v in by_split.items()},
              "point_cache": found.cache, "text_encoder": cast.text_encoder.name,
              "text_encoder_options": {"model_path": cast.text_encoder.model_path,
                                       "allow_download": cast.text_encoder.allow_download},
              "functions": sorted({s.function for s in train_samples})}
    lineage |= {"samples_hash": settings_hash([[s.asset_id, s.function] for s in all_samples])}
    resumed = _write_record(root, run, name, "finetune", record, lineage)
    root.write_bytes(f"{run}/{PROMPTS_FILE}", prompts_bytes(
        texts, embedded, [s.function for s in train_samples], prompts.exemplars[:len(train_samples)],
        prompts.has_exemplar[:len(train_samples)]))
    task = CastTask(root, run, cfg, found.cache, {a: _cast_row(r) for a, r in
                                                   found.manifest.items()},
                    all_samples, prompts, val_entries, weights, holdout_entries)
    progress(f"{len(train_samples)} training samples, {len(val_entries)} validation samples, "
             f"{len(holdout_entries)} held-out samples (evaluation only); "
             f"encoder: {cast.init}" + (f" (step {lineage['init_step']})"
                                         if weights is not None else ""))
    return PreparedTask(task, plan, record, resumed, _scaling(cast))


def _cast_row(row: dict[str, Any]) -> dict[str, Any]:
    return {"asset_id": row["asset_id"], "category": row["category"],
            "part_names": row.get("part_names") or []}


def entries_for(samples: list[Sample], chosen: list[int], train_samples: list[Sample],
                has: np.ndarray, limit: int, seed: int, manifest: dict[str, dict],
                base: int) -> tuple[list[dict[str, Any]], list[int]]:
    """Scoring entries for at most `limit` of the samples `chosen` (drawn with `seed`), which
    go to the sample table from index `base` on: the question phrasing, the exemplar of a
    training sample of the same function (none when no training sample has one), and the
    procedural ground truth when the asset has parts, else the pseudo-label."""
    rng = np.random.default_rng(seed + 7)
    picked = sorted(rng.permutation(chosen)[:limit].tolist())
    by_function: dict[str, list[int]] = {}
    for i, sample in enumerate(train_samples):
        if has[i]:
            by_function.setdefault(sample.function, []).append(i)
    entries = []
    for n, i in enumerate(picked):
        options = by_function.get(samples[i].function, [])
        exemplar = int(options[rng.integers(len(options))]) if options else base + n
        truth = "gt" if manifest[samples[i].asset_id].get("part_names") else "pseudo"
        entries.append({"sample": base + n, "exemplar": exemplar, "truth": truth})
    return entries, picked


# ------------------------------------------------------------------------------ running


@dataclass(frozen=True)
class TaskReport:
    kind: str
    name: str
    run: str                   # display URI of the run directory
    steps: int
    resumed_from: int
    metric: str
    best_step: int | None
    best_score: float | None
    last_loss: float | None
    seconds: float
    steps_per_s: float
    samples_per_s: float


def run_task(prepared: PreparedTask, callbacks: list[Any] | None = None) -> TaskReport:
    task = prepared.task
    done = checkpoints(ModelRef(task.root, task.run)) if prepared.resumed else {}
    resumed_from = max(done, default=0)
    tic = time.perf_counter()
    result = fit(task.root, task.run, task_loop_per_worker, {"task": task}, prepared.plan,
                 prepared.scaling, callbacks)
    seconds = time.perf_counter() - tic
    if result.error is not None:
        raise result.error
    log = read_metric_log(task.root, task.run)
    trained = [r for r in log if r["step"] > resumed_from]
    train_seconds = sum(r["seconds"] for r in trained)
    scored = [r for r in log if task.metric in r and np.isfinite(r[task.metric])]
    best = (max if task.higher_is_better else min)(scored, key=lambda r: r[task.metric],
                                                   default=None)
    record = task.root.read_json(f"{task.run}/{RUN_RECORD}")
    record["status"] = "finished"
    task.root.write_json(f"{task.run}/{RUN_RECORD}", record)
    steps = len(trained)
    per_step = task.cfg["batch_size"] * prepared.scaling.num_workers
    return TaskReport(record["kind"], record["name"], task.root.display(task.run),
                      int(log[-1]["step"]) if log else 0, resumed_from, task.metric,
                      None if best is None else int(best["step"]),
                      None if best is None else float(best[task.metric]),
                      float(log[-1]["loss"]) if log else None, seconds,
                      steps / max(train_seconds, 1e-9),
                      steps * per_step / max(train_seconds, 1e-9))


# ------------------------------------------------------------------------------ the model


def prompts_bytes(texts: list[str], text: np.ndarray, functions: list[str],
                  exemplars: np.ndarray, has: np.ndarray) -> bytes:
    """The run's prompt tables: text embeddings, and the training exemplars with their
    functions (what scoring draws image prompts from)."""
    from safetensors.numpy import save
    import json
    return save({"text": np.ascontiguousarray(text, np.float32),
                 "exemplars": np.ascontiguousarray(exemplars[has], np.float32)},
                metadata={"texts": json.dumps(texts),
                          "functions": json.dumps([f for f, h in zip(functions, has) if h])})


@dataclass
class TrainedCast:
    """A fine-tuned CAST model (encoder + head) with its prompt tables."""

    model: CastModel
    record: dict[str, Any]
    step: int
    where: str
    texts: list[str]
    text: np.ndarray                 # (T, Dt)
    exemplar_functions: list[str]
    exemplars: np.ndarray            # (E, Di)

    @property
    def points(self) -> int:
        return int(self.record["model"]["points"])

    def embed(self, texts: list[str]) -> np.ndarray:
        """Text prompts' embeddings: the run's own for texts it embedded, else the run's text
        encoder (loaded once)."""
        known = {t: i for i, t in enumerate(self.texts)}
        if all(t in known for t in texts):
            return self.text[[known[t] for t in texts]]
        if not hasattr(self, "_encoder"):
            from operators.models.backbones import load_text_encoder
            options = self.record.get("text_encoder_options") or {}
            self._encoder = load_text_encoder(self.record["text_encoder"],
                                              options.get("model_path"),
                                              allow_download=bool(options.get("allow_download")))
        with torch.no_grad():
            return np.asarray(self._encoder.embed(texts), np.float32)

    def exemplar(self, function: str, seed: int = 0) -> np.ndarray | None:
        """A training exemplar of `function` (drawn with `seed`); None when it has none."""
        options = [i for i, f in enumerate(self.exemplar_functions) if f == function]
        if not options:
            return None
        return self.exemplars[options[np.random.default_rng(seed).integers(len(options))]]

    @torch.no_grad()
    def predict(self, xyz: np.ndarray, text: np.ndarray | None,
                image: np.ndarray | None) -> np.ndarray:
        """Per-point probabilities (B, N) of unit-sphere clouds (B, N, 3) for prompt embeddings
        text (B, Dt) and/or image (B, Di) (None: the null token)."""
        batch = len(xyz)
        model = self.model
        text_dim = model.text_proj[-1].in_features
        image_dim = model.image_proj[-1].in_features
        t = np.zeros((batch, text_dim), np.float32) if text is None else text
        i = np.zeros((batch, image_dim), np.float32) if image is None else image
        logits = model(torch.as_tensor(np.asarray(xyz, np.float32)),
                       torch.as_tensor(np.asarray(t, np.float32)),
                       torch.as_tensor(np.asarray(i, np.float32)),
                       torch.full((batch,), text is not None),
                       torch.full((batch,), image is not None))
        return torch.sigmoid(logits).numpy()


def build_cast(record: dict[str, Any]) -> CastModel:
    m = record["model"]
    return CastModel(m["encoder"], m["text_dim"], m["image_dim"], m["fusion_depth"])


def trained_cast(model: CastModel, record: dict[str, Any], step: int, where: str,
                 prompts: bytes) -> TrainedCast:
    import json
    from safetensors.numpy import load
    tables = load(prompts)
    metadata = _metadata(prompts)
    return TrainedCast(model, record, step, where, json.loads(metadata["texts"]),
                       tables["text"], json.loads(metadata["functions"]), tables["exemplars"])


def _metadata(data: bytes) -> dict[str, str]:
    """A safetensors file's metadata (its JSON header)."""
    import json
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size]).get("__metadata__", {})
