"""Typed sections of the learning stages (`rayjobs` composes them into job configs).

- `DataSection` (`data.*`): which assets train, validate or are held out (shared by every
  learning stage).
- `TrainSection` (`train.*`): the dense functional-correspondence trainer (DFC §4.2-4.3, the
  released code's defaults), with `train.preset` choosing a batch shape (`paper`: the release's,
  for GPUs; `cpu`: small enough for a laptop). Every preset value can be overridden.
- `EvalSection` (`eval.*`): the DFC evaluation protocol's sizes.

Imports nothing heavy (no torch, no ray): the command-line client validates configs with it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from operators.models.registry import BackboneOptions
from operators.settings import Section

# Per rank and step (N workers train on N times the pairs a step). paper = the released code (50 + 50 pairs, 128 points per image and sign,
# 1,000 steps an epoch); cpu = measured on 2 cores at ~0.25 s a step with the ViT-S cache.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"functional_pairs": 50, "spatial_pairs": 50, "points": 128, "steps": 10_000,
              "checkpoint_every": 1_000, "val_pairs": 64},
    "cpu": {"functional_pairs": 8, "spatial_pairs": 8, "points": 64, "steps": 200,
            "checkpoint_every": 50, "val_pairs": 16},
}


class DataSection(Section):
    """Splits: an asset's split comes from a hash of its id (stable when assets are added)."""

    val_fraction: float = Field(0.1, ge=0, lt=1, description="fraction of assets (by a hash of the id) kept for validation")
    holdout_categories: list[str] = Field([], description="categories no training run reads (evaluated as an extra column)")
    split_seed: int = Field(0, ge=0, description="salt of the id hash that assigns splits")


class TrainSection(Section):
    """Dense functional-correspondence training (DFC §4.2-4.3)."""

    preset: Literal["paper", "cpu"] = Field("cpu", description="batch shape: paper (50+50 pairs, 128 points, for GPUs) or cpu (8+8 pairs, 64 points); every value below overrides it")
    functional_pairs: int = Field(..., ge=0, description="functional pairs per rank and step (preset)")
    spatial_pairs: int = Field(..., ge=0, description="spatial pairs per rank and step (preset)")
    points: int = Field(..., ge=2, description="positive (and as many negative) points per image (preset)")
    steps: int = Field(..., ge=1, description="optimizer steps in all (preset)")
    checkpoint_every: int = Field(..., ge=1, description="steps between checkpoints and validations (preset)")
    val_pairs: int = Field(..., ge=1, description="fixed validation pairs scored with PCK@10 at each checkpoint (preset)")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (DFC release)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    tau: float = Field(0.1, gt=0, description="contrastive temperature")
    lambda_functional: float = Field(1.0, ge=0, description="weight of L_func (0: spatial-only ablation)")
    lambda_spatial: float = Field(10.0, ge=0, description="weight of L_spatial (0: functional-only ablation)")
    lambda_mask: float = Field(1.0, ge=0, description="weight of L_mask (only with mask_head)")
    mask_head: bool = Field(False, description="add the Linear(256, 1) part-mask head and L_mask")
    masks: Literal["pseudo", "gt"] = Field("pseudo", description="part masks of the functional pairs: labels/masks (pseudo-labels) or the procedural ground truth (gt), to measure label noise")
    min_part_pixels: int = Field(32, ge=1, description="a view shows a part when its mask has at least this many pixels")
    spatial_region: Literal["part", "object"] = Field("part", description="spatial pairs' correspondences: visible points on the functional part (as released) or anywhere on the object")
    min_shared_points: int = Field(128, ge=1, description="spatial pairs: views of one asset sharing at least this many visible part points")
    n_blocks: int = Field(3, ge=1, description="last ViT blocks the model reads (before the final LayerNorm; lift.cache_blocks must be >= this)")
    proj_dim: int = Field(512, ge=1, description="shared per-block projection width")
    hidden_dim: int = Field(1024, ge=1, description="MLP hidden width")
    out_dim: int = Field(256, ge=1, description="descriptor width")
    text_encoder: BackboneOptions = Field(BackboneOptions(name="minilm-text"), description="function-name embeddings by registry name (minilm-text offline; clip-text as released, with user-provided weights)")
    augment_backgrounds: bool = Field(True, description="background augmentation: the backbone path draws a new background per image and step; the cache path picks one of the lift stage's lift.background_variants")
    input: Literal["cache", "backbone"] = Field("cache", description="features from the lift stage's block cache, or the frozen backbone run on the views in the loop")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks)")
    use_gpu: bool = Field(False, description="one GPU per worker, NCCL and bf16 autocast")
    cpus_per_worker: float | None = Field(None, gt=0, description="CPUs per Ray Train worker (unset: the cluster's CPUs shared by the workers, at least 1; torch uses as many threads)")
    keep_checkpoints: int = Field(2, ge=1, description="last checkpoints kept (the best is exported to best/ as well)")
    max_failures: int = Field(0, ge=0, description="worker-group restarts from the last checkpoint before the run fails")
    seed: int = Field(0, ge=0, description="seed of the pair plan, the point sampling and the model init")
    cache_assets: int = Field(64, ge=1, description="assets whose arrays a worker keeps in memory (LRU)")

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        preset = value.get("preset", "cpu")
        return {**PRESETS.get(preset, PRESETS["cpu"]), **value}

    @field_validator("text_encoder")
    @classmethod
    def _text(cls, value: BackboneOptions) -> BackboneOptions:
        if not value.spec.is_text:
            raise ValueError(f"{value.name} is an image backbone; train.text_encoder takes a "
                             "text encoder (minilm-text, clip-text, clip-text-random-tiny)")
        return value

    @model_validator(mode="after")
    def _some_pairs(self) -> "TrainSection":
        if self.functional_pairs == 0 and self.spatial_pairs == 0:
            raise ValueError("train.functional_pairs and train.spatial_pairs are both 0")
        if self.lambda_functional == 0 and self.lambda_spatial == 0:
            raise ValueError("train.lambda_functional and train.lambda_spatial are both 0")
        if self.mask_head and (self.lambda_mask == 0 or self.functional_pairs == 0):
            # an unused head has no gradient, which DDP (find_unused_parameters=False) rejects
            raise ValueError("train.mask_head=true needs train.lambda_mask > 0 and "
                             "train.functional_pairs > 0 (the mask loss is on functional pairs)")
        return self


class EvalSection(Section):
    """DFC §5.1 / B.1 evaluation sizes (the paper's values where they fit a CPU)."""

    pairs: int = Field(48, ge=1, description="evaluation pairs (two views of two assets sharing a function), drawn with eval.seed")
    max_gt_points: int = Field(1000, ge=1, description="ground-truth pairs per image pair (the paper: 10,000; the assignment is cubic)")
    pixel_stride: int = Field(2, ge=1, description="discovery compares every n-th object pixel in both directions (1 = all; memory grows with the square)")
    seed: int = Field(0, ge=0, description="seed of the evaluation pairs and of the chance baseline")
