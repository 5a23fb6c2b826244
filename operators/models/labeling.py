"""Pseudo-labelling one asset's functional parts (DFC 4.1, Appendix A.4, Figure 3).

A grounding backend boxes each part prompt in every view, `trials` times; the boxes vote onto the
asset's surface points (visible points inside a box gain one vote); the votes, normalised to 0-1
per asset and part, are splatted back into each view and thresholded (Otsu + closing) into masks.
Plain functions over one asset's arrays: the Ray wiring lives in `rayjobs/label_job.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from operators.data.taxonomy import Taxonomy
from operators.geometry.aggregate import (boxes_from_crop, consensus_boxes, masks_from_scores,
                                          vote_scores, zoom_crop)
from operators.geometry.cameras import project_points, visibility
from operators.models.grounding import Box, GroundingBackend, format_prompt
from operators.settings import LabelSettings

BoxesPerView = list[list[list[Box]]]  # view -> trial -> boxes


@dataclass(frozen=True)
class PartPrompt:
    """One (function, part) query for an asset; part_index points into the asset's part_names
    (-1 when the asset has no part annotation, e.g. a scanned mesh)."""

    function: str
    part: str
    description: str
    part_index: int


@dataclass(frozen=True)
class GroundTruthParts:
    """What the oracle backend reads instead of pixels (procedural assets only)."""

    face_id: np.ndarray    # (V, H, W) int32
    face_part: np.ndarray  # (F,) int16


@dataclass(frozen=True)
class AssetLabels:
    prompts: tuple[PartPrompt, ...]
    boxes: tuple[BoxesPerView, ...]  # per prompt
    scores: np.ndarray               # (P, N) float32 in [0, 1]
    masks: np.ndarray                # (P, V, H, W) bool


def prompts_for(taxonomy: Taxonomy, category: str, part_names: Sequence[str] = (),
                functions: Sequence[str] | None = None) -> list[PartPrompt]:
    """Every (function, part) the taxonomy lists for the category (optionally only `functions`).
    Raises the taxonomy's UnknownNameError (listing valid names) for unknown names."""
    cat = taxonomy.category(category)
    wanted = list(functions) if functions is not None else list(taxonomy.functions_of(category))
    index = {name: i for i, name in enumerate(part_names)}
    prompts = []
    for function in wanted:
        for part in taxonomy.parts_for(cat.name, function):
            prompts.append(PartPrompt(function, part.name, part.description,
                                      index.get(part.name, -1)))
    return prompts


def _ground(backend: GroundingBackend, images: np.ndarray, text: str, trial: int,
            prompt: PartPrompt, truth: GroundTruthParts | None) -> list[list[Box]]:
    texts = [text] * images.shape[0]
    if getattr(backend, "needs_ground_truth", False):
        if truth is None or prompt.part_index < 0:
            raise ValueError(f"the {backend.name} backend needs ground-truth part labels; "
                             f"asset has none for part '{prompt.part}'")
        return backend.ground(images, texts, trial, face_id=truth.face_id,
                              face_part=truth.face_part, part_indices=[prompt.part_index])
    return backend.ground(images, texts, trial)


def _zoom_pass(backend: GroundingBackend, images: np.ndarray, text: str, trial: int,
               boxes: list[list[Box]], settings: LabelSettings) -> list[list[Box]]:
    """Re-query each small box on a crop around it and put the answers, mapped back to the view,
    in its place (A.4 step 2); large boxes stay; a crop with no answer keeps the original box."""
    height, width = images.shape[1:3]
    out = []
    for image, view_boxes in zip(images, boxes):
        refined_view: list[Box] = []
        for box in view_boxes:
            if box.area >= settings.zoom_max_area_frac * height * width:
                refined_view.append(box)
                continue
            crop, transform = zoom_crop(image, box, settings.zoom_pad_frac, (height, width))
            answer = boxes_from_crop(backend.ground(crop[None], [text], trial)[0], transform)
            refined_view.extend(answer or [box])
        out.append(refined_view)
    return out


def ground_asset(backend: GroundingBackend, rgb: np.ndarray, prompts: Sequence[PartPrompt],
                 settings: LabelSettings, truth: GroundTruthParts | None = None) -> list[BoxesPerView]:
    """Boxes for every prompt, view and trial: prompt -> view -> trial -> boxes."""
    out: list[BoxesPerView] = []
    n_views = rgb.shape[0]
    for prompt in prompts:
        # heat-map backends that are queried with actions (AffordanceCLIP) get the function
        text = (prompt.function.replace("-", " ")
                if getattr(backend, "prompt_from_function", False)
                else format_prompt(settings.template, prompt.part, prompt.description))
        per_view: BoxesPerView = [[] for _ in range(n_views)]
        for trial in range(settings.trials):
            boxes = _ground(backend, rgb, text, trial, prompt, truth)
            if len(boxes) != n_views:
                raise ValueError(f"backend {backend.name} returned {len(boxes)} box lists for "
                                 f"{n_views} views")
            if settings.zoom and not getattr(backend, "needs_ground_truth", False):
                boxes = _zoom_pass(backend, rgb, text, trial, boxes, settings)
            for v in range(n_views):
                per_view[v].append(list(boxes[v]))
        if settings.consensus:
            size = (rgb.shape[1], rgb.shape[2])
            per_view = [consensus_boxes(trials, settings.consensus_radius_frac, size)
                        for trials in per_view]
        out.append(per_view)
    return out


def aggregate_asset(boxes: Sequence[BoxesPerView], xyz: np.ndarray, K: np.ndarray,
                    cam_to_world: np.ndarray, depth: np.ndarray, mask: np.ndarray,
                    settings: LabelSettings) -> tuple[np.ndarray, np.ndarray]:
    """Per-point scores (P, N) and per-view masks (P, V, H, W) from the prompts' boxes."""
    uv, z = project_points(xyz, K, cam_to_world)
    visible = visibility(xyz, K, cam_to_world, depth, settings.visibility_rel_tol,
                         settings.visibility_abs_tol, projection=(uv, z))
    if not visible.any():
        raise ValueError("no surface point is visible in any view (depth test failed everywhere:"
                         " are the points and views from the same render?)")
    scores = np.stack([vote_scores(uv, visible, b, settings.min_boxes_per_view) for b in boxes]) \
        if boxes else np.zeros((0, xyz.shape[0]), np.float32)
    masks = np.stack([masks_from_scores(s, uv, visible, mask, settings.mask_sigma,
                                        settings.closing_iterations) for s in scores]) \
        if boxes else np.zeros((0,) + mask.shape, bool)
    return scores.astype(np.float32), masks


def label_asset(backend: GroundingBackend, views: dict[str, np.ndarray], xyz: np.ndarray,
                prompts: Sequence[PartPrompt], settings: LabelSettings,
                truth: GroundTruthParts | None = None) -> AssetLabels:
    """Ground, vote and mask one asset. `views` holds rgb, depth, mask, K, cam_to_world."""
    if not prompts:
        raise ValueError("no part prompts for this asset (unknown category, or none of the "
                         "requested functions applies)")
    boxes = ground_asset(backend, views["rgb"], prompts, settings, truth)
    scores, masks = aggregate_asset(boxes, xyz, views["K"], views["cam_to_world"],
                                    views["depth"], views["mask"], settings)
    return AssetLabels(tuple(prompts), tuple(boxes), scores, masks)
