"""CAST, the prompt-driven affordance head on the point encoder (CMAT §3.3), and its losses.

    points (B, N, 3) -> patches (FPS + kNN) -> the PointMAE encoder's patch tokens (B, M, W)
    text prompt (B, Dt) -> Linear -> + text modality embedding  \\ a missing modality is its
    image prompt (B, Di) -> Linear -> + image modality embedding / learned null token
    [prompt tokens; patch tokens] -> L fusion blocks (patch positions from their centres)
    -> patch tokens propagated back to the N points (inverse-distance weights of the 3 nearest
    centres, as PointNet++'s feature propagation) + an MLP of each point's xyz
    -> MLP head -> one logit per point

Plain torch; the encoder's submodules carry the names PointMAE gives them (`embed`,
`position`, `encoder`) so that a CMAT checkpoint loads into them (`load_encoder`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.pointmae import (ENCODER_PREFIXES, PatchEmbedding, PointMAEConfig, Transformer,
                               _position_mlp, make_patches)

TEXT, IMAGE = 0, 1  # prompt token order


class CastModel(nn.Module):
    def __init__(self, encoder: dict[str, Any], text_dim: int, image_dim: int,
                 fusion_depth: int) -> None:
        super().__init__()
        config = PointMAEConfig(**encoder)
        self.config = config
        width = config.width
        self.embed = PatchEmbedding(width)
        self.position = _position_mlp(width)
        self.encoder = Transformer(width, config.depth, config.heads, config.drop_path)
        # LayerNorm first: text embeddings and pooled backbone features differ in scale
        self.text_proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, width))
        self.image_proj = nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, width))
        self.modality = nn.Parameter(torch.zeros(2, width))
        self.null = nn.Parameter(torch.zeros(2, width))
        self.fusion_position = _position_mlp(width)
        self.fusion = Transformer(width, fusion_depth, config.heads, 0.0)
        self.point_mlp = nn.Sequential(nn.Linear(3, 64), nn.GELU(), nn.Linear(64, 64))
        self.head = nn.Sequential(nn.Linear(width + 64, width // 2), nn.GELU(),
                                  nn.Linear(width // 2, 1))
        nn.init.normal_(self.modality, std=0.02)
        nn.init.normal_(self.null, std=0.02)

    def encoder_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n.startswith(ENCODER_PREFIXES)]

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith(ENCODER_PREFIXES)]

    def prompt_tokens(self, text: Tensor, image: Tensor, use_text: Tensor,
                      use_image: Tensor) -> Tensor:
        """(B, 2, W): each modality's projection, or its null token where the sample has none
        (torch.where keeps both projections in the graph, so DDP sees every parameter used)."""
        text_token = torch.where(use_text[:, None], self.text_proj(text), self.null[TEXT])
        image_token = torch.where(use_image[:, None], self.image_proj(image), self.null[IMAGE])
        return torch.stack([text_token, image_token], dim=1) + self.modality

    def forward(self, xyz: Tensor, text: Tensor, image: Tensor, use_text: Tensor,
                use_image: Tensor) -> Tensor:
        """Per-point logits (B, N) for unit-sphere clouds xyz (B, N, 3) and their prompts."""
        centres, _, patches = make_patches(xyz, self.config.n_patches, self.config.k)
        tokens = self.encoder(self.embed(patches), self.position(centres))   # (B, M, W)
        prompts = self.prompt_tokens(text, image, use_text, use_image)        # (B, 2, W)
        position = torch.cat([torch.zeros_like(prompts), self.fusion_position(centres)], dim=1)
        fused = self.fusion(torch.cat([prompts, tokens], dim=1), position)[:, 2:]
        per_point = propagate(xyz, centres, fused)                           # (B, N, W)
        return self.head(torch.cat([per_point, self.point_mlp(xyz)], dim=-1)).squeeze(-1)


def propagate(xyz: Tensor, centres: Tensor, features: Tensor, k: int = 3) -> Tensor:
    """Patch features (B, M, C) at `centres` (B, M, 3) -> per point (B, N, C): the average of the
    k nearest centres' features weighted by inverse distance (PointNet++ feature propagation)."""
    d2 = torch.cdist(xyz.float(), centres.float()).square()                # (B, N, M)
    nearest, index = d2.topk(min(k, centres.shape[1]), dim=-1, largest=False)
    weights = 1.0 / (nearest + 1e-8)
    weights = weights / weights.sum(dim=-1, keepdim=True)                  # (B, N, k)
    batch = torch.arange(xyz.shape[0], device=xyz.device)[:, None, None]
    gathered = features[batch, index]                                       # (B, N, k, C)
    return (gathered * weights[..., None].to(gathered.dtype)).sum(dim=2)


def load_encoder(model: CastModel, weights: dict[str, Tensor]) -> int:
    """Copy a PointMAE state dict's encoder half into the model; returns the tensors copied.
    Raises ValueError naming the first tensor whose shape differs."""
    own = model.state_dict()
    taken = {k: v for k, v in weights.items() if k.startswith(ENCODER_PREFIXES)}
    for key, value in taken.items():
        if key not in own or own[key].shape != value.shape:
            raise ValueError(f"encoder tensor {key}: {tuple(value.shape)} in the checkpoint, "
                             f"{tuple(own[key].shape) if key in own else 'absent'} in the model")
    missing = [k for k in own if k.startswith(ENCODER_PREFIXES) and k not in taken]
    if missing:
        raise ValueError(f"the checkpoint lacks encoder tensors, e.g. {missing[0]}")
    model.load_state_dict(taken, strict=False)
    return len(taken)


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0, alpha: float = 0.25) -> Tensor:
    """Sigmoid focal loss (Lin et al.), mean over all points: logits and soft targets (B, N) in
    [0, 1]. -alpha_t (1 - p_t)^gamma log p_t with p_t = p t + (1 - p)(1 - t) and
    alpha_t = alpha t + (1 - alpha)(1 - t); alpha < 0 turns the weighting off."""
    logits, target = logits.float(), target.float()
    probability = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = probability * target + (1 - probability) * (1 - target)
    loss = bce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * target + (1 - alpha) * (1 - target))
    return loss.mean()


def dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """1 - (2 sum(p t) + s) / (sum p + sum t + s) per sample over its points, mean over the
    batch; logits and soft targets (B, N)."""
    probability = torch.sigmoid(logits.float())
    target = target.float()
    overlap = (probability * target).sum(dim=1)
    total = probability.sum(dim=1) + target.sum(dim=1)
    return (1 - (2 * overlap + smooth) / (total + smooth)).mean()


def cast_loss(logits: Tensor, target: Tensor, lambda_focal: float = 1.0,
              lambda_dice: float = 1.0, gamma: float = 2.0,
              alpha: float = 0.25) -> dict[str, Tensor]:
    """CAST's segmentation objective (CMAT §3.3): lambda_focal * focal + lambda_dice * dice."""
    focal = focal_loss(logits, target, gamma, alpha)
    dice = dice_loss(logits, target)
    return {"loss_focal": focal, "loss_dice": dice,
            "loss": lambda_focal * focal + lambda_dice * dice}
