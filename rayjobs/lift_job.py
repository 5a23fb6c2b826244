"""`partlift lift`: views + points -> features/points (+ features/views) as one Ray Data stream.

    load views and points (CPU tasks) -> backbone patch grids (actor pool: the model is loaded
    once per actor; GPUs and bf16 from lift.*) -> project, depth-test, sample, average (CPU tasks)

CMAT 3.1: per-view foundation-model features are projected back onto the surface points. The
per-view grids are also kept (`features/views/`): the frozen-backbone cache that correspondence
training reads instead of running the backbone every epoch (DFC 4.2). `features/points/` is the
commit table of each shard; failed assets go to `errors/` and leave the stream.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import numpy as np

from operators.geometry.lift import lift_features, subsample_points
from operators.store.storage import RunRoot, StorageOptions, make_table, shard_name
from rayjobs.config import ConfigError, LiftConfig, PartliftConfig
from rayjobs.resources import map_batches_args
from rayjobs.runtime import StageReport, StageTables, error_row, seed_for, write_errors
from rayjobs.streams import run_rendered_stage

STAGE = "lift"
FEATURE_POINTS_TABLE = "features/points"
FEATURE_VIEWS_TABLE = "features/views"
LIFT_TABLES = (FEATURE_VIEWS_TABLE, FEATURE_POINTS_TABLE)
LIFT_OUTPUT = StageTables(STAGE, LIFT_TABLES, commit=FEATURE_POINTS_TABLE)


def _rows(batch: dict[str, Any], keep: list[int]) -> dict[str, Any]:
    return {k: ([v[i] for i in keep] if isinstance(v, list) else v[keep]) for k, v in batch.items()}


class BackboneActor:
    """Actor: loads the frozen backbone once, then adds each asset's per-view patch grids."""

    def __init__(self, cfg: LiftConfig, root_uri: str, storage: StorageOptions, job_id: str):
        import torch

        from operators.models.backbones import load_backbone
        self.root, self.job_id = RunRoot(root_uri, storage), job_id
        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.startswith("cuda")
                                                      else None)
        self.backbone = load_backbone(cfg.backbone, cfg.model_path, device=device, dtype=dtype,
                                      stride=cfg.stride, n_last_blocks=cfg.n_last_blocks,
                                      allow_download=cfg.allow_download)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        keep, grids, errors = [], [], []
        for i, asset_id in enumerate(batch["asset_id"]):
            try:
                grids.append(self.backbone.features(batch["rgb"][i]).astype(np.float16))
                keep.append(i)
            except Exception as err:  # row-level: recorded, the asset leaves the stream
                errors.append(error_row(STAGE, self.job_id, str(asset_id), err))
        write_errors(self.root, STAGE, self.job_id,
                     shard_name(e["asset_id"] for e in errors) if errors else "", errors)
        if not keep:
            return {}
        out = _rows({k: batch[k] for k in ("asset_id", "xyz", "depth", "K", "cam_to_world")},
                    keep)
        out["view_features"] = np.stack(grids)
        return out


def lift_write_batch(batch: dict[str, Any], root_uri: str, storage: StorageOptions,
                     cfg: LiftConfig, job_id: str) -> dict[str, list]:
    """CPU task: lift each asset's grids onto a subsample of its points; write one shard of
    features/views (if cached) and features/points (commit)."""
    root = RunRoot(root_uri, storage)
    points, views = defaultdict(list), defaultdict(list)
    summaries, errors = [], []
    ids = [str(a) for a in batch["asset_id"]]
    for i, asset_id in enumerate(ids):
        started = time.perf_counter()
        try:
            xyz_all, grids = batch["xyz"][i], batch["view_features"][i]
            if cfg.n_points > xyz_all.shape[0]:
                raise ValueError(f"lift.n_points={cfg.n_points} exceeds the {xyz_all.shape[0]} "
                                 "surface points rendered for this asset (render.n_points)")
            index = subsample_points(xyz_all.shape[0], cfg.n_points, seed_for(cfg.seed, asset_id))
            features, seen = lift_features(xyz_all[index], grids, batch["K"][i],
                                           batch["cam_to_world"][i], batch["depth"][i],
                                           batch["depth"][i].shape[1:3],
                                           rel_tol=cfg.visibility_rel_tol,
                                           abs_tol=cfg.visibility_abs_tol)
        except Exception as err:  # row-level: recorded, the batch goes on
            errors.append(error_row(STAGE, job_id, asset_id, err))
            summaries.append({"asset_id": asset_id, "status": "failed",
                              "error_type": type(err).__name__, "message": str(err)[:2000]})
            continue
        points["asset_id"].append(asset_id)
        points["point_index"].append(index.astype(np.int32)[None])
        points["xyz"].append(xyz_all[index].astype(np.float32)[None])
        points["features"].append(features.astype(np.float16)[None])
        points["n_views_seen"].append(seen[None])
        if cfg.cache_view_features:
            views["asset_id"] += [asset_id] * grids.shape[0]
            views["view_id"].append(np.arange(grids.shape[0], dtype=np.int32))
            views["features"].append(np.asarray(grids, np.float16))
        summaries.append({"asset_id": asset_id, "status": "ok", "error_type": "",
                          "message": f"{time.perf_counter() - started:.2f} s"})
    if points:
        stack = lambda rows: {k: (np.concatenate(v) if isinstance(v[0], np.ndarray) else v)  # noqa: E731
                              for k, v in rows.items()}
        tables = {FEATURE_POINTS_TABLE: make_table(stack(points))}
        if views:
            tables[FEATURE_VIEWS_TABLE] = make_table(stack(views))
        root.write_shard_set(shard_name(ids), tables, commit_table=FEATURE_POINTS_TABLE)
    write_errors(root, STAGE, job_id, shard_name(ids), errors)
    return {k: [s[k] for s in summaries] for k in summaries[0]} if summaries else {}


def add_lift_stages(ds, config: PartliftConfig, job_id: str):
    cfg, storage = config.lift, config.storage.options()
    ds = ds.map_batches(BackboneActor, fn_constructor_kwargs={
                            "cfg": cfg, "root_uri": config.root, "storage": storage,
                            "job_id": job_id},
                        batch_format="numpy",
                        **map_batches_args(cfg.backbone_resources, actors=True))
    return ds.map_batches(lift_write_batch, fn_kwargs={
                              "root_uri": config.root, "storage": storage, "cfg": cfg,
                              "job_id": job_id},
                          batch_format="numpy", **map_batches_args(cfg.project, actors=False))


def check_lift_config(cfg: LiftConfig) -> None:
    """Fail before any work (and before Ray) when the backbone settings cannot work: unknown
    name (the message lists the registry), a text encoder, a stride the backbone cannot take,
    missing pretrained weights (checked without loading them), bad tiny-model settings."""
    from operators.models.registry import check_available, get_spec
    from operators.models.backbones import load_backbone
    spec = get_spec(cfg.backbone)
    if spec.is_text:
        raise ConfigError(f"lift.backbone={cfg.backbone} is a text encoder; lifting needs an image "
                          "backbone (dinov2-*, dinov3-*)")
    if cfg.stride is not None and cfg.stride not in (spec.patch_size, spec.patch_size // 2):
        raise ConfigError(f"lift.stride={cfg.stride}: {cfg.backbone} takes its patch size "
                          f"{spec.patch_size} or half of it {spec.patch_size // 2}")
    if spec.pretrained:
        if not cfg.allow_download:
            check_available(cfg.backbone, cfg.model_path)
        return
    try:  # random-tiny models are built in memory in a moment: build one to check the rest
        load_backbone(cfg.backbone, cfg.model_path, stride=cfg.stride,
                      n_last_blocks=cfg.n_last_blocks)
    except ValueError as err:
        raise ConfigError(f"lift: {err}") from None


def run_lift(config: PartliftConfig) -> StageReport:
    check_lift_config(config.lift)
    cfg = config.lift

    def units(root: RunRoot, summaries: list[dict]) -> dict[str, int]:
        return {"points with features": sum(s["status"] == "ok" for s in summaries) * cfg.n_points}

    return run_rendered_stage(
        config, LIFT_OUTPUT, add_lift_stages, cfg.project, record_dir="features",
        inputs={"backbone": cfg.backbone + (f" ({cfg.model_path})" if cfg.model_path else "")},
        units=units)
