"""The affordance protocol of `partlift eval --benchmark affordance`: CAST models scored with the
PIAD/LASO per-point metrics (aIoU, AUC, SIM, MAE; operators/metrics/affordance.py) on the
(asset, function) samples of the models' validation assets ("seen" categories) and held-out
categories ("unseen"), prompted by text (the question phrasing), an image exemplar of the
function from the model's training assets, or both; against uniform random scores (chance).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from operators.metrics.affordance import affordance_metrics
from operators.store.readers import RootReader
from operators.store.storage import RunRoot
from training.affordance_data import (QUESTION, PointInputs, Sample, asset_samples,
                                      cached_assets, fill_inputs, gt_target, label_functions,
                                      prompt_texts, pseudo_target)
from training.splits import assign_splits

METRICS = ("aiou", "auc", "sim", "mae")
PROMPTS = ("text", "image", "both")


def eval_samples(root: RunRoot, split_settings: tuple[float, list[str], int], limit: int,
                 seed: int) -> dict[str, list[tuple[Sample, str]]]:
    """split -> up to `limit` (sample, truth) pairs drawn with `seed`: procedural ground truth
    where the asset has parts, else its pseudo-labels."""
    reader = RootReader(root)
    manifest = {r["asset_id"]: r for r in reader.manifest()}
    fraction, holdout, salt = split_settings
    splits = assign_splits({a: r["category"] for a, r in manifest.items()}, fraction, holdout,
                           salt)
    out = {}
    for split, label in (("val", "seen"), ("holdout", "unseen")):
        found = []
        for asset_id in sorted(a for a, s in splits.items() if s == split):
            row = manifest[asset_id]
            procedural = bool(row.get("part_names"))
            functions = None if procedural else label_functions(reader, asset_id)
            truth = "gt" if procedural else "pseudo"
            found += [(s, truth) for s in asset_samples(row, functions)]
        if found:
            order = np.random.default_rng(seed).permutation(len(found))[:limit]
            out[label] = [found[i] for i in sorted(order)]
    return out


def evaluate_cast(root: RunRoot, models: dict[str, Any], samples: dict[str, list],
                  seed: int) -> dict[str, dict[str, dict[str, float]]]:
    """{row: {"<split> <prompt>": metrics}} for chance and every model (a TrainedCast)."""
    reader = RootReader(root)
    manifest = {r["asset_id"]: r for r in reader.manifest()}
    results: dict[str, dict[str, dict[str, float]]] = {"chance": {}}
    for label, model in models.items():
        cache = model.record["point_cache"]
        missing = sorted({s.asset_id for rows in samples.values() for s, _ in rows}
                         - cached_assets(root, cache))
        if missing:  # assets added after the run: their inputs, made the same way
            fill_inputs(root, cache, missing, model.points)
        inputs = PointInputs(root, cache)
        results[label] = {}
        for split, rows in samples.items():
            xyz = np.stack([np.asarray(inputs(s.asset_id)["xyz"]) for s, _ in rows])
            truth = np.stack([
                gt_target(inputs(s.asset_id), list(manifest[s.asset_id]["part_names"]), s.parts)
                if kind == "gt" else
                pseudo_target(reader, s.asset_id, inputs(s.asset_id)["point_index"], s.function)
                for s, kind in rows])
            if split not in {k.split()[0] for k in results["chance"]}:
                rng = np.random.default_rng(seed)
                chance = affordance_metrics(rng.random(truth.shape), truth)
                results["chance"][f"{split} any"] = {k: float(chance[k]) for k in METRICS}
            text = model.embed([prompt_texts(s.category, s.function, s.parts)[QUESTION]
                                for s, _ in rows])
            exemplars = [model.exemplar(s.function, seed) for s, _ in rows]
            has_image = np.asarray([e is not None for e in exemplars])
            dim = model.exemplars.shape[1]
            image = np.stack([e if e is not None else np.zeros(dim, np.float32)
                              for e in exemplars])
            for prompt in PROMPTS:
                if prompt != "text" and not has_image.any():
                    continue
                keep = np.ones(len(rows), bool) if prompt == "text" else has_image
                predicted = model.predict(xyz[keep], None if prompt == "image" else text[keep],
                                          None if prompt == "text" else image[keep])
                scores = affordance_metrics(predicted, truth[keep])
                results[label][f"{split} {prompt}"] = {k: float(scores[k]) for k in METRICS} | {
                    "n_samples": int(keep.sum())}
    return results


def markdown_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """One row per (model, prompt); columns: each split's aIoU / AUC / SIM / MAE in percent."""
    splits = sorted({key.split()[0] for rows in results.values() for key in rows},
                    key=lambda s: ("seen", "unseen").index(s))
    header = "| model | prompt | " + " | ".join(f"{s} {m.upper()}" for s in splits
                                                for m in METRICS) + " |"
    lines = [header, "|" + "---|" * (2 + len(splits) * len(METRICS))]
    for label, rows in results.items():
        prompts = ["any"] if label == "chance" else PROMPTS
        for prompt in prompts:
            cells = []
            for split in splits:
                found = rows.get(f"{split} {prompt}")
                cells += [f"{100 * found[m]:.2f}" if found else "-" for m in METRICS]
            if any(c != "-" for c in cells):
                lines.append(f"| {label} | {prompt} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
