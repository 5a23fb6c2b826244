"""Function-conditioned dense descriptor head on frozen ViT features (DFC §4.2, Fig. 4).

Input: the patch grids of the last `n_blocks` ViT blocks, taken BEFORE the backbone's final
LayerNorm (the authors' release; the paper only says "the last three blocks of DINOv2"), as one
tensor (B, n_blocks, h, w, C), plus a text embedding of the function (B, text_dim).

Pipeline per image:
1. one Linear(C, proj_dim, bias=False) shared by all blocks (release detail);
2. a learned softmax-weighted sum over the blocks ("average ... using learned weights");
3. L2 normalisation over channels of the combined grid;
4. bilinear sampling of the normalised grid at the query pixels (the project's grid convention,
   see `sample_grid`); the sampled vectors are NOT renormalised: blending unit vectors shortens
   them between patch centres, and the MLP sees that as it does in the release;
5. concatenation with the text embedding and a 3-layer MLP, then L2 normalisation, so that the
   similarity of two descriptors is their dot product;
6. optionally a Linear(out_dim, 1) mask head on the descriptors (DFC §4.2, "extra fully
   connected layer ... functional part mask").
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sample_grid(grid: Tensor, uv: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Bilinear sample of patch grids (B, C, h, w) at continuous pixels uv (B, P, 2) of an
    (H, W) image; returns (B, P, C).

    uv = (u = column, v = row); pixel (r, c) covers [c, c+1) x [r, r+1). Patch (i, j) of an
    (h, w) grid is centred at pixel ((j + 0.5) * W / w, (i + 0.5) * H / h), and outside the
    outermost centres the border patch is used: the convention of
    `operators.geometry.lift.sample_patch_grid`. With align_corners=False, grid_sample maps the
    normalised x = 2u/W - 1 to grid column u * w / W - 0.5, which is exactly that convention,
    and padding_mode="border" gives the clamping.
    """
    if grid.ndim != 4:
        raise ValueError(f"sample_grid: grid must be (B, C, h, w), got {tuple(grid.shape)}")
    if uv.ndim != 3 or uv.shape[-1] != 2 or uv.shape[0] != grid.shape[0]:
        raise ValueError(f"sample_grid: uv must be (B={grid.shape[0]}, P, 2), "
                         f"got {tuple(uv.shape)}")
    height, width = image_size
    uv = uv.to(grid.dtype)
    normalised = torch.stack([2.0 * uv[..., 0] / width - 1.0, 2.0 * uv[..., 1] / height - 1.0],
                             dim=-1)
    # grid_sample wants an output "image"; a 1 x P strip of sample points is the cheapest one
    sampled = F.grid_sample(grid, normalised.unsqueeze(1), mode="bilinear",
                            padding_mode="border", align_corners=False)  # (B, C, 1, P)
    return sampled.squeeze(2).transpose(1, 2)


def _check_blocks(blocks: Tensor, uv: Tensor) -> None:
    if blocks.ndim != 5:
        raise ValueError(f"blocks must be (B, n_blocks, h, w, C), got {tuple(blocks.shape)}")
    if uv.ndim != 3 or uv.shape[0] != blocks.shape[0] or uv.shape[-1] != 2:
        raise ValueError(f"uv must be (B={blocks.shape[0]}, P, 2), got {tuple(uv.shape)}")


def raw_descriptors(blocks: Tensor, uv: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Baseline "raw backbone features" (no learned parts): the uniform mean of the blocks
    (B, n_blocks, h, w, C), L2-normalised over channels, sampled at uv (B, P, 2) with
    `sample_grid`. Returns (B, P, C); like the model's grid features, not renormalised after
    sampling."""
    _check_blocks(blocks, uv)
    grid = F.normalize(blocks.mean(dim=1), dim=-1)  # (B, h, w, C)
    return sample_grid(grid.permute(0, 3, 1, 2), uv, image_size)


class DenseCorrespondenceModel(nn.Module):
    """g_theta(p | I, F) of DFC §4.2: per-pixel, function-conditioned, unit-norm descriptors.

    Layer sizes default to the release: proj 512, MLP hidden 1024 (DFC §4.3: "3 layers with
    1024 hidden dimensions"), output 256. All layers keep torch's default initialisation.
    """

    def __init__(self, feature_dim: int, text_dim: int, n_blocks: int = 3, proj_dim: int = 512,
                 hidden_dim: int = 1024, out_dim: int = 256, mask_head: bool = False) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.text_dim = text_dim
        self.n_blocks = n_blocks
        # one projection for every block (release), so the blocks are mixed in one space
        self.proj = nn.Linear(feature_dim, proj_dim, bias=False)
        # zero logits = uniform weights at the start
        self.block_logits = nn.Parameter(torch.zeros(n_blocks))
        self.mlp = nn.Sequential(
            nn.Linear(proj_dim + text_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            # bias-free last layer, as in the release
            nn.Linear(hidden_dim, out_dim, bias=False),
        )
        self.mask_head = nn.Linear(out_dim, 1) if mask_head else None

    @property
    def block_weights(self) -> Tensor:
        """Softmax weights of the blocks, (n_blocks,), summing to 1."""
        return torch.softmax(self.block_logits, dim=0)

    def feature_grid(self, blocks: Tensor) -> Tensor:
        """Projected, block-weighted, L2-normalised grid (B, proj_dim, h, w) from blocks
        (B, n_blocks, h, w, C)."""
        if blocks.shape[1] != self.n_blocks or blocks.shape[-1] != self.feature_dim:
            raise ValueError(f"blocks must be (B, {self.n_blocks}, h, w, {self.feature_dim}), "
                             f"got {tuple(blocks.shape)}")
        # cached backbone features may be float16; compute in the parameters' dtype
        projected = self.proj(blocks.to(self.proj.weight.dtype))  # (B, n, h, w, proj_dim)
        combined = torch.einsum("n,bnhwd->bhwd", self.block_weights, projected)
        return F.normalize(combined, dim=-1).permute(0, 3, 1, 2)

    def forward(self, blocks: Tensor, uv: Tensor, image_size: tuple[int, int],
                text: Tensor) -> tuple[Tensor, Tensor | None]:
        """Descriptors (B, P, out_dim), unit norm, and mask logits (B, P) (None without a mask
        head) at pixels uv (B, P, 2) of (H, W) images, from blocks (B, n_blocks, h, w, C) and
        the function's text embedding (B, text_dim)."""
        _check_blocks(blocks, uv)
        if text.shape != (blocks.shape[0], self.text_dim):
            raise ValueError(f"text must be ({blocks.shape[0]}, {self.text_dim}), "
                             f"got {tuple(text.shape)}")
        # normalise the grid first, then sample (DFC §4.2: weighted grid -> bilinear per pixel)
        points = sample_grid(self.feature_grid(blocks), uv, image_size)  # (B, P, proj_dim)
        return self.condition(points, text)

    def condition_each(self, points: Tensor, texts: Tensor
                       ) -> Iterator[tuple[Tensor, Tensor | None]]:
        """`condition` of the same points (B, P, proj_dim) for each text embedding of texts
        (F, text_dim), in order: the first layer's product with the points (the larger part of
        its input) is computed once, since Linear(cat[x, t]) = W_x x + W_t t + b."""
        first = self.mlp[0]
        proj_dim = points.shape[-1]
        shared = points @ first.weight[:, :proj_dim].T                  # (B, P, hidden)
        for text in texts:
            hidden = shared + (first.weight[:, proj_dim:] @ text.to(points.dtype) + first.bias)
            descriptors = F.normalize(self.mlp[1:](hidden), dim=-1)
            logits = None if self.mask_head is None else self.mask_head(descriptors).squeeze(-1)
            yield descriptors, logits

    def condition(self, points: Tensor, text: Tensor) -> tuple[Tensor, Tensor | None]:
        """The function-conditioned part of `forward`, on sampled grid features (B, P,
        proj_dim): descriptors (B, P, out_dim) and mask logits (B, P) or None. Scoring several
        functions samples the grid once and calls this per function."""
        # the same function embedding conditions every point of the image
        condition = text.to(points.dtype).unsqueeze(1).expand(-1, points.shape[1], -1)
        descriptors = F.normalize(self.mlp(torch.cat([points, condition], dim=-1)), dim=-1)
        if self.mask_head is None:
            return descriptors, None
        return descriptors, self.mask_head(descriptors).squeeze(-1)
