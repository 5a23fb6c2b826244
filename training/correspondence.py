"""Dense functional-correspondence training (DFC §4.2-4.3): everything before and after Ray Train.

`prepare_run` checks the data against the config (before Ray starts: a missing table names the
command that makes it), assigns splits, builds the catalogue, the pair plan, the validation
pairs and the function embeddings, and writes the run record. `train_correspondence` runs the
trainer driver with the loop of `training.loop`.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from operators.settings import ConfigError
from operators.store.commits import settings_hash
from operators.store.integrity import stage_settings
from operators.store.readers import RootReader
from operators.store.storage import RunRoot
from operators.store.tables import (FEATURE_BLOCKS, LABEL_MASKS, LABEL_OUTPUT, LIFT_OUTPUT,
                                    RENDER_OUTPUT)
from training.config import DataSection, EvalSection, TrainSection
from training.evaluation import draw_pairs
from training.loop import LoopSetup, train_loop_per_worker
from training.pairs import AssetScan, NoPairsError, build_catalogue, merge_scans, plan_rows
from training.runs import (RUN_RECORD, TEXT_FILE, ModelRef, checkpoints, read_metric_log,
                           text_bytes)
from training.splits import assign_splits
from training.trainer import Scaling, fit

Progress = Callable[[str], None]
# rows -> their scans in row order, or None to scan them here
Scan = Callable[[list[dict]], "list[AssetScan | None] | None"]


@dataclass
class PreparedRun:
    setup: LoopSetup
    plan: list[dict[str, Any]]
    record: dict[str, Any]
    resumed: bool


def function_text(function: str) -> str:
    """The text a function is embedded from: its name with '-'/'_' as spaces (as released)."""
    return function.replace("-", " ").replace("_", " ")


def data_fingerprints(root: RunRoot, masks: str) -> dict[str, dict[str, Any]]:
    """The settings (and their hash) of the tables a correspondence run reads."""
    outputs = [RENDER_OUTPUT, LIFT_OUTPUT] + ([LABEL_OUTPUT] if masks == "pseudo" else [])
    found = {}
    for output in outputs:
        settings = stage_settings(root, output)
        if settings is not None:
            found[output.stage] = {"hash": settings_hash(settings), "settings": settings}
    return found


def check_fingerprints(recorded: dict[str, dict], current: dict[str, dict], what: str) -> None:
    """Refuse data made with other settings than a run trained on, naming both."""
    for stage, info in recorded.items():
        now = current.get(stage)
        if now is None or now["hash"] != info["hash"]:
            keys = sorted(set(info["settings"]) | set((now or {}).get("settings", {})))
            differ = [f"{k}: {info['settings'].get(k)!r} when trained, "
                      f"{(now or {}).get('settings', {}).get(k)!r} now" for k in keys
                      if info["settings"].get(k) != (now or {}).get("settings", {}).get(k)]
            raise ConfigError(f"{what}: the {stage} tables differ from those the model was "
                              "trained on:\n  " + "\n  ".join(differ or ["(no settings now)"]))


def _augmentation(train: TrainSection, lift: dict[str, Any]) -> str:
    """What background augmentation the run gets (recorded, so no one assumes more)."""
    if not train.augment_backgrounds:
        return "off"
    if train.input == "backbone":
        return "a new background per image and step"
    variants = int(lift.get("lift.background_variants") or 1)
    if variants == 1:
        return "none: the cache holds one background (lift.background_variants=1)"
    return f"one of {variants} cached backgrounds per image"


def _worker_row(row: dict[str, Any], masks: str) -> dict[str, Any]:
    """What a rank needs of a manifest row (it travels in train_loop_config to every worker):
    the part names, and the per-face parts only for ground-truth masks."""
    keep = ("asset_id", "part_names") + (("face_part",) if masks == "gt" else ())
    return {k: row.get(k) for k in keep}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def prepare_run(root: RunRoot, run: str, name: str, train: TrainSection, data: DataSection,
                evaluation: EvalSection, config_record: dict[str, Any],
                backbone: dict[str, Any] | None, progress: Progress = print,
                scan: Scan | None = None) -> PreparedRun:
    """Everything before Ray Train (see the module docstring). `scan` may scan the training
    assets' rows into `AssetScan`s in row order elsewhere (Ray tasks); otherwise (None, or it
    returns None) they are scanned here, one after another."""
    reader = RootReader(root)
    where = root.display()
    lift = stage_settings(root, LIFT_OUTPUT)
    blocks_index = reader.table(FEATURE_BLOCKS).index
    _require(lift is not None and bool(blocks_index),
             f"train: {where} has no features/blocks/ (the trainer's feature cache): run "
             f"`partlift lift --root {root.uri}` (lift.cache_blocks >= {train.n_blocks})")
    cached = int(lift.get("lift.cache_blocks") or 0)
    _require(cached >= train.n_blocks,
             f"train: features/blocks/ under {where} holds {cached} blocks per view, "
             f"train.n_blocks={train.n_blocks}: re-run `partlift lift --root {root.uri} "
             f"--set lift.cache_blocks={train.n_blocks} --overwrite`")
    if backbone is not None:  # the backbone in the loop must be the one the cache was made with
        recorded = {k: v for k, v in lift.items() if k.startswith("lift.backbone.")}
        current = backbone["fingerprint"]
        differ = [f"{k}: {recorded.get(k)!r} in features/, {current.get(k)!r} in lift.backbone"
                  for k in sorted(set(recorded) | set(current)) if recorded.get(k) != current.get(k)]
        _require(not differ, "train: train.input=backbone runs lift.backbone, which is not the "
                 "backbone features/ under " + where + " were lifted with:\n  "
                 + "\n  ".join(differ) + "\nset lift.backbone (and its model_path) to it")
    manifest = {row["asset_id"]: row for row in reader.manifest()}
    _require(bool(manifest), f"train: {where} has no assets: run `partlift assets make --root "
             f"{root.uri}` (or `assets scan`), then render, label and lift")
    categories = {r["category"] for r in manifest.values()}
    unknown = sorted(set(data.holdout_categories) - categories)
    _require(not unknown, f"train: data.holdout_categories names {unknown}, which no asset "
             f"under {where} has; categories: {', '.join(sorted(categories))}")
    sizes = {tuple(reader.views(next(iter(manifest)), ["mask"])["mask"].shape[1:3])}
    _require(all(h == w for h, w in sizes), f"train: the views under {where} are "
             f"{sizes.pop()} (height, width): the DFC protocol's pixel thresholds assume square "
             "images (render.width = render.height)")
    splits = assign_splits({a: r["category"] for a, r in manifest.items()}, data.val_fraction,
                           data.holdout_categories, data.split_seed)
    train_ids = sorted(a for a, s in splits.items() if s == "train")
    val_ids = sorted(a for a, s in splits.items() if s == "val")
    _require(bool(train_ids), f"train: no training assets under {where} "
             f"({len(manifest)} assets, data.val_fraction={data.val_fraction}, "
             f"holdout {data.holdout_categories})")
    missing = [a for a in train_ids + val_ids if a not in blocks_index]
    _require(not missing, f"train: {len(missing)} assets have no features/blocks/ rows (e.g. "
             f"{', '.join(missing[:3])}): run `partlift lift --root {root.uri}`")
    if train.masks == "pseudo":
        labelled = reader.table(LABEL_MASKS).index
        unlabelled = [a for a in train_ids if a not in labelled]
        _require(not unlabelled, f"train: {len(unlabelled)} training assets have no labels/masks/ "
                 f"rows (e.g. {', '.join(unlabelled[:3])}): run `partlift label --root "
                 f"{root.uri}`, or train.masks=gt on procedural assets")
    else:
        no_truth = [a for a in train_ids if not manifest[a].get("face_part")]
        _require(not no_truth, f"train: train.masks=gt needs procedural ground truth; "
                 f"{len(no_truth)} training assets have none (e.g. {', '.join(no_truth[:3])}): "
                 "use train.masks=pseudo")

    progress(f"catalogue: scanning {len(train_ids)} training assets' views and points")
    tic = time.perf_counter()
    rows = [manifest[a] for a in train_ids]
    scans = scan(rows) if scan is not None else None  # e.g. on Ray tasks, after the checks
    if scans is None:
        catalogue = build_catalogue(reader, rows, train.masks,
                                    min_part_pixels=train.min_part_pixels,
                                    min_shared_points=train.min_shared_points)
    else:
        catalogue = merge_scans(scans)
    progress(f"catalogue: {len(catalogue.part_views)} part views, {len(catalogue.shared_views)} "
             f"shared view pairs, {len(catalogue.functions)} functions "
             f"({time.perf_counter() - tic:.1f} s)")
    try:
        plan = plan_rows(catalogue, steps=train.steps, world_size=train.num_workers,
                         functional_pairs=train.functional_pairs,
                         spatial_pairs=train.spatial_pairs, seed=train.seed)
    except NoPairsError as err:
        raise ConfigError(f"train: {err} (under {where}, train.masks={train.masks}); add "
                          "assets with `partlift assets`, or set train.functional_pairs=0 / "
                          "train.spatial_pairs=0") from None
    val_pairs = draw_pairs(reader, [manifest[a] for a in val_ids], n_pairs=train.val_pairs,
                           seed=evaluation.seed, max_gt_points=evaluation.max_gt_points,
                           pixel_stride=evaluation.pixel_stride,
                           min_part_pixels=train.min_part_pixels,
                           functions=set(catalogue.functions))
    _require(bool(val_pairs), f"train: validation needs two validation assets with part frames "
             f"sharing a function the training assets show; the {len(val_ids)} validation "
             f"assets under {where} have none: raise data.val_fraction or add procedural assets "
             f"(`partlift assets make --root {root.uri} --n N`, then render, label, lift)")

    from operators.models.backbones import load_text_encoder
    options = train.text_encoder
    encoder = load_text_encoder(options.name, options.model_path,
                                allow_download=options.allow_download)
    text = encoder.embed([function_text(f) for f in catalogue.functions])
    blocks_shape = reader.view_blocks(train_ids[0]).shape  # (V, n, h, w, C)
    model = {"feature_dim": int(blocks_shape[-1]), "text_dim": int(text.shape[1]),
             "n_blocks": train.n_blocks, "proj_dim": train.proj_dim,
             "hidden_dim": train.hidden_dim, "out_dim": train.out_dim,
             "mask_head": train.mask_head}
    fingerprints = data_fingerprints(root, train.masks)
    record = {"kind": "train", "name": name, "model_kind": "dense-correspondence",
              "config": config_record, "model": model, "functions": catalogue.functions,
              "fingerprints": fingerprints,
              "splits": {"train": len(train_ids), "val": len(val_ids),
                         "holdout": sum(s == "holdout" for s in splits.values())},
              "catalogue": {"part_views": len(catalogue.part_views),
                            "shared_views": len(catalogue.shared_views),
                            "hash": settings_hash(catalogue.to_json())},
              "validation": {"pairs": len(val_pairs), "hash": settings_hash(
                  [[p.asset_1, p.view_1, p.asset_2, p.view_2, p.function] for p in val_pairs])},
              "augmentation": _augmentation(train, lift),
              "text_encoder": options.name}
    progress(f"background augmentation: {record['augmentation']}")
    resumed = root.exists(f"{run}/{RUN_RECORD}")
    if resumed:
        before = root.read_json(f"{run}/{RUN_RECORD}")
        changed = sorted(k for k in set(before["config"]) | set(config_record)
                         if before["config"].get(k) != config_record.get(k))
        _require(not changed, f"train: run {name} exists with other settings ("
                 + ", ".join(f"{k}: {before['config'].get(k)!r} -> {config_record.get(k)!r}"
                             for k in changed)
                 + "): a resume continues the same run; use another --name")
        check_fingerprints(before["fingerprints"], fingerprints, f"train: resuming run {name}")
        for key, what in (("catalogue", "training pairs"), ("validation", "validation pairs")):
            _require(before.get(key, {}).get("hash") == record[key]["hash"],
                     f"train: resuming run {name}: its {what} changed since it started (assets "
                     f"were added or removed under {where}); a resume continues the same plan: "
                     "use another --name")
        record["created"] = before.get("created")
    else:
        record["created"] = dt.datetime.now(dt.timezone.utc).isoformat()
    record["status"] = "running"
    root.write_json(f"{run}/{RUN_RECORD}", record)
    root.write_bytes(f"{run}/{TEXT_FILE}", text_bytes(catalogue.functions, text))
    root.write_json(f"{run}/catalogue.json", catalogue.to_json())
    setup = LoopSetup(root=root, run=run, catalogue=catalogue,
                      manifest={a: _worker_row(manifest[a], train.masks) for a in catalogue.assets},
                      text=text,
                      model=model, train=train.model_dump(mode="json"), val_pairs=val_pairs,
                      backbone=backbone)
    return PreparedRun(setup, plan, record, resumed)


@dataclass(frozen=True)
class TrainReport:
    name: str
    run: str                   # display URI of the run directory
    steps: int
    resumed_from: int
    best_step: int | None
    best_score: float | None
    last_loss: float | None
    seconds: float
    steps_per_s: float


def train_correspondence(prepared: PreparedRun, train: TrainSection,
                         callbacks: list[Any] | None = None) -> TrainReport:
    setup = prepared.setup
    done = checkpoints(ModelRef(setup.root, setup.run)) if prepared.resumed else {}
    resumed_from = max(done, default=0)
    tic = time.perf_counter()
    result = fit(setup.root, setup.run, train_loop_per_worker, {"setup": setup}, prepared.plan,
                 Scaling(train.num_workers, train.use_gpu, train.cpus_per_worker,
                         train.keep_checkpoints, train.max_failures), callbacks)
    seconds = time.perf_counter() - tic
    if result.error is not None:
        raise result.error
    log = read_metric_log(setup.root, setup.run)
    validated = [r for r in log if "val_pck@10" in r and np.isfinite(r["val_pck@10"])]
    best = max(validated, key=lambda r: r["val_pck@10"], default=None)
    record = {**prepared.record, "status": "finished"}
    setup.root.write_json(f"{setup.run}/{RUN_RECORD}", record)
    trained = [r for r in log if r["step"] > resumed_from]
    busy = sum(r["seconds"] for r in trained)
    return TrainReport(record["name"], setup.root.display(setup.run),
                       max((r["step"] for r in log), default=0), resumed_from,
                       best["step"] if best else None, best["val_pck@10"] if best else None,
                       log[-1]["loss"] if log else None, seconds,
                       len(trained) / busy if busy > 0 else 0.0)
