"""Scoring one asset with trained models (plain torch and numpy; the Ray wiring is
`rayjobs.score_job`).

Per asset and function, from its rendered views (rgb, depth, mask, cameras) and surface points:

- the correspondence model (DFC 4.2) runs on the backbone's block grids of every view: its
  descriptors at the projections of a fixed subsample of the asset's points, averaged over the
  views that see each point (depth-tested) and L2-normalised, are the point's functional
  embedding; its mask head, evaluated on a pixel lattice of every view, gives the per-view
  functional-part masks, and averaged over the seeing views the per-point mask score;
- CAST (CMAT 3.3), when given, scores the same points from the function's text prompt on the
  unit-sphere-normalised cloud (farthest-point subsample of the model's size);
- the per-point score is CAST's where present, else the mask head's; the asset's functional
  descriptor for the function is the score-weighted mean of the point embeddings, L2-normalised
  (the pooled embedding of its functional part), what a collection is searched by.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from operators.geometry.cameras import project_points, visibility
from operators.settings import ConfigError


def cast_cloud(points: int, xyz_all: np.ndarray, xyz: np.ndarray, seed: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """CAST's input cloud for an asset, once for all prompts: `points` by farthest-point
    sampling of (a seeded 4096-point subsample of) the asset's surface points, as in training
    (FPS of the lifted points), normalised to the unit sphere; and, for each point of `xyz`,
    its nearest input point (which lends it its score)."""
    from scipy.spatial import cKDTree

    from training.point_ops import farthest_point_sample, normalize_unit_sphere
    rng = np.random.default_rng(seed)
    pool = xyz_all if len(xyz_all) <= 4096 else xyz_all[rng.choice(len(xyz_all), 4096,
                                                                   replace=False)]
    cloud = torch.from_numpy(np.asarray(pool, np.float32))[None]
    size = min(points, len(pool))
    chosen = farthest_point_sample(cloud, size)[0].numpy()
    if size < points:   # fewer surface points than the model takes: repeat some
        chosen = np.concatenate([chosen, rng.choice(chosen, points - size)])
    unit = normalize_unit_sphere(cloud[:, chosen])[0][0].numpy()
    nearest = cKDTree(pool[chosen]).query(xyz)[1]
    return unit, nearest


@dataclass(frozen=True)
class FunctionScores:
    """One asset's scores for one function."""

    function: str
    point_index: np.ndarray        # (N,) int32 rows of the asset's points/ table
    xyz: np.ndarray                # (N, 3) float32
    score: np.ndarray              # (N,) float32 in [0, 1]: CAST's where given, else the mask's
    score_mask: np.ndarray         # (N,) float32, NaN without a mask head or a seeing view
    score_cast: np.ndarray         # (N,) float32, NaN without CAST
    n_views_seen: np.ndarray       # (N,) int16
    embedding: np.ndarray          # (N, D) float16, unit rows (zero where no view sees it)
    descriptor: np.ndarray         # (D,) float32, unit
    masks: np.ndarray | None       # (V, h, w) bool functional-part masks on the pixel lattice


def pixel_lattice(height: int, width: int, stride: int) -> np.ndarray:
    """Pixel centres (h*w, 2) as (u, v) of a lattice with `stride` pixels between samples."""
    rows = np.arange(stride / 2, height, stride, dtype=np.float32)
    cols = np.arange(stride / 2, width, stride, dtype=np.float32)
    v, u = np.meshgrid(rows, cols, indexing="ij")
    return np.stack([u.ravel(), v.ravel()], axis=1)


def pooled_descriptor(embedding: np.ndarray, score: np.ndarray) -> np.ndarray:
    """The score-weighted mean of unit embeddings, L2-normalised (zero when nothing scores)."""
    weights = np.nan_to_num(np.asarray(score, np.float64), nan=0.0)
    if weights.sum() <= 0:
        weights = np.ones_like(weights)
    pooled = (weights[:, None] * np.asarray(embedding, np.float64)).sum(axis=0)
    norm = np.linalg.norm(pooled)
    return (pooled / norm if norm > 0 else pooled).astype(np.float32)


class AssetScorer:
    """Scores assets with a correspondence model (required: embeddings, masks) and optionally
    CAST; holds the models once (an actor's state)."""

    def __init__(self, correspondence: Any, cast: Any | None, backbone: Any, *, n_points: int,
                 mask_stride: int, visibility_tol: tuple[float, float] = (0.01, 2e-3),
                 device: str = "cpu") -> None:
        self.model = correspondence.model.to(device).eval()
        self.text_of = correspondence.text_of
        self.n_blocks = int(self.model.block_logits.numel())
        self.cast, self.backbone = cast, backbone
        self.n_points, self.mask_stride = n_points, mask_stride
        self.visibility_tol, self.device = visibility_tol, device
        self._cast_text: dict[str, np.ndarray] = {}

    @torch.no_grad()
    def _sample(self, blocks: torch.Tensor, uv: np.ndarray, size: tuple[int, int]
                ) -> torch.Tensor:
        """The model's block-weighted grid features (V, P, proj_dim) at pixels uv (V, P, 2):
        the function-independent part, computed once per asset."""
        from training.model import sample_grid
        uv_t = torch.as_tensor(np.nan_to_num(uv, nan=0.0), device=self.device)
        return sample_grid(self.model.feature_grid(blocks), uv_t, size)

    @torch.no_grad()
    def _condition(self, points: torch.Tensor, functions: Sequence[str]
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per function, descriptors (V, P, D) and mask logits (V, P) (or None)."""
        texts = torch.stack([self.text_of(f) for f in functions]).to(self.device)
        yield from self.model.condition_each(points, texts)

    def cast_input(self, xyz_all: np.ndarray, xyz: np.ndarray, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
        """`cast_cloud` at the CAST model's point count."""
        return cast_cloud(self.cast.points, xyz_all, xyz, seed)

    def cast_scores(self, prepared: tuple[np.ndarray, np.ndarray], function: str) -> np.ndarray:
        """CAST's per-point probabilities for the function's text prompt (`cast_input`)."""
        from training.affordance_data import words
        if function not in self._cast_text:
            self._cast_text[function] = self.cast.embed([words(function)])
        unit, nearest = prepared
        predicted = self.cast.predict(unit[None], self._cast_text[function], None)[0]
        return predicted[nearest].astype(np.float32)

    def score(self, asset_id: str, views: dict[str, np.ndarray], xyz_all: np.ndarray,
              functions: Sequence[str], seed: int, grids: np.ndarray | None = None
              ) -> list[FunctionScores]:
        """Score one asset; `grids` (V, n, h, w, C): its views' cached backbone blocks (the
        last n_blocks are used), else the backbone runs on its rgb views."""
        from operators.geometry.lift import subsample_points
        from operators.store.ids import seed_for
        if self.n_points > xyz_all.shape[0]:
            raise ValueError(f"score.n_points={self.n_points} exceeds the {xyz_all.shape[0]} "
                             "surface points rendered for this asset (render.n_points)")
        index = np.sort(subsample_points(xyz_all.shape[0], self.n_points,
                                         seed_for(seed, asset_id))).astype(np.int32)
        xyz = np.asarray(xyz_all[index], np.float32)
        rgb, depth, K, cam = views["rgb"], views["depth"], views["K"], views["cam_to_world"]
        size = (int(rgb.shape[1]), int(rgb.shape[2]))
        if grids is None:
            if self.backbone is None:
                raise ValueError("no cached blocks for this asset and no backbone to make them")
            grids = self.backbone.block_features(rgb, self.n_blocks)   # (V, n, h, w, C)
        blocks = torch.as_tensor(np.asarray(grids[:, -self.n_blocks:], np.float32),
                                 device=self.device)
        projection = project_points(xyz, K, cam)
        seen = visibility(xyz, K, cam, depth, *self.visibility_tol, projection=projection)
        lattice = pixel_lattice(*size, self.mask_stride)
        lattice_shape = (len(np.arange(self.mask_stride / 2, size[0], self.mask_stride)),
                         len(np.arange(self.mask_stride / 2, size[1], self.mask_stride)))
        # the head runs only where it matters: (view, point) pairs that see the point, and
        # lattice pixels on the object
        view_of, point_of = np.nonzero(seen)
        at_points = self._sample(blocks, projection[0], size)[view_of, point_of][None]
        scatter = torch.as_tensor(point_of, device=self.device)
        n_seen = seen.sum(axis=0)
        inside = views["mask"][:, lattice[:, 1].astype(int), lattice[:, 0].astype(int)]
        at_lattice = None
        lattice_logits: Iterator[Any] = iter(())
        cast_input = (self.cast_input(np.asarray(xyz_all, np.float32), xyz,
                                      seed_for(seed, asset_id))
                      if self.cast is not None else None)
        out = []
        for function, (descriptors, logits) in zip(functions,
                                                   self._condition(at_points, functions),
                                                   strict=True):
            with torch.no_grad():
                summed = torch.zeros(xyz.shape[0], descriptors.shape[-1], device=self.device,
                                     dtype=descriptors.dtype).index_add_(0, scatter,
                                                                         descriptors[0])
                embedding = torch.nn.functional.normalize(summed, dim=1).float().cpu().numpy()
            score_mask = np.full(xyz.shape[0], np.nan, np.float32)
            masks = None
            if logits is not None:
                with torch.no_grad():
                    probability = torch.zeros(xyz.shape[0], device=self.device).index_add_(
                        0, scatter, torch.sigmoid(logits[0].float())).cpu().numpy()
                with np.errstate(invalid="ignore", divide="ignore"):
                    score_mask = (probability / n_seen).astype(np.float32)
                if at_lattice is None:
                    grid_uv = np.broadcast_to(lattice, (blocks.shape[0], *lattice.shape))
                    at_lattice = self._sample(blocks, np.ascontiguousarray(grid_uv),
                                              size)[inside][None]
                    lattice_logits = self._condition(at_lattice, functions)
                _, on_lattice = next(lattice_logits)
                positive = np.zeros(inside.shape, bool)
                positive[inside] = (on_lattice[0] > 0).cpu().numpy()
                masks = positive.reshape(-1, *lattice_shape)
            score_cast = (self.cast_scores(cast_input, function) if cast_input is not None
                          else np.full(xyz.shape[0], np.nan, np.float32))
            score = score_cast if self.cast is not None else np.nan_to_num(score_mask, nan=0.0)
            out.append(FunctionScores(
                function, index, xyz, np.asarray(score, np.float32), score_mask, score_cast,
                n_seen.astype(np.int16), embedding.astype(np.float16),
                pooled_descriptor(embedding, score), masks))
        return out


def model_functions(correspondence: Any, asked: Sequence[str] | None) -> list[str]:
    """The functions to score: the asked ones (each known to the correspondence model), else
    every function it was trained on."""
    known = list(correspondence.functions)
    if not asked:
        return known
    unknown = [f for f in asked if f not in known]
    if unknown:
        raise ConfigError(f"score.functions: the correspondence model {correspondence.where} "
                          f"was not trained on {', '.join(unknown)}; it knows "
                          f"{', '.join(known)}")
    return list(asked)


# ------------------------------------------------------------------------------- search


@dataclass(frozen=True)
class Match:
    asset_id: str
    function: str
    similarity: float


def top_matches(batches: Iterable[tuple[list[str], list[str], np.ndarray]], query: np.ndarray,
                k: int, exclude: tuple[str, str] | None = None,
                function: str | None = None) -> list[Match]:
    """The k (asset, function) rows whose descriptors are most similar (dot product of unit
    vectors) to `query`, over batches of (asset ids, functions, descriptors (B, D)) streamed
    from the scores table: memory is k plus one batch, whatever the collection's size."""
    heap: list[tuple[float, str, str]] = []
    for assets, functions, descriptors in batches:
        similarity = np.asarray(descriptors, np.float32) @ np.asarray(query, np.float32)
        for asset, fn, value in zip(assets, functions, similarity.tolist(), strict=True):
            if (asset, fn) == exclude or (function is not None and fn != function):
                continue
            item = (float(value), asset, fn)
            if len(heap) < k:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)
    return [Match(a, f, s) for s, a, f in sorted(heap, reverse=True)]


def point_matches(query_embedding: np.ndarray, query_score: np.ndarray,
                  target_embedding: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray,
                                                                  np.ndarray]:
    """Functional correspondences: the query's n highest-scoring points, each with its most
    similar target point (nearest embedding): (query indices, target indices, similarities)."""
    order = np.argsort(-np.nan_to_num(query_score, nan=-1.0), kind="stable")[:n]
    similarity = (np.asarray(query_embedding[order], np.float32)
                  @ np.asarray(target_embedding, np.float32).T)
    best = similarity.argmax(axis=1)
    return order, best, similarity[np.arange(len(order)), best]
