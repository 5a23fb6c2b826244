"""SOCO (soco-semantic-object-correspondence.txt; public layout of GenIntel/SOCO, SOCOv1):
records and a loader of its self-contained pair annotations, plus the writer the procedural
stand-in uses, so one loader reads both.

Layout read (documented in the README; a missing piece is one ConfigError naming it):

    SOCOv1/Images/<category>/<image>            (JPEG in the release; any PIL format here)
    SOCOv1/PairAnnotations/intra/<group>/*.json  within-category pairs (CC, SOC)
    SOCOv1/PairAnnotations/cross/<group>/*.json  cross-category pairs (Cross-SOC)
    SOCOv1/Metadata/keypoint_taxonomy.json       optional here: concept -> function hints

A pair JSON: pair_id, pair_group, src_category/trg_category (or category), src_image,
trg_image, src_imsize/trg_imsize [w, h], src_bndbox/trg_bndbox [left, top, right, bottom],
src_keypoints/trg_keypoints (each: id, name, pos [x, y], concept_id/concept_name, kind),
semantic_overlap (names with the same identity in both views) and concept_matches (groups
{concept_name, src_keypoints, trg_keypoints} of names: all valid matches of one concept).

Tasks (SOCO §3-4): CC matches a source keypoint to ANY visible target keypoint of its concept,
SOC to the keypoint of the same name (identity), Cross-SOC is SOC on the cross pairs.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from operators.settings import ConfigError

PAIR_DIRS = {"intra": Path("PairAnnotations/intra"), "cross": Path("PairAnnotations/cross")}
TAXONOMY_FILE = Path("Metadata/keypoint_taxonomy.json")
TASKS = ("CC", "SOC", "Cross-SOC")
TASK_PAIRS = {"CC": "intra", "SOC": "intra", "Cross-SOC": "cross"}


@dataclass(frozen=True)
class Keypoint:
    id: int
    name: str                        # unique within a view; the identity SOC matches on
    position: tuple[float, float]    # [x, y] pixels of the original image
    concept: str | None              # the local concept CC matches on
    kind: str | None = None          # structural or functional


@dataclass(frozen=True)
class SocoView:
    category: str
    image: Path
    size: tuple[int, int]            # (width, height)
    bbox: tuple[float, float, float, float]  # [left, top, right, bottom]
    keypoints: tuple[Keypoint, ...]

    def position(self, name: str) -> tuple[float, float]:
        for point in self.keypoints:
            if point.name == name:
                return point.position
        raise KeyError(name)


@dataclass(frozen=True)
class ConceptMatch:
    concept: str
    source: tuple[str, ...]
    target: tuple[str, ...]


@dataclass(frozen=True)
class SocoPair:
    pair_id: int
    group: str
    pair_type: str                   # intra | cross
    path: Path
    source: SocoView
    target: SocoView
    semantic: tuple[str, ...]
    concepts: tuple[ConceptMatch, ...]


@dataclass(frozen=True)
class Query:
    """One source keypoint of a task: where it is, its concept and every valid target."""

    name: str
    concept: str | None
    source: tuple[float, float]
    candidates: np.ndarray           # (m, 2) target positions, m >= 1


def _need(data: dict[str, Any], key: str, path: Path) -> Any:
    if key not in data:
        raise ConfigError(f"soco: {path}: missing field {key!r} (expected SOCO's pair JSON)")
    return data[key]


def _keypoints(items: Any, path: Path, side: str) -> tuple[Keypoint, ...]:
    points = []
    for item in items:
        try:
            x, y = (float(v) for v in item["pos"])
            points.append(Keypoint(int(item["id"]), str(item["name"]), (x, y),
                                   item.get("concept_name", item.get("concept")),
                                   item.get("kind")))
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"soco: {path}: a {side} keypoint is malformed ({item!r}: "
                              f"{type(err).__name__} {err}); expected id, name, pos [x, y]") \
                from None
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise ConfigError(f"soco: {path}: duplicate {side} keypoint names")
    return tuple(points)


def _view(data: dict[str, Any], prefix: str, category: str, images: Path,
          path: Path) -> SocoView:
    image = images / category / str(_need(data, f"{prefix}_image", path))
    if not image.is_file():
        raise ConfigError(f"soco: {path}: its image {image} does not exist")
    size = _need(data, f"{prefix}_imsize", path)
    try:
        width, height = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ConfigError(f"soco: {path}: {prefix}_imsize {size!r} is not [width, height]") \
            from None
    box = data.get(f"{prefix}_bndbox") or [0, 0, width, height]
    try:
        bbox = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        bbox = ()
    if len(bbox) != 4 or bbox[2] < bbox[0] or bbox[3] < bbox[1]:
        raise ConfigError(f"soco: {path}: {prefix}_bndbox {box} is not [left, top, right, "
                          "bottom]")
    return SocoView(category, image, (width, height), bbox,  # type: ignore[arg-type]
                    _keypoints(_need(data, f"{prefix}_keypoints", path), path, prefix))


def parse_pair(data: dict[str, Any], path: Path, pair_type: str, images: Path) -> SocoPair:
    default = data.get("category")
    source_category = str(data.get("src_category") or default)
    target_category = str(data.get("trg_category") or default)
    if "None" in (source_category, target_category):
        raise ConfigError(f"soco: {path}: no src_category/trg_category (or category)")
    source = _view(data, "src", source_category, images, path)
    target = _view(data, "trg", target_category, images, path)
    source_names = {p.name for p in source.keypoints}
    target_names = {p.name for p in target.keypoints}
    semantic = tuple(str(n) for n in _need(data, "semantic_overlap", path))
    concepts = []
    for group in _need(data, "concept_matches", path):
        try:
            concepts.append(ConceptMatch(str(group["concept_name"]),
                                         tuple(str(n) for n in group["src_keypoints"]),
                                         tuple(str(n) for n in group["trg_keypoints"])))
        except (KeyError, TypeError) as err:
            raise ConfigError(f"soco: {path}: a concept_matches entry lacks {err}") from None
    unknown = sorted((set(semantic) - source_names) | (set(semantic) - target_names)
                     | {n for g in concepts for n in g.source if n not in source_names}
                     | {n for g in concepts for n in g.target if n not in target_names})
    if unknown:
        raise ConfigError(f"soco: {path}: matches name keypoints the views do not have: "
                          f"{', '.join(unknown)}")
    return SocoPair(int(data.get("pair_id", 0)), str(data.get("pair_group") or target_category),
                    pair_type, path, source, target, semantic, tuple(concepts))


def load_pairs(data: Path | str, pair_type: str, max_per_group: int | None = None
               ) -> list[SocoPair]:
    """Every pair of `pair_type` (intra | cross) in file-name order per group, at most
    `max_per_group` of each group (None: all)."""
    data = Path(data).expanduser()
    if pair_type not in PAIR_DIRS:
        raise ConfigError(f"soco: pair type {pair_type!r}: expected {' or '.join(PAIR_DIRS)}")
    images, pairs_dir = data / "Images", data / PAIR_DIRS[pair_type]
    for needed in (images, pairs_dir):
        if not needed.is_dir():
            raise ConfigError(f"soco: {data} is not a SOCO directory: {needed} is missing "
                              "(expected SOCOv1/Images/<category>/ and "
                              "PairAnnotations/{intra,cross}/<group>/*.json)")
    pairs = []
    for group in sorted(p for p in pairs_dir.iterdir() if p.is_dir()):
        files = sorted(group.glob("*.json"))
        for path in files if max_per_group is None else files[:max_per_group]:
            try:
                payload = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise ConfigError(f"soco: {path}: not readable JSON ({err})") from None
            pairs.append(parse_pair(payload, path, pair_type, images))
    return pairs


def load_taxonomy(data: Path | str) -> dict[str, Any]:
    """Metadata/keypoint_taxonomy.json, or {} when the directory has none."""
    path = Path(data).expanduser() / TAXONOMY_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ConfigError(f"soco: {path}: not readable JSON ({err})") from None


def concept_functions(taxonomy: dict[str, Any], known: set[str]) -> dict[str, str]:
    """concept -> a function the model knows: the taxonomy's `function` of a concept entry
    (the stand-in writes them; {"concepts": {name: {"function": f}}}), else a concept whose
    name is itself a known function."""
    mapping = {}
    for name, entry in (taxonomy.get("concepts") or {}).items():
        function = entry.get("function") if isinstance(entry, dict) else None
        if function in known:
            mapping[str(name)] = str(function)
    return mapping | {f: f for f in known if f not in mapping}


def queries(pair: SocoPair, task: str) -> list[Query]:
    """The task's source keypoints with their valid targets: SOC / Cross-SOC the same name
    (semantic_overlap); CC every target name of the keypoint's concept, merged over the
    concept's groups (a concept can span several groups)."""
    if task not in TASKS:
        raise ConfigError(f"soco: unknown task {task!r}; known: {', '.join(TASKS)}")
    concept_of = {p.name: p.concept for p in pair.source.keypoints}
    if task != "CC":
        return [Query(n, concept_of.get(n), pair.source.position(n),
                      np.asarray([pair.target.position(n)], np.float64))
                for n in pair.semantic]
    targets: dict[str, list[str]] = defaultdict(list)
    for group in pair.concepts:
        for name in group.source:
            targets[name] += [t for t in group.target if t not in targets[name]]
    return [Query(n, concept_of.get(n), pair.source.position(n),
                  np.asarray([pair.target.position(t) for t in ts], np.float64))
            for n, ts in targets.items() if ts]


def pair_json(pair_id: int, group: str, source: SocoView, target: SocoView,
              semantic: list[str], concepts: list[ConceptMatch]) -> dict[str, Any]:
    """A pair in SOCO's public JSON layout (the stand-in's writer; `load_pairs` reads it)."""
    def points(view: SocoView) -> list[dict[str, Any]]:
        return [{"id": p.id, "name": p.name, "pos": [round(p.position[0], 2),
                                                     round(p.position[1], 2)],
                 "concept_name": p.concept, "kind": p.kind} for p in view.keypoints]
    return {"pair_id": pair_id, "pair_group": group, "src_category": source.category,
            "trg_category": target.category, "src_image": source.image.name,
            "trg_image": target.image.name, "src_imsize": list(source.size),
            "trg_imsize": list(target.size), "src_bndbox": list(source.bbox),
            "trg_bndbox": list(target.bbox), "src_keypoints": points(source),
            "trg_keypoints": points(target), "semantic_overlap": semantic,
            "concept_matches": [{"concept_name": c.concept, "src_keypoints": list(c.source),
                                 "trg_keypoints": list(c.target)} for c in concepts]}
