"""SOCO's zero-shot protocol (SOCO §4 "Evaluation Setup") for partlift's describers: frozen
dense features, cosine nearest neighbour of each source keypoint's descriptor over the target
image, PCK@alpha with the radius alpha * max(w, h) of the target's box (strict <), per pair,
then per image pair (`per_img`, the paper's main number) and per category then overall.

Describers are `training.evaluation`'s (`raw` = uniform mean of the backbone's last blocks,
`model` = the trained correspondence model conditioned on a function, `chance`). The model is
conditioned on the function of the keypoint's concept where the data's taxonomy maps one
(`operators.benchmarks.soco.concept_functions`); a keypoint without one is described by the raw
features on both sides, and the share of conditioned keypoints is reported.

Images are resized so that their longer side is `image_size` (the paper: 800; the backbone's
own rounding to its patch grid follows); the target is searched at every `stride`-th pixel
centre of the resized image; predictions go back to original pixels before PCK.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from operators.benchmarks.soco import TASK_PAIRS, TASKS, SocoPair, queries
from operators.settings import ConfigError
from operators.metrics.keypoints import pair_pck, pck_summary
from training.evaluation import Describe

# SOCO Table 2 (PCK@0.1, per-img, 800 px): published numbers for scale, not for comparison.
PAPER_ROWS = {"DINOv2-B/14 (paper)": {"CC": 78.9, "SOC": 60.4, "Cross-SOC": 55.0},
              "CLIP (paper)": {"CC": 24.9, "SOC": 16.1, "Cross-SOC": 11.2}}


@dataclass(frozen=True)
class ImageFeatures:
    blocks: np.ndarray           # (n_blocks, h, w, C) float32
    size: tuple[int, int]        # (H, W) of the resized image the features belong to
    scale: float                 # resized / original pixels
    original: tuple[int, int]    # (width, height) of the file, as SOCO's *_imsize


class FeatureCache:
    """Backbone blocks of each image file, computed once (a small LRU)."""

    def __init__(self, blocks_of: Callable[[np.ndarray], np.ndarray], image_size: int,
                 keep: int = 64) -> None:
        self.blocks_of, self.image_size, self.keep = blocks_of, image_size, keep
        self.cache: OrderedDict[str, ImageFeatures] = OrderedDict()

    def __call__(self, path: str) -> ImageFeatures:
        if path in self.cache:
            self.cache.move_to_end(path)
            return self.cache[path]
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            original = rgb.size
            scale = self.image_size / max(rgb.size)
            size = (max(1, round(rgb.size[0] * scale)), max(1, round(rgb.size[1] * scale)))
            if size != rgb.size:
                rgb = rgb.resize(size, Image.BICUBIC)
            array = np.asarray(rgb, np.uint8)
        found = ImageFeatures(self.blocks_of(array[None])[0], array.shape[:2], scale, original)
        self.cache[path] = found
        if len(self.cache) > self.keep:
            self.cache.popitem(last=False)
        return found


def search_grid(size: tuple[int, int], stride: int) -> np.ndarray:
    """Pixel centres (n, 2) [u, v] of every `stride`-th row and column of an (H, W) image."""
    height, width = size
    us = np.arange(0, width, stride) + 0.5
    vs = np.arange(0, height, stride) + 0.5
    grid = np.stack(np.meshgrid(us, vs), axis=-1).reshape(-1, 2)
    return grid.astype(np.float32)


@dataclass(frozen=True)
class Predictor:
    """A describer for conditioned keypoints, and the raw fallback for the others."""

    describe: Describe
    fallback: Describe
    functions: dict[str, str]    # concept -> function (empty: no conditioning)


def predict_pair(predictor: Predictor, pair: SocoPair, task: str, features: FeatureCache,
                 stride: int, described: dict | None = None
                 ) -> tuple[np.ndarray, list[np.ndarray], int]:
    """Predicted target positions (K, 2) in original pixels for the task's K queries, their
    candidate lists, and how many were conditioned on a function. `described` keeps the
    target's descriptors per function across the tasks of one pair (CC and SOC search the
    same target)."""
    asked = queries(pair, task)
    src = features(str(pair.source.image))
    trg = features(str(pair.target.image))
    for view, found in ((pair.source, src), (pair.target, trg)):
        if found.original != view.size:  # keypoints are in the annotated image's pixels
            raise ConfigError(f"soco: {pair.path}: {view.image} is {found.original[0]}x"
                              f"{found.original[1]} pixels, its *_imsize says {view.size[0]}x"
                              f"{view.size[1]}: the keypoints would land elsewhere")
    grid = search_grid(trg.size, stride)
    by_function: dict[str | None, list[int]] = defaultdict(list)
    for k, query in enumerate(asked):
        by_function[predictor.functions.get(query.concept or "")].append(k)
    predicted = np.zeros((len(asked), 2))
    keys = (str(pair.source.image), str(pair.target.image))
    for function, members in by_function.items():
        describe = predictor.describe if function is not None else predictor.fallback
        uv = np.asarray([asked[k].source for k in members], np.float32) * src.scale
        d_src, _ = describe(src.blocks, uv, src.size, function or "", keys[0])
        slot = (id(describe), keys[1], function)
        if described is None or slot not in described:
            d_trg, _ = describe(trg.blocks, grid, trg.size, function or "", keys[1])
            if described is not None:
                described[slot] = d_trg
        d_trg = described[slot] if described is not None else d_trg
        best = np.argmax(d_src @ d_trg.T, axis=1)
        predicted[members] = grid[best] / trg.scale
    conditioned = sum(len(m) for f, m in by_function.items() if f is not None)
    return predicted, [q.candidates for q in asked], conditioned


@dataclass(frozen=True)
class SocoResult:
    summary: dict[str, dict[str, object]]   # task -> pck_summary (+ pairs, keypoints)
    conditioned: float                      # share of keypoints described with a function
    predictions: dict[str, list[np.ndarray]]  # task -> per pair predictions (for pictures)


def evaluate_soco(predictors: dict[str, Predictor], pairs: dict[str, list[SocoPair]],
                  features: FeatureCache, alpha: float, stride: int,
                  progress: Callable[[str], None] = print) -> dict[str, SocoResult]:
    """Every task whose pair type is present (CC and SOC on intra pairs, Cross-SOC on cross),
    for every predictor; pair by pair, so each image's features are computed once for all."""
    rows: dict[str, dict[str, list[tuple[str, float]]]] = {n: {} for n in predictors}
    kept: dict[str, dict[str, list[np.ndarray]]] = {n: {} for n in predictors}
    counts = {n: [0, 0] for n in predictors}          # keypoints, conditioned
    keypoints: dict[str, int] = {}
    tasks_of = {kind: [t for t in TASKS if TASK_PAIRS[t] == kind] for kind in TASK_PAIRS.values()}
    for pair_type, tasks in tasks_of.items():
        # one `described` dict per pair (`[{}]` is evaluated anew for each p), shared by its tasks
        for pair, task, described in ((p, t, d) for p in pairs.get(pair_type, [])
                                      for d in [{}] for t in tasks):
            asked = bool(queries(pair, task))
            for name, predictor in predictors.items():
                if not asked:
                    kept[name].setdefault(task, []).append(np.zeros((0, 2)))
                    continue
                predicted, candidates, n_conditioned = predict_pair(
                    predictor, pair, task, features, stride, described)
                rows[name].setdefault(task, []).append(
                    (pair.group, pair_pck(predicted, candidates, pair.target.bbox, alpha)))
                kept[name].setdefault(task, []).append(predicted)
                counts[name][0] += len(predicted)
                counts[name][1] += n_conditioned
            if asked:
                keypoints[task] = keypoints.get(task, 0) + len(queries(pair, task))
    results = {}
    for name in predictors:
        summary: dict[str, dict[str, object]] = {}
        for task, found in rows[name].items():
            summary[task] = dict(pck_summary(found)) | {"pairs": len(found),
                                                        "keypoints": keypoints[task]}
        progress(f"{name}: " + ", ".join(f"{t} {v['per_img']:.1f}" for t, v in summary.items())
                 + f" (PCK@{alpha:g}, per-img)")
        total, conditioned = counts[name]
        results[name] = SocoResult(summary, conditioned / total if total else 0.0, kept[name])
    return results


def markdown_table(results: dict[str, SocoResult], alpha: float) -> str:
    """SOCO Table 2's shape: CC | SOC | Cross-SOC | Avg (PCK@alpha per-img, percent), then
    the per-category overall values; the paper's rows beside them for scale."""
    def cell(value: object) -> str:
        return "–" if value is None else f"{float(value):.1f}"  # type: ignore[arg-type]
    lines = [f"PCK@{alpha:g} per image pair (per-img), percent; `overall` = mean of the "
             "category means.", "",
             "| model | CC | SOC | Cross-SOC | Avg | CC overall | SOC overall | "
             "Cross-SOC overall | conditioned |", "|---|---|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        got = [result.summary.get(t, {}).get("per_img") for t in TASKS]
        present = [float(v) for v in got if v is not None]  # type: ignore[arg-type]
        overall = [result.summary.get(t, {}).get("overall") for t in TASKS]
        lines.append(f"| {name} | " + " | ".join(cell(v) for v in got)
                     + f" | {cell(np.mean(present) if present else None)} | "
                     + " | ".join(cell(v) for v in overall)
                     + f" | {100 * result.conditioned:.0f}% |")
    for name, row in PAPER_ROWS.items():
        values = [row[t] for t in TASKS]
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in values)
                     + f" | {np.mean(values):.1f} | – | – | – | – |")
    lines += ["", "The paper's rows: real photos of 100 categories at 800 px, for scale only."]
    return "\n".join(lines) + "\n"
