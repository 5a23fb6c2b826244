"""The benchmarks' prediction steps without Ray, against hand-computed values: SOCO's nearest
neighbour with a describer that maps each pixel to itself, InstructPart's box and mask-head
predictors and their query routing, AGD20K's heat-map means, and the `affordanceclip`
grounding backend feeding the label stage's vote aggregation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from operators.benchmarks.instructpart import load_samples, write_sample
from operators.benchmarks.soco import load_pairs
from operators.geometry.render import render_views, sample_surface
from operators.models.grounding import heat_boxes
from operators.models.grounding_backends import make_oracle
from operators.models.labeling import label_asset, prompts_for
from operators.data.procedural import make_asset
from operators.data.taxonomy import load_taxonomy
from operators.settings import LabelSettings, RenderSettings
from tests.operators.benchmarks.test_soco import write_fixture
from training.affordanceclip_backend import AffordanceClipBackend
from training.affordanceclip_train import TINY, build_affordanceclip
from training.agd20k_eval import evaluate_heatmaps, uniform_predictor
from training.instructpart_eval import (Routing, box_predictor, evaluate_parts,
                                        mask_head_predictor, object_predictor)
from training.model import DenseCorrespondenceModel
from training.soco_eval import FeatureCache, Predictor, evaluate_soco


def pixel_identity(seen: list[str]):
    """Descriptors = one-hot of the pixel: the nearest neighbour of a source keypoint in the
    target is the target pixel at the same place."""
    def describe(features, uv, size, function, key):
        seen.append(function)
        index = np.floor(uv[:, 1]).astype(int) * size[1] + np.floor(uv[:, 0]).astype(int)
        return np.eye(size[0] * size[1], dtype=np.float32)[index], None
    return describe


def test_soco_nearest_neighbour_and_pck_by_hand(tmp_path: Path) -> None:
    data = write_fixture(tmp_path)
    pairs = {"intra": load_pairs(data, "intra"), "cross": load_pairs(data, "cross")}
    features = FeatureCache(lambda images: np.zeros((1, 1, 2, 2, 1), np.float32), image_size=40)
    conditioned, fallback = [], []
    predictor = Predictor(pixel_identity(conditioned), pixel_identity(fallback),
                          {"wheel": "roll-onto"})
    result = evaluate_soco({"identity": predictor}, pairs, features, alpha=0.1, stride=1,
                           progress=lambda line: None)["identity"]
    # radius 0.1 x 30 = 3 px. Predictions = the source pixels' centres: the left wheel
    # (5.5, 25.5) hits its target (6, 24); the roof (10.5, 2.5) misses (20, 3); the right
    # wheel (15.5, 25.5) misses (30, 24). SOC: wheel + roof = 1/2; CC: both wheels = 1/2.
    assert {t: s["per_img"] for t, s in result.summary.items()} == {
        "CC": 50.0, "SOC": 50.0, "Cross-SOC": 50.0}
    assert result.summary["CC"]["per_category"] == {"car": 50.0}
    # wheels are described with their function, the roof (no function) with the fallback
    assert set(conditioned) == {"roll-onto"} and set(fallback) == {""}
    assert result.conditioned == pytest.approx(4 / 6)     # SOC 1/2, CC 2/2, Cross-SOC 1/2
    assert np.allclose(result.predictions["SOC"][0], [[5.5, 25.5], [10.5, 2.5]])


def test_soco_refuses_an_image_whose_size_is_not_the_annotated_one(tmp_path: Path) -> None:
    from operators.settings import ConfigError
    from PIL import Image
    data = write_fixture(tmp_path)
    Image.new("RGB", (80, 60), "white").save(data / "Images" / "car" / "car.JPEG")  # resized
    features = FeatureCache(lambda images: np.zeros((1, 1, 2, 2, 1), np.float32), image_size=40)
    with pytest.raises(ConfigError, match="car.JPEG is 80x60 pixels, its \\*_imsize says 40x30"):
        evaluate_soco({"raw": Predictor(pixel_identity([]), pixel_identity([]), {})},
                      {"intra": load_pairs(data, "intra")}, features, 0.1, 1,
                      progress=lambda line: None)


def write_part_sample(folder: Path) -> None:
    image = np.full((20, 20, 3), 200, np.uint8)
    truth = np.zeros((20, 20), bool)
    truth[2:6, 4:10] = True                       # 24 px part
    objects = np.zeros((20, 20), bool)
    objects[2:14, 4:14] = True                    # 120 px object
    entry = write_sample(folder / "test", "s1", image, truth, objects, {
        "object": "knife", "part": "blade", "affordance": "cut-with", "action": "cut",
        "instruction": ["cut with", "cut with", "-", "-", "blade of knife", "-"]})
    import json
    (folder / "test" / "data_test.json").write_text(json.dumps([entry]))


def test_instructpart_predictors_by_hand(tmp_path: Path) -> None:
    write_part_sample(tmp_path)
    samples = load_samples(tmp_path)
    whole = evaluate_parts(object_predictor(), samples, "human")
    assert whole.metrics["ORPS"]["gIoU"] == pytest.approx(100 * 24 / 120)
    assert whole.metrics["ORPS"]["P@50"] == 0.0
    exact = make_oracle({"jitter": 0.0, "miss_rate": 0.0, "false_positive_rate": 0.0})
    boxed = evaluate_parts(box_predictor(exact), samples, "human")
    assert boxed.metrics["TRPS"] == {"gIoU": 100.0, "cIoU": 100.0, "P@50": 100.0,
                                     "P@50:95": 100.0, "samples": 1.0}


def test_the_mask_head_predictor_routes_queries_to_functions(tmp_path: Path) -> None:
    from operators.models.backbones import load_text_encoder
    from training.correspondence import function_text
    from training.evaluation import model_describer
    write_part_sample(tmp_path)
    samples = load_samples(tmp_path)
    functions = ["pour-with", "cut-with", "hang-onto"]
    encoder = load_text_encoder("clip-text-random-tiny")
    text = torch.as_tensor(encoder.embed([function_text(f) for f in functions]))
    torch.manual_seed(0)
    model = DenseCorrespondenceModel(feature_dim=4, text_dim=text.shape[1], n_blocks=1,
                                     proj_dim=8, hidden_dim=8, out_dim=4, mask_head=True).eval()
    with torch.no_grad():                         # a head that says "part" everywhere
        model.mask_head.weight.zero_()
        model.mask_head.bias.fill_(5.0)
    by_part = {(c, p.name): p.functions[0] for c, cat in load_taxonomy().categories.items()
               for p in cat.parts.values() if p.functions}
    routing = Routing(functions, text, encoder.embed, by_part)
    routed: dict[str, list[bool]] = {}
    predictor = mask_head_predictor(model_describer(model, lambda f: text[functions.index(f)]),
                                    lambda images: np.ones((1, 1, 2, 2, 4), np.float32),
                                    routing, routed)
    result = evaluate_parts(predictor, samples, "human", routed)
    # ORPS: (knife, blade) -> cut-with by the taxonomy; TRPS: "cut with" embeds exactly like
    # the function's own text -> cut-with; the mask is the whole 20 x 20 image: IoU 24 / 400
    assert result.routing == {"ORPS": 1.0, "TRPS": 1.0}
    assert result.metrics["TRPS"]["gIoU"] == pytest.approx(100 * 24 / 400)


def test_heat_map_means_by_hand(tmp_path: Path) -> None:
    from tests.operators.benchmarks.test_instructpart_agd20k import write_agd20k
    from operators.benchmarks.agd20k import load_samples as load_heat, read_heatmap
    samples = load_heat(write_agd20k(tmp_path))
    perfect = evaluate_heatmaps(lambda image, s: read_heatmap(s.gt), samples)
    assert perfect.metrics["KLD"] == pytest.approx(0.0, abs=1e-6)
    assert perfect.metrics["SIM"] == pytest.approx(1.0)
    assert perfect.thumbnails[0].shape == (32, 64) and perfect.thumbnails[0].dtype == np.float16
    flat = evaluate_heatmaps(uniform_predictor(), samples)
    # uniform over 128 px vs 6 px of ground truth: SIM = 6 x min(1/128, 1/6) = 6/128;
    # NSS is undefined for a flat map (skipped)
    assert flat.metrics["SIM"] == pytest.approx(6 / 128)
    assert flat.metrics["nss_skipped"] == 1.0 and np.isnan(flat.metrics["NSS"])


def test_heat_boxes_are_the_level_sets_regions() -> None:
    heat = np.zeros((10, 12))
    heat[1:3, 1:4] = 1.0          # a strong blob
    heat[6:9, 7:11] = 0.4         # a weaker one
    assert [(b.x0, b.y0, b.x1, b.y1) for b in heat_boxes(heat, (0.3, 0.5))] == [
        (1, 1, 4, 3), (7, 6, 11, 9), (1, 1, 4, 3)]
    assert heat_boxes(np.ones((4, 4))) == []


def test_affordanceclip_backend_feeds_the_label_votes_with_action_prompts() -> None:
    asset = make_asset("mug", 3)
    views = render_views(asset.mesh, RenderSettings(views=3, width=48, height=48,
                                                    n_points=500), 0)
    surface = sample_surface(asset.mesh, 300, 0)
    model = build_affordanceclip({"name": TINY, "seed": 0, "image_size": 32})
    asked: list[str] = []

    class Recording(AffordanceClipBackend):
        def ground(self, images, prompts, trial=0):
            asked.extend(prompts)
            return super().ground(images, prompts, trial)

    prompts = prompts_for(load_taxonomy(), "mug", asset.part_names)
    labels = label_asset(Recording(model, (0.25, 0.5, 0.75)), {
        "rgb": views.rgb, "depth": views.depth, "mask": views.mask, "K": views.K,
        "cam_to_world": views.cam_to_world}, surface.xyz, prompts, LabelSettings(trials=1))
    assert set(asked) == {p.function.replace("-", " ") for p in prompts}
    assert labels.scores.shape == (len(prompts), 300)
    assert ((labels.scores >= 0) & (labels.scores <= 1)).all() and labels.scores.max() == 1.0
