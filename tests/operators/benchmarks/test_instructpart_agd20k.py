"""InstructPart's and AGD20K's loaders on tiny fixtures the tests write in the released
layouts, their errors, and their procedural stand-ins read back through the same loaders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from operators.benchmarks import agd20k, instructpart
from operators.data.procedural import make_asset
from operators.settings import ConfigError


def write_instructpart(root: Path) -> Path:
    folder = root / "test"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    Image.new("RGB", (20, 10), "white").save(folder / "images" / "k1-tea_kettle-spout.jpg")
    mask = np.zeros((10, 20), np.uint8)
    mask[2:5, 15:19] = 255
    Image.fromarray(mask).save(folder / "masks" / "k1-tea_kettle-spout.png")
    entry = {"image_path": "k1.jpg", "part_list": [{
        "object": "tea kettle", "part": "spout", "affordance": "pour", "action": "pour tea",
        "instruction": ["Pour me some tea.", "Could you pour some tea for me?",
                        "the spout of the tea kettle is for pouring", "x", "spout of tea kettle",
                        "y"]}]}
    (folder / "data_test.json").write_text(json.dumps([entry]))
    return root


def test_instructpart_reads_the_release_layout_and_its_two_tasks(tmp_path: Path) -> None:
    samples = instructpart.load_samples(write_instructpart(tmp_path))
    assert len(samples) == 1
    sample = samples[0]
    assert (sample.key, sample.object, sample.part) == ("k1-tea_kettle-spout", "tea kettle",
                                                        "spout")
    assert sample.text("TRPS") == "Pour me some tea."
    assert sample.text("TRPS", "gpt") == "Could you pour some tea for me?"
    assert sample.text("ORPS") == "Where is the spout of the tea kettle in the image"
    assert instructpart.read_mask(sample.mask).sum() == 12


def test_a_nested_split_reads_its_own_index(tmp_path: Path) -> None:
    write_instructpart(tmp_path)
    nested = tmp_path / "train" / "train200"
    nested.parent.mkdir()
    (tmp_path / "test").rename(nested)
    (nested / "data_test.json").rename(nested / "data_train.json")   # the release's naming
    assert len(instructpart.load_samples(tmp_path, "train/train200")) == 1


def test_instructpart_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no test/data_test.json"):
        instructpart.load_samples(tmp_path)
    write_instructpart(tmp_path)
    (tmp_path / "test" / "masks" / "k1-tea_kettle-spout.png").unlink()
    with pytest.raises(ConfigError, match="k1-tea_kettle-spout: no mask"):
        instructpart.load_samples(tmp_path)


def test_the_instructpart_stand_in_never_names_a_part_in_its_task_instructions(
        tmp_path: Path) -> None:
    settings = instructpart.StandinSettings(categories=("mug", "kettle", "knife"),
                                            assets_per_category=1, views=4)
    written = instructpart.write_standin(tmp_path, settings)
    samples = instructpart.load_samples(tmp_path)
    assert written == len(samples) >= 3
    for sample in samples:
        parts = make_asset(sample.object, 0).part_names
        for text in (sample.text("TRPS"), sample.text("TRPS", "gpt")):
            assert not set(text.lower().rstrip(".?").split()) & set(parts), text
        assert sample.part in sample.text("ORPS")
        truth = instructpart.read_mask(sample.mask)
        objects = instructpart.read_mask(sample.objects)
        assert truth.sum() >= 150 and not (truth & ~objects).any()   # the part is on the object


def write_agd20k(root: Path) -> Path:
    for folder in ("egocentric", "GT"):
        (root / "Seen" / "testset" / folder / "cut_with" / "knife").mkdir(parents=True)
    Image.new("RGB", (16, 8), "white").save(
        root / "Seen" / "testset" / "egocentric" / "cut_with" / "knife" / "k_01.jpg")
    heat = np.zeros((8, 16), np.uint8)
    heat[2:4, 3:6] = 255
    Image.fromarray(heat).save(root / "Seen" / "testset" / "GT" / "cut_with" / "knife" /
                               "k_01.png")
    return root


def test_agd20k_reads_its_test_layout_and_needs_every_ground_truth(tmp_path: Path) -> None:
    samples = agd20k.load_samples(write_agd20k(tmp_path))
    assert [(s.affordance, s.object, s.prompt) for s in samples] == [
        ("cut_with", "knife", "cut with")]
    heat = agd20k.read_heatmap(samples[0].gt)
    assert heat.shape == (8, 16) and heat.max() == 1.0 and heat.sum() == 6
    (tmp_path / "Seen" / "testset" / "GT" / "cut_with" / "knife" / "k_01.png").unlink()
    with pytest.raises(ConfigError, match="k_01.jpg has no ground-truth heat map"):
        agd20k.load_samples(tmp_path)
    with pytest.raises(ConfigError, match="no Unseen/testset/egocentric"):
        agd20k.load_samples(tmp_path, "Unseen")


def test_the_agd20k_stand_in_peaks_on_the_functions_parts(tmp_path: Path) -> None:
    settings = agd20k.StandinSettings(categories=("mug",), assets_per_category=1, views=4)
    assert agd20k.write_standin(tmp_path, settings) == len(agd20k.load_samples(tmp_path)) >= 2
    for sample in agd20k.load_samples(tmp_path):
        assert sample.object == "mug" and "-" not in sample.affordance
        heat = agd20k.read_heatmap(sample.gt)
        assert heat.max() == 1.0 and 0 < (heat > 0.5).mean() < 0.5
