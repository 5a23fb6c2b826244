"""SOCO's loader on a tiny fixture the test writes in the public layout, the task queries (CC
merges a concept's targets, SOC the named keypoint), errors that name the file, and the
procedural stand-in read back through the same loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from operators.benchmarks.soco import concept_functions, load_pairs, load_taxonomy, queries
from operators.benchmarks.soco_standin import StandinSettings, asset_keypoints, write_standin
from operators.data.procedural import make_asset
from operators.settings import ConfigError


def _point(name: str, point_id: int, pos: list[float], concept: str) -> dict:
    return {"id": point_id, "name": name, "pos": pos, "concept_id": 1, "concept_name": concept,
            "kind": "structural"}


def write_fixture(root: Path) -> Path:
    data = root / "SOCOv1"
    for category in ("car", "bus"):
        (data / "Images" / category).mkdir(parents=True)
        Image.new("RGB", (40, 30), "white").save(data / "Images" / category / f"{category}.JPEG")
    src = [_point("front_left_wheel", 1, [5, 25], "wheel"),
           _point("front_right_wheel", 2, [15, 25], "wheel"),
           _point("roof", 3, [10, 2], "roof")]
    trg = [_point("front_left_wheel", 1, [6, 24], "wheel"),
           _point("front_right_wheel", 2, [30, 24], "wheel"), _point("roof", 3, [20, 3], "roof")]
    pair = {"pair_id": 7, "pair_group": "car", "src_category": "car", "trg_category": "car",
            "src_image": "car.JPEG", "trg_image": "car.JPEG", "src_imsize": [40, 30],
            "trg_imsize": [40, 30], "src_bndbox": [2, 1, 38, 28], "trg_bndbox": [2, 1, 32, 28],
            "src_keypoints": src, "trg_keypoints": trg,
            "semantic_overlap": ["front_left_wheel", "roof"],
            # two groups of one concept: CC merges them per source keypoint
            "concept_matches": [{"concept_name": "wheel", "src_keypoints": ["front_left_wheel"],
                                 "trg_keypoints": ["front_left_wheel"]},
                                {"concept_name": "wheel",
                                 "src_keypoints": ["front_left_wheel", "front_right_wheel"],
                                 "trg_keypoints": ["front_right_wheel"]}]}
    (data / "PairAnnotations" / "intra" / "car").mkdir(parents=True)
    (data / "PairAnnotations" / "intra" / "car" / "0007.json").write_text(json.dumps(pair))
    cross = dict(pair, pair_group="bus-car", src_category="bus", src_image="bus.JPEG")
    (data / "PairAnnotations" / "cross" / "bus-car").mkdir(parents=True)
    (data / "PairAnnotations" / "cross" / "bus-car" / "0001.json").write_text(json.dumps(cross))
    (data / "Metadata").mkdir()
    (data / "Metadata" / "keypoint_taxonomy.json").write_text(json.dumps(
        {"concepts": {"wheel": {"function": "roll-onto"}, "roof": {}}}))
    return data


def test_the_loader_reads_the_public_layout_and_builds_each_tasks_targets(tmp_path: Path) -> None:
    data = write_fixture(tmp_path)
    intra, cross = load_pairs(data, "intra"), load_pairs(data, "cross")
    assert len(intra) == len(cross) == 1
    pair = intra[0]
    assert (pair.pair_id, pair.group, pair.target.bbox) == (7, "car", (2.0, 1.0, 32.0, 28.0))
    assert cross[0].source.category == "bus" and cross[0].source.image.name == "bus.JPEG"
    soc = {q.name: q.candidates.tolist() for q in queries(pair, "SOC")}
    assert soc == {"front_left_wheel": [[6, 24]], "roof": [[20, 3]]}
    cc = {q.name: q.candidates.tolist() for q in queries(pair, "CC")}
    # the left wheel may land on either target wheel (two groups merged), the right on its own
    assert cc == {"front_left_wheel": [[6, 24], [30, 24]], "front_right_wheel": [[30, 24]]}
    assert concept_functions(load_taxonomy(data), {"roll-onto", "cut-with"}) == {
        "wheel": "roll-onto", "roll-onto": "roll-onto", "cut-with": "cut-with"}


def test_broken_data_is_one_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a SOCO directory.*Images"):
        load_pairs(tmp_path, "intra")
    data = write_fixture(tmp_path)
    path = data / "PairAnnotations" / "intra" / "car" / "0007.json"
    broken = json.loads(path.read_text())
    broken["semantic_overlap"] = ["tail_light"]
    path.write_text(json.dumps(broken))
    with pytest.raises(ConfigError, match="0007.json: matches name keypoints.*tail_light"):
        load_pairs(data, "intra")
    del broken["trg_keypoints"]
    path.write_text(json.dumps(broken))
    with pytest.raises(ConfigError, match="0007.json: missing field 'trg_keypoints'"):
        load_pairs(data, "intra")


def test_frame_keypoints_mean_the_same_spot_on_every_asset_of_a_category() -> None:
    # the spout's "front" keypoint sits at the spout's far end along its frame's x axis
    names = [set(k.name for k in asset_keypoints(make_asset("mug", s))) for s in (1, 2)]
    assert names[0] == names[1] and "pour-with front" in names[0]
    asset = make_asset("mug", 1)
    found = {k.name: k.xyz for k in asset_keypoints(asset)}
    rim = asset.part_names.index("rim")
    frame = asset.part_frames[rim]
    front, back = (np.asarray(found[f"pour-with {w}"]) - frame.origin for w in ("front", "back"))
    assert front @ frame.axes[0] > 0 > back @ frame.axes[0]


def test_the_stand_in_is_written_in_the_public_layout_and_reads_back(tmp_path: Path) -> None:
    settings = StandinSettings(categories=("mug", "cup"), assets_per_category=2, views=4,
                               pairs_per_group=3)
    summary = write_standin(tmp_path, settings)
    intra, cross = load_pairs(tmp_path, "intra"), load_pairs(tmp_path, "cross")
    assert summary.pairs == {"intra": len(intra), "cross": len(cross)}
    assert intra and cross and {p.group for p in cross} == {"mug-cup"}
    for pair in intra + cross:
        assert len(queries(pair, "SOC")) >= 2                   # >= 2 shared visible keypoints
        for view in (pair.source, pair.target):
            left, top, right, bottom = view.bbox
            for point in view.keypoints:                        # projected onto the object
                x, y = point.position
                assert left - 1 <= x <= right + 1 and top - 1 <= y <= bottom + 1
    taxonomy = load_taxonomy(tmp_path)
    assert taxonomy["concepts"]["pour-with opening"]["function"] == "pour-with"
