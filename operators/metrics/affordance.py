"""Affordance grounding metrics: per-point scores on 3D shapes, heat maps on 2D images.

3D (PIAD / PIADv2 / LASO): `aiou`, `auc`, `sim`, `mae` of one sample's per-point scores against
its soft ground truth, and `affordance_metrics` for dataset means, following the definitions of
IAGNet's evaluation code (as used by the CMAT/CAST paper's Tables 1-2). aIoU and AUC are
returned as fractions in [0, 1]; the papers print them as percentages (x 100).

2D (AGD20K): `kld`, `sim_map`, `nss` of one predicted heat map against its ground truth map,
and `heatmap_metrics` for dataset means (AffordanceCLIP §4.2, eqs. 9-11).

NaN marks a sample whose metric is undefined (e.g. no positive ground-truth point); the dataset
helpers skip such samples with a NaN-aware mean and report how many they skipped.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

# The 20 prediction thresholds of aIoU, as IAGNet's evaluation code sets them. Note that
# thresholds[0] == 0 marks every point as predicted (scores are >= 0).
AIOU_THRESHOLDS = np.linspace(0.0, 1.0, 20)

# Ground-truth values >= this are positive points for aIoU and AUC (IAGNet's evaluation code).
GT_POSITIVE = 0.5

# Added to the sums that normalise a map to a distribution, as the reference evaluation codes
# do (IAGNet's SIM; AGD20K's KLD/SIM): an all-zero map then normalises to all zeros instead of
# dividing 0 by 0.
_EPS = 1e-12

# AGD20K's evaluation code keeps as fixations the cells of the min-max scaled ground truth
# above this value (strictly greater).
NSS_FIXATION_THRESHOLD = 0.1

_GT_RULES = ("binarize", "soft")


def _pair(pred: np.ndarray, gt: np.ndarray, ndim: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """`pred` and `gt` as float64 arrays of the same non-empty shape with `ndim` axes."""
    p, g = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    if p.shape != g.shape:
        raise ValueError(f"{name}: shapes differ: pred {p.shape} vs gt {g.shape}")
    if p.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} axes, got shape {p.shape}")
    if p.size == 0:
        raise ValueError(f"{name}: empty input, shape {p.shape}")
    return p, g


def _non_negative(arr: np.ndarray, what: str) -> None:
    """ValueError unless every value of `arr` is >= 0 (a map normalised to a distribution)."""
    if np.any(arr < 0):
        raise ValueError(f"{what} has negative values (min {float(arr.min())})")


def _histogram_intersection(p: np.ndarray, g: np.ndarray) -> float:
    """sum_i min(p_i / (sum p + eps), g_i / (sum g + eps)) of two non-negative maps, in [0, 1]."""
    pn = p / (p.sum() + _EPS)
    gn = g / (g.sum() + _EPS)
    return float(np.minimum(pn, gn).sum())


def _nan_mean(values: np.ndarray) -> tuple[float, int]:
    """(mean of the non-NaN values, number of NaN values); the mean is NaN if all are NaN.

    Written out instead of np.nanmean so that an all-NaN or empty batch gives NaN silently,
    without a RuntimeWarning.
    """
    skipped = np.isnan(values)
    kept = values[~skipped]
    mean = float(kept.mean()) if kept.size else float("nan")
    return mean, int(skipped.sum())


# --- 3D: per-point affordance scores ---------------------------------------------------------


def aiou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Average IoU of one sample: pred (N,) scores in [0, 1], gt (N,) soft truth in [0, 1].

    The ground truth is binarised at gt >= 0.5; for each threshold t of AIOU_THRESHOLDS
    (linspace(0, 1, 20)) the prediction is binarised at pred >= t, and the 20 IoUs
    |P & G| / |P | G| are averaged (IAGNet's evaluation code). At t = 0 every point is predicted,
    so that IoU is |G| / N. NaN when the binarised ground truth is empty (no positive point): the
    dataset mean then skips the sample. Since G is non-empty otherwise, P | G is never empty and
    the 0 / 0 case (both empty) cannot occur.
    """
    p, g = _pair(pred, gt, 1, "aiou")
    positive = g >= GT_POSITIVE
    if not positive.any():
        return float("nan")
    predicted = p[None, :] >= AIOU_THRESHOLDS[:, None]  # (20, N): one row per threshold
    inter = np.count_nonzero(predicted & positive, axis=1)
    union = np.count_nonzero(predicted | positive, axis=1)  # >= |G| > 0
    return float(np.mean(inter / union))


def auc(pred: np.ndarray, gt: np.ndarray) -> float:
    """ROC AUC of one sample's scores pred (N,) against the labels gt (N,) >= 0.5.

    The probability that a random positive point scores above a random negative one, a tie
    counting 1/2 (equal to sklearn's roc_auc_score, which IAGNet's evaluation code calls),
    computed as the Mann-Whitney U statistic from average ranks: U = (sum of positive ranks)
    - n_pos (n_pos + 1) / 2, AUC = U / (n_pos n_neg). NaN when the ground truth has no positive
    point or no negative point: with one class only there is no pair to rank.
    """
    p, g = _pair(pred, gt, 1, "auc")
    positive = g >= GT_POSITIVE
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(p)  # average ranks: tied scores share their mean rank, giving the 1/2
    u = float(ranks[positive].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def sim(pred: np.ndarray, gt: np.ndarray) -> float:
    """Similarity (histogram intersection) of one sample: pred (N,), gt (N,), both >= 0.

    sum_i min(p_i / (sum p + eps), g_i / (sum g + eps)) with eps = 1e-12 (IAGNet's evaluation
    code adds the eps the same way). In [0, 1]: 1 for proportional maps (up to ~eps / sum), 0 for
    disjoint supports. An all-zero prediction or ground truth normalises to all zeros, so SIM = 0.
    """
    p, g = _pair(pred, gt, 1, "sim")
    _non_negative(p, "sim: pred")
    _non_negative(g, "sim: gt")
    return _histogram_intersection(p, g)


def mae(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean absolute error of one sample's scores pred (N,) against the soft truth gt (N,)."""
    p, g = _pair(pred, gt, 1, "mae")
    return float(np.mean(np.abs(p - g)))


def affordance_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Dataset means of the per-point metrics over B samples: pred (B, N), gt (B, N).

    "aiou" and "auc" are means over the samples where they are defined (NaN samples skipped,
    counted in "n_skipped_aiou" / "n_skipped_auc"; NaN if every sample is skipped), as fractions
    in [0, 1] (the papers print percentages). "sim" and "mae" are means over all "n_samples".
    The counts are ints. B = 0 gives NaN means and zero counts.
    """
    p, g = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    if p.shape != g.shape or p.ndim != 2:
        raise ValueError(f"affordance_metrics: expected pred and gt of one shape (B, N), got "
                         f"{p.shape} and {g.shape}")
    n = p.shape[0]
    per_sample = {
        "aiou": np.array([aiou(p[i], g[i]) for i in range(n)], np.float64),
        "auc": np.array([auc(p[i], g[i]) for i in range(n)], np.float64),
        "sim": np.array([sim(p[i], g[i]) for i in range(n)], np.float64),
        "mae": np.array([mae(p[i], g[i]) for i in range(n)], np.float64),
    }
    aiou_mean, aiou_skipped = _nan_mean(per_sample["aiou"])
    auc_mean, auc_skipped = _nan_mean(per_sample["auc"])
    empty = float("nan")
    return {
        "aiou": aiou_mean,
        "auc": auc_mean,
        # SIM and MAE are defined for every sample, so a plain mean over all of them
        "sim": float(per_sample["sim"].mean()) if n else empty,
        "mae": float(per_sample["mae"].mean()) if n else empty,
        "n_samples": n,
        "n_skipped_aiou": aiou_skipped,
        "n_skipped_auc": auc_skipped,
    }


# --- 2D: heat maps ---------------------------------------------------------------------------


def kld(pred: np.ndarray, gt: np.ndarray, eps: float = 1e-12) -> float:
    """Kullback-Leibler divergence of gt from pred, (H, W) non-negative maps; in nats, >= ~0.

    Both maps are normalised to sum ~1 with eps in the denominators, p = pred / (sum pred + eps)
    and g = gt / (sum gt + eps), then KLD = sum_i g_i log(eps + g_i / (p_i + eps))
    (AffordanceCLIP eq. 9, with the normalisation of AGD20K's evaluation code). The eps keep
    every term finite: a cell with g_i = 0 adds 0, one with p_i = 0 < g_i adds a large but
    finite g_i log(g_i / eps). Identical maps give ~0 (to about eps / min g_i), an all-zero
    ground truth gives 0.
    """
    p, g = _pair(pred, gt, 2, "kld")
    _non_negative(p, "kld: pred")
    _non_negative(g, "kld: gt")
    pn = p / (p.sum() + eps)
    gn = g / (g.sum() + eps)
    return float(np.sum(gn * np.log(eps + gn / (pn + eps))))


def sim_map(pred: np.ndarray, gt: np.ndarray) -> float:
    """Similarity of two (H, W) non-negative heat maps (AffordanceCLIP eq. 10).

    The same histogram intersection as `sim`: sum_i min of the maps normalised with
    sum + 1e-12; all-zero maps normalise to zeros, giving 0.
    """
    p, g = _pair(pred, gt, 2, "sim_map")
    _non_negative(p, "sim_map: pred")
    _non_negative(g, "sim_map: gt")
    return _histogram_intersection(p, g)


def nss(pred: np.ndarray, gt: np.ndarray, gt_rule: str = "binarize") -> float:
    """Normalized scanpath saliency of a (H, W) prediction at the ground truth's fixations.

    pred is standardised, (pred - mean) / std with the population std (ddof = 0, as np.std),
    and averaged over the fixations given by `gt_rule`:
    - "binarize" (AGD20K's evaluation code): gt min-max scaled to [0, 1], fixations are the
      cells > 0.1, a plain mean over them. A constant gt has no min-max scaling (0 / 0) and no
      fixation: NaN.
    - "soft" (AffordanceCLIP eq. 11 as written): the mean weighted by gt / sum(gt); gt >= 0.
    NaN when pred is constant (std = 0: nothing to standardise) or when there is no fixation
    (sum(gt) = 0 for "soft").
    """
    if gt_rule not in _GT_RULES:
        raise ValueError(f"nss: gt_rule must be one of {_GT_RULES}, got {gt_rule!r}")
    p, g = _pair(pred, gt, 2, "nss")
    # test the spread exactly: np.std of a constant float map can come out a few ulps above 0
    # (the mean rounds), which would turn rounding noise into huge standardised values
    if np.ptp(p) == 0:
        return float("nan")
    standard = (p - p.mean()) / p.std()
    if gt_rule == "binarize":
        lo, hi = float(g.min()), float(g.max())
        if hi == lo:
            return float("nan")
        fixations = (g - lo) / (hi - lo) > NSS_FIXATION_THRESHOLD
        # hi > lo puts the max cell at 1.0 > 0.1, so the set is never empty here
        return float(standard[fixations].mean())
    _non_negative(g, "nss: gt")
    total = float(g.sum())
    if total == 0:
        return float("nan")
    return float(np.sum(standard * g) / total)


def heatmap_metrics(preds: np.ndarray, gts: np.ndarray,
                    gt_rule: str = "binarize") -> dict[str, float]:
    """Dataset means of KLD, SIM and NSS over B heat maps: preds (B, H, W), gts (B, H, W).

    Keys "kld", "sim", "nss": means over the samples where each is defined (NaN samples are
    skipped; NaN if all are), plus the int counts "n_samples" and "n_skipped_nss" (KLD and SIM
    are finite for any finite non-negative input, so only NSS can skip). `gt_rule` as in `nss`.
    """
    p, g = np.asarray(preds, np.float64), np.asarray(gts, np.float64)
    if p.shape != g.shape or p.ndim != 3:
        raise ValueError(f"heatmap_metrics: expected preds and gts of one shape (B, H, W), got "
                         f"{p.shape} and {g.shape}")
    n = p.shape[0]
    kld_mean, _ = _nan_mean(np.array([kld(p[i], g[i]) for i in range(n)], np.float64))
    sim_mean, _ = _nan_mean(np.array([sim_map(p[i], g[i]) for i in range(n)], np.float64))
    nss_values = np.array([nss(p[i], g[i], gt_rule) for i in range(n)], np.float64)
    nss_mean, nss_skipped = _nan_mean(nss_values)
    return {"kld": kld_mean, "sim": sim_mean, "nss": nss_mean,
            "n_samples": n, "n_skipped_nss": nss_skipped}
