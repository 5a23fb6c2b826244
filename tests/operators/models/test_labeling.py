"""Pseudo-labelling one asset: prompts, grounding structure, vote aggregation quality."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

from operators.data.procedural import make_asset
from operators.data.taxonomy import UnknownNameError, load_taxonomy
from operators.geometry.render import render_asset
from operators.metrics.segmentation import mask_iou
from operators.models.grounding import NO_NOISE, Box, OracleBackend
from operators.models.labeling import (GroundTruthParts, aggregate_asset, ground_asset, label_asset,
                                       prompts_for)
from operators.settings import LabelSettings, RenderSettings

TAXONOMY = load_taxonomy()


@dataclass
class FixedBoxBackend:
    """A deterministic test backend: one box per image, shrinking with the trial number."""

    name: ClassVar[str] = "fixed"
    calls: int = 0

    def ground(self, images, prompts, trial):
        self.calls += 1
        h, w = images.shape[1:3]
        return [[Box(0.0, 0.0, w / (trial + 1), h / (trial + 1))] for _ in images]


@pytest.fixture(scope="module")
def kettle():
    asset = make_asset("kettle", 7)
    views, samples = render_asset(asset.mesh, RenderSettings(views=8, width=64, height=64,
                                                             n_points=6000), seed=1)
    return asset, views, samples


def _arrays(views) -> dict:
    return {k: getattr(views, k) for k in ("rgb", "depth", "mask", "K", "cam_to_world")}


def test_prompts_cover_the_categorys_functions_with_part_indices() -> None:
    asset = make_asset("kettle", 0)
    prompts = prompts_for(TAXONOMY, "kettle", asset.part_names)
    pour = [p for p in prompts if p.function == "pour-with"]
    assert pour and asset.part_names[pour[0].part_index] == pour[0].part
    assert all(p.description for p in prompts)
    only = prompts_for(TAXONOMY, "kettle", asset.part_names, functions=["pour-with"])
    assert {p.function for p in only} == {"pour-with"}
    assert prompts_for(TAXONOMY, "kettle", ())[0].part_index == -1  # scanned mesh: no labels


def test_unknown_category_lists_the_known_ones() -> None:
    with pytest.raises(UnknownNameError, match="kettle"):
        prompts_for(TAXONOMY, "spaceship")


def test_ground_asset_returns_prompt_view_trial_structure() -> None:
    backend = FixedBoxBackend()
    images = np.zeros((3, 10, 20, 3), np.uint8)
    prompts = prompts_for(TAXONOMY, "mug", ())
    boxes = ground_asset(backend, images, prompts, LabelSettings(trials=2))
    assert len(boxes) == len(prompts) and all(len(per_view) == 3 for per_view in boxes)
    assert [len(t) for t in boxes[0][0]] == [1, 1]  # two trials, one box each
    assert boxes[0][0][1][0].x1 == 10.0  # trial 1 box is half the width
    assert backend.calls == 2 * len(prompts)


def test_zoom_pass_requeries_small_boxes_on_a_crop() -> None:
    backend = FixedBoxBackend()
    images = np.zeros((1, 100, 100, 3), np.uint8)
    prompt = prompts_for(TAXONOMY, "knife", ())[:1]
    boxes = ground_asset(backend, images, prompt, LabelSettings(trials=4, zoom=True,
                                                                 zoom_max_area_frac=0.1))
    # Trial 3's box (25x25 px = 6% of the image) is small: one more call, on the crop around it
    # padded by 25% (x, y in [0, 32) after clipping and snapping), resized to 100x100. The
    # backend answers a quarter of the crop, which maps back to [0, 8) x [0, 8).
    assert backend.calls == 4 + 1
    assert boxes[0][0][3][0] == Box(0.0, 0.0, 8.0, 8.0)
    assert boxes[0][0][2][0] == Box(0.0, 0.0, 100 / 3, 100 / 3)  # 11% of the image: kept


def test_oracle_without_ground_truth_is_a_clear_error() -> None:
    prompts = prompts_for(TAXONOMY, "mug", ())
    with pytest.raises(ValueError, match="needs ground-truth part labels"):
        ground_asset(OracleBackend(NO_NOISE), np.zeros((1, 8, 8, 3), np.uint8), prompts,
                     LabelSettings(trials=1))


def test_noise_free_oracle_labels_match_the_ground_truth_part(kettle) -> None:
    asset, views, samples = kettle
    prompts = prompts_for(TAXONOMY, "kettle", asset.part_names, functions=["pour-with"])
    labels = label_asset(OracleBackend(NO_NOISE), _arrays(views), samples.xyz, prompts,
                         LabelSettings(trials=2), GroundTruthParts(views.face_id, asset.face_part))
    assert labels.scores.shape == (len(prompts), 6000)
    assert labels.masks.shape == (len(prompts), 8, 64, 64)
    part = prompts[0].part_index
    on_part = asset.face_part[samples.face_id] == part
    assert labels.scores[0][on_part].mean() > 3 * labels.scores[0][~on_part].mean()
    gt = (views.face_id >= 0) & (asset.face_part[np.maximum(views.face_id, 0)] == part)
    ious = [mask_iou(labels.masks[0, v], gt[v]) for v in range(8) if gt[v].sum() >= 20]
    assert ious and np.mean(ious) > 0.6
    assert not (labels.masks[0] & ~views.mask).any()  # masks stay on the object


def test_points_seen_by_no_view_are_an_error(kettle) -> None:
    _, views, samples = kettle
    far = samples.xyz + np.float32(1000.0)
    with pytest.raises(ValueError, match="no surface point is visible"):
        aggregate_asset([], far, views.K, views.cam_to_world, views.depth, views.mask,
                        LabelSettings())


def test_an_asset_without_prompts_is_rejected(kettle) -> None:
    _, views, samples = kettle
    with pytest.raises(ValueError, match="no part prompts"):
        label_asset(FixedBoxBackend(), _arrays(views), samples.xyz, [], LabelSettings())


@dataclass
class TwoBoxBackend:
    """First pass: one large and two small boxes per view; on a crop: the crop's centre half."""

    name: ClassVar[str] = "two-box"
    calls: int = 0

    def ground(self, images, prompts, trial):
        self.calls += 1
        h, w = images.shape[1:3]
        if self.calls == 1:
            return [[Box(0, 0, 80, 80), Box(85, 85, 90, 90), Box(5, 90, 9, 95)] for _ in images]
        return [[Box(w / 4, h / 4, 3 * w / 4, 3 * h / 4)] for _ in images]


def test_zoom_refines_every_small_box_and_keeps_the_large_one() -> None:
    backend = TwoBoxBackend()
    images = np.zeros((1, 100, 100, 3), np.uint8)
    prompt = prompts_for(TAXONOMY, "knife", ())[:1]
    [[[boxes]]] = ground_asset(backend, images, prompt, LabelSettings(trials=1, zoom=True))
    assert backend.calls == 1 + 2  # one crop per small box
    assert boxes[0] == Box(0, 0, 80, 80)
    # each refined box is the centre half of its crop, so it stays around the original
    assert len(boxes) == 3 and boxes[1].center[0] == pytest.approx(87.5, abs=1.0)
    assert boxes[2].center[0] == pytest.approx(7.0, abs=1.5)


@dataclass
class OutlierTrialBackend:
    """Trials 0-2 box the same spot (jittered by a pixel); trial 3 boxes the far corner."""

    name: ClassVar[str] = "outlier"

    def ground(self, images, prompts, trial):
        if trial == 3:
            return [[Box(80, 80, 100, 100)] for _ in images]
        return [[Box(10 + trial, 10, 30 + trial, 30)] for _ in images]


def test_consensus_keeps_the_largest_cluster_of_trial_boxes() -> None:
    images = np.zeros((2, 100, 100, 3), np.uint8)
    prompt = prompts_for(TAXONOMY, "knife", ())[:1]
    plain = ground_asset(OutlierTrialBackend(), images, prompt, LabelSettings(trials=4))
    agreed = ground_asset(OutlierTrialBackend(), images, prompt,
                          LabelSettings(trials=4, consensus=True))
    assert sum(len(t) for t in plain[0][0]) == 4
    kept = [b for trial in agreed[0][1] for b in trial]
    assert len(kept) == 3 and all(b.x1 <= 32 for b in kept)
