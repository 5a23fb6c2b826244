"""The DFC evaluation protocol (§5.1, Appendix B.1) on procedural assets, and the validation the
trainer runs at every checkpoint (label-transfer PCK@10 on a fixed, seeded set of pairs).

- Pairs: two views of two assets sharing a function, each showing the function's part with at
  least `min_part_pixels` pixels; ground truth from the functional frames
  (`operators.geometry.correspondence`, `operators.metrics.correspondence.ground_truth_matches`).
- Describers: `model` (a trained DenseCorrespondenceModel with its function embeddings),
  `raw` (uniform mean of the cached blocks, L2-normalised: the paper's raw-feature baseline),
  `chance` (random unit descriptors, seeded per image).
- Label transfer both directions, argmax over the target's object pixels (with a mask head:
  predicted mask ∩ object, falling back to the object under 16 px); discovery over the object
  pixels of both images at `pixel_stride`. Metric code: `operators.metrics.correspondence`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from operators.geometry.correspondence import (frame_to_frame, part_mask, part_surface,
                                               pixel_centres)
from operators.metrics.correspondence import (discovery_metrics, discovery_scores,
                                              ground_truth_matches, label_transfer, pck)
from operators.store.readers import RootReader
from training.model import DenseCorrespondenceModel, raw_descriptors

MIN_MASK_PIXELS = 16  # below this a predicted mask is ignored (the release's fallback)
PCK_THRESHOLDS = (23, 15, 10)
DISCOVERY_KS = (23, 15, 10, 5)


@dataclass(frozen=True)
class EvalPair:
    asset_1: str
    view_1: int
    asset_2: str
    view_2: int
    function: str
    same_category: bool
    truth: np.ndarray      # (m, 4) ground-truth pixel pairs [u1, v1, u2, v2]
    objects_1: np.ndarray  # (n1, 2) every object pixel of image 1
    objects_2: np.ndarray  # (n2, 2)
    lattice_1: np.ndarray  # (n1,) bool: on the every-pixel_stride-th row/column lattice
    lattice_2: np.ndarray  # (n2,) bool

    def split(self) -> str:
        return "within" if self.same_category else "across"


def object_pixels(mask: np.ndarray, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Centres (n, 2) of every pixel of the mask, and which of them lie on the
    every-`stride`-th row/column lattice (n,) bool."""
    pixels = pixel_centres(mask)  # row-major, (u, v) = (col + 0.5, row + 0.5)
    cols, rows = pixels[:, 0].astype(np.int64), pixels[:, 1].astype(np.int64)
    return pixels, (rows % stride == 0) & (cols % stride == 0)


def draw_pairs(reader: RootReader, assets: Sequence[dict], *, n_pairs: int, seed: int,
               max_gt_points: int, pixel_stride: int, min_part_pixels: int = 32,
               functions: set[str] | None = None) -> list[EvalPair]:
    """Seeded evaluation pairs among `assets` (manifest rows with part frames), only of
    `functions` when given (those a model was trained on); [] when no function is shown by
    two of them."""
    allowed = functions
    shows: dict[str, list[tuple[int, int, int]]] = defaultdict(list)  # function -> (a, view, part)
    views: list[dict[str, np.ndarray]] = []
    usable = [row for row in assets if len(row.get("part_frames") or ())]
    for a, row in enumerate(usable):
        v = reader.views(row["asset_id"], ["face_id", "depth", "K", "cam_to_world", "mask"])
        views.append(v)
        face_part = np.asarray(row["face_part"], np.int64)
        for p, functions in enumerate(row["part_functions"]):
            if not functions:
                continue
            counts = part_mask(v["face_id"], face_part, [p]).sum(axis=(1, 2))
            for view in np.flatnonzero(counts >= min_part_pixels):
                for function in functions:
                    if allowed is None or function in allowed:
                        shows[function].append((a, int(view), p))
    functions = sorted(f for f, entries in shows.items() if len({e[0] for e in entries}) >= 2)
    if not functions:
        return []
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n_pairs):
        function = functions[rng.integers(len(functions))]
        entries = shows[function]
        first = entries[rng.integers(len(entries))]
        others = [e for e in entries if e[0] != first[0]]
        second = others[rng.integers(len(others))]
        pairs.append(_pair(usable, views, function, first, second, max_gt_points, pixel_stride))
    return pairs


def _pair(rows: Sequence[dict], views: Sequence[dict], function: str, first: tuple[int, int, int],
          second: tuple[int, int, int], max_gt_points: int, pixel_stride: int) -> EvalPair:
    sides = []
    for a, view, part in (first, second):
        v = views[a]
        pixels, surface = part_surface(v["face_id"][view], v["depth"][view], v["K"][view],
                                       v["cam_to_world"][view],
                                       np.asarray(rows[a]["face_part"], np.int64), [part])
        frame = np.asarray(rows[a]["part_frames"], np.float64).reshape(-1, 4, 3)[part]
        sides.append((pixels, surface, frame, object_pixels(np.asarray(v["mask"][view], bool),
                                                            pixel_stride)))
    (pix_1, surf_1, frame_1, obj_1), (pix_2, surf_2, frame_2, obj_2) = sides
    aligned = frame_to_frame(surf_1, frame_1, frame_2)  # asset 1's part onto asset 2's (DFC §3.2)
    truth = ground_truth_matches(pix_1, aligned, pix_2, surf_2, max_points=max_gt_points)
    a1, a2 = rows[first[0]], rows[second[0]]
    return EvalPair(a1["asset_id"], first[1], a2["asset_id"], second[1], function,
                    a1["category"] == a2["category"], truth, obj_1[0], obj_2[0], obj_1[1],
                    obj_2[1])


# ------------------------------------------------------------------------------ describers

# (features of one view, pixels (n, 2), image size, function, image key) -> descriptors (n, D)
# and mask logits (n,) or None
Describe = Callable[[np.ndarray, np.ndarray, tuple[int, int], str, str],
                    tuple[np.ndarray, np.ndarray | None]]


def model_describer(model: DenseCorrespondenceModel, text_of: Callable[[str], torch.Tensor],
                    device: torch.device | str = "cpu", chunk: int = 4096) -> Describe:
    n_blocks = int(model.block_logits.numel())

    @torch.no_grad()
    def describe(features: np.ndarray, uv: np.ndarray, size: tuple[int, int], function: str,
                 key: str) -> tuple[np.ndarray, np.ndarray | None]:
        blocks = torch.as_tensor(np.array(features[-n_blocks:], np.float32), device=device)[None]
        text = text_of(function).to(device)[None]
        out, logits = [], []
        for start in range(0, len(uv), chunk):
            points = torch.as_tensor(np.array(uv[start:start + chunk], np.float32),
                                     device=device)[None]
            d, m = model(blocks, points, size, text)
            out.append(d[0].float().cpu().numpy())
            if m is not None:
                logits.append(m[0].float().cpu().numpy())
        return np.concatenate(out), (np.concatenate(logits) if logits else None)
    return describe


def raw_describer(n_blocks: int = 3) -> Describe:
    """DFC's raw-feature baseline: the uniform mean of the last n blocks, L2-normalised."""
    @torch.no_grad()
    def describe(features: np.ndarray, uv: np.ndarray, size: tuple[int, int], function: str,
                 key: str) -> tuple[np.ndarray, None]:
        blocks = torch.as_tensor(np.array(features[-n_blocks:], np.float32))[None]
        points = torch.as_tensor(np.array(uv, np.float32))[None]
        return raw_descriptors(blocks, points, size)[0].numpy(), None
    return describe


def chance_describer(seed: int, dim: int = 64) -> Describe:
    """Random unit descriptors; the same pixel of the same image always gets the same one."""
    def describe(features: np.ndarray, uv: np.ndarray, size: tuple[int, int], function: str,
                 key: str) -> tuple[np.ndarray, None]:
        rng = np.random.default_rng([seed, *key.encode()])
        table = rng.standard_normal((size[0] * size[1], dim)).astype(np.float32)
        table /= np.linalg.norm(table, axis=1, keepdims=True)
        index = np.floor(uv[:, 1]).astype(np.int64) * size[1] + np.floor(uv[:, 0]).astype(np.int64)
        return table[index], None
    return describe


# ------------------------------------------------------------------------------ scoring


def _transfer(d_src: np.ndarray, d_tgt: np.ndarray, logits: np.ndarray | None,
              candidates: np.ndarray) -> np.ndarray:
    if logits is not None:  # mask head: predicted mask ∩ object unless it is nearly empty
        inside = logits > 0
        if inside.sum() >= MIN_MASK_PIXELS:
            d_tgt, candidates = d_tgt[inside], candidates[inside]
    return label_transfer(d_src @ d_tgt.T, candidates)


def score_pair(describe: Describe, pair: EvalPair, feat_1: np.ndarray, feat_2: np.ndarray,
               size: tuple[int, int], discovery: bool = True,
               lattice_targets: bool = False) -> dict[str, float]:
    """PCK (both directions, pooled) and, with `discovery`, best-F1/AP of one pair.

    Label transfer searches every object pixel of the target (`lattice_targets`: only those on
    the pixel-stride lattice, the cheaper approximation validation uses); discovery runs on the
    lattice pixels of both images."""
    keys = (f"{pair.asset_1}/{pair.view_1}", f"{pair.asset_2}/{pair.view_2}")
    truth = pair.truth
    images = []
    for key, feat, objects, lattice in ((keys[0], feat_1, pair.objects_1, pair.lattice_1),
                                        (keys[1], feat_2, pair.objects_2, pair.lattice_2)):
        pixels = objects[lattice] if lattice_targets else objects
        described, logits = describe(feat, pixels, size, pair.function, key)
        on_lattice = np.ones(len(pixels), bool) if lattice_targets else lattice
        images.append((pixels, described, logits, on_lattice))
    (pix_1, obj_d1, logit_1, lat_1), (pix_2, obj_d2, logit_2, lat_2) = images
    src_1, _ = describe(feat_1, truth[:, :2], size, pair.function, keys[0])
    src_2, _ = describe(feat_2, truth[:, 2:], size, pair.function, keys[1])
    forward = _transfer(src_1, obj_d2, logit_2, pix_2)
    backward = _transfer(src_2, obj_d1, logit_1, pix_1)
    metrics = pck(np.concatenate([forward, backward]), np.concatenate([truth[:, 2:], truth[:, :2]]),
                  size[0], PCK_THRESHOLDS)
    if discovery:
        matches, scores, _ = discovery_scores(obj_d1[lat_1] @ obj_d2[lat_2].T, pix_1[lat_1],
                                              pix_2[lat_2])
        metrics |= discovery_metrics(matches, scores, truth, DISCOVERY_KS, size[0])
    return metrics


def mean_metrics(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean over pairs of each metric (NaN-free pairs only per metric)."""
    keys = sorted({k for r in rows for k in r})
    out = {}
    for k in keys:
        values = np.array([r[k] for r in rows if k in r and np.isfinite(r[k])], np.float64)
        out[k] = float(values.mean()) if values.size else float("nan")
    return out


# ------------------------------------------------------------------------------ benchmark

TABLE_COLUMNS = (("normalized_dist", "Normalized Dist (↓)"), ("pck@23", "PCK@23"),
                 ("pck@15", "PCK@15"), ("pck@10", "PCK@10"), ("best_f1@23", "Best F1@23"),
                 ("best_f1@10", "Best F1@10"), ("ap@23", "AP@23"), ("ap@10", "AP@10"))


@dataclass
class PairFeatures:
    """Reads the two views' features of a pair (cached per asset)."""

    reader: RootReader
    cache: dict[str, np.ndarray]

    def __call__(self, asset_id: str, view: int) -> np.ndarray:
        """(n_blocks, h, w, C) of every cached block; describers take the last ones they use."""
        if asset_id not in self.cache:
            self.cache[asset_id] = np.asarray(self.reader.view_blocks(asset_id))
        return self.cache[asset_id][view]


def evaluate(describers: dict[str, Describe], pair_sets: dict[str, list[EvalPair]],
             features: PairFeatures, size: tuple[int, int],
             progress: Callable[[str], None] = print) -> dict[str, dict[str, dict[str, float]]]:
    """describer -> subset -> mean metrics, subsets: every pair set by name (e.g. val,
    holdout) and, for `val`, its within- and across-category pairs (DFC Table 2)."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, describe in describers.items():
        results[name] = {}
        for set_name, pairs in pair_sets.items():
            rows, splits = [], []
            for pair in pairs:
                rows.append(score_pair(describe, pair, features(pair.asset_1, pair.view_1),
                                       features(pair.asset_2, pair.view_2), size))
                splits.append(pair.split())
            results[name][set_name] = mean_metrics(rows) | {"pairs": float(len(rows))}
            if set_name == "val":
                for split in ("within", "across"):
                    chosen = [r for r, s in zip(rows, splits) if s == split]
                    results[name][f"val-{split}"] = (mean_metrics(chosen)
                                                     | {"pairs": float(len(chosen))})
        progress(f"{name}: PCK@10 {results[name].get('val', {}).get('pck@10', float('nan')):.3f}"
                 f", AP@10 {results[name].get('val', {}).get('ap@10', float('nan')):.3f}")
    return results


def markdown_tables(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """DFC Table 1's shape on the validation pairs, then within/across category (Table 2) and the
    held-out categories as extra columns."""
    def cell(value: float | None) -> str:
        return "-" if value is None or not np.isfinite(value) else f"{value:.3f}"

    lines = ["| Model | " + " | ".join(title for _, title in TABLE_COLUMNS) + " |",
             "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for name, subsets in results.items():
        val = subsets.get("val", {})
        lines.append(f"| {name} | " + " | ".join(cell(val.get(k)) for k, _ in TABLE_COLUMNS)
                     + " |")
    lines += ["", "| Model | PCK@10 within | PCK@10 across | AP@10 within | AP@10 across | "
              "PCK@10 held out | AP@10 held out |", "|---|---|---|---|---|---|---|"]
    for name, subsets in results.items():
        get = lambda subset, key: subsets.get(subset, {}).get(key)  # noqa: E731
        lines.append(f"| {name} | {cell(get('val-within', 'pck@10'))} | "
                     f"{cell(get('val-across', 'pck@10'))} | {cell(get('val-within', 'ap@10'))} | "
                     f"{cell(get('val-across', 'ap@10'))} | {cell(get('holdout', 'pck@10'))} | "
                     f"{cell(get('holdout', 'ap@10'))} |")
    return "\n".join(lines) + "\n"
