"""Training objectives of DFC §4.2 (Eq. 1-3), with the details of the authors' release.

Descriptors are L2-normalised by the model, so sim(x, y) is their dot product; every
contrastive loss is a cross-entropy over logits sim / tau with the positive as the target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_points(name: str, *points: Tensor) -> None:
    for p in points:
        if p.ndim != 3:
            raise ValueError(f"{name}: point descriptors must be (B, n, D), got {tuple(p.shape)}")


def _cross_entropy_first(logits: Tensor) -> Tensor:
    """Mean over rows of -log softmax(row)[0] for logits (..., K)."""
    return (torch.logsumexp(logits, dim=-1) - logits[..., 0]).mean()


def functional_loss(pos_1: Tensor, pos_2: Tensor, neg_1: Tensor, neg_2: Tensor,
                    tau: float = 0.1) -> Tensor:
    """Functional-part InfoNCE (DFC Eq. 1 as released); scalar.

    pos_k (B, n, D): points inside the function's part on image k; neg_k (B, n, D): points on
    the object outside the part. Row i (per pair b) has the positive logit sim(p1+_i, p2+_i)
    and the negatives sim(p1+_i, p2-_j), sim(p2+_i, p1-_j) and sim(p1-_i, p2-_j) for all j,
    all over tau: 1 + 3n logits. The release adds the second and third groups to Eq. 1 (the
    third is the paper's "push P1- away from P2-"). Mean over the n rows of all B pairs.
    Raises ValueError unless n_pos == n_neg (row i uses the i-th negative of image 1).
    """
    _check_points("functional_loss", pos_1, pos_2, neg_1, neg_2)
    if pos_1.shape != pos_2.shape or neg_1.shape != neg_2.shape:
        raise ValueError(f"functional_loss: both images need the same points: pos "
                         f"{tuple(pos_1.shape)} vs {tuple(pos_2.shape)}, neg "
                         f"{tuple(neg_1.shape)} vs {tuple(neg_2.shape)}")
    n_pos, n_neg = pos_1.shape[1], neg_1.shape[1]
    if n_pos != n_neg:
        raise ValueError(f"functional_loss: n_pos ({n_pos}) must equal n_neg ({n_neg})")
    positive = (pos_1 * pos_2).sum(dim=-1, keepdim=True)  # (B, n, 1)
    logits = torch.cat([
        positive,
        pos_1 @ neg_2.transpose(1, 2),  # (B, n, n): p1+_i vs every p2-_j
        pos_2 @ neg_1.transpose(1, 2),  # p2+_i vs every p1-_j
        neg_1 @ neg_2.transpose(1, 2),  # p1-_i vs every p2-_j
    ], dim=-1) / tau
    return _cross_entropy_first(logits)


def spatial_loss(points_1: Tensor, points_2: Tensor, tau: float = 0.1) -> Tensor:
    """Multi-view InfoNCE (DFC Eq. 2), one direction (image 1 -> image 2); scalar.

    points_k (B, n, D): the i-th point of image 1 corresponds to the i-th of image 2; the
    other sampled points of image 2 are row i's negatives. Mean over rows and B.
    """
    _check_points("spatial_loss", points_1, points_2)
    if points_1.shape != points_2.shape:
        raise ValueError(f"spatial_loss: points_1 {tuple(points_1.shape)} and points_2 "
                         f"{tuple(points_2.shape)} must match (they are paired)")
    logits = points_1 @ points_2.transpose(1, 2) / tau  # (B, n, n), target j = i
    diagonal = torch.diagonal(logits, dim1=1, dim2=2)
    return (torch.logsumexp(logits, dim=-1) - diagonal).mean()


def mask_loss(pos_logits: Tensor, neg_logits: Tensor) -> Tensor:
    """Mask BCE (DFC §4.2, L_mask): binary cross-entropy with logits, target 1 for the
    part's points pos_logits (any shape, e.g. (B, n_pos)) and 0 for the rest neg_logits;
    mean over all points of both sets together. Scalar."""
    logits = torch.cat([pos_logits.reshape(-1), neg_logits.reshape(-1)])
    targets = torch.cat([torch.ones_like(pos_logits.reshape(-1)),
                         torch.zeros_like(neg_logits.reshape(-1))])
    return F.binary_cross_entropy_with_logits(logits, targets)


def total_loss(l_func: Tensor | None, l_spatial: Tensor | None, l_mask: Tensor | None,
               lambda_spatial: float = 10.0, lambda_mask: float = 1.0,
               lambda_functional: float = 1.0) -> Tensor:
    """DFC Eq. 3 divided by the sum of its weights (release):
    (lf * l_func + ls * l_spatial + lm * l_mask) / (lf + ls + lm), lf = 1 as released; lf = 0
    is the spatial-only ablation. A None term (no pairs of that kind, no mask head) drops out of
    both the sum and the denominator. Scalar tensor."""
    terms = [(lambda_functional, l_func), (lambda_spatial, l_spatial), (lambda_mask, l_mask)]
    present = [(w, t) for w, t in terms if t is not None and w > 0]
    if not present:
        raise ValueError("total_loss: no term with a positive weight")
    loss = sum(w * t for w, t in present)
    return loss / sum(w for w, _ in present)
