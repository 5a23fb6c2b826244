"""Worker-side batches of correspondence training (DFC §4.2): a pair-plan row -> tensors.

Each rank reads the arrays of the assets its pairs name through the operators' readers (an LRU
of `cache_assets` assets), so any rank can train on any pair of the dataset.

- Functional pair: per image, `points` positive pixels inside the part mask (with replacement
  when the part has fewer pixels) and as many negatives from the object minus the part (never
  the background).
- Spatial pair: two views of one asset; `points` surface points of the part visible in both
  (the label/lift depth test), projected with the stored cameras (inside the part only).

Pixels are continuous (u, v) centres (`operators.geometry.cameras`). The features are the lift
stage's block cache (`features/blocks`, (n_blocks, h, w, C) float16 per view) or, on the
backbone-in-the-loop path, the views' RGB (the loop runs the frozen backbone).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from operators.geometry.cameras import project_points, visibility
from operators.store.readers import RootReader
from operators.store.storage import RunRoot
from operators.data.backgrounds import replace_background
from training.pairs import Catalogue, PartMasks


@dataclass
class AssetArrays:
    """What batches need of one asset (every view, view_id order)."""

    features: np.ndarray      # (V, K, n_blocks, h, w, C) float16, or (V, H, W, 3) uint8 RGB
    objects: np.ndarray       # (V, H, W) bool
    face_id: np.ndarray       # (V, H, W) int32
    depth: np.ndarray         # (V, H, W) float32
    K: np.ndarray             # (V, 3, 3)
    cam_to_world: np.ndarray  # (V, 4, 4)
    xyz: np.ndarray           # (N, 3) surface points
    point_part: np.ndarray    # (N,) procedural part index (-1 none)
    masks: PartMasks
    part_masks: dict[tuple[str, str], np.ndarray]    # (part, function) -> (V, H, W) bool
    part_points: dict[tuple[str, str], np.ndarray]   # (part, function) -> (N,) bool


def sample_pixels(mask: np.ndarray, n: int, rng: np.random.Generator,
                  what: str = "mask") -> np.ndarray:
    """n pixel centres (n, 2) float32 of a non-empty (H, W) mask; with replacement only when the
    mask has fewer than n pixels."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError(f"cannot sample pixels from an empty {what}")
    pick = rng.choice(rows.size, size=n, replace=rows.size < n)
    return np.stack([cols[pick] + 0.5, rows[pick] + 0.5], axis=1).astype(np.float32)


class PairBatches:
    """Builds the tensors of one plan row (one rank's step)."""

    def __init__(self, root: RunRoot, catalogue: Catalogue, manifest: dict[str, dict], *,
                 masks: str, points: int, input: str, n_blocks: int, cache_assets: int,
                 augment: bool = False, spatial_region: str = "part",
                 visibility_tol: tuple[float, float] = (0.01, 2e-3)) -> None:
        self.reader = RootReader(root)
        self.catalogue, self.manifest = catalogue, manifest
        self.masks, self.points, self.input, self.n_blocks = masks, points, input, n_blocks
        self.visibility_tol, self.augment = visibility_tol, augment
        self.spatial_region = spatial_region
        self._cache: OrderedDict[int, AssetArrays] = OrderedDict()
        self._cache_assets = cache_assets
        self.extra_views: dict[str, np.ndarray] = {}  # validation assets' view features

    def asset(self, index: int) -> AssetArrays:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        asset_id = self.catalogue.assets[index]
        views = self.reader.views(asset_id, ["rgb", "mask", "face_id", "depth", "K", "cam_to_world"]
                                  if self.input == "backbone" else
                                  ["mask", "face_id", "depth", "K", "cam_to_world"])
        if self.input == "backbone":
            features = np.asarray(views["rgb"])
        else:
            blocks = self.reader.view_blocks(asset_id, variant=None)  # (V, K, n, h, w, C)
            features = np.asarray(blocks)[:, :, -self.n_blocks:]
        points = self.reader.points(asset_id, ["xyz", "part"])
        arrays = AssetArrays(features, np.asarray(views["mask"], bool), views["face_id"],
                             views["depth"], views["K"], views["cam_to_world"], points["xyz"],
                             np.asarray(points["part"]),
                             PartMasks(self.reader, asset_id, self.manifest[asset_id], self.masks),
                             {}, {})
        self._cache[index] = arrays
        while len(self._cache) > self._cache_assets:
            self._cache.popitem(last=False)
        return arrays

    def part_mask(self, arrays: AssetArrays, part: str, function: str) -> np.ndarray:
        key = (part, function)
        if key not in arrays.part_masks:
            arrays.part_masks[key] = arrays.masks.view_masks(part, function, arrays.face_id)
        return arrays.part_masks[key]

    def part_points(self, arrays: AssetArrays, part: str, function: str) -> np.ndarray:
        key = (part, function)
        if key not in arrays.part_points:
            arrays.part_points[key] = arrays.masks.point_members(part, function, arrays.point_part)
        return arrays.part_points[key]

    def _functional_image(self, entry_index: int, rng: np.random.Generator
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        entry = self.catalogue.part_views[entry_index]
        arrays = self.asset(entry.asset)
        part = self.catalogue.parts[entry.part]
        function = self.catalogue.functions[entry.function]
        inside = self.part_mask(arrays, part, function)[entry.view] & arrays.objects[entry.view]
        outside = arrays.objects[entry.view] & ~inside
        where = (f"asset {self.catalogue.assets[entry.asset]} view {entry.view} part {part} "
                 f"({function})")
        return (self.view_input(arrays, entry.view, rng),
                sample_pixels(inside, self.points, rng, f"part mask of {where}"),
                sample_pixels(outside, self.points, rng, f"rest of the object of {where}"))

    def _spatial_pair(self, entry_index: int, function: int, swap: bool,
                      rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        entry = self.catalogue.shared_views[entry_index]
        arrays = self.asset(entry.asset)
        views = [entry.view_2, entry.view_1] if swap else [entry.view_1, entry.view_2]
        members = (np.ones(arrays.xyz.shape[0], bool) if self.spatial_region == "object" else
                   self.part_points(arrays, self.catalogue.parts[entry.part],
                                    self.catalogue.functions[function]))
        xyz = arrays.xyz[members]
        projection = project_points(xyz, arrays.K[views], arrays.cam_to_world[views])
        seen = visibility(xyz, arrays.K[views], arrays.cam_to_world[views], arrays.depth[views],
                          *self.visibility_tol, projection=projection)
        shared = np.flatnonzero(seen.all(axis=0))
        if shared.size == 0:
            raise ValueError(f"asset {self.catalogue.assets[entry.asset]} views {views}: no "
                             "shared visible part points")
        pick = rng.choice(shared, size=self.points, replace=shared.size < self.points)
        uv = projection[0][:, pick]
        return (self.view_input(arrays, views[0], rng), self.view_input(arrays, views[1], rng),
                uv[0], uv[1])

    def view_input(self, arrays: AssetArrays, view: int, rng: np.random.Generator) -> np.ndarray:
        """One view's model input. With augmentation: the cache's features of a random
        background variant, or the RGB view with a new background (backbone path)."""
        if self.input == "backbone":
            rgb = arrays.features[view]
            return replace_background(rgb, arrays.objects[view], rng) if self.augment else rgb
        n_variants = arrays.features.shape[1]
        variant = int(rng.integers(n_variants)) if self.augment and n_variants > 1 else 0
        return arrays.features[view, variant]

    def image_size(self) -> tuple[int, int]:
        arrays = self.asset(0) if not self._cache else next(iter(self._cache.values()))
        return tuple(int(s) for s in arrays.objects.shape[1:3])  # type: ignore[return-value]

    def build(self, row: dict[str, Any]) -> dict[str, np.ndarray]:
        """numpy arrays of one plan row: f_* (functional) and s_* (spatial) blocks/pixels."""
        rng = np.random.default_rng(int(row["seed"]))
        out: dict[str, list] = {k: [] for k in ("f_feat_1", "f_feat_2", "f_pos_1", "f_neg_1",
                                                "f_pos_2", "f_neg_2", "s_feat_1", "s_feat_2",
                                                "s_uv_1", "s_uv_2")}
        empty = np.zeros(0, np.int64)
        for first, second in zip(row.get("f_first", empty), row.get("f_second", empty)):
            for side, entry in (("1", first), ("2", second)):
                feat, pos, neg = self._functional_image(int(entry), rng)
                out[f"f_feat_{side}"].append(feat)
                out[f"f_pos_{side}"].append(pos)
                out[f"f_neg_{side}"].append(neg)
        for entry, function, swap in zip(row.get("s_entry", empty), row.get("s_function", empty),
                                         row.get("s_swap", empty)):
            feat_1, feat_2, uv_1, uv_2 = self._spatial_pair(int(entry), int(function),
                                                            bool(swap), rng)
            out["s_feat_1"].append(feat_1)
            out["s_feat_2"].append(feat_2)
            out["s_uv_1"].append(uv_1)
            out["s_uv_2"].append(uv_2)
        batch = {k: np.stack(v) for k, v in out.items() if v}
        batch["f_text"] = np.asarray(row.get("f_function", empty), np.int64)
        batch["s_text"] = np.asarray(row.get("s_function", empty), np.int64)
        return batch
