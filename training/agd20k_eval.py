"""AGD20K's protocol (AffordanceCLIP §4.1, eq. 9-11): a heat map per (image, affordance), KLD
(lower is better), SIM and NSS (higher is better) against the ground-truth heat map, averaged
over the samples (`operators.metrics.affordance`: the AGD20K evaluation code's normalisation).

Predictors: a trained AffordanceCLIP queried zero-shot with the affordance as the prompt; two
prompt-free baselines: `uniform` (a flat map) and `centre prior` (a Gaussian at the image centre,
sigma a quarter of the shorter side: saliency's classic baseline).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from operators.benchmarks import read_image
from operators.benchmarks.agd20k import HeatSample, read_heatmap
from operators.metrics.affordance import kld, nss, sim_map

# AffordanceCLIP Table 1 (Test A = Seen, Test B = Unseen): published rows, for scale only.
PAPER_ROWS = {"AffordanceCLIP (paper, Test A)": (1.628, 0.335, 0.791),
              "AffordanceCLIP (paper, Test B)": (1.812, 0.301, 0.760),
              "LOCATE, weakly supervised (paper, Test A)": (1.226, 0.401, 1.177)}

HeatPredictor = Callable[[np.ndarray, HeatSample], np.ndarray]


def uniform_predictor() -> HeatPredictor:
    return lambda image, sample: np.ones(image.shape[:2])


def centre_predictor() -> HeatPredictor:
    def predict(image: np.ndarray, sample: HeatSample) -> np.ndarray:
        height, width = image.shape[:2]
        sigma = min(height, width) / 4
        rows, cols = np.mgrid[0:height, 0:width]
        return np.exp(-(((rows - height / 2) ** 2 + (cols - width / 2) ** 2) / (2 * sigma ** 2)))
    return predict


def affordanceclip_predictor(model) -> HeatPredictor:  # noqa: ANN001 - an AffordanceCLIP
    return lambda image, sample: model.heatmaps(image[None], [sample.prompt])[0]


THUMBNAIL = 64  # the longer side of the heat maps kept for predictions.npz, pixels


@dataclass(frozen=True)
class HeatResult:
    metrics: dict[str, float]
    maps: list[np.ndarray]               # the first `keep` maps at full size (pictures)
    thumbnails: list[np.ndarray]         # every map, float16, THUMBNAIL px on its longer side


def thumbnail(heat: np.ndarray) -> np.ndarray:
    scale = THUMBNAIL / max(heat.shape)
    size = (max(1, round(heat.shape[1] * scale)), max(1, round(heat.shape[0] * scale)))
    image = Image.fromarray(heat.astype(np.float32)).resize(size, Image.BILINEAR)  # mode F
    return np.asarray(image, np.float16)


def evaluate_heatmaps(predictor: HeatPredictor, samples: list[HeatSample],
                      keep: int = 4) -> HeatResult:
    """Means of KLD, SIM, NSS (NSS skips samples where it is undefined: a flat prediction)."""
    klds, sims, nsss, maps, small = [], [], [], [], []
    for sample in samples:
        image = read_image(sample.image)
        heat = np.clip(np.asarray(predictor(image, sample), np.float64), 0, None)
        truth = read_heatmap(sample.gt, image.shape[:2])
        klds.append(kld(heat, truth))
        sims.append(sim_map(heat, truth))
        nsss.append(nss(heat, truth))
        if len(maps) < keep:
            maps.append(heat)
        small.append(thumbnail(heat))
    finite = [v for v in nsss if np.isfinite(v)]
    return HeatResult({"KLD": float(np.mean(klds)), "SIM": float(np.mean(sims)),
                       "NSS": float(np.mean(finite)) if finite else float("nan"),
                       "samples": float(len(samples)),
                       "nss_skipped": float(len(nsss) - len(finite))}, maps, small)


def markdown_table(results: dict[str, HeatResult], split: str) -> str:
    lines = [f"AGD20K-style heat maps ({split}); KLD lower is better, SIM and NSS higher.", "",
             "| predictor | KLD ↓ | SIM ↑ | NSS ↑ | samples |", "|---|---|---|---|---|"]
    for name, result in results.items():
        m = result.metrics
        nss_cell = "–" if not np.isfinite(m["NSS"]) else f"{m['NSS']:.3f}"
        lines.append(f"| {name} | {m['KLD']:.3f} | {m['SIM']:.3f} | {nss_cell} | "
                     f"{int(m['samples'])} |")
    for name, (k, s, n) in PAPER_ROWS.items():
        lines.append(f"| {name} | {k:.3f} | {s:.3f} | {n:.3f} | – |")
    lines += ["", "The paper's rows: AGD20K's real egocentric photos with a pretrained "
              "ResNet-101 CLIP, for scale only."]
    return "\n".join(lines) + "\n"
