"""The correspondence steps for the shared Ray Train loop (`training.task_loop`): plain torch
around `training.model`, `training.losses`, `training.data`.

Per step each rank reads one pair-plan row, builds its batch, and takes an AdamW step at a
constant learning rate (DDP averages the gradients). Every `checkpoint_every` steps rank 0
validates (label-transfer PCK@10 on the fixed validation pairs); the shared loop writes the
metric log, exports `best/` when PCK@10 improved, and restores model, optimiser, step and torch
RNG on a resume, skipping the plan rows of the steps done.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from operators.store.storage import RunRoot
from training.data import PairBatches
from training.evaluation import EvalPair, PairFeatures, model_describer, score_pair
from training.losses import functional_loss, mask_loss, spatial_loss, total_loss
from training.model import DenseCorrespondenceModel
from training.pairs import Catalogue
from training.task_loop import StepTask, task_loop_per_worker

VALIDATION_METRIC = "val_pck@10"


@dataclass
class LoopSetup:
    """Everything a worker needs (pickled into train_loop_config)."""

    root: RunRoot
    run: str                          # run directory relative to root
    catalogue: Catalogue
    manifest: dict[str, dict]         # asset_id -> manifest row (training assets)
    text: np.ndarray                  # (n_functions, d_text), catalogue.functions order
    model: dict[str, Any]             # DenseCorrespondenceModel kwargs
    train: dict[str, Any]             # TrainSection as a dict
    val_pairs: list[EvalPair] = field(default_factory=list)
    backbone: dict[str, Any] | None = None   # lift backbone options (input=backbone)
    visibility_tol: tuple[float, float] = (0.01, 2e-3)


class PairStep(nn.Module):
    """One DDP module around the model, so that both kinds of pairs go through one forward
    (DDP expects one forward per backward)."""

    def __init__(self, model: DenseCorrespondenceModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                image_size: tuple[int, int]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        return [self.model(blocks, uv, image_size, text) for blocks, uv, text in groups]


def step_losses(step_module: nn.Module, batch: dict[str, torch.Tensor], text: torch.Tensor,
                cfg: dict[str, Any], image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The losses of one batch (DFC §4.3): L_func, L_spatial, L_mask and their weighted mean."""
    n = cfg["points"]
    groups = []
    if "f_feat_1" in batch:
        feats = torch.cat([batch["f_feat_1"], batch["f_feat_2"]])
        uv = torch.cat([torch.cat([batch["f_pos_1"], batch["f_neg_1"]], dim=1),
                        torch.cat([batch["f_pos_2"], batch["f_neg_2"]], dim=1)])
        groups.append((feats, uv, text[batch["f_text"]].repeat(2, 1)))
    if "s_feat_1" in batch:
        groups.append((torch.cat([batch["s_feat_1"], batch["s_feat_2"]]),
                       torch.cat([batch["s_uv_1"], batch["s_uv_2"]]),
                       text[batch["s_text"]].repeat(2, 1)))
    outputs = step_module(groups, image_size)
    losses: dict[str, torch.Tensor] = {}
    l_func = l_spatial = l_mask = None
    index = 0
    if "f_feat_1" in batch:
        desc, logits = outputs[index]
        desc, logits = desc.float(), None if logits is None else logits.float()  # fp32 losses
        index += 1
        half = desc.shape[0] // 2
        d1, d2 = desc[:half], desc[half:]
        l_func = functional_loss(d1[:, :n], d2[:, :n], d1[:, n:], d2[:, n:], cfg["tau"])
        losses["loss_functional"] = l_func
        if logits is not None:
            l_mask = mask_loss(logits[:, :n], logits[:, n:])
            losses["loss_mask"] = l_mask
    if "s_feat_1" in batch:
        desc = outputs[index][0].float()
        half = desc.shape[0] // 2
        l_spatial = spatial_loss(desc[:half], desc[half:], cfg["tau"])
        losses["loss_spatial"] = l_spatial
    losses["loss"] = total_loss(l_func, l_spatial, l_mask, cfg["lambda_spatial"],
                                cfg["lambda_mask"], cfg["lambda_functional"])
    return losses


class BlockSource:
    """Turns a batch's view features into blocks: the cache's (as read) or, on the
    backbone-in-the-loop path, the frozen backbone run on the RGB views."""

    def __init__(self, backbone_options: dict[str, Any] | None, n_blocks: int,
                 device: torch.device) -> None:
        self.backbone = None
        self.n_blocks, self.device = n_blocks, device
        if backbone_options is not None:
            from operators.models.backbones import load_backbone
            options = {k: v for k, v in backbone_options.items() if k != "fingerprint"}
            self.backbone = load_backbone(**options, device=device)

    def __call__(self, features: np.ndarray) -> torch.Tensor:
        if self.backbone is None:
            return torch.as_tensor(np.array(features, np.float32), device=self.device)
        blocks = self.backbone.block_features(np.asarray(features), self.n_blocks)
        # the cache stores float16: round the same way so both paths give the same numbers
        return torch.as_tensor(blocks.astype(np.float16).astype(np.float32), device=self.device)


def to_tensors(batch: dict[str, np.ndarray], blocks: BlockSource,
               device: torch.device) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in batch.items():
        if "_feat_" in key:
            shape = value.shape
            out[key] = blocks(value.reshape(-1, *shape[1:]))
        else:
            out[key] = torch.as_tensor(np.array(value), device=device)
    return out


def validate(model: DenseCorrespondenceModel, pairs: list[EvalPair], data: PairBatches,
             blocks: BlockSource, text_of, device: torch.device) -> float:
    """Mean label-transfer PCK@10 over the validation pairs (no discovery: it is the slow part)."""
    if not pairs:
        return float("nan")
    model.eval()
    describe = model_describer(model, text_of, device)
    values = []
    for pair in pairs:
        feat_1 = blocks(view_features(data, pair.asset_1, pair.view_1)[None])[0].cpu().numpy()
        feat_2 = blocks(view_features(data, pair.asset_2, pair.view_2)[None])[0].cpu().numpy()
        size = data.image_size()
        values.append(score_pair(describe, pair, feat_1, feat_2, size, discovery=False,
                                 lattice_targets=True)["pck@10"])
    model.train()
    return float(np.mean(values))


def view_features(data: PairBatches, asset_id: str, view: int) -> np.ndarray:
    """One view's features (blocks, or RGB on the backbone path) of any asset (validation
    assets are not in the catalogue)."""
    if data.input != "backbone":
        return PairFeatures(data.reader, data.extra_views)(asset_id, view)
    if asset_id not in data.extra_views:
        data.extra_views[asset_id] = np.asarray(data.reader.views(asset_id, ["rgb"])["rgb"])
    return data.extra_views[asset_id][view]


class CorrespondenceTask(StepTask):
    """The DFC model's steps (§4.3) and validation (label-transfer PCK@10) for the shared loop;
    a constant learning rate, as released."""

    stage = "train"
    metric = VALIDATION_METRIC
    higher_is_better = True

    def __init__(self, setup: LoopSetup) -> None:
        super().__init__(setup.root, setup.run, setup.train)
        self.setup = setup

    def build(self) -> nn.Module:
        return DenseCorrespondenceModel(**self.setup.model)

    def schedule(self, step: int) -> float:
        return 1.0

    def start(self, device: torch.device) -> None:
        setup, cfg = self.setup, self.cfg
        self.device = device
        self.text = torch.as_tensor(np.array(setup.text, np.float32), device=device)
        self.data = PairBatches(setup.root, setup.catalogue, setup.manifest, masks=cfg["masks"],
                                points=cfg["points"], input=cfg["input"],
                                n_blocks=cfg["n_blocks"], cache_assets=cfg["cache_assets"],
                                augment=cfg["augment_backgrounds"],
                                spatial_region=cfg["spatial_region"],
                                visibility_tol=setup.visibility_tol)
        self.blocks = BlockSource(setup.backbone if cfg["input"] == "backbone" else None,
                                  cfg["n_blocks"], device)

    def step_module(self, model: nn.Module) -> nn.Module:
        return PairStep(model)

    def batch(self, row: dict[str, Any], rank: int, device: torch.device) -> Any:
        return to_tensors(self.data.build(row), self.blocks, device)

    def losses(self, module: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        return step_losses(module, batch, self.text, self.cfg, self.data.image_size())

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        functions = self.setup.catalogue.functions
        text_of = lambda f: self.text[functions.index(f)]  # noqa: E731
        return {VALIDATION_METRIC: validate(model, self.setup.val_pairs, self.data, self.blocks,
                                            text_of, device)}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The correspondence run on the shared loop (training.task_loop)."""
    task_loop_per_worker({"task": CorrespondenceTask(config["setup"])})
