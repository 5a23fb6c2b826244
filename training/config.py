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
from training import affordanceclip_backend  # noqa: F401 - registers the `affordanceclip` backend
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


class SocoSection(Section):
    """SOCO keypoint correspondence (`partlift eval --benchmark soco`)."""

    alpha: float = Field(0.1, gt=0, description="PCK radius = alpha x max(w, h) of the target's box (the paper: 0.1)")
    image_size: int = Field(224, ge=14, description="images resized so their longer side has this many pixels before the backbone (the paper: 800)")
    search_stride: int = Field(4, ge=1, description="the target is searched at every n-th pixel centre of the resized image (4 at 224 px: 56 x 56 candidates, finer than the 16 x 16 patch grid)")
    pairs_per_group: int | None = Field(None, ge=1, description="at most this many pairs per category / category pair (None: all)")
    standin_assets: int = Field(3, ge=2, description="--data procedural: fresh assets per category")
    standin_views: int = Field(6, ge=1, description="--data procedural: rendered views per asset")
    standin_pairs: int = Field(4, ge=1, description="--data procedural: pairs per category (intra) and per category pair sharing a function (cross)")
    categories: list[str] = Field([], description="only these categories: --data procedural generates them, --data PATH keeps pairs whose two images are of them (default: all)")


class InstructPartSection(Section):
    """InstructPart instruction -> part segmentation (`partlift eval --benchmark instructpart`)."""

    split: str = Field("test", min_length=1, description="the release's split folder (test, all, train/train1800, ...): its data_<first part>.json, images/, masks/")
    instruction: Literal["human", "gpt"] = Field("human", description="TRPS instruction: human-written (instruction[0]) or GPT-4 rewritten ([1])")
    limit: int | None = Field(None, ge=1, description="at most this many (image, part) samples (None: all)")
    standin_assets: int = Field(2, ge=1, description="--data procedural: fresh assets per category")
    categories: list[str] = Field([], description="only these object categories: --data procedural generates them, --data PATH keeps their samples (default: all)")
    image_size: int = Field(224, ge=14, description="images resized so their longer side has this many pixels before a mask head's backbone (the mask comes back at the image's size)")
    mask_stride: int = Field(2, ge=1, description="a mask head is evaluated on every n-th pixel of the resized image (1 = all; the mask is upsampled nearest)")


# ------------------------------------------------------------------ CMAT pretraining and CAST

# Encoder shapes (training.pointmae.PRESETS) plus the batch and schedule each preset trains
# with. paper = the defaults (12 blocks, width 384; batch 32 per rank); cpu = measured on
# 2 cores: a step of batch 8 costs ~0.37 s (batch 16 ~0.8 s).
PRETRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"n_patches": 64, "k": 32, "width": 384, "depth": 12, "heads": 6,
              "decoder_depth": 4, "batch_size": 32, "steps": 30_000, "checkpoint_every": 1_000,
              "warmup_steps": 1_000},
    "cpu": {"n_patches": 64, "k": 32, "width": 192, "depth": 4, "heads": 6, "decoder_depth": 2,
            "batch_size": 8, "steps": 200, "checkpoint_every": 50, "warmup_steps": 20},
}
# cpu trains 10x faster (1e-3 head, 1e-4 encoder) than the paper's 1e-4 / 1e-5: measured on 48
# procedural assets, 200 steps at the paper's rates left validation AUC near chance (0.54).
CAST_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"fusion_depth": 6, "batch_size": 32, "steps": 10_000, "checkpoint_every": 500,
              "warmup_steps": 500, "lr": 1e-4, "lr_encoder": 1e-5},
    "cpu": {"fusion_depth": 2, "batch_size": 8, "steps": 200, "checkpoint_every": 50,
            "warmup_steps": 20, "lr": 1e-3, "lr_encoder": 1e-4},
}


def _with_preset(presets: dict[str, dict[str, Any]], value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    return {**presets.get(value.get("preset", "cpu"), presets["cpu"]), **value}


class RunScaling(Section):
    """How a Ray Train run is laid out and kept (shared by pretrain.* and cast.*)."""

    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks)")
    use_gpu: bool = Field(False, description="one GPU per worker, NCCL and bf16 autocast")
    cpus_per_worker: float | None = Field(None, gt=0, description="CPUs per worker (unset: the cluster's CPUs shared by the workers)")
    keep_checkpoints: int = Field(2, ge=1, description="last checkpoints kept (the best is exported to best/ as well)")
    max_failures: int = Field(0, ge=0, description="worker-group restarts from the last checkpoint before the run fails")
    seed: int = Field(0, ge=0, description="seed of the batch plan, the masks and the model init")


class PretrainSection(RunScaling):
    """CMAT pretraining of the PointMAE encoder (CMAT §3.2)."""

    preset: Literal["paper", "cpu"] = Field("cpu", description="encoder shape and batch: paper (12 blocks, width 384, batch 32) or cpu (4 blocks, width 192, batch 8); every value below overrides it")
    points: int = Field(1024, ge=64, description="input points per asset: farthest-point samples of features/points (cached per asset under cache/points/)")
    n_patches: int = Field(..., ge=2, description="patch centres by FPS (the CMAT release: 256)")
    k: int = Field(..., ge=2, description="nearest neighbours per patch")
    width: int = Field(..., ge=8, description="transformer width")
    depth: int = Field(..., ge=1, description="encoder blocks")
    heads: int = Field(..., ge=1, description="attention heads")
    decoder_depth: int = Field(..., ge=1, description="decoder blocks")
    drop_path: float = Field(0.1, ge=0, lt=1, description="stochastic depth of the encoder (linear over blocks)")
    mask_ratio: float = Field(0.6, gt=0, lt=1, description="fraction of patches masked")
    target: Literal["points", "centres"] = Field("points", description="L_rec: Chamfer-L2 of the masked patches' points (as released) or MSE of their centres (hidden from the decoder)")
    lambda_rec: float = Field(1.0, ge=0, description="weight of L_rec (Eq. 6)")
    lambda_aff: float = Field(0.1, ge=0, description="weight of L_aff, the affinity alignment to the lifted features (Eq. 3-4)")
    lambda_div: float = Field(0.2, ge=0, description="weight of L_div, KoLeo on the patch features (Eq. 5)")
    teacher: Literal["lifted", "random"] = Field("lifted", description="L_aff's 2D features: the lifted backbone features (features/points) or random Gaussian features per point (the teacher ablation)")
    batch_size: int = Field(..., ge=1, description="assets per rank and step (preset)")
    steps: int = Field(..., ge=1, description="optimizer steps in all (preset)")
    checkpoint_every: int = Field(..., ge=1, description="steps between checkpoints and validations (preset)")
    warmup_steps: int = Field(..., ge=0, description="linear warm-up steps before the cosine decay (preset)")
    lr: float = Field(1e-4, gt=0, description="AdamW peak learning rate")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay")
    val_assets: int = Field(32, ge=1, description="validation assets whose reconstruction is scored at each checkpoint (fixed masks)")

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, value: Any) -> Any:
        return _with_preset(PRETRAIN_PRESETS, value)

    @model_validator(mode="after")
    def _consistent(self) -> "PretrainSection":
        if self.width % self.heads:
            raise ValueError(f"pretrain.width={self.width} is not divisible by "
                             f"pretrain.heads={self.heads}")
        if self.n_patches * 2 > self.points or self.k > self.points:
            raise ValueError(f"pretrain.points={self.points} is too few for "
                             f"pretrain.n_patches={self.n_patches} and pretrain.k={self.k}")
        masked = round(self.mask_ratio * self.n_patches)
        if not 1 <= masked <= self.n_patches - 2:
            raise ValueError(f"pretrain.mask_ratio={self.mask_ratio} of pretrain.n_patches="
                             f"{self.n_patches} masks {masked}: at least 1 patch must be masked "
                             "and 2 stay visible (KoLeo compares visible patches)")
        if self.lambda_rec == 0 and self.lambda_aff == 0 and self.lambda_div == 0:
            raise ValueError("pretrain.lambda_rec, lambda_aff and lambda_div are all 0")
        return self

    def encoder(self) -> dict[str, Any]:
        """The PointMAEConfig keyword arguments."""
        keys = ("n_patches", "k", "width", "depth", "heads", "decoder_depth", "drop_path",
                "mask_ratio", "target")
        return {k: getattr(self, k) for k in keys}


class CastSection(RunScaling):
    """The CAST prompt-driven affordance head on the encoder (CMAT §3.3)."""

    preset: Literal["paper", "cpu"] = Field("cpu", description="fusion depth and batch: paper (6 fusion blocks, batch 32) or cpu (2 blocks, batch 8)")
    init: str = Field("scratch", description="the encoder: pretrain/NAME (a CMAT run's best weights, its shape and points) or scratch (pretrain.* shape, random init); `partlift finetune --from`")
    targets: Literal["gt", "pseudo"] = Field("gt", description="per-point supervision: the procedural ground truth or the pseudo-labels of labels/points")
    prompts: Literal["text", "image", "both"] = Field("both", description="prompt modalities trained: both draws text only, image only or both per sample (a missing one is the null token)")
    text_encoder: BackboneOptions = Field(BackboneOptions(name="minilm-text"), description="text prompt embeddings by registry name")
    fusion_depth: int = Field(..., ge=1, description="fusion transformer blocks over prompt + patch tokens (preset; the paper: 6)")
    batch_size: int = Field(..., ge=1, description="(asset, function) samples per rank and step (preset)")
    steps: int = Field(..., ge=1, description="optimizer steps in all (preset)")
    checkpoint_every: int = Field(..., ge=1, description="steps between checkpoints and validations (preset)")
    warmup_steps: int = Field(..., ge=0, description="linear warm-up steps before the cosine decay (preset)")
    lr: float = Field(..., gt=0, description="AdamW learning rate of the new modules: prompt projections, fusion, head (preset: paper 1e-4, cpu 1e-3)")
    lr_encoder: float = Field(..., ge=0, description="AdamW learning rate of the encoder, 0 = frozen (preset: paper 1e-5, cpu 1e-4)")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay")
    lambda_focal: float = Field(1.0, ge=0, description="weight of the focal loss")
    lambda_dice: float = Field(1.0, ge=0, description="weight of the dice loss")
    focal_gamma: float = Field(2.0, ge=0, description="focal loss gamma")
    focal_alpha: float = Field(0.25, ge=0, le=1, description="focal loss weight of the positives")
    val_samples: int = Field(64, ge=1, description="validation (asset, function) samples scored with aIoU at each checkpoint")

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, value: Any) -> Any:
        return _with_preset(CAST_PRESETS, value)

    @field_validator("init")
    @classmethod
    def _init(cls, value: str) -> str:
        if value != "scratch" and not (value.startswith("pretrain/") or "://" in value
                                       or value.startswith("/")):
            raise ValueError(f"cast.init={value!r}: expected scratch, pretrain/NAME or a run URI")
        return value

    @field_validator("text_encoder")
    @classmethod
    def _text(cls, value: BackboneOptions) -> BackboneOptions:
        if not value.spec.is_text:
            raise ValueError(f"{value.name} is an image backbone; cast.text_encoder takes a text "
                             "encoder (minilm-text, clip-text, clip-text-random-tiny)")
        return value

    @model_validator(mode="after")
    def _some_loss(self) -> "CastSection":
        if self.lambda_focal == 0 and self.lambda_dice == 0:
            raise ValueError("cast.lambda_focal and cast.lambda_dice are both 0")
        return self


class AffordanceClipSection(RunScaling):
    """AffordanceCLIP (affordanceclip.txt): a frozen CLIP + FPN trained on object-level
    referring composites of the root's rendered assets (`partlift affordanceclip`)."""

    clip: str = Field("clip-random-tiny", description="clip-random-tiny (a tiny CLIP from a config, NOT pretrained: a code-path check) or a local directory of a transformers CLIPModel + tokenizer (e.g. openai/clip-vit-base-patch16 saved with save_pretrained)")
    image_size: int = Field(64, ge=32, description="the tiny CLIP's input size, pixels (a real CLIP uses its own)")
    steps: int = Field(60, ge=1, description="optimizer steps in all")
    batch_size: int = Field(8, ge=1, description="composites per rank and step")
    checkpoint_every: int = Field(20, ge=1, description="steps between checkpoints and validations")
    warmup_steps: int = Field(5, ge=0, description="linear warm-up steps before the cosine decay")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the FPN and the logit scale/bias (the paper: 1e-4 at batch 64 on real CLIP)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    composite_size: int = Field(128, ge=32, description="composite images, pixels (square)")
    balanced: bool = Field(False, description="weigh mask and background pixels one half each in the loss (the paper: plain per-pixel mean)")
    val_samples: int = Field(32, ge=1, description="fixed validation composites of validation assets, scored by mask IoU at each checkpoint")


class Agd20kSection(Section):
    """AGD20K-style affordance heat maps (`partlift eval --benchmark agd20k`)."""

    split: str = Field("Seen", min_length=1, description="AGD20K's setting folder: Seen or Unseen (its testset/ is read)")
    limit: int | None = Field(None, ge=1, description="at most this many (image, affordance) samples (None: all)")
    standin_assets: int = Field(2, ge=1, description="--data procedural: fresh assets per category")
    categories: list[str] = Field([], description="only these object categories: --data procedural generates them, --data PATH keeps their samples (default: all)")
    sigma: float = Field(6.0, gt=0, description="--data procedural: Gaussian blur of the part masks into ground-truth heat maps, pixels at 224")
