"""Render-stage throughput: the Ray Data job with 1 and 2 CPU workers vs a plain single-process
loop doing the same work (read mesh, ray-cast views, sample points, write Parquet shards), on the
same procedural assets, in one run. Writes the table to benchmarks/RESULTS.md.

    python benchmarks/bench_render.py [--n 24] [--views 19] [--points 100000]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from operators.store.commits import settings_hash  # noqa: E402
from operators.store.readers import read_manifest  # noqa: E402
from operators.store.storage import RunRoot  # noqa: E402
from operators.store.tables import POINTS, VIEWS  # noqa: E402
from rayjobs.assets_job import run_assets_make  # noqa: E402
from rayjobs.config import load_config  # noqa: E402
from rayjobs.driver import TaskContext, ensure_ray  # noqa: E402
from rayjobs.render_job import render_batch, run_render  # noqa: E402

from results import PeakTreeMemory, write_section  # noqa: E402

SECTION = "## Render stage"


def plain_loop(config, manifest_rows: list[dict]) -> None:
    """The single-process reference: the same per-batch function, called in a Python loop."""
    settings = config.render.settings()
    batch_size = config.render.resources.render.batch_size
    task = TaskContext(config.root, config.storage.options(), "bench",
                       {"render": settings_hash(config.render.fingerprint())})
    for start in range(0, len(manifest_rows), batch_size):
        rows = manifest_rows[start:start + batch_size]
        batch = {"asset_id": np.array([r["asset_id"] for r in rows]),
                 "uri": np.array([r["uri"] for r in rows]),
                 "face_part": [r["face_part"] for r in rows],
                 "up_axis": [r["up_axis"] for r in rows]}
        render_batch(batch, task, settings, config.render.seed, config.render.read_limits())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24, help="procedural assets")
    parser.add_argument("--views", type=int, default=19)
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=224, help="image width = height, pixels")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="partlift-bench-"))
    common = [f"render.views={args.views}", f"render.n_points={args.points}",
              f"render.width={args.size}", f"render.height={args.size}", f"assets.n={args.n}",
              "ray.num_cpus=2", "ray.progress_bars=false"]
    source = str(work / "source")
    t0 = time.perf_counter()
    ensure_ray(load_config((), common).ray)
    ray_start = time.perf_counter() - t0
    run_assets_make(load_config((), common, root=source))
    manifest = read_manifest(RunRoot(source))

    results = []
    # Plain loop: same assets (meshes are read from the source root), fresh output root.
    out = str(work / "plain")
    shutil.copytree(work / "source", work / "plain")
    config = load_config((), common, root=out)
    with PeakTreeMemory(children=False) as memory:  # the idle local Ray is not the loop's
        t = time.perf_counter()
        plain_loop(config, manifest)
        seconds = time.perf_counter() - t
    results.append(("plain single-process loop", seconds, memory.peak))
    for workers in (1, 2):
        out = str(work / f"ray{workers}")
        shutil.copytree(work / "source", out)
        config = load_config((), [*common, f"render.resources.render.concurrency={workers}"], root=out)
        with PeakTreeMemory() as memory:
            t = time.perf_counter()
            report = run_render(config)
            seconds = time.perf_counter() - t
        assert report.ok == args.n, report
        rows = RunRoot(out).read_table(VIEWS.name, columns=["asset_id"]).num_rows
        assert rows == args.n * args.views and \
            RunRoot(out).read_table(POINTS.name, columns=["asset_id"]).num_rows == args.n
        results.append((f"Ray Data, {workers} CPU worker{'s' if workers > 1 else ''}", seconds,
                        memory.peak))
    shutil.rmtree(work, ignore_errors=True)

    base = results[0][1]
    views = args.n * args.views
    lines = [SECTION, "",
             f"{args.n} procedural assets x {args.views} views at {args.size}x{args.size} px + "
             f"{args.points:,} surface points each, written as zstd Parquet shards "
             f"(2 assets per shard). Machine: {psutil.cpu_count()} CPU cores, "
             f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.machine()}; "
             f"measured {time.strftime('%Y-%m-%d')} by `make bench`. Local Ray start-up "
             f"({ray_start:.1f} s) is not included; peak memory is the resident set of the "
             "driver and all its child processes (Ray's raylet, object store and workers) for the Ray "
             "runs, and of the one process for the plain loop. Ray runs reuse one local Ray "
             "(`render.resources.render.concurrency` = 1 or 2 tasks at a time).", "",
             "| run | wall s | views/s | assets/s | speed-up vs plain | peak memory MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, seconds, peak in results:
        lines.append(f"| {name} | {seconds:.1f} | {views / seconds:.1f} | "
                     f"{args.n / seconds:.2f} | {base / seconds:.2f}x | {peak / 2**20:.0f} |")
    lines += ["", "open3d casts rays and finds closest points with its own thread pool, so the plain "
              "loop already keeps both cores partly busy; on 2 cores the Ray gain is bounded by "
              "that. The Ray path's value is scaling out across nodes with resume and error "
              "isolation; per-node speed comes from open3d."]
    table = "\n".join(lines) + "\n"
    print(table)
    write_section(table, SECTION)


if __name__ == "__main__":
    main()
