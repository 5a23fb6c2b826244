"""Grounding operators: VLM text parsing, prompts, the oracle backend. Hand-computed numbers."""

from __future__ import annotations

import numpy as np
import pytest

from operators.models.grounding import (NO_NOISE, PROMPT_TEMPLATES, Box, GroundingBackend,
                                        GroundingOutputError, OracleBackend, OracleNoise,
                                        boxes_from_array, boxes_to_array, format_prompt,
                                        oracle_boxes, parse_vlm_boxes)

SQUARE = (1000, 1000)  # 0-1000 frame == pixels: easy hand numbers


# --- Box ----------------------------------------------------------------------------------------

def test_box_record_validates_and_round_trips_through_arrays() -> None:
    box = Box(np.float32(1), 2, 3, 4)
    assert box == Box(1.0, 2.0, 3.0, 4.0, 1.0) and type(box.x0) is float
    assert (box.width, box.height, box.area, box.center) == (2.0, 2.0, 4.0, (2.0, 3.0))
    with pytest.raises(ValueError):
        Box(3, 0, 1, 1)
    with pytest.raises(ValueError):
        Box(float("nan"), 0, 1, 1)
    boxes = [Box(0, 0, 1, 2, 0.5), Box(1, 1, 3, 3)]
    assert boxes_from_array(boxes_to_array(boxes)) == boxes
    assert boxes_to_array([]).shape == (0, 5) and boxes_from_array(np.zeros((0, 5))) == []


# --- CogVLM style ---------------------------------------------------------------------------------

def test_cogvlm_single_box() -> None:
    assert parse_vlm_boxes("the handle [[100,200,300,400]]", SQUARE, "cogvlm") == [Box(100, 200, 300, 400)]


@pytest.mark.parametrize("text", [
    "[[100,200,300,400],[500,600,700,800]]",
    "[[100,200,300,400];[500,600,700,800]]",
    "[[100,200,300,400]] and [[500,600,700,800]]",
    "[[100,200,300,400;500,600,700,800]]",
    "[[100, 200, 300, 400]]; [[500, 600, 700, 800]]",
])
def test_cogvlm_several_boxes(text: str) -> None:
    assert parse_vlm_boxes(text, SQUARE, "cogvlm") == [Box(100, 200, 300, 400), Box(500, 600, 700, 800)]


def test_cogvlm_stretched_mapping_for_a_non_square_image() -> None:
    # CogVLM stretches the image to a square: x scales by W=400, y by H=200.
    # x: 250*0.4 = 100, 750*0.4 = 300; y: 100*0.2 = 20, 400*0.2 = 80.
    assert parse_vlm_boxes("[[250,100,750,400]]", (200, 400), "cogvlm") == [Box(100, 20, 300, 80)]
    assert parse_vlm_boxes("[[0,0,1000,1000]]", (200, 400), "cogvlm") == [Box(0, 0, 400, 200)]


def test_cogvlm_padded_square_mapping_for_a_non_square_image() -> None:
    # H=200, W=400: the padded square has side 400, padding at the bottom.
    # x: 250*400/1000 = 100, 750*400/1000 = 300; y: 100*400/1000 = 40, 400*400/1000 = 160.
    padded = {"cogvlm_frame": "padded"}
    assert parse_vlm_boxes("[[250,100,750,400]]", (200, 400), "cogvlm", **padded) == [
        Box(100, 40, 300, 160)]
    # A box reaching into the padding is clipped to the image (y1 = 1000*0.4 = 400 -> 200).
    assert parse_vlm_boxes("[[0,0,1000,1000]]", (200, 400), "cogvlm", **padded) == [
        Box(0, 0, 400, 200)]
    # Tall image H=400, W=200: padding at the right, x beyond 200 is clipped.
    assert parse_vlm_boxes("[[250,250,750,500]]", (400, 200), "cogvlm", **padded) == [
        Box(100, 100, 200, 200)]


def test_cogvlm_inverted_corners_are_swapped() -> None:
    assert parse_vlm_boxes("[[300,400,100,200]]", SQUARE, "cogvlm") == [Box(100, 200, 300, 400)]


def test_cogvlm_out_of_range_is_clipped_and_empty_boxes_dropped() -> None:
    assert parse_vlm_boxes("[[-50,100,1200,500]]", SQUARE, "cogvlm") == [Box(0, 100, 1000, 500)]
    assert parse_vlm_boxes("[[1100,0,1200,500]]", SQUARE, "cogvlm") == []  # fully outside
    assert parse_vlm_boxes("[[100,100,100,500]]", SQUARE, "cogvlm") == []  # zero width


@pytest.mark.parametrize("text", [
    "", "There is no such object in the picture.", "no", "[[nan,1,2,3]]", "[[1,2,3]]",
    "[[a,b,c,d]]", "[[1,2,3,4", "}{][", "[[inf,0,10,10]]", "\x00\x01", "[[]]",
])
def test_no_object_and_garbage_give_no_boxes(text: str) -> None:
    assert parse_vlm_boxes(text, SQUARE) == []


def test_nan_box_is_ignored_but_valid_neighbours_kept() -> None:
    assert parse_vlm_boxes("[[nan,1,2,3],[10,20,30,40]]", SQUARE, "cogvlm") == [Box(10, 20, 30, 40)]


def test_strict_mode() -> None:
    # A negative answer is a valid answer, even in strict mode.
    assert parse_vlm_boxes("There is no spout visible.", SQUARE, strict=True) == []
    for text in ["[[1,2,3]]", "[[nan,1,2,3]]", "blah blah", "x" * 1000]:
        with pytest.raises(GroundingOutputError) as err:
            parse_vlm_boxes(text, SQUARE, strict=True)
        assert len(str(err.value)) < 300  # the offending text is quoted, truncated
    # Clipping and swapping are not errors.
    assert parse_vlm_boxes("[[300,400,100,2000]]", SQUARE, strict=True) == [Box(100, 400, 300, 1000)]


def test_parser_never_raises_on_random_text() -> None:
    rng = np.random.default_rng(0)
    alphabet = list("[]();,.0123456789-+ e nan{}\"bbox_2d:<|box_start|><box>") + ["\n", "```"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet, size=rng.integers(0, 60)))
        for style in ("cogvlm", "qwen", "auto"):
            for box in parse_vlm_boxes(text, (37, 53), style):
                assert 0 <= box.x0 < box.x1 <= 53 and 0 <= box.y0 < box.y1 <= 37


# --- Qwen style -----------------------------------------------------------------------------------

def test_qwen_json_in_fence_is_absolute_pixels() -> None:
    text = ('Here it is:\n```json\n[\n  {"bbox_2d": [10, 20, 110, 220], "label": "handle"},\n'
            '  {"bbox_2d": [300, 5, 250, 50], "label": "handle"}\n]\n```')
    expected = [Box(10, 20, 110, 220), Box(250, 5, 300, 50)]
    assert parse_vlm_boxes(text, (240, 320), "qwen") == expected
    assert parse_vlm_boxes(text, (240, 320), "auto") == expected
    # Truncated JSON (max_new_tokens hit) still yields its complete boxes.
    assert parse_vlm_boxes(text[:70], (240, 320), "auto") == [Box(10, 20, 110, 220)]


def test_qwen_json_rescaled_from_the_model_input_size() -> None:
    # The model saw a 448x448 resize of a 224x224 view: halve everything.
    text = '[{"bbox_2d": [100, 40, 300, 440], "label": "spout"}]'
    assert parse_vlm_boxes(text, (224, 224), "qwen", model_image_size=(448, 448)) == [Box(50, 20, 150, 220)]


def test_qwen_box_tokens_are_in_a_0_1000_frame_of_the_unpadded_image() -> None:
    text = "<|object_ref_start|>handle<|object_ref_end|><|box_start|>(100,200),(500,600)<|box_end|>"
    # H=200, W=400: x*400/1000, y*200/1000.
    assert parse_vlm_boxes(text, (200, 400), "qwen") == [Box(40, 40, 200, 120)]
    assert parse_vlm_boxes(text, (200, 400), "auto") == [Box(40, 40, 200, 120)]
    assert parse_vlm_boxes("<box>(0,0),(1000,500)</box>", (200, 400)) == [Box(0, 0, 400, 100)]


def test_qwen_style_ignores_bare_brackets_and_reports_none() -> None:
    assert parse_vlm_boxes("[[100,200,300,400]]", SQUARE, "qwen") == []
    assert parse_vlm_boxes("I cannot find it.", SQUARE, "qwen", strict=True) == []


# --- prompts ---------------------------------------------------------------------------------------

def test_format_prompt() -> None:
    assert format_prompt("cogvlm", "spout", "a narrow tube on the side") == (
        "What are the exact bounding boxes of spout, a narrow tube on the side, in the provided picture?")
    assert format_prompt("cogvlm", " spout ", "") == (
        "What are the exact bounding boxes of spout in the provided picture?")
    assert format_prompt("zero-shot", "blade", "the sharp edge") == "blade"
    assert set(PROMPT_TEMPLATES) >= {"cogvlm", "qwen", "zero-shot"}
    with pytest.raises(KeyError, match="cogvlm"):
        format_prompt("nope", "spout", "")
    with pytest.raises(ValueError):
        format_prompt("cogvlm", "  ", "x")


# --- oracle -----------------------------------------------------------------------------------------

def _hand_view() -> tuple[np.ndarray, np.ndarray]:
    """One 6x8 view. Faces 1 and 2 are part 1, face 0 part 0, face 3 part 2; -1 background."""
    face_id = np.full((1, 6, 8), -1, np.int32)
    face_id[0, 0, 0:3] = 0
    face_id[0, 1:3, 2:4] = 1   # part 1 rows 1-3, cols 2-4 ...
    face_id[0, 3, 4] = 2       # ... tight box (2, 1, 5, 4)
    face_id[0, 5, 6:8] = 3
    face_part = np.array([0, 1, 1, 2])
    return face_id, face_part


def test_oracle_zero_noise_is_the_tight_box() -> None:
    face_id, face_part = _hand_view()
    assert oracle_boxes(face_id, face_part, [1], NO_NOISE) == [[Box(2, 1, 5, 4)]]
    assert oracle_boxes(face_id, face_part, [0], NO_NOISE) == [[Box(0, 0, 3, 1)]]
    assert oracle_boxes(face_id, face_part, [0, 2], NO_NOISE) == [[Box(0, 0, 8, 6)]]
    assert oracle_boxes(face_id, face_part, [7], NO_NOISE) == [[]]  # part not present


def test_oracle_min_pixels_and_miss_rate() -> None:
    face_id, face_part = _hand_view()  # part 1 shows 5 pixels
    small = OracleNoise(jitter=0.0, miss_rate=0.0, false_positive_rate=0.0, min_pixels=6)
    assert oracle_boxes(face_id, face_part, [1], small) == [[]]
    always_miss = OracleNoise(jitter=0.0, miss_rate=1.0, false_positive_rate=0.0)
    views = np.repeat(face_id, 5, axis=0)
    for trial in range(3):
        assert oracle_boxes(views, face_part, [1], always_miss, seed=3, trial=trial) == [[]] * 5


def test_oracle_is_deterministic_per_seed_trial_and_view() -> None:
    face_id, face_part = _hand_view()
    views = np.repeat(face_id, 4, axis=0)
    noise = OracleNoise(jitter=0.2, miss_rate=0.3, false_positive_rate=0.3, min_pixels=1)
    first = oracle_boxes(views, face_part, [1], noise, seed=11, trial=2)
    assert first == oracle_boxes(views, face_part, [1], noise, seed=11, trial=2)
    assert first != oracle_boxes(views, face_part, [1], noise, seed=11, trial=3)
    # A view's boxes do not depend on the batch it comes in.
    assert oracle_boxes(views[2:3], face_part, [1], noise, seed=11, trial=2, view_ids=[2]) == [first[2]]


def test_oracle_false_positive_lies_on_the_object() -> None:
    face_id, face_part = _hand_view()
    noise = OracleNoise(jitter=0.0, miss_rate=1.0, false_positive_rate=1.0, min_pixels=1)
    for trial in range(10):
        (boxes,) = oracle_boxes(face_id, face_part, [1], noise, seed=0, trial=trial)
        assert len(boxes) == 1
        cu, cv = boxes[0].center
        assert face_id[0, int(cv), int(cu)] >= 0 or boxes[0].x0 == 0 or boxes[0].y0 == 0 \
            or boxes[0].x1 == 8 or boxes[0].y1 == 6  # centre on the object unless clipped


def test_oracle_jitter_statistics() -> None:
    face_id = np.full((200, 20, 20), -1, np.int32)
    face_id[:, 5:15, 5:15] = 0  # tight box (5, 5, 15, 15), width 10
    noise = OracleNoise(jitter=0.1, miss_rate=0.0, false_positive_rate=0.0)
    boxes = [v[0] for v in oracle_boxes(face_id, np.array([0]), [0], noise, seed=1)]
    x0 = np.array([b.x0 for b in boxes])
    assert abs(x0.mean() - 5.0) < 0.3 and 0.7 < x0.std() < 1.3  # std = 0.1 * 10


def test_oracle_noise_validation() -> None:
    for bad in [dict(jitter=-0.1), dict(miss_rate=1.5), dict(false_positive_rate=-0.1), dict(min_pixels=0),
                dict(jitter=float("nan")), dict(min_pixels=2.5)]:
        with pytest.raises(ValueError):
            OracleNoise(**bad)
    face_id, face_part = _hand_view()
    with pytest.raises(ValueError, match="out of range"):
        oracle_boxes(face_id, face_part[:2], [1])
    with pytest.raises(ValueError, match="empty"):
        oracle_boxes(face_id, face_part, [])


def test_oracle_backend_wrapper() -> None:
    face_id, face_part = _hand_view()
    backend = OracleBackend(NO_NOISE, seed=5)
    assert isinstance(backend, GroundingBackend) and backend.name == "oracle"
    images = np.zeros((1, 6, 8, 3), np.uint8)
    assert backend.ground(images, ["handle"], 0, face_id=face_id, face_part=face_part,
                          part_indices=[1]) == [[Box(2, 1, 5, 4)]]
    with pytest.raises(ValueError, match="procedural"):
        backend.ground(images, ["handle"], 0)
    with pytest.raises(ValueError, match="same views"):
        backend.ground(images, ["a", "b"], 0, face_id=face_id, face_part=face_part, part_indices=[1])
