"""InstructPart's protocol (instructpart.txt §3, §5) for partlift's predictors: one mask per
(image, query), gIoU / cIoU / P@50 / P@50:95 (`operators.metrics.segmentation.referring_metrics`)
per task: TRPS (task instruction) and ORPS ("Where is the {part} of the {object} in the image").

Predictors:
- `object mask`: the whole object's pixels (when the data has them): what a model that finds
  the object but not the part scores (the paper's Table E5 reasoning).
- grounding backends of the label stage (`oracle`, `hf-zero-shot`, `hf-vlm`, `openai`): the
  best-scoring box of the query -> mask = the box's pixels, intersected with the object's pixels
  when known (the label stage's box -> pixels step). `oracle` answers from the ground-truth mask
  with the label stage's calibrated noise: an upper bound of the box -> mask step, not a model.
- CAST (finetune/ runs) on the stand-in's 3D assets: the query text as its prompt, points ->
  the sample's view by the label stage's splatting (`cast_predictor`).
- the correspondence model's mask head: the query is routed to a function the model knows
  (ORPS through the taxonomy's (object, part) -> function when it has them, else and for TRPS
  the nearest function embedding of the query text under the model's own text encoder); mask =
  pixels with positive mask logits.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from operators.benchmarks import read_image
from operators.benchmarks.instructpart import TASKS, PartSample, read_mask
from operators.metrics.segmentation import referring_metrics

# InstructPart Table 2 (ORPS / TRPS, human instructions): published rows for scale only.
PAPER_ROWS = {"LISA (paper)": {"ORPS": (34.46, 39.44, 32.67, 17.48),
                               "TRPS": (32.11, 30.25, 30.00, 16.98)},
              "Grounded-SAM (paper)": {"ORPS": (34.33, 24.83, 28.83, 15.03),
                                       "TRPS": (29.95, 21.45, 25.17, 11.98)}}
METRICS = ("gIoU", "cIoU", "P@50", "P@50:95")


class MaskPredictor(Protocol):
    def __call__(self, image: np.ndarray, text: str, sample: PartSample, task: str
                 ) -> np.ndarray: ...


def object_pixels(sample: PartSample, shape: tuple[int, int]) -> np.ndarray | None:
    return None if sample.objects is None else read_mask(sample.objects, shape)


def object_predictor() -> MaskPredictor:
    def predict(image: np.ndarray, text: str, sample: PartSample, task: str) -> np.ndarray:
        found = object_pixels(sample, image.shape[:2])
        return np.ones(image.shape[:2], bool) if found is None else found
    return predict


def box_predictor(backend: Any) -> MaskPredictor:
    """The best box of a label-stage grounding backend, as pixels (module docstring)."""
    needs_truth = bool(getattr(backend, "needs_ground_truth", False))

    def predict(image: np.ndarray, text: str, sample: PartSample, task: str) -> np.ndarray:
        shape = image.shape[:2]
        objects = object_pixels(sample, shape)
        if needs_truth:  # the oracle: the truth as a two-"face" image (part 0, rest 1)
            truth = read_mask(sample.mask, shape)
            rest = objects if objects is not None else np.ones(shape, bool)
            face_id = np.where(truth, 0, np.where(rest, 1, -1))[None]
            # a stable per-sample noise stream (the oracle draws per view id)
            stream = int.from_bytes(hashlib.sha256(sample.key.encode()).digest()[:4], "big")
            boxes = backend.ground(image[None], [text], 0, face_id=face_id,
                                   face_part=np.array([0, 1]), part_indices=[0],
                                   view_ids=[stream])[0]
        else:
            boxes = backend.ground(image[None], [text], 0)[0]
        mask = np.zeros(shape, bool)
        if boxes:
            box = max(boxes, key=lambda b: b.score)
            top, left = int(np.floor(box.y0)), int(np.floor(box.x0))
            mask[max(top, 0):int(np.ceil(box.y1)), max(left, 0):int(np.ceil(box.x1))] = True
        return mask & objects if objects is not None else mask
    return predict


@dataclass(frozen=True)
class Routing:
    """Query text -> a function of the model."""

    functions: list[str]
    text: torch.Tensor               # (F, d) the model's function embeddings (unit norm)
    embed: Callable[[Sequence[str]], np.ndarray]
    by_part: dict[tuple[str, str], str]  # (object, part) -> function, from the taxonomy

    def __call__(self, sample: PartSample, task: str, text: str) -> str:
        if task == "ORPS":
            found = self.by_part.get((sample.object, sample.part))
            if found in self.functions:
                return found
        query = torch.as_tensor(self.embed([text]))[0]
        return self.functions[int(torch.argmax(self.text.float() @ query.float()))]


def mask_head_predictor(describe: Callable[..., tuple[np.ndarray, np.ndarray | None]],
                        blocks_of: Callable[[np.ndarray], np.ndarray], routing: Routing,
                        routed: dict[str, list[bool]], image_size: int = 224,
                        stride: int = 2) -> MaskPredictor:
    """Mask logits > 0 of the correspondence model on every `stride`-th pixel of the image
    resized so its longer side is `image_size` (the scale the model trained at), conditioned on
    the routed function, brought back to the image's size (nearest); `routed[task]` collects
    whether the route hit the sample's affordance."""
    def predict(image: np.ndarray, text: str, sample: PartSample, task: str) -> np.ndarray:
        function = routing(sample, task, text)
        routed.setdefault(task, []).append(function == sample.affordance)
        full = image.shape[:2]
        scale = image_size / max(full)
        height, width = max(1, round(full[0] * scale)), max(1, round(full[1] * scale))
        small = (image if (height, width) == full else
                 np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC)))
        blocks = blocks_of(small[None])[0]
        rows, cols = np.mgrid[0:height:stride, 0:width:stride]
        uv = np.stack([cols.ravel() + 0.5, rows.ravel() + 0.5], axis=1).astype(np.float32)
        _, logits = describe(blocks, uv, (height, width), function, sample.key)
        mask = (logits > 0).reshape(rows.shape)
        if mask.shape == full:
            return mask
        return np.asarray(Image.fromarray(mask).resize((full[1], full[0]), Image.NEAREST))
    return predict


def cast_predictor(cast: Any, n_surface: int = 4096, sigma: float = 1.0,
                   closing_iterations: int = 2) -> MaskPredictor:
    """CAST (CMAT 3.3) on the 3D asset behind a stand-in image: its surface points scored for
    the query text itself (CAST is prompt-driven: no routing), then the label stage's
    points -> view mask step (`masks_from_scores`: the visible points' scores splatted, Otsu,
    closing, inside the object) in the sample's own camera. Needs the stand-in's `3d/` record."""
    from operators.data.procedural import make_asset
    from operators.geometry.aggregate import masks_from_scores
    from operators.geometry.cameras import project_points, visibility
    from operators.geometry.render import render_views, sample_surface
    from operators.settings import ConfigError, RenderSettings
    from training.scoring import cast_cloud
    made: dict[str, tuple[Any, Any, tuple[np.ndarray, np.ndarray], int]] = {}

    def scene(sample: PartSample) -> tuple[Any, Any, tuple[np.ndarray, np.ndarray], int]:
        if sample.asset is None:
            raise ConfigError(f"instructpart: {sample.key}: no 3d/{sample.key}.json: the CAST "
                              "row needs the 3D asset behind the image (the procedural "
                              "stand-in's)")
        if sample.key not in made:
            made.clear()  # one sample at a time (its two tasks share it)
            info = json.loads(sample.asset.read_text())
            asset = make_asset(info["category"], int(info["seed"]))
            views = render_views(asset.mesh, RenderSettings(
                views=int(info["views"]), width=int(info["size"]), height=int(info["size"]),
                n_points=1000), int(info["seed"]))
            surface = sample_surface(asset.mesh, n_surface, int(info["seed"]))
            made[sample.key] = (views, surface, cast_cloud(cast.points, surface.xyz,
                                                           surface.xyz, int(info["seed"])),
                                int(info["view"]))
        return made[sample.key]

    def predict(image: np.ndarray, text: str, sample: PartSample, task: str) -> np.ndarray:
        views, surface, (unit, nearest), v = scene(sample)
        score = cast.predict(unit[None], cast.embed([text]), None)[0][nearest]
        K, pose = views.K[v:v + 1], views.cam_to_world[v:v + 1]
        projection = project_points(surface.xyz, K, pose)
        seen = visibility(surface.xyz, K, pose, views.depth[v:v + 1], projection=projection)
        mask = masks_from_scores(score, projection[0], seen, views.mask[v:v + 1], sigma,
                                 closing_iterations)[0]
        if mask.shape != image.shape[:2]:
            mask = np.asarray(Image.fromarray(mask).resize((image.shape[1], image.shape[0]),
                                                           Image.NEAREST))
        return mask
    return predict


@dataclass(frozen=True)
class PartResult:
    metrics: dict[str, dict[str, float]]     # task -> metrics (percent)
    masks: dict[str, list[np.ndarray]]       # task -> predicted masks (for pictures)
    routing: dict[str, float]                # task -> share of queries routed to the affordance


def evaluate_parts(predictor: MaskPredictor, samples: list[PartSample], instruction: str,
                   routed: dict[str, list[bool]] | None = None) -> PartResult:
    metrics, masks = {}, {}
    for task in TASKS:
        preds, truths = [], []
        for sample in samples:
            image = read_image(sample.image)
            preds.append(np.asarray(predictor(image, sample.text(task, instruction), sample,
                                              task), bool))
            truths.append(read_mask(sample.mask, image.shape[:2]))
        metrics[task] = referring_metrics(preds, truths) | {"samples": float(len(preds))}
        masks[task] = preds
    routing = {t: float(np.mean(v)) for t, v in (routed or {}).items() if v}
    return PartResult(metrics, masks, routing)


def markdown_table(results: dict[str, PartResult]) -> str:
    """InstructPart Table 2's shape: ORPS then TRPS, gIoU | cIoU | P@50 | P@50:95."""
    head = ("| predictor | " + " | ".join(f"ORPS {m}" for m in METRICS) + " | "
            + " | ".join(f"TRPS {m}" for m in METRICS) + " | routed to the affordance |")
    lines = ["Percent. ORPS = object + part query, TRPS = task instruction.", "", head,
             "|---" * (2 * len(METRICS) + 2) + "|"]
    for name, result in results.items():
        cells = [f"{result.metrics[t][m]:.2f}" for t in ("ORPS", "TRPS") for m in METRICS]
        routing = ", ".join(f"{t} {100 * v:.0f}%" for t, v in sorted(result.routing.items()))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {routing or '–'} |")
    for name, row in PAPER_ROWS.items():
        cells = [f"{row[t][i]:.2f}" for t in ("ORPS", "TRPS") for i in (0, 1, 2, 3)]
        lines.append(f"| {name} | " + " | ".join(cells) + " | – |")
    lines += ["", "The paper's rows: real photos (2,400 images, 48 object classes), for scale "
              "only; its column order is gIoU, cIoU, P50-95, P50 (reordered here)."]
    return "\n".join(lines) + "\n"
