"""What CMAT pretraining and CAST read: per-asset point inputs, prompts, targets and batches.

Point inputs (CMAT §3.2): of the points that carry lifted features (`features/points`, e.g.
2048 per asset), `n` (default 1024) by farthest-point sampling from the first point, centred
on their mean and scaled so that the farthest lies on the unit sphere (the render stage turned
every mesh +y up; a scorer must normalise real meshes the same way). They are computed once per
asset and kept under `<root>/cache/points/n<N>-<hash>/<asset_id>.safetensors`, the hash naming
the render and lift settings they come from (new settings, a new folder):

    xyz (n, 3) float32, features (n, C) float16, point_index (n,) int32 into points/,
    part (n,) int16 (procedural part, -1 for scanned assets)

CAST samples are (asset, function) pairs: the asset's points and one function it performs. The
target per point is 1 on the parts that perform it (procedural ground truth) or the
pseudo-label score of labels/points (max over the function's parts). Prompts:
- text, four phrasings per (category, function): the function ("pour with"), a question
  ("which part of the mug do you pour with?"), the part's taxonomy description, and
  "the rim of the mug"; training draws one per sample, validation and evaluation use the
  question;
- image exemplar: the lift stage's patch grid of one rendered view, averaged over the pixels of
  the function's parts (the view showing most of them) - the backbone's pooled patches of
  that part. A training sample's exemplar is another training asset's, for the same function
  (the prompt names a function, not an instance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import load as load_numpy
from safetensors.numpy import save as save_numpy

from operators.data.taxonomy import UnknownNameError, load_taxonomy
from operators.store.commits import settings_hash
from operators.store.integrity import stage_settings
from operators.store.readers import RootReader
from operators.store.storage import RunRoot
from operators.store.tables import LIFT_OUTPUT, RENDER_OUTPUT
from training.point_ops import farthest_point_sample, normalize_unit_sphere

CACHE_DIR = "cache/points"
CACHE_VERSION = 1
QUESTION = 1  # the phrasing validation and evaluation use (index into prompt_texts)


# ------------------------------------------------------------------------- point inputs


def cache_path(root: RunRoot, n_points: int) -> str:
    """The cache folder of `n_points` inputs made from the root's current render and lift."""
    fingerprint = {"version": CACHE_VERSION, "points": n_points}
    for output in (RENDER_OUTPUT, LIFT_OUTPUT):
        settings = stage_settings(root, output)
        fingerprint[output.stage] = settings_hash(settings) if settings is not None else None
    return f"{CACHE_DIR}/n{n_points}-{settings_hash(fingerprint)[:10]}"


def make_inputs(reader: RootReader, asset_id: str, n_points: int) -> dict[str, np.ndarray]:
    """One asset's point inputs (see the module docstring). ValueError when the asset has
    fewer lifted points than `n_points`."""
    lifted = reader.point_features(asset_id)
    have = int(lifted["xyz"].shape[0])
    if have < n_points:
        raise ValueError(f"asset {asset_id} has {have} lifted points in features/points, "
                         f"fewer than pretrain.points={n_points} (raise lift.n_points)")
    xyz = torch.from_numpy(np.array(lifted["xyz"], np.float32))[None]
    chosen = farthest_point_sample(xyz, n_points)[0].numpy()
    unit = normalize_unit_sphere(xyz[:, chosen])[0][0].numpy()
    point_index = lifted["point_index"][chosen].astype(np.int32)
    part = reader.points(asset_id, ["part"])["part"][point_index].astype(np.int16)
    return {"xyz": unit.astype(np.float32), "features": lifted["features"][chosen],
            "point_index": point_index, "part": part}


def inputs_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    return save_numpy({k: np.ascontiguousarray(v) for k, v in arrays.items()})


def cached_assets(root: RunRoot, path: str) -> set[str]:
    return {name.rsplit(".", 1)[0].rsplit("/", 1)[-1]
            for name in root.list_files(path, ".safetensors")} if root.exists(path) else set()


def fill_inputs(root: RunRoot, path: str, asset_ids: list[str], n_points: int) -> list[str]:
    """Compute and store the inputs of `asset_ids` (a CPU task's work); returns their ids."""
    reader = RootReader(root)
    for asset_id in asset_ids:
        try:
            arrays = make_inputs(reader, asset_id, n_points)
        except (OSError, KeyError) as err:
            raise RuntimeError(f"point inputs of asset {asset_id}: {type(err).__name__}: "
                               f"{err}") from err
        root.write_bytes(f"{path}/{asset_id}.safetensors", inputs_bytes(arrays))
    return asset_ids


class PointInputs:
    """Reads cached inputs, keeping the last `keep` assets in memory."""

    def __init__(self, root: RunRoot, path: str, keep: int = 256) -> None:
        self.root, self.path, self.keep = root, path, keep
        self._memory: dict[str, dict[str, np.ndarray]] = {}

    def __call__(self, asset_id: str) -> dict[str, np.ndarray]:
        if asset_id not in self._memory:
            if len(self._memory) >= self.keep:
                self._memory.pop(next(iter(self._memory)))
            data = self.root.read_bytes(f"{self.path}/{asset_id}.safetensors")
            self._memory[asset_id] = load_numpy(data)
        return self._memory[asset_id]


def random_features(asset_id: str, n_points: int, dim: int, seed: int) -> np.ndarray:
    """The teacher ablation's features: i.i.d. Gaussian per point, fixed per (asset, seed)."""
    salt = int(settings_hash({"asset": asset_id, "seed": seed}), 16) % (2 ** 32)
    return np.random.default_rng(salt).standard_normal((n_points, dim)).astype(np.float32)


# ------------------------------------------------------------------------- CAST samples


@dataclass(frozen=True)
class Sample:
    asset_id: str
    category: str
    function: str
    parts: tuple[str, ...]        # the asset's parts that perform the function


def words(function: str) -> str:
    return function.replace("-", " ").replace("_", " ")


def prompt_texts(category: str, function: str, parts: tuple[str, ...]) -> list[str]:
    """The four text phrasings of a sample (see the module docstring), question second."""
    part = parts[0] if parts else "part"
    description = f"the {words(part)} of the {words(category)}"
    try:
        found = load_taxonomy().category(category).parts.get(part)
        if found is not None:
            description = found.description
    except UnknownNameError:
        pass
    return [words(function), f"which part of the {words(category)} do you {words(function)}?",
            description, f"the {words(part)} of the {words(category)}"]


def asset_samples(row: dict[str, Any], label_functions: dict[str, tuple[str, ...]] | None
                  ) -> list[Sample]:
    """The (asset, function) samples of a manifest row: from its procedural parts, or (for
    pseudo-label targets, `label_functions` = function -> parts of labels/points) from its
    pseudo-labels."""
    if label_functions is not None:
        return [Sample(row["asset_id"], row["category"], f, tuple(parts))
                for f, parts in sorted(label_functions.items())]
    by_function: dict[str, list[str]] = {}
    for part, functions in zip(row.get("part_names") or [], row.get("part_functions") or []):
        for function in functions:
            by_function.setdefault(function, []).append(part)
    return [Sample(row["asset_id"], row["category"], f, tuple(p))
            for f, p in sorted(by_function.items())]


def label_functions(reader: RootReader, asset_id: str) -> dict[str, tuple[str, ...]]:
    scores = reader.label_scores(asset_id)
    out: dict[str, list[str]] = {}
    for function, part in zip(scores["function"], scores["part"]):
        out.setdefault(str(function), []).append(str(part))
    return {f: tuple(p) for f, p in out.items()}


def gt_target(inputs: dict[str, np.ndarray], part_names: list[str],
              parts: tuple[str, ...]) -> np.ndarray:
    """1.0 on the points of `parts`, else 0.0 (n,) float32."""
    wanted = [i for i, name in enumerate(part_names) if name in parts]
    return np.isin(inputs["part"], wanted).astype(np.float32)


def pseudo_target(reader: RootReader, asset_id: str, point_index: np.ndarray,
                  function: str) -> np.ndarray:
    """The pseudo-label score of `function` at the points (max over its parts), (n,) float32."""
    scores = reader.label_scores(asset_id)
    rows = [i for i, f in enumerate(scores["function"]) if str(f) == function]
    if not rows:
        return np.zeros(len(point_index), np.float32)
    chosen = np.asarray(scores["score"][rows], np.float32)[:, point_index]
    return chosen.max(axis=0)


# ------------------------------------------------------------------------- image exemplars


def part_masks(reader: RootReader, row: dict[str, Any], function: str, parts: tuple[str, ...],
               targets: str) -> np.ndarray:
    """(V, H, W) bool: the pixels of the function's parts in each view."""
    if targets == "gt" and row.get("face_part"):
        face_id = reader.views(row["asset_id"], ["face_id"])["face_id"]
        names = list(row["part_names"])
        wanted = np.asarray([i for i, n in enumerate(names) if n in parts])
        face_part = np.asarray(row["face_part"])
        hit = face_id >= 0
        out = np.zeros(face_id.shape, bool)
        out[hit] = np.isin(face_part[face_id[hit]], wanted)
        return out
    views = reader.views(row["asset_id"], ["mask"])
    out = np.zeros(views["mask"].shape[:3], bool)
    position = {int(v): i for i, v in enumerate(views["view_id"])}
    for part in parts:
        found = reader.label_masks(row["asset_id"], function, part)
        for view, mask in zip(found["view_id"], found["mask"]):
            out[position[int(view)]] |= np.asarray(mask) > 0
    return out


def pooled_exemplar(grid: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """A view's patch grid (h, w, C) averaged with the area weights of `mask` (H, W) in each
    cell; None when the mask is empty."""
    if not mask.any():
        return None
    h, w = grid.shape[:2]
    weights = np.asarray(Image.fromarray(mask.astype(np.float32)).resize((w, h), Image.BOX))
    weights = np.clip(weights, 0.0, None)
    total = float(weights.sum())
    if total <= 0:
        return None
    return (grid.astype(np.float32) * weights[..., None]).sum(axis=(0, 1)) / total


def asset_exemplars(reader: RootReader, row: dict[str, Any], samples: list[Sample],
                    targets: str) -> dict[str, np.ndarray]:
    """function -> the pooled exemplar of the view showing most of its parts (absent when no
    view shows them)."""
    if not samples:
        return {}
    grids = reader.view_features(row["asset_id"])                      # (V, h, w, C)
    out = {}
    for sample in samples:
        masks = part_masks(reader, row, sample.function, sample.parts, targets)
        best = int(masks.reshape(len(masks), -1).sum(axis=1).argmax())
        pooled = pooled_exemplar(grids[best], masks[best])
        if pooled is not None:
            out[sample.function] = pooled.astype(np.float32)
    return out
