"""The PointMAE-style point encoder CMAT pretrains (CMAT §3.2; the shape of the original PointMAE):
plain torch, CPU and GPU alike.

    points (B, N, 3), unit sphere -> M patch centres by farthest point sampling -> k nearest
    points per centre, centred -> mini-PointNet patch embedding -> random masking of a ratio of
    the patches -> transformer encoder on the visible patches (a learned MLP of the centre xyz
    added before every block) -> final norm -> light transformer decoder over visible + mask
    tokens -> the masked patches' k points (Chamfer-L2 target), or their centres.

Reconstructing centres ("MSE of the masked patch centres", the paper's text) is only meaningful
when the decoder does not see them: with `hide_masked_centres=True` the mask tokens get no
positional embedding of their own centres (a test shows the prediction then does not depend on
them). Reconstructing the patches' points (both releases) keeps the standard PointMAE decoder,
which places each mask token at its centre.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from training.point_ops import farthest_point_sample, group, knn

# paper = the defaults of the issue (the CMAT release uses 256 patches); cpu = what trains here.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"n_patches": 64, "k": 32, "width": 384, "depth": 12, "heads": 6,
              "decoder_depth": 4},
    "cpu": {"n_patches": 64, "k": 32, "width": 192, "depth": 4, "heads": 6, "decoder_depth": 2},
}


@dataclass(frozen=True)
class PointMAEConfig:
    n_patches: int = 64
    k: int = 32
    width: int = 384
    depth: int = 12
    heads: int = 6
    decoder_depth: int = 4
    drop_path: float = 0.1
    mask_ratio: float = 0.6
    target: str = "points"          # "points" (Chamfer-L2) or "centres" (MSE, centres hidden)

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.target not in ("points", "centres"):
            raise ValueError(f"target must be points or centres, got {self.target!r}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "PointMAEConfig":
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PatchEmbedding(nn.Module):
    """Mini-PointNet over each patch's centred points: shared per-point MLP, max-pool, the pooled
    vector appended to every point, a second MLP, max-pool -> one token per patch. LayerNorm
    where PointMAE has BatchNorm: a token then does not depend on the rest of the batch, and DDP
    needs no synchronised batch statistics."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.first = nn.Sequential(nn.Linear(3, 128), nn.LayerNorm(128), nn.ReLU(),
                                   nn.Linear(128, 256))
        self.second = nn.Sequential(nn.Linear(512, 512), nn.LayerNorm(512), nn.ReLU(),
                                    nn.Linear(512, width))

    def forward(self, patches: Tensor) -> Tensor:
        """(B, M, k, 3) -> (B, M, width)."""
        local = self.first(patches)                                    # (B, M, k, 256)
        pooled = local.amax(dim=2, keepdim=True).expand_as(local)
        return self.second(torch.cat([pooled, local], dim=-1)).amax(dim=2)


class DropPath(nn.Module):
    """Stochastic depth: drops a residual branch per sample while training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.ndim - 1)), device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block (self-attention + MLP), each branch with stochastic depth."""

    def __init__(self, width: int, heads: int, drop_path: float) -> None:
        super().__init__()
        self.norm_1 = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))
        self.drop = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm_1(x)
        x = x + self.drop(self.attention(h, h, h, need_weights=False)[0])
        return x + self.drop(self.mlp(self.norm_2(x)))


def _position_mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, width))


class Transformer(nn.Module):
    """Blocks with the positional embedding added before every block (as PointMAE does)."""

    def __init__(self, width: int, depth: int, heads: int, drop_path: float) -> None:
        super().__init__()
        rates = torch.linspace(0.0, drop_path, depth).tolist() if depth else []
        self.blocks = nn.ModuleList(Block(width, heads, r) for r in rates)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: Tensor, position: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x + position)
        return self.norm(x)


@dataclass
class MAEOutput:
    centres: Tensor        # (B, M, 3)
    masked: Tensor         # (B, M) bool, the same count per sample
    visible_tokens: Tensor  # (B, V, width) after the encoder's final norm
    prediction: Tensor     # (B, Mm, k, 3) points or (B, Mm, 3) centres of the masked patches
    target: Tensor         # the same shape: the true points (centred) or centres


# The state-dict prefixes of the encoder half (what CAST takes over from a pretrained PointMAE).
ENCODER_PREFIXES = ("embed.", "position.", "encoder.")


def make_patches(xyz: Tensor, n_patches: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, N, 3) -> centres (B, M, 3) by FPS, point indices (B, M, k) of their k nearest points,
    and the patches' points centred on their centre (B, M, k, 3)."""
    centre_index = farthest_point_sample(xyz, n_patches)
    rows = torch.arange(xyz.shape[0], device=xyz.device)[:, None]
    centres = xyz[rows, centre_index]
    index = knn(xyz, centres, k)
    return centres, index, group(xyz, centres, index)


def random_patch_mask(batch: int, n_patches: int, ratio: float,
                      generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> Tensor:
    """(B, M) bool with round(ratio * M) patches of each sample masked, uniformly at random
    (drawn on the CPU generator, so a seed gives the same masks on any device)."""
    n_masked = int(round(ratio * n_patches))
    order = torch.rand(batch, n_patches, generator=generator).argsort(dim=1).to(device)
    masked = torch.zeros(batch, n_patches, dtype=torch.bool, device=device)
    masked.scatter_(1, order[:, :n_masked], True)
    return masked


class PointMAE(nn.Module):
    def __init__(self, config: PointMAEConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.embed = PatchEmbedding(width)
        self.position = _position_mlp(width)
        self.encoder = Transformer(width, config.depth, config.heads, config.drop_path)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.decoder_position = _position_mlp(width)
        self.decoder = Transformer(width, config.decoder_depth, config.heads, 0.0)
        out = 3 * config.k if config.target == "points" else 3
        self.head = nn.Linear(width, out)
        nn.init.normal_(self.mask_token, std=0.02)

    def patches(self, xyz: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, N, 3) -> centres (B, M, 3), point indices (B, M, k), centred patches (B, M, k, 3)."""
        return make_patches(xyz, self.config.n_patches, self.config.k)

    def random_mask(self, batch: int, generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu") -> Tensor:
        """(B, M) bool, round(ratio * M) masked patches per sample, uniformly at random."""
        return random_patch_mask(batch, self.config.n_patches, self.config.mask_ratio,
                                 generator, device)

    def encode(self, patches: Tensor, centres: Tensor, visible: Tensor | None = None) -> Tensor:
        """Tokens of the patches (B, M or V, width) after the final norm; only the `visible`
        ones (B, M) bool, the same count per sample, when given."""
        tokens, position = self.embed(patches), self.position(centres)
        if visible is not None:
            batch, width = tokens.shape[0], tokens.shape[-1]
            tokens = tokens[visible].reshape(batch, -1, width)
            position = position[visible].reshape(batch, -1, width)
        return self.encoder(tokens, position)

    def forward(self, xyz: Tensor, generator: torch.Generator | None = None,
                masked: Tensor | None = None) -> MAEOutput:
        """Masked-patch reconstruction of unit-sphere clouds xyz (B, N, 3)."""
        centres, _, patches = self.patches(xyz)
        if masked is None:
            masked = self.random_mask(centres.shape[0], generator, xyz.device)
        return self.reconstruct(centres, patches, masked)

    def reconstruct(self, centres: Tensor, patches: Tensor, masked: Tensor) -> MAEOutput:
        """The masked patches' points (or centres) from the visible ones."""
        batch = centres.shape[0]
        visible = ~masked
        tokens = self.encode(patches, centres, visible)
        width = tokens.shape[-1]
        n_masked = int(masked[0].sum())
        queries = self.mask_token.expand(batch, n_masked, width)
        position_visible = self.decoder_position(centres[visible].reshape(batch, -1, 3))
        if self.config.target == "centres":  # the decoder must not be told where they are
            position_masked = torch.zeros_like(queries)
        else:
            position_masked = self.decoder_position(centres[masked].reshape(batch, -1, 3))
        decoded = self.decoder(torch.cat([tokens, queries], dim=1),
                               torch.cat([position_visible, position_masked], dim=1))
        predicted = self.head(decoded[:, -n_masked:])
        if self.config.target == "points":
            prediction = predicted.reshape(batch, n_masked, self.config.k, 3)
            target = patches[masked].reshape(batch, n_masked, self.config.k, 3)
        else:
            prediction, target = predicted, centres[masked].reshape(batch, n_masked, 3)
        return MAEOutput(centres, masked, tokens, prediction, target)
