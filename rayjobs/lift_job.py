"""`partlift lift`: views + points -> features/points (+ features/views) as one Ray Data stream.

    load views and points (CPU tasks) -> backbone patch grids (actor pool: the model is loaded
    once per actor; GPUs and bf16 from lift.*) -> project, depth-test, sample, average (CPU tasks)

CMAT 3.1: per-view foundation-model features are projected back onto the surface points. The
per-view grids are also kept (`features/views/`): the frozen-backbone cache that correspondence
training reads instead of running the backbone every epoch (DFC 4.2). `features/points/` is the
commit table of each shard; failed assets go to `errors/` and leave the stream.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import ray.data

from operators.data.backgrounds import background_variants
from operators.geometry.lift import lift_features, subsample_points
from operators.models.loading import resolve_device, resolve_dtype
from operators.settings import ConfigError
from operators.store.ids import seed_for
from operators.store.storage import concatenated, make_table, rows_to_columns, shard_name
from operators.store.tables import FEATURE_BLOCKS, FEATURE_POINTS, FEATURE_VIEWS, LIFT_OUTPUT
from rayjobs.config import LiftConfig, LiftJob, StepResources
from rayjobs.driver import (AssetErrors, JobContext, Plan, StageReport, TaskContext, map_actors,
                            map_tasks, run_stage)
from rayjobs.streams import RenderedAssetsStage, keep_rows, todo

STAGE = "lift"


class BackboneActor:
    """Actor: loads the frozen backbone once, then adds each asset's per-view patch grids."""

    def __init__(self, cfg: LiftConfig, task: TaskContext):
        from operators.models.backbones import load_backbone
        self.task = task
        self.cache_blocks = cfg.cache_blocks
        self.variants, self.seed = cfg.background_variants, cfg.seed
        options = cfg.backbone
        device = resolve_device(options.device)
        self.backbone = load_backbone(options.name, options.model_path, device=device,
                                      dtype=resolve_dtype(options.dtype, device),
                                      stride=options.stride,
                                      n_last_blocks=cfg.n_last_blocks,
                                      allow_download=options.allow_download)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        errors = AssetErrors(STAGE, self.task)
        rows = range(len(batch["asset_id"]))
        raw_blocks = self.cache_blocks

        def grids(i: int) -> tuple[np.ndarray, np.ndarray | None]:
            rgb = batch["rgb"][i]
            features, blocks = self.backbone.features_and_blocks(rgb, raw_blocks)
            if blocks is None:
                return features.astype(np.float16), None
            variants = [blocks]  # variant 0: the render's own background
            if self.variants > 1:  # the others: replaced backgrounds, seeded per asset
                seed = seed_for(self.seed, str(batch["asset_id"][i]))
                images = np.stack([background_variants(rgb[v], batch["mask"][i][v],
                                                       self.variants, seed + v)[1:]
                                   for v in range(rgb.shape[0])])  # (V, K-1, H, W, 3)
                extra = self.backbone.block_features(images.reshape(-1, *rgb.shape[1:]),
                                                     raw_blocks)
                variants += list(extra.reshape(rgb.shape[0], self.variants - 1,
                                               *extra.shape[1:]).swapaxes(0, 1))
            # (V, K, n_blocks, h, w, D)
            return features.astype(np.float16), np.stack(variants, axis=1).astype(np.float16)

        done = dict(errors.attempt([i for i in rows if todo(batch, STAGE, i)], grids,
                                   asset_of=lambda i: str(batch["asset_id"][i])))
        errors.write()
        keep = [i for i in rows if i in done or not todo(batch, STAGE, i)]  # failed rows leave
        if not keep:
            return {}
        names = ["asset_id", "render_commit", "xyz", "depth", "K", "cam_to_world"]
        names += [k for k in (f"todo_{STAGE}", "failed_stage") if k in batch]
        out = keep_rows(batch, keep, names)
        results = [done.get(i) for i in keep]
        for column, part, rank in (("view_features", 0, 4), ("view_blocks", 1, 6)):
            values = [r[part] if r is not None and r[part] is not None else None
                      for r in results]
            if all(v is not None for v in values):
                out[column] = np.stack(values)
            else:  # lifted before (or no block cache): an empty array of the same rank
                out[column] = [v if v is not None else np.zeros((0,) * rank, np.float16)
                               for v in values]
        return out


def lift_write_batch(batch: dict[str, Any], task: TaskContext, cfg: LiftConfig) -> dict[str, list]:
    """CPU task: lift each asset's grids onto a subsample of its points; write one shard of
    features/views (if cached) and features/points (commit)."""
    ids = [str(a) for a in batch["asset_id"]]
    errors = AssetErrors(STAGE, task)

    def lift(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        xyz_all = batch["xyz"][i]
        if cfg.n_points > xyz_all.shape[0]:
            raise ValueError(f"lift.n_points={cfg.n_points} exceeds the {xyz_all.shape[0]} "
                             "surface points rendered for this asset (render.n_points)")
        index = subsample_points(xyz_all.shape[0], cfg.n_points, seed_for(cfg.seed, ids[i]))
        features, seen = lift_features(xyz_all[index], batch["view_features"][i], batch["K"][i],
                                       batch["cam_to_world"][i], batch["depth"][i],
                                       batch["depth"][i].shape[1:3],
                                       rel_tol=cfg.visibility_rel_tol,
                                       abs_tol=cfg.visibility_abs_tol)
        return index, features, seen

    points, views, blocks, ok = defaultdict(list), defaultdict(list), defaultdict(list), []
    lifted_before = [i for i in range(len(ids)) if not todo(batch, STAGE, i)]
    work = [i for i in range(len(ids)) if todo(batch, STAGE, i)]
    for i, (index, features, seen) in errors.attempt(work, lift, ids.__getitem__):
        grids = batch["view_features"][i]
        points["asset_id"].append(ids[i])
        points["point_index"].append(index.astype(np.int32)[None])
        points["xyz"].append(batch["xyz"][i][index].astype(np.float32)[None])
        points["features"].append(features.astype(np.float16)[None])
        points["n_views_seen"].append(seen[None])
        if cfg.cache_view_features:
            views["asset_id"] += [ids[i]] * grids.shape[0]
            views["view_id"].append(np.arange(grids.shape[0], dtype=np.int32))
            views["features"].append(np.asarray(grids, np.float16))
        if cfg.cache_blocks:  # one row per (view, background variant)
            cached = np.asarray(batch["view_blocks"][i], np.float16)  # (V, K, n, h, w, D)
            n_views, n_variants = cached.shape[:2]
            blocks["asset_id"] += [ids[i]] * (n_views * n_variants)
            blocks["view_id"].append(np.repeat(np.arange(n_views, dtype=np.int32), n_variants))
            blocks["variant"].append(np.tile(np.arange(n_variants, dtype=np.int16), n_views))
            blocks["blocks"].append(cached.reshape(-1, *cached.shape[2:]))
        ok.append({"asset_id": ids[i], "status": "ok",
                   "render_commit": str(batch["render_commit"][i])})
    shard = shard_name(ids)
    if points:
        tables = {FEATURE_POINTS.name: make_table(concatenated(points))}
        if views:  # the per-view cache is optional (lift.cache_view_features)
            tables[FEATURE_VIEWS.name] = make_table(concatenated(views))
        if blocks:  # the trainer's block cache is optional too (lift.cache_blocks)
            tables[FEATURE_BLOCKS.name] = make_table(concatenated(blocks))
        task.commit(LIFT_OUTPUT, shard, tables, assets=[r["asset_id"] for r in ok],
                    upstream={r["asset_id"]: r["render_commit"] for r in ok})
    errors.write(shard)
    # in a stream, a row an earlier stage failed is lifted all the same but is not ok
    earlier = batch.get("failed_stage")
    status = {ids[i]: "failed" if earlier is not None and earlier[i] else "ok"
              for i in range(len(ids))}
    return rows_to_columns([{"asset_id": a, "status": status[a]}
                            for a in [r["asset_id"] for r in ok] + [ids[i] for i in lifted_before]])


class LiftStage(RenderedAssetsStage):
    name = STAGE
    outputs = (LIFT_OUTPUT,)

    def check(self, config: LiftJob) -> None:
        """Fail before any work (and before Ray) when the backbone cannot work: pretrained
        weights missing (checked without loading them), more blocks than the model has. The
        name, a text encoder and the stride are checked when the config loads."""
        cfg = config.lift
        cfg.backbone.check_available()
        blocks = cfg.backbone.num_blocks()
        for key in ("n_last_blocks", "cache_blocks"):
            if blocks is not None and getattr(cfg, key) > blocks:
                raise ConfigError(f"lift.{key}={getattr(cfg, key)}: {cfg.backbone.name} has "
                                  f"{blocks} blocks")

    def settings(self, config: LiftJob) -> dict[str, dict[str, Any]]:
        return {STAGE: config.lift.fingerprint()}

    def load_resources(self, config: LiftJob) -> StepResources:
        return config.lift.resources.load

    def add_steps(self, ds: ray.data.Dataset, ctx: JobContext,
                  forward: bool = False) -> ray.data.Dataset:
        """Backbone (actor pool) and lifting + write (tasks) after a stream of asset rows (the
        last stage of a stream: `forward` is not supported)."""
        if forward:
            raise ValueError("lift is the last stage of a stream")
        cfg = ctx.config.lift
        ds = map_actors(ds, BackboneActor, cfg.resources.backbone, cfg=cfg, task=ctx.task)
        return map_tasks(ds, lift_write_batch, cfg.resources.project, task=ctx.task, cfg=cfg)

    def inputs(self, ctx: JobContext) -> dict[str, str]:
        backbone = ctx.config.lift.backbone
        where = f" ({backbone.model_path})" if backbone.model_path else ""
        return {**super().inputs(ctx), "backbone": backbone.name + where}

    def units(self, ctx: JobContext, plan: Plan, ok: int) -> dict[str, int]:
        return {"points with features": ok * ctx.config.lift.n_points}


def run_lift(config: LiftJob) -> StageReport:
    """Lift backbone features onto every rendered asset that `features/points` does not hold."""
    return run_stage(config, LiftStage())
