"""Object-level referring-segmentation composites for training AffordanceCLIP's FPN.

AffordanceCLIP (affordanceclip.txt §4.1, §4.3) trains its FPN on RefCOCO/+/g only: masks of
whole *objects* referred to by a sentence, never parts and never actions, so that affordance
grounding at test time stays zero-shot. RefCOCO is not available offline, so this module builds
the same kind of sample from object crops (e.g. the project's rendered views): 2 or 3 crops
pasted side by side (left / middle / right) on a plain or noisy background, one of them the
target, referred to by category, dominant colour and position:

    "the red mug on the left"

The texts are made from a closed vocabulary (templates, colours, positions) plus the crop's
category name, and `compose` checks every text against `forbidden_words()` (the taxonomy's part
and function names that are not also category names), so no part or function word can leak
into the FPN's training signal.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, Sequence

import numpy as np

from operators.data.taxonomy import load_taxonomy

if TYPE_CHECKING:
    from torch import Tensor

Background = Literal["plain", "noise"]

# Named palette for the target's dominant colour (nearest in RGB to the median masked pixel).
# Saturated anchors, plus the greys, so that a plain rendered material gets an obvious name.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (230, 210, 50),
    "green": (50, 160, 60),
    "blue": (40, 80, 210),
    "purple": (130, 60, 170),
    "pink": (240, 140, 190),
    "brown": (130, 80, 40),
    "black": (20, 20, 20),
    "grey": (128, 128, 128),
    "white": (240, 240, 240),
}

# Slot names by number of objects, left to right.
SLOTS: dict[int, tuple[str, ...]] = {2: ("left", "right"), 3: ("left", "middle", "right")}

# Every template names category, colour and position; `where` is "on the left" / "in the middle" /
# "on the right".
_TEMPLATES: tuple[str, ...] = (
    "the {colour} {category} {where}",
    "{colour} {category} {where}",
    "the {category} {where}, the {colour} one",
)
_WHERE: dict[str, str] = {"left": "on the left", "middle": "in the middle", "right": "on the right"}

_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


# eq=False: the fields are arrays, and a generated __eq__ would compare them element-wise.
@dataclass(frozen=True, eq=False)
class ObjectCrop:
    """One object cut out of an image: rgb uint8 (h, w, 3), mask bool (h, w), its category."""

    rgb: np.ndarray
    mask: np.ndarray
    category: str

    def __post_init__(self) -> None:
        if self.rgb.dtype != np.uint8 or self.rgb.ndim != 3 or self.rgb.shape[-1] != 3:
            raise ValueError(f"ObjectCrop.rgb must be uint8 (h, w, 3), got {self.rgb.dtype} {self.rgb.shape}")
        if self.mask.dtype != np.bool_ or self.mask.shape != self.rgb.shape[:2]:
            raise ValueError(f"ObjectCrop.mask must be bool {self.rgb.shape[:2]}, got "
                             f"{self.mask.dtype} {self.mask.shape}")
        if not self.mask.any():
            raise ValueError(f"ObjectCrop of {self.category!r} has an empty mask")


@dataclass(frozen=True, eq=False)
class ReferringSample:
    """A composite image, the mask of ONE object in it, and the sentence that refers to it."""

    image: np.ndarray  # uint8 (size, size, 3)
    mask: np.ndarray  # bool (size, size): the target object only
    text: str
    category: str
    colour: str
    position: str  # the paste slot: left / middle / right


# ---------------------------------------------------------------------------------------------
# Vocabulary guard
# ---------------------------------------------------------------------------------------------


def _words(text: str) -> set[str]:
    """Lower-cased words of `text`: hyphenated tokens whole ("pour-with") and their pieces."""
    tokens = _WORD.findall(text.lower())
    return set(tokens) | {piece for token in tokens for piece in token.split("-")}


@functools.lru_cache(maxsize=1)
def forbidden_words() -> frozenset[str]:
    """Part names and function names of the taxonomy (whole and hyphen-split: "pour-with",
    "pour", "with"), minus every word of a category name ("bowl" is a spoon's part and also a
    category; naming the category is what referring segmentation does)."""
    taxonomy = load_taxonomy()
    banned: set[str] = set()
    for name in taxonomy.functions:
        banned |= _words(name)
    for category in taxonomy.categories.values():
        for part in category.parts.values():
            banned |= _words(part.name)
    allowed: set[str] = set()
    for name in taxonomy.categories:
        allowed |= _words(name)
    return frozenset(banned - allowed)


def assert_no_part_words(text: str, forbidden: set[str] | frozenset[str]) -> None:
    """Raise ValueError when `text` contains a forbidden word. A ValueError, not an `assert`:
    the guard must hold under `python -O` too."""
    hits = sorted(_words(text) & {w.lower() for w in forbidden})
    if hits:
        raise ValueError(f"referring text {text!r} contains part/function word(s) {', '.join(hits)}; "
                         "AffordanceCLIP's FPN trains on object-level references only")


def referring_vocabulary() -> tuple[str, ...]:
    """Every word the templates, positions and colours can produce (the category aside)."""
    words: set[str] = set(PALETTE)
    for template in _TEMPLATES:
        words |= _words(template.replace("{colour}", "").replace("{category}", "")
                        .replace("{where}", ""))
    for where in _WHERE.values():
        words |= _words(where)
    return tuple(sorted(words))


@functools.lru_cache(maxsize=1)
def _check_vocabulary() -> None:
    """The fixed vocabulary must never collide with a part or function name; checked once, so a
    taxonomy edit that introduces, say, a part called "left" fails loudly instead of leaking."""
    clash = sorted(set(referring_vocabulary()) & forbidden_words())
    if clash:
        raise ValueError(f"referring vocabulary collides with part/function names: {', '.join(clash)}")


# ---------------------------------------------------------------------------------------------
# Composites
# ---------------------------------------------------------------------------------------------


def colour_name(pixels: np.ndarray) -> str:
    """Nearest `PALETTE` name to the median of `pixels` (n, 3): the median resists highlights
    and shading edges better than the mean."""
    if pixels.size == 0:
        raise ValueError("colour_name needs at least one pixel")
    median = np.median(pixels.reshape(-1, 3).astype(np.float64), axis=0)
    names = list(PALETTE)
    anchors = np.array([PALETTE[n] for n in names], np.float64)
    return names[int(np.argmin(((anchors - median) ** 2).sum(axis=1)))]


def _resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize by index sampling at pixel centres. Nearest keeps the pasted
    pixels exactly the crop's colours and the mask exactly binary."""
    rows = np.minimum(((np.arange(height) + 0.5) * array.shape[0] / height).astype(np.int64),
                      array.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * array.shape[1] / width).astype(np.int64),
                      array.shape[1] - 1)
    return array[rows][:, cols]


def _background(rng: np.random.Generator, size: int, kind: Background) -> np.ndarray:
    base = rng.integers(0, 256, size=3)
    image = np.broadcast_to(base, (size, size, 3)).astype(np.float64)
    if kind == "noise":
        image = image + rng.normal(0.0, 25.0, size=(size, size, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def compose(objects: Sequence[ObjectCrop], rng: np.random.Generator, size: int = 224, *,
            target: int | None = None, background: Background | None = None,
            min_scale: float = 0.6) -> ReferringSample:
    """Paste 2 or 3 object crops into slots left to right and refer to one of them.

    Each crop keeps its aspect ratio, fits 90% of its slot (width size / n, full height) times a
    random factor in [min_scale, 1], and lands at a random place inside its slot, so the slots
    never overlap and the position word is always true. Only masked pixels are pasted.
    target: the index of the referred object (random when None); background: "plain" or "noise"
    (random when None). Raises ValueError for a wrong object count, a target whose pasted mask
    is empty, or a text that would contain a part or function word.
    """
    _check_vocabulary()
    n = len(objects)
    if n not in SLOTS:
        raise ValueError(f"compose takes 2 or 3 objects, got {n}")
    if size < 2 * n:
        raise ValueError(f"size {size} is too small for {n} slots")
    target = int(rng.integers(n)) if target is None else int(target)
    if not 0 <= target < n:
        raise ValueError(f"target {target} out of range for {n} objects")
    kind: Background = background or ("plain", "noise")[int(rng.integers(2))]
    image = _background(rng, size, kind)
    mask = np.zeros((size, size), bool)
    slot_width = size // n
    target_pixels = np.zeros((0, 3), np.uint8)
    for i, crop in enumerate(objects):
        x0 = i * slot_width
        width = size - x0 if i == n - 1 else slot_width  # the last slot takes the remainder
        h, w = crop.mask.shape
        scale = min(0.9 * width / w, 0.9 * size / h) * float(rng.uniform(min_scale, 1.0))
        nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
        rgb = _resize_nearest(crop.rgb, nh, nw)
        m = _resize_nearest(crop.mask, nh, nw)
        y = int(rng.integers(0, size - nh + 1))
        x = x0 + int(rng.integers(0, width - nw + 1))
        region = image[y:y + nh, x:x + nw]
        region[m] = rgb[m]
        if i == target:
            mask[y:y + nh, x:x + nw] = m
            target_pixels = rgb[m]
    if not mask.any():
        raise ValueError(f"the target {objects[target].category!r} vanished when resized to its slot; "
                         "give larger crops or a larger size")
    position = SLOTS[n][target]
    colour = colour_name(target_pixels)
    category = objects[target].category
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    text = template.format(colour=colour, category=category, where=_WHERE[position])
    assert_no_part_words(text, forbidden_words())  # the category is the only open slot
    return ReferringSample(image=image, mask=mask, text=text, category=category, colour=colour,
                           position=position)


def crops_from_views(rgb: np.ndarray, mask: np.ndarray, category: str,
                     min_pixels: int = 64) -> list[ObjectCrop]:
    """One tight crop per view of its object mask: rgb uint8 (V, H, W, 3), mask bool (V, H, W).
    Views with fewer than `min_pixels` object pixels are skipped: a sliver of an object seen
    edge-on gives no usable colour and vanishes when pasted small."""
    if rgb.ndim != 4 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be uint8 (V, H, W, 3), got {rgb.dtype} {rgb.shape}")
    if mask.shape != rgb.shape[:3]:
        raise ValueError(f"mask must be (V, H, W) = {rgb.shape[:3]}, got {mask.shape}")
    mask = mask.astype(bool, copy=False)
    crops: list[ObjectCrop] = []
    for view in range(rgb.shape[0]):
        m = mask[view]
        if int(m.sum()) < min_pixels:
            continue
        rows, cols = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
        top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        crops.append(ObjectCrop(rgb=rgb[view, top:bottom, left:right].copy(),
                                mask=m[top:bottom, left:right].copy(), category=category))
    return crops


def referring_batch(samples: Sequence[ReferringSample],
                    preprocess: Callable[[np.ndarray], Tensor]) -> tuple[Tensor, list[str], Tensor]:
    """(pixel_values (B, 3, S, S), texts, masks bool (B, S, S)) for a training step.

    `preprocess` is the model's (`AffordanceCLIP.preprocess`: resize to its image size, CLIP
    normalisation); the masks follow with nearest resampling to the same S, because the logits
    come back at the pixel_values' size and the loss compares them pixel by pixel.
    """
    import torch
    import torch.nn.functional as F

    if not samples:
        raise ValueError("referring_batch needs at least one sample")
    pixel_values = preprocess(np.stack([s.image for s in samples]))
    masks = torch.from_numpy(np.stack([s.mask for s in samples]))
    size = tuple(pixel_values.shape[-2:])
    if tuple(masks.shape[-2:]) != size:
        masks = F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5
    return pixel_values, [s.text for s in samples], masks.to(pixel_values.device)
