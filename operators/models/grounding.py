"""Grounding: text prompt + view image -> boxes around the named functional part.

DFC (dense-functional-correspondence) §4.1 and Appendix A.4 box each functional part in every
rendered view with a grounding VLM, several trials per view. This module holds what every
grounding backend shares and needs no model:

- `Box`, the record all backends return (view pixels, the continuous frame of README "Camera and pixel conventions");
- `GroundingBackend`, the protocol the Ray actors call;
- `parse_vlm_boxes`, the robust parser for generative VLM answers (CogVLM / Qwen-VL styles);
- `PROMPT_TEMPLATES` / `format_prompt`;
- the `oracle` backend: boxes from the procedural assets' ground-truth part faces with seeded
  noise. It is the offline default of the demo and of the quality benchmarks (no weights needed).

The transformers and OpenAI-endpoint backends live elsewhere and only use what is here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol, Sequence, runtime_checkable

import numpy as np

# ---------------------------------------------------------------------------------------------
# Records and protocol
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    """Axis-aligned box in view pixels, continuous frame: pixel (v, u) covers [u, u+1) x [v, v+1).

    x = u (column), y = v (row); x0 <= x1, y0 <= y1. A point (x, y) is inside when
    x0 <= x < x1 and y0 <= y < y1. `score` is the backend's confidence (1.0 for VLM text boxes,
    which carry none).
    """

    x0: float
    y0: float
    x1: float
    y1: float
    score: float = 1.0

    def __post_init__(self) -> None:
        values = tuple(float(getattr(self, k)) for k in ("x0", "y0", "x1", "y1", "score"))
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"Box: non-finite coordinate or score {values}")
        if values[2] < values[0] or values[3] < values[1]:
            raise ValueError(f"Box: corners must satisfy x0 <= x1 and y0 <= y1, got {values[:4]}")
        # Plain Python floats: numpy scalars would make equality and serialisation surprising.
        for key, value in zip(("x0", "y0", "x1", "y1", "score"), values):
            object.__setattr__(self, key, value)

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        return self.width * self.height

    @property
    def center(self) -> tuple[float, float]:
        return (0.5 * (self.x0 + self.x1), 0.5 * (self.y0 + self.y1))


def boxes_to_array(boxes: Sequence[Box]) -> np.ndarray:
    """(n, 5) float32 rows [x0, y0, x1, y1, score] (the storage layout of `labels/boxes`)."""
    if not boxes:
        return np.zeros((0, 5), np.float32)
    return np.array([[b.x0, b.y0, b.x1, b.y1, b.score] for b in boxes], np.float32)


def boxes_from_array(array: np.ndarray) -> list[Box]:
    """Inverse of `boxes_to_array`; accepts (n, 4) (score 1.0) or (n, 5)."""
    a = np.asarray(array, np.float64)
    if a.size == 0:
        return []
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[1] not in (4, 5):
        raise ValueError(f"boxes array must have 4 or 5 columns, got shape {a.shape}")
    return [Box(*row[:4], score=row[4] if a.shape[1] == 5 else 1.0) for row in a]


@runtime_checkable
class GroundingBackend(Protocol):
    """What a grounding backend offers the label stage.

    `ground(images, prompts, trial)`: images (B, H, W, 3) uint8 views, prompts[i] the text for
    images[i]; returns one list of boxes per image, in that image's pixel frame. `trial` numbers
    the repeated queries of DFC A.4 step 2; sampling backends seed from it so reruns repeat.
    """

    name: str

    def ground(self, images: np.ndarray, prompts: Sequence[str], trial: int) -> list[list[Box]]:
        ...


class GroundingOutputError(ValueError):
    """A grounding model's output could not be read as boxes (malformed VLM text)."""


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------

# DFC A.4 prompts CogVLM with "What are the exact bounding boxes of <expr> in the provided
# picture?" where <expr> is the part name plus an appearance description (§4.1 found that the
# description matters).
PROMPT_TEMPLATES: dict[str, str] = {
    "cogvlm": "What are the exact bounding boxes of {part}, {description}, in the provided picture?",
    "qwen": "Outline the position of {part}, {description}, and output all the bounding box "
            "coordinates in JSON format.",
    # Open-vocabulary detectors (OWLv2, Grounding DINO) take a short noun phrase.
    "zero-shot": "{part}",
}


def format_prompt(template_name: str, part: str, description: str = "") -> str:
    """Fill a `PROMPT_TEMPLATES` entry. An empty description drops its slot and the commas around it."""
    if template_name not in PROMPT_TEMPLATES:
        raise KeyError(f"unknown prompt template {template_name!r}; "
                       f"known: {', '.join(sorted(PROMPT_TEMPLATES))}")
    part = part.strip()
    if not part:
        raise ValueError("format_prompt: part name is empty")
    description = description.strip()
    template = PROMPT_TEMPLATES[template_name]
    if not description:
        template = re.sub(r",?\s*\{description\}\s*,?", "", template)
    return template.format(part=part, description=description)


# ---------------------------------------------------------------------------------------------
# VLM text -> boxes
# ---------------------------------------------------------------------------------------------

VlmStyle = Literal["cogvlm", "qwen", "auto"]

# Coordinate frame of CogVLM grounding and of Qwen-VL box tokens.
NORMALIZED_FRAME = 1000.0

_NUMBER_TOKEN = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?(?:nan|inf|infinity)$",
                           re.IGNORECASE)
_INNERMOST_BRACKETS = re.compile(r"\[([^\[\]]*)\]")
_QWEN_BOX_TOKENS = re.compile(
    r"(?:<\|box_start\|>|<box>)\s*\(\s*([^()]*?)\s*\)\s*,?\s*\(\s*([^()]*?)\s*\)\s*(?:<\|box_end\|>|</box>)",
    re.IGNORECASE)
_QWEN_BOX_START = re.compile(r"<\|box_start\|>|<box>", re.IGNORECASE)
_QWEN_JSON_BOX = re.compile(r"\"(?:bbox_2d|bbox|box)\"\s*:\s*\[([^\[\]]*)\]", re.IGNORECASE)
_QWEN_JSON_KEY = re.compile(r"\"(?:bbox_2d|bbox|box)\"\s*:", re.IGNORECASE)
_NEGATIVE_ANSWER = re.compile(r"\b(?:no|none|not|nothing|cannot|can't|unable|absent)\b", re.IGNORECASE)
_MAX_QUOTED_CHARS = 200


class _Malformed(Exception):
    """Internal: a box-like fragment that is not four finite numbers."""


def _numbers(fragment: str) -> list[float]:
    tokens = [t for t in re.split(r"[,\s]+", fragment.strip()) if t]
    if not tokens or not all(_NUMBER_TOKEN.match(t) for t in tokens):
        raise _Malformed(fragment)
    return [float(t) for t in tokens]


def _quote(text: str) -> str:
    return repr(text if len(text) <= _MAX_QUOTED_CHARS else text[:_MAX_QUOTED_CHARS] + "...")


def _finish_box(x0: float, y0: float, x1: float, y1: float, height: int, width: int) -> Box | None:
    """Order the corners, clip to the image, drop empty boxes."""
    if not all(math.isfinite(c) for c in (x0, y0, x1, y1)):
        return None
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
    y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    if x1 <= x0 or y1 <= y0:
        return None
    return Box(x0, y0, x1, y1, 1.0)


def _cogvlm_quads(text: str) -> tuple[list[list[float]], list[str]]:
    """Four-number groups inside brackets: `[[a,b,c,d]]`, `[[..],[..]]`, `[[..;..]]`, ...

    Returns (quads, malformed fragments).
    """
    quads: list[list[float]] = []
    bad: list[str] = []
    for match in _INNERMOST_BRACKETS.finditer(text):
        for segment in match.group(1).split(";"):
            if not segment.strip():
                continue
            try:
                values = _numbers(segment)
            except _Malformed:
                bad.append(segment)
                continue
            if len(values) % 4:
                bad.append(segment)
                continue
            quads.extend(values[i:i + 4] for i in range(0, len(values), 4))
    return quads, bad


def parse_vlm_boxes(
    text: str,
    image_size: tuple[int, int],
    style: VlmStyle = "auto",
    *,
    strict: bool = False,
    model_image_size: tuple[int, int] | None = None,
    cogvlm_frame: Literal["stretched", "padded"] = "stretched",
) -> list[Box]:
    """Read the boxes out of a grounding VLM's text answer, in pixels of an (H, W) view.

    Styles:
    - "cogvlm": `[[x0,y0,x1,y1]]`, several as `[[..],[..]]`, `[[..];[..]]`, `[[..;..]]` or
      `[[..]] and [[..]]`, in a 0-1000 frame. `cogvlm_frame="stretched"` (default): CogVLM
      resizes every image to a 490x490 square without padding, so the frame spans the image on
      each axis: x = value * W / 1000, y = value * H / 1000. `"padded"`: for a model fed the
      image padded to a square at the right/bottom, pixel = value * max(H, W) / 1000, and boxes
      reaching into the padding are clipped to the image.
    - "qwen": Qwen2.5-VL JSON `[{"bbox_2d": [x0,y0,x1,y1], "label": ..}]` (also keys "bbox",
      "box"; ```json fences and truncated JSON are fine) in absolute pixels of the image the model
      saw (`model_image_size`, default `image_size`; rescaled per axis to `image_size`), or
      Qwen2-VL box tokens `<|box_start|>(x0,y0),(x1,y1)<|box_end|>` (or `<box>..</box>`) in a
      0-1000 frame of the unpadded image (x scaled by W, y by H).
    - "auto": box tokens if present, else a "bbox" JSON key if present, else "cogvlm".

    Inverted corners are swapped, boxes clipped to the image, empty and non-finite boxes dropped.
    "No such object" answers and garbage give []. Never raises on any text unless `strict`:
    then malformed box fragments (not four numbers, NaN), or an answer with no box that is not a
    negative answer, raise GroundingOutputError quoting the (truncated) text.
    """
    height, width = int(image_size[0]), int(image_size[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"parse_vlm_boxes: image_size must be positive (H, W), got {image_size}")
    if style not in ("cogvlm", "qwen", "auto"):
        raise ValueError(f"parse_vlm_boxes: unknown style {style!r}; use 'cogvlm', 'qwen' or 'auto'")
    if not isinstance(text, str):
        if strict:
            raise GroundingOutputError(f"grounding output is not text: {type(text).__name__}")
        return []

    if style == "auto":
        if _QWEN_BOX_START.search(text) or _QWEN_JSON_KEY.search(text):
            style = "qwen"
        else:
            style = "cogvlm"

    # Each candidate: (x0, y0, x1, y1) already in view pixels.
    candidates: list[tuple[float, float, float, float]] = []
    bad: list[str] = []
    if style == "cogvlm":
        if cogvlm_frame not in ("stretched", "padded"):
            raise ValueError(f"parse_vlm_boxes: cogvlm_frame must be 'stretched' or 'padded', "
                             f"got {cogvlm_frame!r}")
        quads, bad = _cogvlm_quads(text)
        side_x, side_y = ((width, height) if cogvlm_frame == "stretched"
                          else (max(height, width),) * 2)
        sx, sy = side_x / NORMALIZED_FRAME, side_y / NORMALIZED_FRAME
        candidates = [(q[0] * sx, q[1] * sy, q[2] * sx, q[3] * sy) for q in quads]
    else:
        for match in _QWEN_BOX_TOKENS.finditer(text):
            try:
                p0, p1 = _numbers(match.group(1)), _numbers(match.group(2))
            except _Malformed:
                bad.append(match.group(0))
                continue
            if len(p0) != 2 or len(p1) != 2:
                bad.append(match.group(0))
                continue
            candidates.append((p0[0] * width / NORMALIZED_FRAME, p0[1] * height / NORMALIZED_FRAME,
                               p1[0] * width / NORMALIZED_FRAME, p1[1] * height / NORMALIZED_FRAME))
        if len(_QWEN_BOX_START.findall(text)) > len(_QWEN_BOX_TOKENS.findall(text)):
            bad.append("unterminated or malformed box tokens")
        seen_h, seen_w = model_image_size if model_image_size is not None else (height, width)
        if seen_h <= 0 or seen_w <= 0:
            raise ValueError(f"parse_vlm_boxes: model_image_size must be positive, got {model_image_size}")
        sx, sy = width / float(seen_w), height / float(seen_h)
        for match in _QWEN_JSON_BOX.finditer(text):
            try:
                values = _numbers(match.group(1))
            except _Malformed:
                bad.append(match.group(0))
                continue
            if len(values) != 4:
                bad.append(match.group(0))
                continue
            candidates.append((values[0] * sx, values[1] * sy, values[2] * sx, values[3] * sy))
        if len(_QWEN_JSON_KEY.findall(text)) > len(_QWEN_JSON_BOX.findall(text)):
            bad.append("a bbox key without a list of numbers")

    non_finite = [c for c in candidates if not all(math.isfinite(v) for v in c)]
    boxes = [b for b in (_finish_box(*c, height, width) for c in candidates) if b is not None]
    if strict:
        if bad or non_finite:
            raise GroundingOutputError(f"malformed boxes in grounding output {_quote(text)}")
        if not candidates and not _NEGATIVE_ANSWER.search(text):
            raise GroundingOutputError(f"no boxes in grounding output {_quote(text)}")
    return boxes


# ---------------------------------------------------------------------------------------------
# Oracle backend (ground truth + calibrated noise)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OracleNoise:
    """Noise of the oracle backend, mimicking a grounding VLM's errors.

    jitter: std of the gaussian noise on each box corner, as a fraction of the box width (x) or
        height (y). miss_rate: probability that a visible part gets no box. false_positive_rate:
        probability of one extra box of similar size centred on a random object pixel.
        min_pixels: a part showing fewer pixels than this is not boxed (too small to see).
    """

    jitter: float = 0.1
    miss_rate: float = 0.1
    false_positive_rate: float = 0.1
    min_pixels: int = 4

    def __post_init__(self) -> None:
        if not (math.isfinite(self.jitter) and self.jitter >= 0.0):
            raise ValueError(f"OracleNoise.jitter must be a finite number >= 0, got {self.jitter}")
        for key in ("miss_rate", "false_positive_rate"):
            value = getattr(self, key)
            if not (0.0 <= value <= 1.0):
                raise ValueError(f"OracleNoise.{key} must be in [0, 1], got {value}")
        if isinstance(self.min_pixels, bool) or int(self.min_pixels) != self.min_pixels \
                or self.min_pixels < 1:
            raise ValueError(f"OracleNoise.min_pixels must be an integer >= 1, got {self.min_pixels}")


NO_NOISE = OracleNoise(jitter=0.0, miss_rate=0.0, false_positive_rate=0.0, min_pixels=1)

# Size range of a false-positive box relative to the true box (or to a quarter of the object's
# box when the part is not in view).
_FALSE_POSITIVE_SCALE = (0.75, 1.25)


def _tight_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    # Continuous frame: the box covers the pixels' squares, hence the +1 on the max side.
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def oracle_boxes(
    face_id: np.ndarray,
    face_part: np.ndarray,
    part_indices: Sequence[int] | np.ndarray,
    noise: OracleNoise = OracleNoise(),
    seed: int = 0,
    trial: int = 0,
    view_ids: Sequence[int] | None = None,
) -> list[list[Box]]:
    """Ground-truth boxes of a procedural asset's part in each view, with seeded noise.

    face_id: (V, H, W) int32 rendered triangle ids (-1 = background). face_part: (F,) part index
    per triangle. part_indices: the part(s) the prompt names. The GT mask of a view is
    `face_id >= 0 & isin(face_part[face_id], part_indices)`; its tight box
    [min_u, min_v, max_u + 1, max_v + 1] gets `noise` applied. Returns one list per view.

    Deterministic for (seed, trial, view id): each view draws from its own stream keyed by
    `view_ids[i]` (default 0..V-1), so a view's boxes do not depend on how views are batched.
    Fold an asset key into `seed` to decorrelate assets.
    """
    face_id = np.asarray(face_id)
    if face_id.ndim == 2:
        face_id = face_id[None]
    if face_id.ndim != 3 or not np.issubdtype(face_id.dtype, np.integer):
        raise ValueError(f"oracle_boxes: face_id must be an integer (V, H, W) array, "
                         f"got {face_id.dtype} {face_id.shape}")
    face_part = np.asarray(face_part).reshape(-1)
    parts = np.asarray(part_indices).reshape(-1)
    if parts.size == 0:
        raise ValueError("oracle_boxes: part_indices is empty; name at least one part")
    if face_id.size and face_id.max() >= face_part.shape[0]:
        raise ValueError(f"oracle_boxes: face id {int(face_id.max())} out of range for "
                         f"{face_part.shape[0]} faces in face_part")
    if int(seed) < 0 or int(trial) < 0:
        raise ValueError(f"oracle_boxes: seed and trial must be >= 0, got {seed}, {trial}")
    n_views, height, width = face_id.shape
    ids = list(range(n_views)) if view_ids is None else [int(i) for i in view_ids]
    if len(ids) != n_views or any(i < 0 for i in ids):
        raise ValueError(f"oracle_boxes: need {n_views} non-negative view_ids, got {view_ids}")

    is_part_face = np.isin(face_part, parts)  # lookup per face: cheaper than isin per pixel
    out: list[list[Box]] = []
    for v in range(n_views):
        fid = face_id[v]
        on_object = fid >= 0
        part_mask = on_object & is_part_face[np.where(on_object, fid, 0)]
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(trial), ids[v]]))
        # Draw every number every time, so changing one rate does not reshuffle the others.
        miss_draw = rng.random()
        corner_noise = rng.standard_normal(4)
        false_positive_draw = rng.random()
        centre_draw = rng.random()
        scale = rng.uniform(*_FALSE_POSITIVE_SCALE, size=2)

        view_boxes: list[Box] = []
        true_box = None
        if int(part_mask.sum()) >= noise.min_pixels:
            true_box = _tight_box(part_mask)
            if miss_draw >= noise.miss_rate:
                x0, y0, x1, y1 = true_box
                w, h = x1 - x0, y1 - y0
                jx, jy = noise.jitter * w, noise.jitter * h
                box = _finish_box(x0 + jx * corner_noise[0], y0 + jy * corner_noise[1],
                                  x1 + jx * corner_noise[2], y1 + jy * corner_noise[3], height, width)
                if box is not None:
                    view_boxes.append(box)
        if false_positive_draw < noise.false_positive_rate and on_object.any():
            if true_box is not None:
                w, h = true_box[2] - true_box[0], true_box[3] - true_box[1]
            else:
                ox0, oy0, ox1, oy1 = _tight_box(on_object)
                w, h = max(0.25 * (ox1 - ox0), 1.0), max(0.25 * (oy1 - oy0), 1.0)
            pixels = np.flatnonzero(on_object.reshape(-1))
            centre = int(pixels[min(int(centre_draw * pixels.size), pixels.size - 1)])
            cu, cv = centre % width + 0.5, centre // width + 0.5
            hw, hh = 0.5 * w * scale[0], 0.5 * h * scale[1]
            box = _finish_box(cu - hw, cv - hh, cu + hw, cv + hh, height, width)
            if box is not None:
                view_boxes.append(box)
        out.append(view_boxes)
    return out


@dataclass(frozen=True)
class OracleBackend:
    """The `oracle` grounding backend: `oracle_boxes` behind the backend interface.

    The offline default for the demo and the quality benchmarks: no weights, works only for
    procedural assets, whose per-face part labels it reads. It ignores the images' pixels and the
    prompt text; the caller passes the ground truth the prompt names (`face_id` of the views,
    the asset's `face_part`, the prompt's `part_indices`).
    """

    noise: OracleNoise = OracleNoise()
    seed: int = 0
    name: ClassVar[str] = "oracle"
    # Callers (operators.models.labeling) pass face_id / face_part / part_indices to backends that say so.
    needs_ground_truth: ClassVar[bool] = True

    def ground(
        self,
        images: np.ndarray,
        prompts: Sequence[str],
        trial: int,
        *,
        face_id: np.ndarray | None = None,
        face_part: np.ndarray | None = None,
        part_indices: Sequence[int] | np.ndarray | None = None,
        view_ids: Sequence[int] | None = None,
    ) -> list[list[Box]]:
        if face_id is None or face_part is None or part_indices is None:
            raise ValueError("the oracle backend needs face_id, face_part and part_indices "
                             "(ground truth exists only for procedural assets)")
        face_id = np.asarray(face_id)
        images = np.asarray(images)
        if images.shape[:3] != face_id.shape or len(prompts) != face_id.shape[0]:
            raise ValueError(f"oracle backend: images {images.shape[:3]}, {len(prompts)} prompts and "
                             f"face_id {face_id.shape} must describe the same views")
        return oracle_boxes(face_id, face_part, part_indices, self.noise, self.seed, trial, view_ids)


def heat_boxes(heat: np.ndarray, levels: Sequence[float] = (0.25, 0.5, 0.75),
               min_pixels: int = 4) -> list[Box]:
    """A heat map (H, W) >= 0 as boxes for the box-vote aggregation: at each level (a fraction
    of the way from the map's minimum to its maximum: a sigmoid map never reaches 0), the
    bounding box of every connected region above it, scored by the
    region's mean heat. Nested level sets stack, so the votes a pixel gets count the levels it
    clears: the map quantised to len(levels) steps, through the same aggregation as any box
    backend. A flat or empty map gives no box."""
    from scipy.ndimage import find_objects, label
    heat = np.asarray(heat, np.float64)
    if heat.ndim != 2:
        raise ValueError(f"heat_boxes: heat must be (H, W), got {heat.shape}")
    if not heat.size:
        return []
    peak, floor = float(heat.max()), float(heat.min())
    if not np.isfinite(peak) or peak <= floor:
        return []
    boxes = []
    for level in levels:
        above = heat >= floor + level * (peak - floor)
        regions, _ = label(above)
        for index, found in enumerate(find_objects(regions), start=1):
            if found is None:
                continue
            inside = regions[found] == index
            if inside.sum() < min_pixels:
                continue
            rows, cols = found
            boxes.append(Box(cols.start, rows.start, cols.stop, rows.stop,
                             float(heat[found][inside].mean())))
    return boxes
