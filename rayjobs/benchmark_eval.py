"""`partlift eval --benchmark soco|instructpart`: the seed papers' benchmarks on their public
data (`--data PATH`) or on a procedural stand-in written in the same layout (`--data
procedural`, generated once per settings under `<root>/eval/data/` for a local root, else in a
temporary directory). Each benchmark = a loader (`operators.benchmarks`), predictors and its
metrics (`training.soco_eval`, `training.instructpart_eval`); outputs go to
`<root>/eval/<benchmark>/<name>/`: metrics.json, table.md (the paper's main table's shape, the
paper's rows beside for scale) and a picture of a few predictions, kept apart from the metrics.
Runs in this process (no Ray): the work is a few hundred images.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from operators.settings import ConfigError
from operators.store.commits import settings_hash
from operators.store.storage import RunRoot
from rayjobs.config import EvalJob
from training.runs import default_run_name

PICTURE_ROWS = 4


@dataclass(frozen=True)
class BenchmarkReport:
    name: str
    where: str
    results: dict[str, Any]
    table: str
    seconds: float


# Bumped when a stand-in generator changes what it writes: older stand-ins are not reused.
STANDIN_VERSION = 2  # 2: InstructPart stand-ins keep their 3D source (3d/)


def _standin(root: RunRoot, benchmark: str, settings: Any, write: Any, split: str,
             scratch: Path) -> Path:
    """The stand-in of these settings: written once under a local root's eval/data/ (reused
    after), or into `scratch` (removed after the run) for a remote root."""
    from dataclasses import asdict
    key = {**asdict(settings), "split": split, "version": STANDIN_VERSION}
    folder = f"{benchmark}-procedural-{settings_hash(key)}"
    keep = root.uri.startswith("/")
    out = Path(root.uri) / "eval" / "data" / folder if keep else scratch / folder
    done = out / "_complete.json"
    if not done.exists():
        print(f"eval: writing the procedural {benchmark} stand-in to {out}")
        summary = write(out, settings)
        done.write_text(json.dumps({"settings": key, "summary": str(summary)}))
    else:
        print(f"eval: the procedural {benchmark} stand-in at {out} (made before)")
    return out


def _check_data_settings(section: Any, prefix: str, data: str) -> None:
    """Stand-in settings with real data would be ignored: refuse them, naming them."""
    given = sorted(k for k in section.model_fields_set
                   if k.startswith("standin_") or k == "sigma")
    if data != "procedural" and given:
        raise ConfigError(f"eval: {', '.join(f'{prefix}.{k}' for k in given)} shape(s) the "
                          f"procedural stand-in; with --data {data} they do nothing: drop them")


def _chosen(samples: list[Any], cfg: Any, where: str, what: str) -> list[Any]:
    """The samples of `cfg.categories` (all without), at most `cfg.limit`; none is an error."""
    chosen = [s for s in samples if not cfg.categories or s.object in cfg.categories]
    if not chosen:
        raise ConfigError(f"eval: {where} holds no {what} samples"
                          + (f" of {', '.join(cfg.categories)}" if cfg.categories else ""))
    return chosen[:cfg.limit]


def _model_backbone(config: EvalJob, trained: dict[str, Any]) -> EvalJob:
    """The lift.backbone a model's features need: its name and stride are adopted unless the
    command gives them; given ones that differ (or weights other than the model's) are refused,
    naming the keys. `lift.backbone.model_path` says where the weights are."""
    wanted: dict[str, Any] = {}
    weights: Any = None
    for label, model in trained.items():
        settings = model.record["fingerprints"].get("lift", {}).get("settings", {})
        got = {k: v for k, v in settings.items() if k in ("lift.backbone.name",
                                                          "lift.backbone.stride")}
        if wanted and got != wanted:
            raise ConfigError(f"eval: the models were trained on different backbones ({wanted} "
                              f"vs {label}: {got}); evaluate them separately")
        wanted, weights = got, settings.get("lift.backbone.weights")
    if not wanted:
        return config
    given = config.lift.backbone
    explicit = given.model_fields_set if "backbone" in config.lift.model_fields_set else set()
    adopt = {key.rsplit(".", 1)[1]: value for key, value in wanted.items()
             if key.rsplit(".", 1)[1] not in explicit}
    backbone = given.model_copy(update=adopt)
    asked = backbone.fingerprint("lift.backbone")
    differ = sorted(k for k in wanted if asked.get(k) != wanted[k])
    if weights is not None and asked.get("lift.backbone.weights") != weights:
        differ.append("lift.backbone.weights")  # e.g. no model_path: other (or no) weights
    if differ:
        raise ConfigError("eval: the models were trained on features of " + ", ".join(
            f"{k}={wanted.get(k, weights)!r}" for k in differ) + "; this command gives "
            + ", ".join(f"{k}={asked.get(k)!r}" for k in differ)
            + ": drop those settings (the models' backbone is used) or evaluate the models "
            "separately")
    return config.model_copy(update={"lift": config.lift.model_copy(
        update={"backbone": backbone})})


def _blocks_function(config: EvalJob, n_blocks: int) -> Any:
    from operators.models.backbones import load_backbone
    from operators.models.loading import resolve_device, resolve_dtype
    options = config.lift.backbone
    device = resolve_device(options.device)
    backbone = load_backbone(options.name, options.model_path, device=device,
                             dtype=resolve_dtype(options.dtype, device), stride=options.stride,
                             n_last_blocks=1, allow_download=options.allow_download)
    print(f"eval: backbone {backbone.name}"
          + ("" if backbone.pretrained else " (random-tiny: NOT pretrained, a code-path check)"))
    return lambda images: backbone.block_features(images, n_blocks)


def _load_models(root: RunRoot, models: list[str], checkpoint: str, need_mask: bool,
                 cast: bool = False) -> dict[str, Any]:
    """Correspondence runs (with a mask head when `need_mask`) and, with `cast`, CAST runs."""
    from rayjobs.eval_job import split_label
    from training.cmat import TrainedCast
    from training.runs import TrainedModel, load_model
    trained: dict[str, Any] = {}
    for given in models:
        label, ref = split_label(given)
        model = load_model(root, ref, checkpoint if checkpoint in ("best", "last")
                           else int(checkpoint))
        if cast and isinstance(model, TrainedCast):
            label = label or model.record["name"]
            if label in trained:
                raise ConfigError(f"eval: two rows would be named {label!r}: --model "
                                  "LABEL=KIND/NAME")
            trained[label] = model
            continue
        if not isinstance(model, TrainedModel):
            raise ConfigError(f"eval: --model {ref} is not a correspondence run (train/NAME)"
                              + (" or a CAST run (finetune/NAME)" if cast else "")
                              + f"; --benchmark {'instructpart' if cast else 'soco'} "
                              "evaluates those")
        if need_mask and model.model.mask_head is None:
            raise ConfigError(f"eval: --model {ref} has no mask head (train.mask_head=false): "
                              "InstructPart needs one to predict masks")
        label = label or model.record["name"]
        if label in trained:
            raise ConfigError(f"eval: two rows would be named {label!r}: --model LABEL=KIND/NAME")
        trained[label] = model
    return trained


def _write(root: RunRoot, benchmark: str, name: str, record: dict[str, Any], table: str,
           picture: bytes, picture_name: str, tic: float) -> BenchmarkReport:
    where = f"eval/{benchmark}/{name}"
    root.write_json(f"{where}/metrics.json", record)
    root.write_bytes(f"{where}/table.md", table.encode())
    root.write_bytes(f"{where}/{picture_name}", picture)
    seconds = time.perf_counter() - tic
    kept = [f for f in ("predictions.json", "predictions.npz") if root.exists(f"{where}/{f}")]
    print(f"\neval finished in {seconds:.1f} s: {root.display(where)}/ (metrics.json, table.md, "
          f"{', '.join([picture_name, *kept])})\n")
    print(table)
    return BenchmarkReport(name, root.display(where), record["results"], table, seconds)


# ------------------------------------------------------------------------------------ SOCO


def run_soco(config: EvalJob, root: RunRoot, data: str, models: list[str], checkpoint: str,
             name: str | None, tic: float, scratch: Path) -> BenchmarkReport:
    from operators.benchmarks.soco import concept_functions, load_pairs, load_taxonomy
    from operators.benchmarks.soco_standin import StandinSettings, write_standin
    from training.evaluation import chance_describer, model_describer, raw_describer
    from operators.benchmarks.soco import TASK_PAIRS
    from training.soco_eval import FeatureCache, Predictor, evaluate_soco, markdown_table
    cfg = config.soco
    _check_data_settings(cfg, "soco", data)
    trained = _load_models(root, models, checkpoint, need_mask=False)
    config = _model_backbone(config, trained)
    if data == "procedural":
        from operators.data.procedural import PROCEDURAL_CATEGORIES
        settings = StandinSettings(categories=tuple(cfg.categories) or PROCEDURAL_CATEGORIES,
                                   assets_per_category=cfg.standin_assets,
                                   views=cfg.standin_views, pairs_per_group=cfg.standin_pairs,
                                   seed=config.eval.seed)
        folder = _standin(root, "soco", settings, write_standin, "intra+cross", scratch)
    else:
        folder = Path(data).expanduser()
    pairs = {t: load_pairs(folder, t, cfg.pairs_per_group) for t in ("intra", "cross")
             if (folder / "PairAnnotations" / t).is_dir()}
    if cfg.categories:  # both images' categories among them
        pairs = {t: [p for p in found if {p.source.category, p.target.category}
                     <= set(cfg.categories)] for t, found in pairs.items()}
    if not any(pairs.values()):
        raise ConfigError(f"eval: {folder} holds no SOCO pairs (PairAnnotations/intra or cross "
                          "is empty or missing)")
    taxonomy = load_taxonomy(folder)
    n_blocks = max([3] + [int(m.model.block_logits.numel()) for m in trained.values()])
    features = FeatureCache(_blocks_function(config, n_blocks), cfg.image_size)
    raw = raw_describer()
    predictors = {"chance": Predictor(chance_describer(config.eval.seed),
                                      chance_describer(config.eval.seed), {}),
                  f"raw features ({config.lift.backbone.name})": Predictor(raw, raw, {})}
    for label, model in trained.items():
        mapping = concept_functions(taxonomy, set(model.functions))
        predictors[label] = Predictor(model_describer(model.model, model.text_of), raw, mapping)
    print("eval: soco on " + ", ".join(f"{len(v)} {k} pairs" for k, v in pairs.items())
          + f" from {folder}, {len(predictors)} predictors")
    results = evaluate_soco(predictors, pairs, features, cfg.alpha, cfg.search_stride,
                            progress=lambda line: print(f"eval: {line}"))
    table = markdown_table(results, cfg.alpha)
    name = name or default_run_name("soco", {"models": models, "data": data,
                                             "soco": cfg.model_dump()})
    last = list(results)[-1]
    record = {"benchmark": "soco", "data": str(folder), "models": models,
              "checkpoint": checkpoint, "backbone": config.lift.backbone.name,
              "soco": cfg.model_dump(), "pairs": {k: len(v) for k, v in pairs.items()},
              "results": {n: {"tasks": r.summary, "conditioned": r.conditioned}
                          for n, r in results.items()},
              "notes": {"pck": "percent; per_img = mean over pairs (the paper's number), "
                               "overall = mean of per-category means; strict < radius",
                        "conditioned": "share of keypoints whose concept maps to a function "
                                       "the model knows (the rest use raw features)"}}
    predictions = {n: {task: {str(pair.path.relative_to(folder)): guess.round(2).tolist()
                              for pair, guess in zip(pairs[TASK_PAIRS[task]], found)}
                       for task, found in r.predictions.items()} for n, r in results.items()}
    root.write_bytes(f"eval/soco/{name}/predictions.json",
                     json.dumps(predictions, indent=0).encode())
    intra = pairs.get("intra") or pairs.get("cross") or []
    task = "SOC" if pairs.get("intra") else "Cross-SOC"
    picture = soco_picture(intra[:PICTURE_ROWS], results[last].predictions[task][:PICTURE_ROWS],
                           task, cfg.alpha)
    return _write(root, "soco", name, record, table, picture, "pairs.png", tic)


def _paste(sheet: Image.Image, picture: Image.Image, column: int, row: int, size: int) -> None:
    """A picture scaled to fit a size x size cell of the sheet."""
    scale = size / max(picture.size)
    sheet.paste(picture.resize((round(picture.size[0] * scale), round(picture.size[1] * scale))),
                (column * size, row * size))


def _png(sheet: Image.Image) -> bytes:
    out = io.BytesIO()
    sheet.save(out, format="PNG")
    return out.getvalue()


def soco_picture(pairs: list[Any], predictions: list[np.ndarray], task: str,
                 alpha: float) -> bytes:
    """Per pair: source keypoints (dots) and, on the target, the predictions (rings) with a
    line to the true target (crosses); green = within the PCK radius."""
    from operators.benchmarks.soco import queries
    from operators.metrics.keypoints import pck_radius
    size = 224
    sheet = Image.new("RGB", (2 * size, max(1, len(pairs)) * size), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (pair, predicted) in enumerate(zip(pairs, predictions)):
        top = row * size
        scales = []
        for column, view in enumerate((pair.source, pair.target)):
            with Image.open(view.image) as image:
                scale = size / max(image.size)
                sheet.paste(image.convert("RGB").resize(
                    (round(image.size[0] * scale), round(image.size[1] * scale))),
                    (column * size, top))
            scales.append(scale)
        radius = pck_radius(pair.target.bbox, alpha)
        for query, guess in zip(queries(pair, task), predicted):
            sx, sy = (v * scales[0] for v in query.source)
            gx, gy = (v * scales[1] for v in guess)
            tx, ty = (v * scales[1] for v in query.candidates[0])
            hit = bool((np.linalg.norm(query.candidates - guess, axis=1) < radius).any())
            colour = (30, 160, 60) if hit else (210, 40, 40)
            draw.ellipse([sx - 3, top + sy - 3, sx + 3, top + sy + 3], fill=colour)
            draw.ellipse([size + gx - 5, top + gy - 5, size + gx + 5, top + gy + 5],
                         outline=colour, width=2)
            draw.line([size + gx, top + gy, size + tx, top + ty], fill=colour)
        draw.text((4, top + 2), f"{pair.group} {task}", fill=(0, 0, 0))
    out = io.BytesIO()
    sheet.save(out, format="PNG")
    return out.getvalue()


# ----------------------------------------------------------------------------- InstructPart


def run_instructpart(config: EvalJob, root: RunRoot, data: str, models: list[str],
                     checkpoint: str, name: str | None, tic: float, scratch: Path) -> BenchmarkReport:
    from operators.benchmarks.instructpart import StandinSettings, load_samples, write_standin
    from operators.data.taxonomy import load_taxonomy
    import torch.nn.functional as F

    from operators.models.backbones import load_text_encoder
    from operators.models.registry import OracleOptions
    from training.evaluation import model_describer
    from training.instructpart_eval import (Routing, box_predictor, evaluate_parts,
                                            markdown_table, mask_head_predictor,
                                            object_predictor)
    cfg = config.instructpart
    _check_data_settings(cfg, "instructpart", data)
    from training.cmat import TrainedCast
    from training.instructpart_eval import cast_predictor
    loaded = _load_models(root, models, checkpoint, need_mask=True, cast=True)
    casts = {n: m for n, m in loaded.items() if isinstance(m, TrainedCast)}
    trained = {n: m for n, m in loaded.items() if n not in casts}
    config = _model_backbone(config, trained)
    if data == "procedural":
        settings = StandinSettings(categories=tuple(cfg.categories),
                                   assets_per_category=cfg.standin_assets, seed=config.eval.seed)
        folder = _standin(root, "instructpart", settings,
                          lambda out, s: write_standin(out, s, split=cfg.split), cfg.split,
                          scratch)
    else:
        folder = Path(data).expanduser()
    samples = _chosen(load_samples(folder, cfg.split), cfg, f"{folder}/{cfg.split}",
                      "InstructPart")
    predictors: dict[str, Any] = {"object mask": object_predictor()}
    backends = ["oracle"] + ([config.label.backend.name]
                             if config.label.backend.name != "oracle" else [])
    for backend_name in backends:
        options = (config.label.backend if backend_name == config.label.backend.name
                   else OracleOptions())
        backend = options.build(device="cpu", seed=config.label.seed)
        label = ("oracle boxes (ground truth + noise)" if backend_name == "oracle"
                 else f"{backend_name} boxes")
        predictors[label] = box_predictor(backend)
    routed: dict[str, dict[str, list[bool]]] = {}
    by_part = {(c, p.name): p.functions[0] for c, category in load_taxonomy().categories.items()
               for p in category.parts.values() if p.functions}
    blocks_of = (_blocks_function(config, max(int(m.model.block_logits.numel())
                                               for m in trained.values()))
                 if trained else None)
    for label, model in trained.items():
        options = model.record.get("config", {}).get("train.text_encoder") or {}
        encoder = load_text_encoder(model.record.get("text_encoder", "minilm-text"),
                                    options.get("model_path"),
                                    allow_download=bool(options.get("allow_download", False)))
        text = F.normalize(model.text.float(), dim=-1)
        routing = Routing(list(model.functions), text, encoder.embed, by_part)
        routed[label] = {}
        predictors[f"{label} mask head"] = mask_head_predictor(
            model_describer(model.model, model.text_of), blocks_of, routing, routed[label],
            cfg.image_size, cfg.mask_stride)
    for label, model in casts.items():
        if any(sample.asset is None for sample in samples):
            raise ConfigError(f"eval: --model {label} is a CAST run: it scores the 3D asset "
                              f"behind each image, which {folder} does not have (only "
                              "--data procedural does)")
        predictors[f"{label} (CAST)"] = cast_predictor(model)
    print(f"eval: instructpart on {len(samples)} samples from {folder}/{cfg.split}, "
          f"{len(predictors)} predictors")
    results = {}
    for label, predictor in predictors.items():
        key = label.removesuffix(" mask head")
        results[label] = evaluate_parts(predictor, samples, cfg.instruction, routed.get(key))
        print(f"eval: {label}: ORPS gIoU {results[label].metrics['ORPS']['gIoU']:.1f}, "
              f"TRPS gIoU {results[label].metrics['TRPS']['gIoU']:.1f}")
    table = markdown_table(results)
    name = name or default_run_name("instructpart", {"models": models, "data": data,
                                                     "instructpart": cfg.model_dump(),
                                                     "backend": config.label.backend.name})
    record = {"benchmark": "instructpart", "data": str(folder), "models": models,
              "checkpoint": checkpoint, "instructpart": cfg.model_dump(),
              "samples": len(samples),
              "results": {n: {"tasks": r.metrics, "routed_to_affordance": r.routing}
                          for n, r in results.items()},
              "notes": {"metrics": "percent; P@t counts IoU > t",
                        "oracle": "boxes of the ground-truth masks with the label stage's "
                                  "noise: an upper bound of the box -> mask step"}}
    packed = io.BytesIO()  # every predicted mask, bit-packed: <predictor>/<task>/<sample key>
    np.savez_compressed(packed, **{f"{n}/{task}/{sample.key}": np.packbits(mask)
                                   for n, r in results.items() for task, masks in r.masks.items()
                                   for sample, mask in zip(samples, masks)})
    root.write_bytes(f"eval/instructpart/{name}/predictions.npz", packed.getvalue())
    last = list(results)[-1]
    picture = parts_picture(samples[:PICTURE_ROWS], results[last].masks)
    return _write(root, "instructpart", name, record, table, picture, "masks.png", tic)


def parts_picture(samples: list[Any], masks: dict[str, list[np.ndarray]]) -> bytes:
    """Per sample: the image with the true mask (green), the ORPS and the TRPS predictions
    (red), each over the image."""
    from operators.benchmarks import read_image
    from operators.benchmarks.instructpart import read_mask
    size = 224
    sheet = Image.new("RGB", (3 * size, max(1, len(samples)) * size), "white")
    draw = ImageDraw.Draw(sheet)
    for row, sample in enumerate(samples):
        image = read_image(sample.image)
        shown = [read_mask(sample.mask, image.shape[:2]), masks["ORPS"][row],
                 masks["TRPS"][row]]
        for column, mask in enumerate(shown):
            tinted = image.copy()
            colour = np.array([40, 200, 60] if column == 0 else [220, 40, 40])
            tinted[mask] = (0.45 * tinted[mask] + 0.55 * colour).astype(np.uint8)
            _paste(sheet, Image.fromarray(tinted), column, row, size)
        draw.text((4, row * size + 2), f"{sample.object}: {sample.part}", fill=(0, 0, 0))
    return _png(sheet)


# ----------------------------------------------------------------------------------- AGD20K


def run_agd20k(config: EvalJob, root: RunRoot, data: str, models: list[str], checkpoint: str,
               name: str | None, tic: float, scratch: Path) -> BenchmarkReport:
    from operators.benchmarks.agd20k import StandinSettings, load_samples, write_standin
    from rayjobs.eval_job import split_label
    from training.affordanceclip_train import TrainedAffordanceClip
    from training.agd20k_eval import (affordanceclip_predictor, centre_predictor,
                                      evaluate_heatmaps, markdown_table, uniform_predictor)
    from training.runs import load_model
    cfg = config.agd20k
    _check_data_settings(cfg, "agd20k", data)
    predictors: dict[str, Any] = {"uniform": uniform_predictor(),
                                  "centre prior": centre_predictor()}
    steps = {}
    for given in models:
        label, ref = split_label(given)
        model = load_model(root, ref, checkpoint if checkpoint in ("best", "last")
                           else int(checkpoint))
        if not isinstance(model, TrainedAffordanceClip):
            raise ConfigError(f"eval: --model {ref} is not an AffordanceCLIP run "
                              "(affordanceclip/NAME): --benchmark agd20k scores heat maps")
        clip = model.record["clip"]
        label = label or (f"{model.record['name']} (AffordanceCLIP, "
                          + ("pretrained CLIP)" if clip.get("pretrained")
                             else "random-tiny CLIP: NOT pretrained)"))
        if label in predictors:
            raise ConfigError(f"eval: two rows would be named {label!r}: --model LABEL=KIND/NAME")
        predictors[label] = affordanceclip_predictor(model.model)
        steps[label] = model.step
    if data == "procedural":
        settings = StandinSettings(categories=tuple(cfg.categories),
                                   assets_per_category=cfg.standin_assets, sigma=cfg.sigma,
                                   seed=config.eval.seed)
        folder = _standin(root, "agd20k", settings,
                          lambda out, s: write_standin(out, s, split=cfg.split), cfg.split,
                          scratch)
    else:
        folder = Path(data).expanduser()
    samples = _chosen(load_samples(folder, cfg.split), cfg, f"{folder}/{cfg.split}/testset",
                      "AGD20K")
    print(f"eval: agd20k on {len(samples)} samples from {folder}/{cfg.split}, "
          f"{len(predictors)} predictors")
    results = {}
    for label, predictor in predictors.items():
        results[label] = evaluate_heatmaps(predictor, samples, keep=PICTURE_ROWS)
        m = results[label].metrics
        print(f"eval: {label}: KLD {m['KLD']:.3f}, SIM {m['SIM']:.3f}, NSS {m['NSS']:.3f}")
    table = markdown_table(results, cfg.split)
    name = name or default_run_name("agd20k", {"models": models, "data": data,
                                               "agd20k": cfg.model_dump()})
    record = {"benchmark": "agd20k", "data": str(folder), "models": models,
              "checkpoint": checkpoint, "steps": steps, "agd20k": cfg.model_dump(),
              "samples": len(samples),
              "results": {n: r.metrics for n, r in results.items()},
              "notes": {"metrics": "KLD / SIM / NSS as AGD20K's evaluation code normalises "
                                   "them (operators.metrics.affordance); NSS skips flat maps",
                        "prompts": "the affordance folder name, _ as a space"}}
    packed = io.BytesIO()  # every heat map, float16 thumbnails: <predictor>/<image path>
    np.savez_compressed(packed, **{f"{n}/{sample.image.relative_to(folder)}": small
                                   for n, r in results.items()
                                   for sample, small in zip(samples, r.thumbnails)})
    root.write_bytes(f"eval/agd20k/{name}/predictions.npz", packed.getvalue())
    last = list(results)[-1]
    picture = heat_picture(samples[:PICTURE_ROWS], results[last].maps)
    return _write(root, "agd20k", name, record, table, picture, "heatmaps.png", tic)


def heat_picture(samples: list[Any], maps: list[np.ndarray]) -> bytes:
    """Per sample: the image, the ground-truth heat map and the prediction (red overlays)."""
    from operators.benchmarks.agd20k import read_heatmap
    from operators.benchmarks import read_image
    size = 224
    sheet = Image.new("RGB", (3 * size, max(1, len(samples)) * size), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (sample, heat) in enumerate(zip(samples, maps)):
        image = read_image(sample.image)
        truth = read_heatmap(sample.gt, image.shape[:2])
        for column, overlay in enumerate((None, truth, heat / max(float(heat.max()), 1e-9))):
            shown = image.astype(np.float64)
            if overlay is not None:
                shown = 0.5 * shown + 0.5 * overlay[..., None] * np.array([255.0, 30, 30])
            _paste(sheet, Image.fromarray(shown.clip(0, 255).astype(np.uint8)), column, row,
                   size)
        draw.text((4, row * size + 2), f"{sample.object}: {sample.prompt}", fill=(0, 0, 0))
    return _png(sheet)
