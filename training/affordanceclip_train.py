"""AffordanceCLIP on the shared trainer driver (training.trainer + training.task_loop): the
FPN learns from object-level referring composites of the root's rendered assets (AffordanceCLIP
§3.4 trains on RefCOCO objects, never on parts), so its affordance heat maps for action prompts
are zero-shot on parts.

- Crops: every rendered view's object mask of the training assets (`views/` rgb + mask);
  validation composites come from the validation assets of `data.*`'s split, fixed by the seed.
- A step: `batch_size` composites per rank, each of 2-3 crops of distinct assets, drawn from a
  per-(seed, step, rank) stream (so a resume draws exactly what the interrupted run would have).
- Validation: mask IoU (heat map > 0.5 vs the referred object's mask) and the loss on the fixed
  validation composites; `val_miou` picks the best checkpoint.
- Checkpoints hold the FPN and the logit scale/bias only: the frozen CLIP is rebuilt from
  run.json (the tiny one from its seed, a real one from its directory, whose weights digest is
  recorded and checked).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from operators.models.registry import weights_digest
from operators.settings import ConfigError
from operators.store.commits import settings_hash
from operators.store.readers import RootReader
from operators.store.storage import RunRoot
from operators.store.tables import VIEWS
from training.affordanceclip import AffordanceCLIP, build_tiny_clip, load_clip, pixel_text_loss
from training.cmat import PreparedTask, _write_record
from training.config import AffordanceClipSection, DataSection
from training.referring_data import ObjectCrop, compose, crops_from_views
from training.splits import assign_splits
from training.task_loop import StepTask
from training.trainer import Scaling

TINY = "clip-random-tiny"
MODEL_KIND = "affordanceclip"


def build_affordanceclip(clip: dict[str, Any]) -> AffordanceCLIP:
    """The model a run record's `clip` entry describes (weights of the FPN not loaded)."""
    if clip["name"] == TINY:
        model, tokenize = build_tiny_clip(int(clip["seed"]), image_size=int(clip["image_size"]))
    else:
        found = weights_digest(clip["name"])
        if clip.get("weights") and found != clip["weights"]:
            raise ConfigError(f"affordanceclip: the CLIP at {clip['name']} is not the one the run "
                              f"was trained with (weights digest {found} != {clip['weights']})")
        model, tokenize = load_clip(clip["name"])
    return AffordanceCLIP(model, tokenize)


def clip_record(section: AffordanceClipSection) -> dict[str, Any]:
    if section.clip != TINY and "image_size" in section.model_fields_set:
        raise ConfigError("affordanceclip.image_size sets the tiny CLIP's input size; a real "
                          f"CLIP ({section.clip}) uses its own: drop the setting")
    if section.clip == TINY:
        return {"name": TINY, "seed": section.seed, "image_size": section.image_size,
                "pretrained": False}
    return {"name": section.clip, "weights": weights_digest(section.clip), "pretrained": True}


def load_crops(reader: RootReader, asset_ids: list[str], categories: dict[str, str]
               ) -> list[list[ObjectCrop]]:
    """Per asset, a crop of every view's object (views without enough pixels skipped)."""
    out = []
    for asset_id in asset_ids:
        views = reader.views(asset_id, ["rgb", "mask"])
        crops = crops_from_views(np.asarray(views["rgb"]), np.asarray(views["mask"], bool),
                                 categories[asset_id])
        if crops:
            out.append(crops)
    return out


def draw_composites(crops: list[list[ObjectCrop]], n: int, size: int,
                    rng: np.random.Generator) -> list[Any]:
    """n composites, each of 2-3 crops of distinct assets (fewer assets than 2: an error)."""
    if len(crops) < 2:
        raise ConfigError("affordanceclip: composites need at least 2 assets with rendered "
                          "views in the split")
    samples = []
    for _ in range(n):
        k = int(rng.integers(2, min(3, len(crops)) + 1))
        assets = rng.choice(len(crops), k, replace=False)
        chosen = [crops[a][int(rng.integers(len(crops[a])))] for a in assets]
        samples.append(compose(chosen, rng, size))
    return samples


class AffordanceClipStep(nn.Module):
    """One forward from uint8 composites to the loss (what DDP wraps)."""

    def __init__(self, model: AffordanceCLIP, balanced: bool) -> None:
        super().__init__()
        self.model, self.balanced = model, balanced

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor,
                masks: Tensor) -> dict[str, Tensor]:
        pixels = self.model.preprocess(images.cpu().numpy())
        logits = self.model(pixels, self.model.encode_text(input_ids, attention_mask))
        target = nn.functional.interpolate(masks[:, None].float(), size=logits.shape[-2:],
                                           mode="nearest")[:, 0] > 0.5
        loss = pixel_text_loss(logits, target, balanced=self.balanced)
        return {"loss": loss, "pixel_text": loss.detach()}


def mask_iou(heat: np.ndarray, mask: np.ndarray) -> float:
    predicted = heat > 0.5
    union = np.logical_or(predicted, mask).sum()
    return float(np.logical_and(predicted, mask).sum() / union) if union else 1.0


class AffordanceClipTask(StepTask):
    stage = "affordanceclip"
    metric = "val_miou"
    higher_is_better = True

    def __init__(self, root: RunRoot, run: str, cfg: dict[str, Any], train_ids: list[str],
                 val_ids: list[str], categories: dict[str, str]) -> None:
        super().__init__(root, run, cfg)
        self.train_ids, self.val_ids, self.categories = train_ids, val_ids, categories
        self.crops: list[list[ObjectCrop]] = []
        self.val: list[Any] = []
        self.tokenize: Callable[..., Any] | None = None

    def build(self) -> nn.Module:
        model = build_affordanceclip(self.cfg["clip_record"])
        self.tokenize = model.tokenize
        return model

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{"params": model.trainable_parameters(), "lr": self.cfg["lr"]}]

    def start(self, device: torch.device) -> None:
        reader = RootReader(self.root)
        self.crops = load_crops(reader, self.train_ids, self.categories)
        val_crops = load_crops(reader, self.val_ids, self.categories)
        self.val = draw_composites(val_crops, self.cfg["val_samples"],
                                   self.cfg["composite_size"],
                                   np.random.default_rng([self.cfg["seed"], 99]))

    def step_module(self, model: nn.Module) -> nn.Module:
        return AffordanceClipStep(model, self.cfg["balanced"])  # type: ignore[arg-type]

    def batch(self, row: dict[str, Any], rank: int, device: torch.device) -> Any:
        rng = np.random.default_rng([self.cfg["seed"], int(row["step"]), rank])
        samples = draw_composites(self.crops, self.cfg["batch_size"],
                                  self.cfg["composite_size"], rng)
        ids, attention = self.tokenize([s.text for s in samples])  # type: ignore[misc]
        images = torch.from_numpy(np.stack([s.image for s in samples]))
        masks = torch.from_numpy(np.stack([s.mask for s in samples]))
        return images, ids.to(device), attention.to(device), masks.to(device)

    def losses(self, module: nn.Module, batch: Any) -> dict[str, Tensor]:
        return module(*batch)

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        heat = model.heatmaps(np.stack([s.image for s in self.val]),  # type: ignore[operator]
                              [s.text for s in self.val])
        ious = [mask_iou(h, s.mask) for h, s in zip(heat, self.val, strict=True)]
        eps = 1e-6
        truth = np.stack([s.mask for s in self.val]).astype(np.float64)
        p = np.clip(heat.astype(np.float64), eps, 1 - eps)
        bce = float(-(truth * np.log(p) + (1 - truth) * np.log(1 - p)).mean())
        return {"val_miou": float(np.mean(ious)), "val_bce": bce}


def affordanceclip_plan(steps: int, world_size: int) -> list[dict[str, Any]]:
    """One row per step and rank (the batch itself is drawn from the (seed, step, rank))."""
    return [{"step": step, "slot": slot} for step in range(steps) for slot in range(world_size)]


def prepare_affordanceclip(root: RunRoot, run: str, name: str, section: AffordanceClipSection,
                           data: DataSection, config_record: dict[str, Any],
                           progress: Callable[[str], None] = print) -> PreparedTask:
    reader = RootReader(root)
    manifest = {row["asset_id"]: row["category"] for row in reader.manifest(["category"])}
    rendered = reader.table(VIEWS).index
    categories = {a: c for a, c in manifest.items() if a in rendered}
    if len(categories) < 4:
        raise ConfigError(f"affordanceclip: {root.display()} has {len(categories)} rendered "
                          "assets; composites need a few (render more: `partlift render`)")
    splits = assign_splits(categories, data.val_fraction, list(data.holdout_categories),
                           data.split_seed)
    train_ids = sorted(a for a, s in splits.items() if s == "train")
    val_ids = sorted(a for a, s in splits.items() if s != "train")
    if len(train_ids) < 2 or len(val_ids) < 2:
        raise ConfigError(f"affordanceclip: {len(train_ids)} training and {len(val_ids)} "
                          "validation assets; both need 2 or more (data.val_fraction)")
    clip = clip_record(section)
    cfg = section.model_dump(mode="json") | {"clip_record": clip}
    from operators.store.integrity import stage_settings
    from operators.store.tables import RENDER_OUTPUT
    render = stage_settings(root, RENDER_OUTPUT) or {}
    # a resume of other renders or other CLIP weights is refused (run.json's lineage)
    fingerprints = {"render": {"hash": settings_hash(render), "settings": render}}
    record = {"kind": MODEL_KIND, "name": name, "model_kind": MODEL_KIND,
              "config": config_record, "clip": clip, "fingerprints": fingerprints,
              "splits": {"train": len(train_ids), "val": len(val_ids)}}
    lineage = {"assets_hash": settings_hash({"train": train_ids, "val": val_ids}),
               "clip_weights": clip.get("weights", clip["name"])}
    resumed = _write_record(root, run, name, MODEL_KIND, record, lineage)
    task = AffordanceClipTask(root, run, cfg, train_ids, val_ids, categories)
    progress(f"{len(train_ids)} training assets, {len(val_ids)} validation assets, "
             f"{section.steps} steps of {section.batch_size} composites per rank x "
             f"{section.num_workers} ranks; CLIP {clip['name']}"
             + ("" if clip["pretrained"] else " (NOT pretrained)"))
    scaling = Scaling(section.num_workers, section.use_gpu, section.cpus_per_worker,
                      section.keep_checkpoints, section.max_failures)
    return PreparedTask(task, affordanceclip_plan(section.steps, section.num_workers), record,
                        resumed, scaling)


@dataclass(frozen=True)
class TrainedAffordanceClip:
    model: AffordanceCLIP
    record: dict[str, Any]
    step: int
    where: str
