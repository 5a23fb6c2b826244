"""The catalogue, the pair plan and the batches a rank builds, on a real (small) root."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from operators.geometry.correspondence import part_mask, unproject
from operators.store.readers import RootReader
from operators.store.storage import RunRoot
from training.data import PairBatches
from training.loop import BlockSource, step_losses, to_tensors
from training.model import DenseCorrespondenceModel
from training.pairs import build_catalogue, plan_rows

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]

TRAIN_CFG = {"points": 16, "tau": 0.1, "lambda_functional": 1.0, "lambda_spatial": 10.0,
             "lambda_mask": 1.0}


@pytest.fixture(scope="module")
def scanned(dfc_root: str):
    reader = RootReader(RunRoot(dfc_root))
    manifest = {row["asset_id"]: row for row in reader.manifest()}
    catalogue = build_catalogue(reader, list(manifest.values()), "gt", min_part_pixels=8,
                                min_shared_points=16)
    return reader, manifest, catalogue


def test_catalogue_lists_views_that_show_each_functional_part(scanned) -> None:
    reader, manifest, catalogue = scanned
    assert {"pour-with", "scoop-with"} <= set(catalogue.functions)
    assert {catalogue.functions[f] for f in catalogue.pairable_functions()} >= {"pour-with"}
    for entry in catalogue.part_views[:40]:
        row = manifest[catalogue.assets[entry.asset]]
        part = catalogue.parts[entry.part]
        assert catalogue.functions[entry.function] in row["part_functions"][
            row["part_names"].index(part)]
        views = reader.views(row["asset_id"], ["face_id", "mask"])
        mask = part_mask(views["face_id"][entry.view], np.asarray(row["face_part"]),
                         [row["part_names"].index(part)])
        assert mask.sum() >= 8 and (views["mask"][entry.view] & ~mask).sum() >= 8
    assert catalogue.shared_views and all(s.view_1 < s.view_2 for s in catalogue.shared_views)


def test_the_plan_is_deterministic_and_pairs_two_assets_on_one_function(scanned) -> None:
    _, _, catalogue = scanned
    kwargs = dict(steps=5, world_size=2, functional_pairs=3, spatial_pairs=2)
    rows = plan_rows(catalogue, seed=7, **kwargs)
    again = plan_rows(catalogue, seed=7, **kwargs)
    other = plan_rows(catalogue, seed=8, **kwargs)
    assert [(r["step"], r["slot"]) for r in rows] == [(s, k) for s in range(5) for k in range(2)]
    assert all(np.array_equal(a["f_first"], b["f_first"]) and a["seed"] == b["seed"]
               for a, b in zip(rows, again))
    assert any(not np.array_equal(a["f_first"], b["f_first"]) for a, b in zip(rows, other))
    for row in rows:
        for first, second, function in zip(row["f_first"], row["f_second"], row["f_function"]):
            one, two = catalogue.part_views[first], catalogue.part_views[second]
            assert one.asset != two.asset and one.function == two.function == function
        for entry, function in zip(row["s_entry"], row["s_function"]):
            assert function in catalogue.shared_views[entry].functions


def test_a_batch_samples_inside_the_part_and_on_the_rest_of_the_object(scanned) -> None:
    reader, manifest, catalogue = scanned
    data = PairBatches(reader.root, catalogue, manifest, masks="gt", points=16, input="cache",
                       n_blocks=3, cache_assets=4)
    row = plan_rows(catalogue, steps=1, world_size=1, functional_pairs=3, spatial_pairs=3,
                    seed=0)[0]
    batch = data.build(row)
    assert batch["f_feat_1"].shape[:2] == (3, 3) and batch["f_pos_1"].shape == (3, 16, 2)
    for k, entry_index in enumerate(row["f_first"]):
        entry = catalogue.part_views[entry_index]
        row_ = manifest[catalogue.assets[entry.asset]]
        views = reader.views(row_["asset_id"], ["face_id", "mask"])
        part = part_mask(views["face_id"][entry.view], np.asarray(row_["face_part"]),
                         [row_["part_names"].index(catalogue.parts[entry.part])])
        pos = np.floor(batch["f_pos_1"][k]).astype(int)
        neg = np.floor(batch["f_neg_1"][k]).astype(int)
        assert part[pos[:, 1], pos[:, 0]].all()
        assert (~part[neg[:, 1], neg[:, 0]]).all()
        assert views["mask"][entry.view][neg[:, 1], neg[:, 0]].all()  # never the background
    # spatial pairs: both pixels see the same surface point (within the depth tolerance)
    for k, entry_index in enumerate(row["s_entry"]):
        entry = catalogue.shared_views[entry_index]
        views = reader.views(catalogue.assets[entry.asset], ["depth", "K", "cam_to_world"])
        order = [entry.view_2, entry.view_1] if row["s_swap"][k] else [entry.view_1, entry.view_2]
        xyz = [unproject(batch[f"s_uv_{i + 1}"][k], views["depth"][v], views["K"][v],
                         views["cam_to_world"][v]) for i, v in enumerate(order)]
        gap = np.linalg.norm(xyz[0] - xyz[1], axis=1)
        assert not np.isnan(gap).any()  # both pixels are on the object
        # the same point, up to where in its pixel it lies (~5 mm pixels at 56 px)
        assert np.median(gap) < 0.01 and gap.max() < 0.03


def test_the_backbone_in_the_loop_gives_the_cache_s_numbers(scanned) -> None:
    """Same batch, augmentation off: blocks from features/blocks and from the frozen backbone
    run on the views agree, and so do the losses."""
    reader, manifest, catalogue = scanned
    row = plan_rows(catalogue, steps=1, world_size=1, functional_pairs=2, spatial_pairs=2,
                    seed=3)[0]
    common = dict(masks="gt", points=16, n_blocks=3, cache_assets=8)
    cached = PairBatches(reader.root, catalogue, manifest, input="cache", **common).build(row)
    images = PairBatches(reader.root, catalogue, manifest, input="backbone", **common).build(row)
    assert images["f_feat_1"].dtype == np.uint8  # RGB views
    device = torch.device("cpu")
    from_cache = to_tensors(cached, BlockSource(None, 3, device), device)
    in_loop = to_tensors(images, BlockSource({"name": "dinov2-random-tiny"}, 3, device), device)
    for key in ("f_feat_1", "f_feat_2", "s_feat_1", "s_feat_2"):
        torch.testing.assert_close(in_loop[key], from_cache[key], atol=2e-3, rtol=1e-3)
    torch.manual_seed(0)
    model = DenseCorrespondenceModel(64, 8, proj_dim=32, hidden_dim=32, out_dim=16)
    from training.loop import PairStep
    text = torch.randn(len(catalogue.functions), 8)
    size = (56, 56)
    a = step_losses(PairStep(model), from_cache, text, TRAIN_CFG, size)
    b = step_losses(PairStep(model), in_loop, text, TRAIN_CFG, size)
    for key in ("loss", "loss_functional", "loss_spatial"):
        assert abs(float(a[key].detach()) - float(b[key].detach())) < 1e-3


def test_validation_and_held_out_assets_never_reach_training(dfc_root: str) -> None:
    from training.config import DataSection, EvalSection, TrainSection
    from training.correspondence import prepare_run
    from training.splits import assign_splits
    root = RunRoot(dfc_root)
    manifest = {r["asset_id"]: r for r in RootReader(root).manifest()}
    data = DataSection(val_fraction=0.3, holdout_categories=["knife"])
    train = TrainSection(steps=2, checkpoint_every=2, min_part_pixels=8, min_shared_points=16,
                         points=16, functional_pairs=2, spatial_pairs=2, val_pairs=4,
                         proj_dim=8, hidden_dim=8, out_dim=8)
    prepared = prepare_run(root, "runs/train/leak-check", "leak-check", train, data,
                           EvalSection(max_gt_points=50), {"k": 1}, None, progress=lambda _: None)
    splits = assign_splits({a: r["category"] for a, r in manifest.items()}, 0.3, ["knife"])
    trained = set(prepared.setup.catalogue.assets) | set(prepared.setup.manifest)
    assert trained and all(splits[a] == "train" for a in trained)
    assert {a for a, s in splits.items() if s == "holdout"} == {
        a for a, r in manifest.items() if r["category"] == "knife"}
    for pair in prepared.setup.val_pairs:  # validation pairs: validation assets only
        assert splits[pair.asset_1] == splits[pair.asset_2] == "val"
        assert pair.function in prepared.setup.catalogue.functions


def test_pseudo_label_masks_drive_the_catalogue_per_function(scanned) -> None:
    reader, manifest, _ = scanned
    catalogue = build_catalogue(reader, list(manifest.values()), "pseudo", min_part_pixels=8,
                                min_shared_points=16)
    assert catalogue.part_views
    for entry in catalogue.part_views[:30]:
        asset = catalogue.assets[entry.asset]
        found = reader.label_masks(asset, catalogue.functions[entry.function],
                                   catalogue.parts[entry.part])
        mask = found["mask"][list(found["view_id"]).index(entry.view)]
        objects = reader.views(asset, ["mask"])["mask"][entry.view]
        assert (mask & objects).sum() >= 8  # the view shows that function's pseudo-label


def test_the_catalogue_scanned_on_ray_tasks_is_the_sequential_one(dfc_root: str,
                                                                  scanned) -> None:
    from rayjobs.config import TrainJob, load_config
    from rayjobs.train_job import scan_on_ray
    from training.pairs import merge_scans
    reader, manifest, catalogue = scanned
    config = load_config((), ["train.masks=gt", "train.min_part_pixels=8",
                              "train.min_shared_points=16", "ray.progress_bars=false"],
                         root=dfc_root, model=TrainJob)
    scans = scan_on_ray(config, reader.root, list(manifest.values()))
    assert merge_scans(scans).to_json() == catalogue.to_json()
