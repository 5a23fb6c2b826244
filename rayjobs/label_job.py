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
from pathlib import Path
from collections import defaultdict
from collections.abc import Hashable, Iterable
from typing import Any

import numpy as np
import pyarrow.compute as pc
import ray.data

from operators.grounding import Box, GroundingBackend, OracleBackend, OracleNoise
from operators.label import (GroundTruthParts, LabelSettings, PartPrompt, aggregate_asset,
                             ground_asset, prompts_for)
from operators.storage import RunRoot, StorageOptions, make_table, shard_name, table_columns
from operators.taxonomy import load_taxonomy
from rayjobs.assets_job import ASSETS_TABLE
from rayjobs.config import ConfigError, LabelConfig, PartliftConfig
from rayjobs.render_job import POINTS_TABLE, VIEW_ARRAYS, VIEWS_TABLE
from rayjobs.resources import map_batches_args
from rayjobs.runtime import (ERRORS_TABLE, StageReport, ensure_ray, error_row, finish_stage,
                             new_job_id, seed_for, write_errors)

STAGE = "label"
BOXES_TABLE = "labels/boxes"
LABEL_POINTS_TABLE = "labels/points"
MASKS_TABLE = "labels/masks"
LABEL_TABLES = (BOXES_TABLE, MASKS_TABLE, LABEL_POINTS_TABLE)
# What flows from loading/rendering to grounding and aggregation, one row per asset.
STACKED_COLUMNS = (*VIEW_ARRAYS, "xyz")


def shard_index(root: RunRoot, table: str) -> dict[str, str]:
    """asset_id -> the shard of `table` that holds it (reads only the asset_id column)."""
    index = {}
    for shard in root.list_shards(table):
        for asset_id in set(root.read_shard(table, shard, ["asset_id"])["asset_id"].to_pylist()):
            index[asset_id] = shard
    return index


def _rows_of(table, asset_id: str):
    return table.filter(pc.equal(table["asset_id"], asset_id))


def _group_by(values: Iterable[Hashable]) -> dict[Hashable, list[int]]:
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for i, value in enumerate(values):
        groups[value].append(i)
    return groups


def load_views_batch(batch: dict[str, np.ndarray], root_uri: str, storage: StorageOptions,
                     job_id: str, stage: str = STAGE) -> dict[str, Any]:
    """CPU task: one row per asset with its views stacked (V, ...) and its surface points; each
    views/points shard is read once per batch."""
    root = RunRoot(root_uri, storage)
    rows: list[dict[str, Any]] = []
    errors = []
    for (views_shard, points_shard), members in _group_by(
            zip(batch["views_shard"].tolist(), batch["points_shard"].tolist())).items():
        try:
            views = root.read_shard(VIEWS_TABLE, views_shard, ["asset_id", "view_id", *VIEW_ARRAYS])
            points = root.read_shard(POINTS_TABLE, points_shard, ["asset_id", "xyz"])
        except Exception as err:  # the shard is unreadable: every asset in it fails
            errors += [error_row(stage, job_id, batch["asset_id"][i],
                                 f"shard {views_shard}/{points_shard}: {err}") for i in members]
            continue
        for i in members:
            asset_id = batch["asset_id"][i]
            cols = table_columns(_rows_of(views, asset_id).sort_by("view_id"))
            xyz = table_columns(_rows_of(points, asset_id), ["xyz"])["xyz"][0]
            rows.append(asset_row(batch, i, {**{n: cols[n] for n in VIEW_ARRAYS}, "xyz": xyz}))
    write_errors(root, stage, job_id, shard_name(e["asset_id"] for e in errors) if errors else "",
                 errors)
    return stacked_columns(rows)


def asset_row(batch: dict[str, Any], i: int, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The label stream's row for asset i of a manifest batch."""
    return {"asset_id": str(batch["asset_id"][i]), "category": str(batch["category"][i]),
            "part_names": [str(p) for p in batch["part_names"][i]],
            "face_part": np.asarray(batch["face_part"][i], dtype=np.int16), **arrays}


def stacked_columns(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {}
    return {k: (np.stack([r[k] for r in rows]) if k in STACKED_COLUMNS else [r[k] for r in rows])
            for k in rows[0]}


def build_backend(cfg: LabelConfig, device: str) -> GroundingBackend | None:
    """The model-backed backend (None for oracle, which is built per asset with its seed)."""
    if cfg.backend == "oracle":
        return None
    from operators.grounding_backends import make_backend
    if cfg.backend == "hf-zero-shot":
        return make_backend(cfg.backend, model_path=cfg.model_path, device=device,
                            box_threshold=cfg.box_threshold, text_threshold=cfg.text_threshold)
    if cfg.backend == "hf-vlm":
        return make_backend(cfg.backend, model_path=cfg.model_path, device=device,
                            style=cfg.vlm_style, template=cfg.template or cfg.vlm_style,
                            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            strict=cfg.strict_output)
    return make_backend(cfg.backend, base_url=cfg.base_url, model=cfg.model,
                        api_key_env=cfg.api_key_env, style=cfg.vlm_style,
                        template=cfg.template or cfg.vlm_style, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries,
                        max_concurrency=cfg.max_concurrency, temperature=cfg.temperature,
                        strict=cfg.strict_output)


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


def _job_errors(root: RunRoot, job_id: str) -> list[dict]:
    table = root.read_table(ERRORS_TABLE, columns=["job_id", "asset_id", "error_type", "message"])
    if table is None:
        return []
    return table.filter(pc.equal(table["job_id"], job_id)).to_pylist()


def check_label_config(cfg: LabelConfig) -> None:
    if cfg.backend in ("hf-zero-shot", "hf-vlm"):
        if not cfg.model_path:
            raise ConfigError(f"label.backend={cfg.backend} needs label.model_path (a local model "
                              "directory); the offline default is label.backend=oracle")
        if not (Path(cfg.model_path).expanduser() / "config.json").is_file():
            raise ConfigError(
                f"label.model_path={cfg.model_path}: no model there (expected a directory with "
                "config.json). Download one on a machine with network access, e.g. `hf download "
                "google/owlv2-base-patch16-ensemble --local-dir DIR`, then --set label.model_path=DIR")
    if cfg.backend == "openai" and not (cfg.base_url and cfg.model):
        raise ConfigError("label.backend=openai needs label.base_url and label.model")


def prepare_label_tables(root: RunRoot, overwrite: bool) -> tuple[set[str], list[str]]:
    """Asset ids already labelled, and the uncommitted shards removed (or wipe on overwrite)."""
    if overwrite:
        for table in LABEL_TABLES:
            root.delete_table(table)
        root.delete_shards(ERRORS_TABLE, f"{STAGE}-")
        return set(), []
    removed = root.remove_uncommitted(LABEL_TABLES, LABEL_POINTS_TABLE)
    return root.ids_in(LABEL_POINTS_TABLE), removed


def items_dataset(items: list[dict], batch_size: int) -> ray.data.Dataset:
    return ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // batch_size)))


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


def stream_report(root: RunRoot, stage: str, job_id: str, started: float, summaries: list[dict],
                  input_count: int, skipped: int, inputs: dict[str, str],
                  outputs: dict[str, str], removed: list[str],
                  units: dict[str, int] | None = None) -> StageReport:
    """Report of a stream whose failed rows leave it: ok from the summaries, failures from the
    errors/ rows of this job (every stage of the stream writes its own)."""
    failures = _job_errors(root, job_id)
    types: dict[str, int] = defaultdict(int)
    for f in failures:
        types[f["error_type"]] += 1
    return StageReport(
        stage=stage, job_id=job_id, root=root.display(), inputs=inputs, outputs=outputs,
        started=started, ended=time.time(), input_count=input_count, skipped_done=skipped,
        ok=sum(1 for s in summaries if s["status"] == "ok"),
        failed=len({f["asset_id"] for f in failures}), units=units or {},
        error_types=dict(types),
        error_examples=[f"{f['asset_id']}: {f['message']}" for f in failures[:5]],
        removed_uncommitted=removed)


def manifest_for_labels(root: RunRoot) -> list[dict]:
    manifest = root.read_table(ASSETS_TABLE, columns=["asset_id", "category", "part_names",
                                                      "face_part"])
    return [] if manifest is None else manifest.to_pylist()


def run_label(config: PartliftConfig) -> StageReport:
    check_label_config(config.label)
    root = RunRoot(config.root, config.storage.options())
    root.check_reachable()
    ensure_ray(config.ray)  # before the clock: throughput excludes cluster start-up
    started = time.time()
    job_id = new_job_id(STAGE)
    points_index = shard_index(root, POINTS_TABLE)
    manifest = manifest_for_labels(root)
    if not manifest or not points_index:
        raise FileNotFoundError(f"label: no rendered assets under {root.display(POINTS_TABLE)}/;"
                                " run `partlift render` first")
    views_index = shard_index(root, VIEWS_TABLE)
    done, removed = prepare_label_tables(root, config.job.overwrite)
    rendered = [r for r in manifest if r["asset_id"] in points_index and r["asset_id"] in views_index]
    items = sorted(({**r, "points_shard": points_index[r["asset_id"]],
                     "views_shard": views_index[r["asset_id"]]}
                    for r in rendered if r["asset_id"] not in done),
                   key=lambda r: (r["views_shard"], r["asset_id"]))
    summaries: list[dict] = []
    if items:
        ds = items_dataset(items, config.label.aggregate.batch_size).map_batches(
            load_views_batch, fn_kwargs={"root_uri": config.root,
                                         "storage": config.storage.options(), "job_id": job_id},
            batch_format="numpy", **map_batches_args(config.label.aggregate, actors=False))
        summaries = add_label_stages(ds, config, job_id).take_all()
    n_prompts = root.read_table(LABEL_POINTS_TABLE, columns=["asset_id"])
    report = stream_report(
        root, STAGE, job_id, started, summaries, len(rendered), len(rendered) - len(items),
        inputs={VIEWS_TABLE: root.display(VIEWS_TABLE) + "/",
                POINTS_TABLE: root.display(POINTS_TABLE) + "/", "backend": config.label.backend},
        outputs={t: root.display(t) + "/" for t in LABEL_TABLES}, removed=removed,
        units={"part labels (all runs)": 0 if n_prompts is None else n_prompts.num_rows})
    return finish_stage(root, config, report, "labels")
