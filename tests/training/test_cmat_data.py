"""What CMAT and CAST read and in which order: the schedule, the plans, prompts, targets and
image exemplars (hand-made inputs)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from training.affordance_data import (Sample, asset_samples, gt_target, pooled_exemplar,
                                      prompt_texts, random_features)
from training.cmat import cast_plan, pretrain_plan
from training.task_loop import lr_factor


def test_the_schedule_warms_up_linearly_then_decays_as_a_cosine() -> None:
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)       # half-way through the decay
    assert lr_factor(100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(0, 10, 0) == pytest.approx(1.0)


def test_the_pretrain_plan_visits_every_asset_once_an_epoch_per_rank_and_step() -> None:
    rows = pretrain_plan(n_assets=6, steps=3, world_size=2, batch_size=2, seed=0)
    assert [(r["step"], r["slot"]) for r in rows] == [(s, k) for s in range(3) for k in (0, 1)]
    first_epoch = [i for r in rows[:3] for i in r["items"]]
    assert sorted(first_epoch) == list(range(6))
    assert rows == pretrain_plan(6, 3, 2, 2, 0) and rows != pretrain_plan(6, 3, 2, 2, 1)


def test_the_cast_plan_draws_exemplars_of_the_function_from_other_assets() -> None:
    samples = [Sample("a", "mug", "pour-with", ("rim",)), Sample("b", "cup", "pour-with", ("rim",)),
               Sample("a", "mug", "hang-onto", ("handle",)),
               Sample("c", "bowl", "scoop-with", ("interior",))]
    rows = cast_plan(samples, steps=40, world_size=1, batch_size=4, prompts="both", seed=0)
    seen_modalities = Counter()
    for row in rows:
        for item, exemplar, text, modality in zip(row["items"], row["exemplars"], row["texts"],
                                                  row["modality"]):
            assert samples[exemplar].function == samples[item].function
            if samples[item].function == "pour-with":   # another asset has it
                assert samples[exemplar].asset_id != samples[item].asset_id
            else:                                       # the only one: itself
                assert exemplar == item
            assert 0 <= text < 4
            seen_modalities[modality] += 1
    assert set(seen_modalities) == {0, 1, 2}
    # exemplars only from samples that have one: b's pour-with has none -> a's own
    no_b = cast_plan(samples, 10, 1, 4, "image", 0, has_exemplar=[True, False, True, True])
    for row in no_b:
        for item, exemplar in zip(row["items"], row["exemplars"]):
            assert exemplar != 1
            if item == 0:
                assert exemplar == 0
    text_only = cast_plan(samples, 5, 1, 4, "text", 0)
    assert {m for r in text_only for m in r["modality"]} == {1}


def test_prompts_have_four_phrasings_with_the_question_second() -> None:
    texts = prompt_texts("mug", "pour-with", ("rim",))
    assert texts[0] == "pour with"
    assert texts[1] == "which part of the mug do you pour with?"
    assert "edge" in texts[2]                          # the taxonomy's description of the rim
    assert texts[3] == "the rim of the mug"
    unknown = prompt_texts("teapot-xl", "pour-with", ("spout",))
    assert unknown[2] == "the spout of the teapot xl"   # no taxonomy entry: a plain phrase


def test_samples_and_ground_truth_come_from_the_procedural_parts() -> None:
    row = {"asset_id": "a", "category": "knife", "part_names": ["handle", "blade", "tip"],
           "part_functions": [[], ["cut-with", "spread-with"], ["cut-with", "pierce-with"]]}
    samples = asset_samples(row, None)
    assert [(s.function, s.parts) for s in samples] == [
        ("cut-with", ("blade", "tip")), ("pierce-with", ("tip",)), ("spread-with", ("blade",))]
    inputs = {"part": np.array([0, 1, 2, 2, -1], np.int16)}
    assert gt_target(inputs, row["part_names"], ("blade", "tip")).tolist() == [0, 1, 1, 1, 0]
    pseudo = asset_samples(row, {"cut-with": ("blade",)})
    assert [(s.function, s.parts) for s in pseudo] == [("cut-with", ("blade",))]


def test_an_exemplar_averages_the_patch_grid_over_the_part_pixels() -> None:
    grid = np.array([[[1.0], [3.0]], [[5.0], [7.0]]])          # (h=2, w=2, C=1)
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True                                         # the top-left cell only
    assert pooled_exemplar(grid, mask)[0] == pytest.approx(1.0)
    mask[:2, 2:3] = True                                        # half of the top-right cell
    # weights 1 and 0.5 -> (1 * 1 + 0.5 * 3) / 1.5
    assert pooled_exemplar(grid, mask)[0] == pytest.approx(2.5 / 1.5)
    assert pooled_exemplar(grid, np.zeros((4, 4), bool)) is None


def test_random_teacher_features_are_fixed_per_asset_and_seed() -> None:
    a = random_features("x", 10, 4, seed=0)
    assert a.shape == (10, 4) and np.array_equal(a, random_features("x", 10, 4, seed=0))
    assert not np.array_equal(a, random_features("y", 10, 4, seed=0))
    assert not np.array_equal(a, random_features("x", 10, 4, seed=1))
