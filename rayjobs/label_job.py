"""`partlift label`: views + points -> labels/{boxes,points,masks} (DFC A.4) as one Ray Data stream.

    load views (CPU tasks) -> ground every prompt/view/trial (actor pool: the model is loaded once
    per actor; GPUs from label.grounding.num_gpus) -> vote onto points, masks, write (CPU tasks)

An asset that fails before the last stage is written to `errors/` by the stage that failed and
leaves the stream; the driver counts those rows (same job id), so ok + failed = processed.
`labels/points/` is the commit table of each shard; resume skips asset_ids it already holds.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import ray.data

from operators.models.grounding import Box, GroundingBackend, OracleBackend, OracleNoise
from operators.models.labeling import (GroundTruthParts, PartPrompt, aggregate_asset, ground_asset,
                                       prompts_for)
from operators.settings import LabelSettings
from operators.store.storage import RunRoot, StorageOptions, make_table, shard_name
from operators.data.taxonomy import load_taxonomy
from rayjobs.config import ConfigError, LabelConfig, PartliftConfig
from rayjobs.resources import map_batches_args
from rayjobs.runtime import StageReport, StageTables, error_row, seed_for, write_errors
from rayjobs.streams import run_rendered_stage

STAGE = "label"
BOXES_TABLE = "labels/boxes"
LABEL_POINTS_TABLE = "labels/points"
MASKS_TABLE = "labels/masks"
LABEL_TABLES = (BOXES_TABLE, MASKS_TABLE, LABEL_POINTS_TABLE)
LABEL_OUTPUT = StageTables(STAGE, LABEL_TABLES, commit=LABEL_POINTS_TABLE)


def build_backend(cfg: LabelConfig, device: str) -> GroundingBackend | None:
    """The model-backed backend (None for oracle, which is built per asset with its seed)."""
    if cfg.backend == "oracle":
        return None
    from operators.models.grounding_backends import make_backend
    if cfg.backend == "hf-zero-shot":
        return make_backend(cfg.backend, model_path=cfg.model_path, device=device,
                            box_threshold=cfg.box_threshold, text_threshold=cfg.text_threshold)
    if cfg.backend == "hf-vlm":
        return make_backend(cfg.backend, model_path=cfg.model_path, device=device,
                            style=cfg.vlm_style, template=cfg.template or cfg.vlm_style,
                            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            strict=cfg.strict_output, trust_remote_code=cfg.trust_remote_code,
                            **({"json_frame": cfg.json_frame} if cfg.json_frame else {}))
    return make_backend(cfg.backend, base_url=cfg.base_url, model=cfg.model,
                        api_key_env=cfg.api_key_env, style=cfg.vlm_style,
                        template=cfg.template or cfg.vlm_style, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries,
                        max_concurrency=cfg.max_concurrency, temperature=cfg.temperature,
                        strict=cfg.strict_output,
                        **({"json_frame": cfg.json_frame} if cfg.json_frame else {}))


def _prompts_json(prompts: list[PartPrompt], boxes: list) -> str:
    return json.dumps([{"function": p.function, "part": p.part, "part_index": p.part_index,
                        "boxes": [[[[b.x0, b.y0, b.x1, b.y1, b.score] for b in trial]
                                   for trial in view] for view in per_view]}
                       for p, per_view in zip(prompts, boxes)])


class GroundingActor:
    """Actor: loads the grounding model once, then boxes every prompt in every view and trial."""

    def __init__(self, cfg: LabelConfig, root_uri: str, storage: StorageOptions, job_id: str):
        import torch
        self.cfg, self.job_id = cfg, job_id
        self.root = RunRoot(root_uri, storage)
        self.taxonomy = load_taxonomy()
        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.backend = build_backend(cfg, device)
        # A detector wants a noun phrase, a VLM a question: each backend names its template.
        template = cfg.template or getattr(self.backend, "template", None) or "cogvlm"
        self.settings = dataclasses.replace(cfg.settings(), template=template)

    def _backend_for(self, asset_id: str) -> GroundingBackend:
        if self.backend is not None:
            return self.backend
        noise = OracleNoise(self.cfg.oracle_jitter, self.cfg.oracle_miss_rate,
                            self.cfg.oracle_false_positive_rate)
        return OracleBackend(noise, seed=seed_for(self.cfg.seed, asset_id) % (2**31))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        keep, out_json, errors = [], [], []
        for i, asset_id in enumerate(batch["asset_id"]):
            try:
                part_names = list(batch["part_names"][i])
                prompts = prompts_for(self.taxonomy, batch["category"][i], part_names,
                                      self.cfg.functions)
                if not prompts:
                    raise ValueError(f"category '{batch['category'][i]}' has none of the "
                                     f"functions {self.cfg.functions}")
                face_part = np.asarray(batch["face_part"][i], dtype=np.int16)
                truth = GroundTruthParts(batch["face_id"][i], face_part) if face_part.size else None
                boxes = ground_asset(self._backend_for(asset_id), batch["rgb"][i], prompts,
                                     self.settings, truth)
            except Exception as err:  # row-level: recorded, the asset leaves the stream
                errors.append(error_row(STAGE, self.job_id, asset_id, err))
                continue
            keep.append(i)
            out_json.append(_prompts_json(prompts, boxes))
        write_errors(self.root, STAGE, self.job_id,
                     shard_name(e["asset_id"] for e in errors) if errors else "", errors)
        if not keep:
            return {}
        out = {k: ([batch[k][i] for i in keep] if isinstance(batch[k], list) else batch[k][keep])
               for k in ("asset_id", "xyz", "depth", "mask", "K", "cam_to_world")}
        out["prompts_json"] = out_json
        return out


def aggregate_write_batch(batch: dict[str, Any], root_uri: str, storage: StorageOptions,
                          settings: LabelSettings, job_id: str) -> dict[str, list]:
    """CPU task: votes -> per-point scores -> per-view masks; writes one shard per label table."""
    root = RunRoot(root_uri, storage)
    boxes_rows, masks_rows, points_rows = defaultdict(list), defaultdict(list), defaultdict(list)
    summaries, errors = [], []
    ids = [str(a) for a in batch["asset_id"]]
    for i, asset_id in enumerate(ids):
        started = time.perf_counter()
        try:
            prompts = json.loads(batch["prompts_json"][i])
            boxes = [[[[Box(*b) for b in trial] for trial in view] for view in p["boxes"]]
                     for p in prompts]
            scores, masks = aggregate_asset(boxes, batch["xyz"][i], batch["K"][i],
                                            batch["cam_to_world"][i], batch["depth"][i],
                                            batch["mask"][i], settings)
        except Exception as err:  # row-level: recorded, the batch goes on
            errors.append(error_row(STAGE, job_id, asset_id, err))
            summaries.append({"asset_id": asset_id, "status": "failed",
                              "error_type": type(err).__name__, "message": str(err)[:2000]})
            continue
        n_views = masks.shape[1]
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
        summaries.append({"asset_id": asset_id, "status": "ok", "error_type": "",
                          "message": f"{len(prompts)} prompts in "
                                     f"{time.perf_counter() - started:.2f} s"})
    shard = shard_name(ids)
    if points_rows:
        stack = lambda rows: {k: (np.concatenate(v) if isinstance(v[0], np.ndarray) else v)  # noqa: E731
                              for k, v in rows.items()}
        root.write_shard_set(shard, {BOXES_TABLE: make_table(stack(boxes_rows)),
                                     MASKS_TABLE: make_table(stack(masks_rows)),
                                     LABEL_POINTS_TABLE: make_table(stack(points_rows))},
                             commit_table=LABEL_POINTS_TABLE)
    write_errors(root, STAGE, job_id, shard, errors)
    return {k: [s[k] for s in summaries] for k in summaries[0]} if summaries else {}


def check_label_config(cfg: LabelConfig) -> None:
    if cfg.backend in ("hf-zero-shot", "hf-vlm"):
        if not cfg.model_path:
            raise ConfigError(f"label.backend={cfg.backend} needs label.model_path (a local model "
                              "directory); the offline default is label.backend=oracle")
        if not (Path(cfg.model_path).expanduser() / "config.json").is_file():
            example = ("google/owlv2-base-patch16-ensemble" if cfg.backend == "hf-zero-shot"
                       else "Qwen/Qwen2.5-VL-7B-Instruct")
            raise ConfigError(
                f"label.model_path={cfg.model_path}: no model there (expected a directory with "
                "config.json). Download one on a machine with network access, e.g. `hf download "
                f"{example} --local-dir DIR`, then --set label.model_path=DIR")
    if cfg.backend == "openai" and cfg.json_frame == "model":
        raise ConfigError("label.json_frame=model needs the model's processor, which only hf-vlm "
                          "has; for an endpoint use view (absolute pixels) or norm1000")
    if cfg.backend == "openai":
        missing = [k for k in ("base_url", "model") if not getattr(cfg, k)]
        if missing:
            raise ConfigError(f"label.backend=openai needs {' and '.join('label.' + k for k in missing)}")


def add_label_stages(ds: ray.data.Dataset, config: PartliftConfig,
                     job_id: str) -> ray.data.Dataset:
    """Grounding (actor pool) and aggregation + write (tasks) after a stream of asset rows."""
    cfg, storage = config.label, config.storage.options()
    ds = ds.map_batches(GroundingActor, fn_constructor_kwargs={
                            "cfg": cfg, "root_uri": config.root, "storage": storage,
                            "job_id": job_id},
                        batch_format="numpy", **map_batches_args(cfg.grounding, actors=True))
    return ds.map_batches(aggregate_write_batch, fn_kwargs={
                              "root_uri": config.root, "storage": storage,
                              "settings": cfg.settings(), "job_id": job_id},
                          batch_format="numpy", **map_batches_args(cfg.aggregate, actors=False))


def run_label(config: PartliftConfig) -> StageReport:
    check_label_config(config.label)

    def units(root: RunRoot, summaries: list[dict]) -> dict[str, int]:
        labels = root.read_table(LABEL_POINTS_TABLE, columns=["asset_id"])
        return {"part labels (all runs)": 0 if labels is None else labels.num_rows}

    return run_rendered_stage(
        config, LABEL_OUTPUT, add_label_stages, config.label.aggregate,
        record_dir="labels", inputs={"backend": config.label.backend},
        units=units)
