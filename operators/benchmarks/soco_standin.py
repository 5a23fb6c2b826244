"""A procedural SOCO stand-in written in SOCO's public layout (operators.benchmarks.soco reads
it like the real data), so the benchmark runs offline, in tests and in the demo.

Keypoints live in the generator's functional frames (operators.data.procedural): for each
functional part, the extremes of its surface along its frame's axes (e.g. the front/back/left/
right points of a rim's opening, the top/bottom of a handle loop, a blade's tip). Because the
frames are the ones DFC §3.2 aligns assets by, a keypoint means the same spot on every asset of
a category and on every category sharing the function, so:
- name = "<function> <direction>" (the SOC identity, the same across categories),
- concept = "<function> <frame kind>" (all keypoints of one functional part: CC's "any valid
  target of the concept", like SOCO's "any visible wheel"),
- kind = "functional"; the taxonomy file maps each concept to its function.
An extreme is taken as the mean of the part's surface samples within the last 3 % of its extent
along the axis, snapped to the nearest sample; an axis along which the part is flat or round
(the band's mean lies off the surface by more than 8 % of the part's size) has no keypoint.
Visibility: the keypoint's depth matches the rendered depth of its pixel. Fresh assets are made
from the stand-in's own seed (never a root's training assets).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image

from operators.benchmarks.soco import (PAIR_DIRS, TAXONOMY_FILE, ConceptMatch, Keypoint,
                                       SocoView, pair_json)
from operators.data.procedural import FRAME_KIND, PROCEDURAL_CATEGORIES, make_asset
from operators.geometry.cameras import project_points, visibility
from operators.geometry.render import render_views, sample_surface
from operators.settings import RenderSettings

DIRECTIONS = {(0, 1): "front", (0, -1): "back", (1, 1): "top", (1, -1): "bottom",
              (2, 1): "right", (2, -1): "left"}
BAND = 0.03          # fraction of the part's extent that counts as "the extreme"
MAX_OFF_SURFACE = 0.08  # band mean this far off the surface (x part size): no keypoint
MIN_SHARED = 2       # a pair needs at least this many keypoints visible in both views


@dataclass(frozen=True)
class StandinSettings:
    categories: tuple[str, ...] = PROCEDURAL_CATEGORIES
    assets_per_category: int = 3
    views: int = 6
    size: int = 224
    pairs_per_group: int = 4
    seed: int = 0
    rel_tol: float = 0.03  # visibility: depth tolerance relative to the depth


@dataclass
class StandinSummary:
    images: int = 0
    pairs: dict[str, int] = field(default_factory=lambda: {"intra": 0, "cross": 0})


@dataclass(frozen=True)
class _KeypointSpec:
    name: str
    concept: str
    function: str
    xyz: np.ndarray


def asset_keypoints(asset, samples: int = 20000, seed: int = 0) -> list[_KeypointSpec]:
    """The frame-extreme keypoints of one procedural asset (module docstring)."""
    surface = sample_surface(asset.mesh, samples, seed)
    part_of = np.asarray(asset.face_part)[surface.face_id]
    found, used = [], set()
    for p, (functions, frame) in enumerate(zip(asset.part_functions, asset.part_frames)):
        if not functions or functions[0] in used:
            continue
        function = functions[0]
        used.add(function)
        points = surface.xyz[part_of == p].astype(np.float64)
        if len(points) < 20:
            continue
        local = (points - frame.origin) @ np.asarray(frame.axes, np.float64).T
        size = float(np.linalg.norm(points.max(0) - points.min(0)))
        concept = f"{function} {FRAME_KIND[function]}"
        for (axis, sign), word in DIRECTIONS.items():
            along = sign * local[:, axis]
            band = along >= along.max() - BAND * max(float(np.ptp(along)), 1e-9)
            centre = points[band].mean(0)
            nearest = np.linalg.norm(points - centre, axis=1)
            if nearest.min() > MAX_OFF_SURFACE * size:
                continue
            found.append(_KeypointSpec(f"{function} {word}", concept, function,
                                       points[int(np.argmin(nearest))]))
    return found


@dataclass(frozen=True)
class _Shot:
    view: SocoView
    names: frozenset[str]


def _bbox(mask: np.ndarray) -> tuple[float, float, float, float]:
    rows, cols = np.nonzero(mask)
    return float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)


def _shots(asset, index: int, settings: StandinSettings, images: Path, seed: int
           ) -> list[_Shot]:
    render = RenderSettings(views=settings.views, width=settings.size, height=settings.size,
                            n_points=1000)
    views = render_views(asset.mesh, render, seed)
    specs = asset_keypoints(asset, seed=seed)
    if not specs:
        return []
    xyz = np.stack([s.xyz for s in specs])
    uv, z = project_points(xyz, views.K, views.cam_to_world)
    seen = visibility(xyz, views.K, views.cam_to_world, views.depth, rel_tol=settings.rel_tol,
                      projection=(uv, z))
    folder = images / asset.category
    folder.mkdir(parents=True, exist_ok=True)
    shots = []
    for v in range(settings.views):
        if not seen[v].any() or views.mask[v].sum() < 64:
            continue
        name = f"{asset.category}_{index:03d}_{v:02d}.JPEG"
        Image.fromarray(views.rgb[v]).save(folder / name, quality=95)
        points = tuple(Keypoint(int(k), specs[k].name, (float(uv[v, k, 0]), float(uv[v, k, 1])),
                                specs[k].concept, "functional")
                       for k in np.flatnonzero(seen[v]))
        shots.append(_Shot(SocoView(asset.category, folder / name, (settings.size,
                                                                     settings.size),
                                    _bbox(views.mask[v]), points),
                           frozenset(p.name for p in points)))
    return shots


def _matches(source: SocoView, target: SocoView) -> tuple[list[str], list[ConceptMatch]]:
    target_names = {p.name for p in target.keypoints}
    semantic = [p.name for p in source.keypoints if p.name in target_names]
    groups: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for p in source.keypoints:
        groups[p.concept][0].append(p.name)
    for p in target.keypoints:
        groups[p.concept][1].append(p.name)
    concepts = [ConceptMatch(c, tuple(s), tuple(t)) for c, (s, t) in sorted(groups.items())
                if s and t]
    return semantic, concepts


def write_standin(out: Path | str, settings: StandinSettings = StandinSettings()
                  ) -> StandinSummary:
    """Render fresh procedural assets and write SOCOv1-style Images/, PairAnnotations/{intra,
    cross}/ and Metadata/keypoint_taxonomy.json under `out`."""
    out = Path(out)
    images = out / "Images"
    rng = np.random.default_rng(settings.seed)
    summary = StandinSummary()
    shots: dict[str, list[list[_Shot]]] = {}
    concepts: dict[str, dict[str, object]] = {}
    for c, category in enumerate(settings.categories):
        shots[category] = []
        for i in range(settings.assets_per_category):
            seed = int(np.random.SeedSequence([settings.seed, 104_729, c, i])
                       .generate_state(1)[0])
            asset = make_asset(category, seed)
            for spec in asset_keypoints(asset, seed=seed):
                entry = concepts.setdefault(spec.concept, {"function": spec.function,
                                                           "kind": "functional",
                                                           "keypoints": []})
                if spec.name not in entry["keypoints"]:  # type: ignore[operator]
                    entry["keypoints"].append(spec.name)  # type: ignore[union-attr]
            found = _shots(asset, i, settings, images, seed)
            summary.images += len(found)
            shots[category].append(found)
    pair_id = 0
    groups: list[tuple[str, str, str, str]] = [("intra", c, c, c) for c in settings.categories]
    groups += [("cross", f"{a}-{b}", a, b) for a, b in combinations(settings.categories, 2)]
    for pair_type, group, cat_a, cat_b in groups:
        candidates = []
        for ia, assets_a in enumerate(shots[cat_a]):
            for ib, assets_b in enumerate(shots[cat_b]):
                if cat_a == cat_b and ib <= ia:
                    continue
                for sa in assets_a:
                    for sb in assets_b:
                        if len(sa.names & sb.names) >= MIN_SHARED:
                            candidates.append((sa, sb))
        if not candidates:
            continue
        chosen = rng.choice(len(candidates), min(settings.pairs_per_group, len(candidates)),
                            replace=False)
        folder = out / PAIR_DIRS[pair_type] / group
        folder.mkdir(parents=True, exist_ok=True)
        for k in sorted(int(i) for i in chosen):
            source, target = candidates[k][0].view, candidates[k][1].view
            semantic, matched = _matches(source, target)
            pair_id += 1
            payload = pair_json(pair_id, group, source, target, semantic, matched)
            (folder / f"{pair_id:06d}.json").write_text(json.dumps(payload, indent=1))
            summary.pairs[pair_type] += 1
    (out / TAXONOMY_FILE).parent.mkdir(parents=True, exist_ok=True)
    (out / TAXONOMY_FILE).write_text(json.dumps(
        {"source": "partlift procedural stand-in (operators/benchmarks/soco_standin.py)",
         "concepts": concepts}, indent=1))
    return summary
