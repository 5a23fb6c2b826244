"""`partlift label`: views + points -> labels/{boxes,points,masks} (DFC A.4) as one Ray Data stream.

    load views (CPU tasks) -> ground every prompt/view/trial (actor pool: the model is loaded once
    per actor; GPUs from label.resources.grounding.num_gpus) -> vote onto points, masks, write
    (CPU tasks)

An asset that fails leaves the stream with an `errors/` row written by the step that failed.
`labels/points/` is the commit table of each shard; resume skips asset_ids it already holds.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import numpy as np
import ray.data

from operators.data.taxonomy import load_taxonomy
from operators.models.grounding import Box, GroundingBackend
from operators.models.labeling import (GroundTruthParts, PartPrompt, aggregate_asset, ground_asset,
                                       prompts_for)
from operators.models.loading import resolve_device
from operators.settings import LabelSettings
from operators.store.ids import seed_for
from operators.store.storage import concatenated, make_table, rows_to_columns, shard_name
from operators.store.tables import LABEL_BOXES, LABEL_MASKS, LABEL_OUTPUT, LABEL_POINTS
from rayjobs.config import LabelConfig, LabelJob, StepResources
from rayjobs.driver import (AssetErrors, JobContext, Plan, StageReport, TaskContext, map_actors,
                            map_tasks, run_stage)
from rayjobs.streams import RenderedAssetsStage, failed_stages, keep_rows, todo

STAGE = "label"


def _prompts_json(prompts: list[PartPrompt], boxes: list) -> str:
    return json.dumps([{"function": p.function, "part": p.part, "part_index": p.part_index,
                        "boxes": [[[[b.x0, b.y0, b.x1, b.y1, b.score] for b in trial]
                                   for trial in view] for view in per_view]}
                       for p, per_view in zip(prompts, boxes)])


class GroundingActor:
    """Actor: loads the grounding model once, then boxes every prompt in every view and trial."""

    def __init__(self, cfg: LabelConfig, task: TaskContext, forward: bool = False):
        self.cfg, self.task, self.forward = cfg, task, forward
        self.taxonomy = load_taxonomy()
        self.device = resolve_device(cfg.device)
        self.settings = cfg.settings()
        # The oracle is built per asset (its noise is seeded by the asset id); models once.
        self.backend = (None if cfg.backend.per_asset else
                        cfg.backend.build(device=self.device, seed=cfg.seed,
                                          template=self.settings.template))

    def _backend_for(self, asset_id: str) -> GroundingBackend:
        if self.backend is not None:
            return self.backend
        return self.cfg.backend.build(device=self.device,
                                      seed=seed_for(self.cfg.seed, asset_id) % (2**31),
                                      template=self.settings.template)

    def _ground(self, batch: dict[str, Any], i: int) -> str:
        asset_id = str(batch["asset_id"][i])
        prompts = prompts_for(self.taxonomy, batch["category"][i], list(batch["part_names"][i]),
                              self.cfg.functions)
        if not prompts:
            raise ValueError(f"category '{batch['category'][i]}' has none of the "
                             f"functions {self.cfg.functions}")
        face_part = np.asarray(batch["face_part"][i], dtype=np.int16)
        truth = GroundTruthParts(batch["face_id"][i], face_part) if face_part.size else None
        boxes = ground_asset(self._backend_for(asset_id), batch["rgb"][i], prompts,
                             self.settings, truth)
        return _prompts_json(prompts, boxes)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        errors = AssetErrors(STAGE, self.task)
        rows = range(len(batch["asset_id"]))
        done = dict(errors.attempt([i for i in rows if todo(batch, STAGE, i)],
                                   lambda i: self._ground(batch, i),
                                   asset_of=lambda i: str(batch["asset_id"][i])))
        errors.write()
        failed = {i for i in rows if todo(batch, STAGE, i) and i not in done}
        # alone, failed rows leave; in a stream they go on to the next stage (failed_stage)
        keep = list(rows) if self.forward else [i for i in rows if i not in failed]
        if not keep:
            return {}
        names = list(batch) if self.forward else (
            "asset_id", "render_commit", "xyz", "depth", "mask", "K", "cam_to_world")
        out = keep_rows(batch, keep, names)
        out["prompts_json"] = [done.get(i, "") for i in keep]  # "" = labelled before, or failed
        if self.forward:
            out["failed_stage"] = failed_stages(batch, keep, STAGE, failed)
        return out


def aggregate_write_batch(batch: dict[str, Any], task: TaskContext, settings: LabelSettings,
                          forward: bool = False) -> dict[str, Any]:
    """CPU task: votes -> per-point scores -> per-view masks; writes one shard set of the label
    tables. Returns one summary row per labelled asset, or with `forward` (more stages follow in
    the stream) the rows themselves, without those that failed."""
    ids = [str(a) for a in batch["asset_id"]]
    work = [i for i in range(len(ids)) if batch["prompts_json"][i]]
    errors = AssetErrors(STAGE, task)

    def aggregate(i: int) -> tuple[list[dict], np.ndarray, np.ndarray]:
        prompts = json.loads(batch["prompts_json"][i])
        boxes = [[[[Box(*b) for b in trial] for trial in view] for view in p["boxes"]]
                 for p in prompts]
        scores, masks = aggregate_asset(boxes, batch["xyz"][i], batch["K"][i],
                                        batch["cam_to_world"][i], batch["depth"][i],
                                        batch["mask"][i], settings)
        return prompts, scores, masks

    boxes_rows, masks_rows, points_rows = defaultdict(list), defaultdict(list), defaultdict(list)
    ok = []
    for i, (prompts, scores, masks) in errors.attempt(work, aggregate, ids.__getitem__):
        asset_id, n_views = ids[i], masks.shape[1]
        for p, prompt in enumerate(prompts):
            for v, view in enumerate(prompt["boxes"]):
                for t, trial in enumerate(view):
                    boxes_rows["asset_id"].append(asset_id)
                    boxes_rows["view_id"].append(v)
                    boxes_rows["function"].append(prompt["function"])
                    boxes_rows["part"].append(prompt["part"])
                    boxes_rows["trial"].append(t)
                    boxes_rows["boxes"].append([b[:4] for b in trial])
                    boxes_rows["scores"].append([b[4] for b in trial])
            masks_rows["asset_id"] += [asset_id] * n_views
            masks_rows["view_id"].append(np.arange(n_views, dtype=np.int32))
            masks_rows["function"] += [prompt["function"]] * n_views
            masks_rows["part"] += [prompt["part"]] * n_views
            masks_rows["mask"].append(masks[p])
            points_rows["asset_id"].append(asset_id)
            points_rows["function"].append(prompt["function"])
            points_rows["part"].append(prompt["part"])
            points_rows["score"].append(scores[p][None].astype(np.float16))
        ok.append({"asset_id": asset_id, "status": "ok",
                   "render_commit": str(batch["render_commit"][i])})
    shard = shard_name(ids)
    for key in ("view_id", "trial"):  # key columns are int32 in every table
        boxes_rows[key] = np.asarray(boxes_rows[key], np.int32)
    if points_rows:
        task.commit(LABEL_OUTPUT, shard, {LABEL_BOXES.name: make_table(concatenated(boxes_rows)),
                                          LABEL_MASKS.name: make_table(concatenated(masks_rows)),
                                          LABEL_POINTS.name: make_table(concatenated(points_rows))},
                    assets=[r["asset_id"] for r in ok],
                    upstream={r["asset_id"]: r["render_commit"] for r in ok})
    errors.write(shard)
    if forward:  # every row goes on, those that failed here flagged
        rows = range(len(ids))
        out = keep_rows(batch, list(rows), [k for k in batch if k != "prompts_json"])
        out["failed_stage"] = failed_stages(batch, rows, STAGE,
                                            {i for i in rows if ids[i] in errors.failed})
        return out
    return rows_to_columns([{"asset_id": r["asset_id"], "status": "ok"} for r in ok])


class LabelStage(RenderedAssetsStage):
    name = STAGE
    outputs = (LABEL_OUTPUT,)

    def check(self, config: LabelJob) -> None:
        config.label.backend.check()
        config.label.settings()

    def settings(self, config: LabelJob) -> dict[str, dict[str, Any]]:
        return {STAGE: config.label.fingerprint()}

    def load_resources(self, config: LabelJob) -> StepResources:
        return config.label.resources.load

    def add_steps(self, ds: ray.data.Dataset, ctx: JobContext,
                  forward: bool = False) -> ray.data.Dataset:
        """Grounding (actor pool) and aggregation + write (tasks) after a stream of asset rows;
        `forward`: pass the rows on to the next stage instead of summaries."""
        cfg = ctx.config.label
        ds = map_actors(ds, GroundingActor, cfg.resources.grounding, cfg=cfg, task=ctx.task,
                        forward=forward)
        return map_tasks(ds, aggregate_write_batch, cfg.resources.aggregate, task=ctx.task,
                         settings=cfg.settings(), forward=forward)

    def inputs(self, ctx: JobContext) -> dict[str, str]:
        return {**super().inputs(ctx), "backend": ctx.config.label.backend.name}

    def units(self, ctx: JobContext, plan: Plan, ok: int) -> dict[str, int]:
        labels = ctx.root.read_table(LABEL_POINTS.name, columns=["asset_id"])
        return {"part labels (all runs)": 0 if labels is None else labels.num_rows}


def run_label(config: LabelJob) -> StageReport:
    """Pseudo-label every rendered asset that `labels/points` does not hold yet."""
    return run_stage(config, LabelStage())
