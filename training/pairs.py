"""What correspondence training pairs up (DFC §4.2), built once by the driver, before Ray Train:

- the **catalogue**: for every training asset, the views that show each functional part (its
  mask has >= `min_part_pixels` pixels and the rest of the object as many), and the view pairs
  of one asset that share >= `min_shared_points` visible surface points on a functional part;
- the **pair plan**: one row per (step, rank slot) naming that step's pairs with integer ids
  into the catalogue's lists, plus the seed of its point sampling. It is deterministic in
  (catalogue, seed, steps, world size); Ray Data splits it across the ranks and each rank reads
  the features of its pairs itself (`training.data`), so pairs span the whole dataset.

Part masks are the pseudo-labels (`labels/masks`) or, on procedural assets, the ground truth
(`face_part` of the rendered triangle ids); `train.masks` chooses, so the effect of label
noise can be measured. Part points (for spatial pairs) follow the same choice: points/ `part`
or labels/points score >= 0.5.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from operators.geometry.cameras import visibility
from operators.geometry.correspondence import part_mask
from operators.store.readers import RootReader
from operators.store.tables import LABEL_MASKS, LABEL_POINTS

PSEUDO_POINT_THRESHOLD = 0.5  # a point belongs to a pseudo-labelled part at this score


class NoPairsError(ValueError):
    """The data cannot give the pairs a config asks for (named, with the command that makes it)."""


@dataclass(frozen=True)
class PartView:
    """A view of an asset showing one part that performs `function`."""

    asset: int     # index into Catalogue.assets
    view: int
    part: int      # index into Catalogue.parts (part names)
    function: int  # index into Catalogue.functions


@dataclass(frozen=True)
class SharedViews:
    """Two views of one asset sharing enough visible points of one functional part."""

    asset: int
    view_1: int
    view_2: int
    part: int
    functions: tuple[int, ...]  # the part's functions (the text is one of them)


@dataclass
class Catalogue:
    assets: list[str]
    functions: list[str]
    parts: list[str]
    part_views: list[PartView] = field(default_factory=list)
    shared_views: list[SharedViews] = field(default_factory=list)

    def by_function(self) -> dict[int, list[int]]:
        """function -> indices into part_views."""
        out: dict[int, list[int]] = defaultdict(list)
        for i, entry in enumerate(self.part_views):
            out[entry.function].append(i)
        return dict(out)

    def pairable_functions(self) -> list[int]:
        """Functions shown by at least two different assets (a functional pair needs two)."""
        return sorted(f for f, entries in self.by_function().items()
                      if len({self.part_views[i].asset for i in entries}) >= 2)

    def to_json(self) -> dict:
        return {"assets": self.assets, "functions": self.functions, "parts": self.parts,
                "part_views": [[e.asset, e.view, e.part, e.function] for e in self.part_views],
                "shared_views": [[e.asset, e.view_1, e.view_2, e.part, list(e.functions)]
                                 for e in self.shared_views]}

    @classmethod
    def from_json(cls, data: dict) -> "Catalogue":
        return cls(list(data["assets"]), list(data["functions"]), list(data["parts"]),
                   [PartView(*map(int, e)) for e in data["part_views"]],
                   [SharedViews(int(a), int(v1), int(v2), int(p), tuple(int(f) for f in fs))
                    for a, v1, v2, p, fs in data["shared_views"]])


@dataclass(frozen=True)
class AssetParts:
    """One asset's functional parts: name -> its functions (from the manifest for procedural
    assets, from the pseudo-labels otherwise)."""

    part_names: tuple[str, ...]
    functions: dict[str, tuple[str, ...]]


def functional_parts(row: dict, masks: str, labelled: Sequence[tuple[str, str]]) -> AssetParts:
    """The functional parts of one manifest row: with gt masks the procedural parts and their
    functions; with pseudo masks the (function, part) rows the label stage wrote."""
    names = tuple(row.get("part_names") or ())
    if masks == "gt":
        functions = {name: tuple(fs) for name, fs in zip(names, row.get("part_functions") or ())
                     if fs}
    else:
        grouped: dict[str, list[str]] = defaultdict(list)
        for function, part in labelled:
            grouped[part].append(function)
        functions = {part: tuple(sorted(set(fs))) for part, fs in grouped.items()}
    return AssetParts(names, functions)


class PartMasks:
    """Part masks and part points of one asset, ground truth or pseudo-labels."""

    def __init__(self, reader: RootReader, asset_id: str, row: dict, masks: str) -> None:
        self.reader, self.asset_id, self.row, self.masks = reader, asset_id, row, masks
        self._label_rows = None

    def labelled(self) -> list[tuple[str, str]]:
        if self.masks == "gt":
            return []
        table = self.reader.table(LABEL_MASKS)
        if self.asset_id not in table:
            return []
        rows = table.rows(self.asset_id, ["view_id"])
        return sorted(set(zip(rows["function"].to_pylist(), rows["part"].to_pylist())))

    def view_masks(self, part: str, function: str, face_id: np.ndarray) -> np.ndarray:
        """(V, H, W) bool masks of `part` in every view (view_id order)."""
        if self.masks == "gt":
            index = list(self.row["part_names"]).index(part)
            return part_mask(face_id, np.asarray(self.row["face_part"], np.int64), [index])
        found = self.reader.label_masks(self.asset_id, function, part)
        out = np.zeros(face_id.shape, bool)
        out[np.asarray(found["view_id"], np.int64)] = np.asarray(found["mask"], bool)
        return out

    def point_members(self, part: str, function: str, point_part: np.ndarray) -> np.ndarray:
        """(N,) bool: the asset's surface points on `part`."""
        if self.masks == "gt":
            return point_part == list(self.row["part_names"]).index(part)
        rows = self.reader.table(LABEL_POINTS).arrays(self.asset_id, ["function", "part", "score"])
        for f, p, score in zip(rows["function"], rows["part"], rows["score"]):
            if f == function and p == part:
                return np.asarray(score, np.float32) >= PSEUDO_POINT_THRESHOLD
        return np.zeros(point_part.shape, bool)


@dataclass(frozen=True)
class AssetScan:
    """What one training asset adds to the catalogue, by name (indices are given when scans are
    merged, in asset order, so a parallel scan gives the same catalogue as a sequential one)."""

    asset_id: str
    part_views: tuple[tuple[int, str, tuple[str, ...]], ...]          # (view, part, functions)
    shared_views: tuple[tuple[int, int, str, tuple[str, ...]], ...]   # (view_1, view_2, ...)

    def to_json(self) -> dict:
        return {"asset_id": self.asset_id,
                "part_views": [[v, p, list(f)] for v, p, f in self.part_views],
                "shared_views": [[a, b, p, list(f)] for a, b, p, f in self.shared_views]}

    @classmethod
    def from_json(cls, data: dict) -> "AssetScan":
        return cls(data["asset_id"],
                   tuple((int(v), p, tuple(f)) for v, p, f in data["part_views"]),
                   tuple((int(a), int(b), p, tuple(f)) for a, b, p, f in data["shared_views"]))


def scan_asset(reader: RootReader, row: dict, masks: str, *, min_part_pixels: int,
               min_shared_points: int,
               visibility_tol: tuple[float, float] = (0.01, 2e-3)) -> AssetScan | None:
    """One training asset's views (face ids, masks, depth, cameras) and points, read once:
    which views show each functional part, which view pairs share its visible points. None
    when the asset has no functional part (labelled, or in the ground truth)."""
    asset_id = row["asset_id"]
    source = PartMasks(reader, asset_id, row, masks)
    parts = functional_parts(row, masks, source.labelled())
    if not parts.functions:
        return None
    views = reader.views(asset_id, ["face_id", "mask", "depth", "K", "cam_to_world"])
    points = reader.points(asset_id, ["xyz", "part"])
    objects = np.asarray(views["mask"], bool)
    part_views: list[tuple[int, str, tuple[str, ...]]] = []
    shared_views: list[tuple[int, int, str, tuple[str, ...]]] = []
    for part, functions in sorted(parts.functions.items()):
        # gt masks are the same for every function of a part; pseudo-labels are per
        # (function, part) and may differ, so each function gets its own views and pairs
        for function in (functions[:1] if masks == "gt" else functions):
            named = functions if masks == "gt" else (function,)
            in_part = source.view_masks(part, function, views["face_id"]) & objects
            counts = in_part.sum(axis=(1, 2))
            rest = (objects & ~in_part).sum(axis=(1, 2))
            part_views += [(int(view), part, named) for view in
                           np.flatnonzero((counts >= min_part_pixels) & (rest >= min_part_pixels))]
            members = source.point_members(part, function, np.asarray(points["part"]))
            if members.sum() < min_shared_points:
                continue
            seen = visibility(points["xyz"][members], views["K"], views["cam_to_world"],
                              views["depth"], *visibility_tol).astype(np.int32)
            shared = seen @ seen.T  # (V, V) points visible in both views
            v1, v2 = np.nonzero(np.triu(shared >= min_shared_points, k=1))
            shared_views += [(int(a), int(b), part, named) for a, b in zip(v1, v2)]
    return AssetScan(asset_id, tuple(part_views), tuple(shared_views))


def merge_scans(scans: Sequence[AssetScan | None]) -> Catalogue:
    """The catalogue of the scans, in their order (None = an asset without functional parts)."""
    catalogue = Catalogue([], [], [])
    function_index: dict[str, int] = {}
    part_index: dict[str, int] = {}
    for scan in scans:
        if scan is None:
            continue
        asset = len(catalogue.assets)
        catalogue.assets.append(scan.asset_id)
        for view, part, functions in scan.part_views:
            p = part_index.setdefault(part, len(part_index))
            for f in functions:
                f_id = function_index.setdefault(f, len(function_index))
                catalogue.part_views.append(PartView(asset, view, p, f_id))
        for view_1, view_2, part, functions in scan.shared_views:
            p = part_index.setdefault(part, len(part_index))
            f_ids = tuple(function_index.setdefault(f, len(function_index)) for f in functions)
            catalogue.shared_views.append(SharedViews(asset, view_1, view_2, p, f_ids))
    catalogue.functions = list(function_index)
    catalogue.parts = list(part_index)
    return catalogue


def build_catalogue(reader: RootReader, assets: Sequence[dict], masks: str, *,
                    min_part_pixels: int, min_shared_points: int,
                    visibility_tol: tuple[float, float] = (0.01, 2e-3)) -> Catalogue:
    """Scan the training assets one after another (`rayjobs.train_job` scans them on Ray
    tasks instead, with the same result)."""
    return merge_scans([scan_asset(reader, row, masks, min_part_pixels=min_part_pixels,
                                   min_shared_points=min_shared_points,
                                   visibility_tol=visibility_tol) for row in assets])


# ------------------------------------------------------------------------------------ plan

PLAN_COLUMNS = ("step", "slot", "seed", "f_first", "f_second", "f_function", "s_entry",
                "s_function", "s_swap")


def plan_rows(catalogue: Catalogue, *, steps: int, world_size: int, functional_pairs: int,
              spatial_pairs: int, seed: int) -> list[dict[str, np.ndarray | int]]:
    """One row per (step, rank slot): functional pairs as two indices into part_views and the
    function index; spatial pairs as an index into shared_views, the function, and whether the
    two views swap. A row's draws depend only on (seed, step, slot)."""
    by_function = catalogue.by_function()
    functions = catalogue.pairable_functions()
    if functional_pairs and not functions:
        raise NoPairsError("no function is shown by two different training assets: functional "
                           "pairs need two")
    if spatial_pairs and not catalogue.shared_views:
        raise NoPairsError("no two views of a training asset share enough visible points of a "
                           "functional part for spatial pairs")
    asset_of = np.array([e.asset for e in catalogue.part_views], np.int64)
    rows = []
    for step in range(steps):
        for slot in range(world_size):
            rng = np.random.default_rng([seed, step, slot])
            first = np.empty(functional_pairs, np.int64)
            second = np.empty(functional_pairs, np.int64)
            chosen = rng.choice(functions, size=functional_pairs) if functional_pairs else []
            for k, function in enumerate(chosen):  # a function with replacement, then two assets
                entries = np.asarray(by_function[int(function)])
                first[k] = rng.choice(entries)
                others = entries[asset_of[entries] != asset_of[first[k]]]
                second[k] = rng.choice(others)
            entry = rng.integers(0, max(len(catalogue.shared_views), 1), size=spatial_pairs)
            s_function = np.array([rng.choice(catalogue.shared_views[e].functions)
                                   for e in entry], np.int64)
            row = {"step": step, "slot": slot, "seed": int(rng.integers(0, 2 ** 62))}
            if functional_pairs:  # no zero-length columns: the kind is left out instead
                row |= {"f_first": first, "f_second": second,
                        "f_function": np.asarray(chosen, np.int64)}
            if spatial_pairs:
                row |= {"s_entry": entry.astype(np.int64), "s_function": s_function,
                        "s_swap": rng.integers(0, 2, size=spatial_pairs).astype(bool)}
            rows.append(row)
    return rows
