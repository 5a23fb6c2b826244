"""Pre-training objectives of CMAT §3.2 (Eq. 1-6), with the details of the authors' release
and of the original PointMAE where the paper is silent.

- Reconstruction: `chamfer_l2` (PointMAE's Chamfer-L2 over the masked patches' points, as
  released) or `centre_mse` (the paper's wording: MSE of the masked patch centres).
- Affinity alignment: `pool_patch_features` (Eq. 1, nearest-centre pooling of the lifted 2D
  features), `affinity` (Eq. 3) and `affinity_loss` (Eq. 4).
- Diversity: `koleo_loss` (Eq. 5, the KoLeo regulariser as in DINOv2).
- `cmat_loss`: the weighted sum of Eq. 6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_shape(name: str, what: str, x: Tensor, ndim: int, last: int | None = None) -> None:
    if x.ndim != ndim or (last is not None and x.shape[-1] != last):
        want = ", ".join(["*"] * (ndim - 1) + [str(last) if last is not None else "*"])
        raise ValueError(f"{name}: {what} must be ({want}), got {tuple(x.shape)}")


def _squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """(..., n, 3), (..., m, 3) -> (..., n, m) squared Euclidean distances.

    Written as a difference rather than |a|^2 + |b|^2 - 2ab: exact (never negative) and with a
    finite gradient at coincident points, where cdist's square root has none."""
    return ((a[..., :, None, :] - b[..., None, :, :]) ** 2).sum(dim=-1)


def chamfer_l2(pred: Tensor, target: Tensor) -> Tensor:
    """Chamfer-L2 between reconstructed and true masked patches, as PointMAE trains; scalar.

    pred (P, k, 3), target (P, k2, 3): the points of P masked patches, each centred on its
    patch centre. Per patch: mean over pred points of the squared distance to the nearest
    target point, plus mean over target points of the squared distance to the nearest pred
    point; then the mean over the P patches. (With the same k for every patch this equals
    PointMAE's mean of each direction over all points of all patches.)
    """
    _check_shape("chamfer_l2", "pred", pred, 3, 3)
    _check_shape("chamfer_l2", "target", target, 3, 3)
    if pred.shape[0] != target.shape[0]:
        raise ValueError(f"chamfer_l2: pred has {pred.shape[0]} patches, target "
                         f"{target.shape[0]}")
    d2 = _squared_distances(pred, target)            # (P, k, k2)
    pred_to_target = d2.amin(dim=2).mean(dim=1)      # (P,)
    target_to_pred = d2.amin(dim=1).mean(dim=1)      # (P,)
    return (pred_to_target + target_to_pred).mean()


def centre_mse(pred_centres: Tensor, true_centres: Tensor) -> Tensor:
    """The paper's L_rec (CMAT §3.2, "Geometric Fidelity"): MSE of the masked patch centres,
    pred_centres and true_centres (P, 3), mean over all P * 3 coordinates; scalar.

    Only meaningful when the decoder does not see the masked centres: PointMAE feeds them to
    the decoder as positional embeddings, which would give the answer away. The trainer only
    allows this loss with the masked centres hidden from the decoder.
    """
    _check_shape("centre_mse", "pred_centres", pred_centres, 2, 3)
    if pred_centres.shape != true_centres.shape:
        raise ValueError(f"centre_mse: pred_centres {tuple(pred_centres.shape)} and "
                         f"true_centres {tuple(true_centres.shape)} must match")
    return F.mse_loss(pred_centres, true_centres)


def pool_patch_features(point_features: Tensor, points: Tensor, centres: Tensor) -> Tensor:
    """Patch-level features by average pooling (CMAT §3.2, Eq. (1)); (B, M, C).

    point_features (B, N, C): the lifted 2D feature of each point; points (B, N, 3) their
    coordinates; centres (B, M, 3) the patch centres. As released, a point belongs to the
    patch of its nearest centre (ties: the lower centre index), so every point counts exactly
    once, unlike the overlapping kNN patches the encoder embeds. A patch that no point is
    assigned to gets a zero vector; with centres chosen from the points by FPS this cannot
    happen, since each centre point is its own nearest centre (barring duplicate centres).
    """
    _check_shape("pool_patch_features", "point_features", point_features, 3)
    _check_shape("pool_patch_features", "points", points, 3, 3)
    _check_shape("pool_patch_features", "centres", centres, 3, 3)
    batch, n_points, channels = point_features.shape
    if points.shape[:2] != (batch, n_points) or centres.shape[0] != batch:
        raise ValueError(f"pool_patch_features: point_features {tuple(point_features.shape)}, "
                         f"points {tuple(points.shape)} and centres {tuple(centres.shape)} "
                         f"disagree on B or N")
    n_patches = centres.shape[1]
    with torch.no_grad():  # the assignment is discrete: no gradient to the coordinates
        distances = torch.cdist(points, centres, compute_mode="donot_use_mm_for_euclid_dist")
        owner = distances.argmin(dim=2)              # (B, N); argmin keeps the first minimum
    sums = point_features.new_zeros(batch, n_patches, channels)
    sums = sums.scatter_add(1, owner[..., None].expand(-1, -1, channels), point_features)
    counts = torch.zeros(batch, n_patches, dtype=point_features.dtype,
                         device=point_features.device)
    counts = counts.scatter_add(1, owner, torch.ones_like(owner, dtype=counts.dtype))
    # an empty patch has a zero sum; dividing by 1 keeps it zero instead of 0 / 0
    return sums / counts.clamp_min(1)[..., None]


def affinity(features: Tensor) -> Tensor:
    """Cosine-similarity matrices (CMAT §3.2, Eq. (3)): (B, M, C) -> (B, M, M).

    Each feature is L2-normalised over C (norm floored at 1e-8, so a zero feature stays zero
    and has affinity 0 with every patch, itself included), then A = F F^T per sample."""
    _check_shape("affinity", "features", features, 3)
    unit = F.normalize(features, p=2.0, dim=-1, eps=1e-8)
    return torch.bmm(unit, unit.transpose(1, 2))


def affinity_loss(student: Tensor, teacher: Tensor, visible: Tensor | None = None) -> Tensor:
    """Affinity alignment (CMAT §3.2, Eq. (3)-(4)): MSE between affinity(student) and
    affinity(teacher); scalar.

    student (B, M, D): the encoder's patch features; teacher (B, M, C): pooled lifted 2D
    features (detached here: the 2D teacher is a fixed target). Without `visible`: the mean
    of (A3D - A2D)^2 over all B * M * M entries, i.e. Eq. (4) averaged over the batch.

    visible (B, M) bool: only the visible patches count (as released: the encoder's visible
    tokens after its final norm; the student's other rows are ignored, finite or not). Each
    sample's affinity is built from its own V_b visible patches, and the squared differences
    are averaged over all visible pairs of all samples, sum_b V_b^2 of them; a sample with
    more visible patches therefore weighs more. Restricting the full affinity to visible rows
    and columns gives the same matrices, since each entry depends on its two patches only.
    """
    _check_shape("affinity_loss", "student", student, 3)
    _check_shape("affinity_loss", "teacher", teacher, 3)
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(f"affinity_loss: student {tuple(student.shape)} and teacher "
                         f"{tuple(teacher.shape)} must agree on (B, M)")
    teacher = teacher.detach()
    if visible is None:
        return ((affinity(student) - affinity(teacher)) ** 2).mean()
    if visible.dtype != torch.bool or visible.shape != student.shape[:2]:
        raise ValueError(f"affinity_loss: visible must be bool {tuple(student.shape[:2])}, "
                         f"got {visible.dtype} {tuple(visible.shape)}")
    pairs = visible[:, :, None] & visible[:, None, :]   # (B, M, M)
    n_pairs = pairs.sum()
    if n_pairs == 0:
        raise ValueError("affinity_loss: no visible patch in the batch")
    # zero the hidden rows before the matmul: a NaN there would survive a mask applied after
    # (NaN * 0 = NaN), and masked_fill also gives those rows exactly zero gradient
    hidden = ~visible[..., None]
    a_student = affinity(student.masked_fill(hidden, 0.0))
    a_teacher = affinity(teacher.masked_fill(hidden, 0.0))
    squared = torch.where(pairs, (a_student - a_teacher) ** 2, 0.0)
    return squared.sum() / n_pairs


def koleo_loss(features: Tensor, eps: float = 1e-8) -> Tensor:
    """Feature diversity, the KoLeo regulariser as in DINOv2 (CMAT §3.2, Eq. (5)); scalar,
    float32.

    features (B, M, D): the M patch features of each sample, M >= 2. Each feature is
    L2-normalised over D; its nearest neighbour is the OTHER patch of the same sample with
    the largest dot product; d = ||f_i - f_nn||_2 and the loss is the mean over all B * M
    patches of -log(d + eps). Computed in float32 with autocast off whatever the input dtype
    (DINOv2 does the same): -log of a small distance is where bf16/fp16 rounding hurts most.
    """
    _check_shape("koleo_loss", "features", features, 3)
    n_patches = features.shape[1]
    if n_patches < 2:
        raise ValueError(f"koleo_loss: needs at least 2 patches per sample, got {n_patches}")
    with torch.autocast(device_type=features.device.type, enabled=False):
        unit = F.normalize(features.float(), p=2.0, dim=-1, eps=1e-8)
        dots = torch.bmm(unit, unit.transpose(1, 2))     # (B, M, M)
        # -inf (not DINOv2's -1) on the diagonal: with antipodal features every other dot is
        # -1 too, and argmax could then pick the patch itself
        self_mask = torch.eye(n_patches, dtype=torch.bool, device=features.device)
        nearest = dots.masked_fill(self_mask, float("-inf")).argmax(dim=2)  # (B, M)
        neighbours = torch.gather(unit, 1, nearest[..., None].expand_as(unit))
        distances = torch.linalg.vector_norm(unit - neighbours, dim=-1)    # (B, M)
        return -torch.log(distances + eps).mean()


def cmat_loss(l_rec: Tensor | None, l_aff: Tensor | None, l_div: Tensor | None,
              lambda_rec: float = 1.0, lambda_aff: float = 0.1,
              lambda_div: float = 0.2) -> Tensor:
    """The pre-training objective (CMAT §3.2, Eq. (6)): the weighted sum
    lambda_rec * l_rec + lambda_aff * l_aff + lambda_div * l_div, not normalised by the
    weights (defaults: the paper's §4 values). A None term is left out, and so is a term of
    weight 0 (so that an ablated, possibly non-finite term cannot turn the sum into NaN).
    Raises ValueError when nothing is left. Scalar tensor."""
    terms = [(lambda_rec, l_rec), (lambda_aff, l_aff), (lambda_div, l_div)]
    present = [(w, t) for w, t in terms if t is not None and w != 0]
    if not present:
        raise ValueError("cmat_loss: no term with a nonzero weight")
    total = present[0][0] * present[0][1]
    for weight, term in present[1:]:
        total = total + weight * term
    return total
