"""Render-stage throughput: the Ray Data job with 1 and 2 CPU workers vs a plain single-process
loop doing the same work (read mesh, ray-cast views, sample points, write Parquet shards), on the
same procedural assets, in one run; with `--before REV`, the same benchmark of an earlier commit
(run from a temporary git worktree) in the same run, for before/after. Also the overhead of
reading untrusted mesh files in a child process. Writes the table to benchmarks/RESULTS.md.

    python benchmarks/bench_render.py [--n 24] [--views 19] [--points 100000] [--before a393301]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from operators.data.assets import read_mesh_file  # noqa: E402
from operators.settings import ReadLimits  # noqa: E402
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
REPO = Path(__file__).resolve().parents[1]


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
                 "up_axis": [r["up_axis"] for r in rows], "source": [r["source"] for r in rows]}
        render_batch(batch, task, settings, config.render.seed, config.render.read_limits())


def isolation_overhead(root: RunRoot, manifest_rows: list[dict], repeats: int = 3) -> tuple[float, float, float]:
    """Seconds per file reading the assets' meshes in this process vs in the warm child process
    (median of `repeats` passes), and the child's start-up."""
    uris = [root.resolve(r["uri"]) for r in manifest_rows]
    started = time.perf_counter()
    read_mesh_file(uris[0])  # starts the child (interpreter + open3d import)
    start_up = time.perf_counter() - started

    def per_file(limits: ReadLimits) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            for uri in uris:
                read_mesh_file(uri, limits=limits)
            times.append((time.perf_counter() - t) / len(uris))
        return float(np.median(times))

    return per_file(ReadLimits(isolate=False)), per_file(ReadLimits()), start_up


def before(rev: str, args: argparse.Namespace) -> list[tuple[str, float, float, float]]:
    """This benchmark as commit `rev` had it, run from a temporary worktree: its table rows."""
    tree = Path(tempfile.mkdtemp(prefix="partlift-before-")) / "tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(tree), rev],
                   check=True)
    try:
        done = subprocess.run(
            [sys.executable, "benchmarks/bench_render.py", "--n", str(args.n), "--views",
             str(args.views), "--points", str(args.points), "--size", str(args.size)],
            cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True,
            text=True, check=True)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                       check=False)
    rows = []
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and re.fullmatch(r"[\d.]+", cells[1]):
            rows.append((f"before ({rev[:7]}): {cells[0]}", float(cells[1]), float(cells[2]),
                         float(cells[5])))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24, help="procedural assets")
    parser.add_argument("--views", type=int, default=19)
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=224, help="image width = height, pixels")
    parser.add_argument("--before", default=None, help="also benchmark this earlier commit")
    args = parser.parse_args()
    baseline = before(args.before, args) if args.before else []
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
    plain_read, isolated_read, child_start = isolation_overhead(RunRoot(source), manifest)

    # Warm-up: two worker processes that imported the render code. Timed and shown (a first
    # run pays it, and benchmarks of earlier commits had no warm-up) but not the baseline.
    shutil.copytree(work / "source", work / "warm")
    with PeakTreeMemory() as memory:
        t = time.perf_counter()
        run_render(load_config((), [*common, "render.resources.render.concurrency=2"],
                               root=str(work / "warm")))
        cold = time.perf_counter() - t
    cold_row = ("Ray Data, 2 CPU workers, cold (workers start in the run)", cold,
                args.n * args.views / cold, memory.peak / 2**20)

    results = []
    # Plain loop: same assets (meshes are read from the source root), fresh output root.
    out = str(work / "plain")
    shutil.copytree(work / "source", work / "plain")
    config = load_config((), common, root=out)
    with PeakTreeMemory(children=False) as memory:  # the idle local Ray is not the loop's
        t = time.perf_counter()
        plain_loop(config, manifest)
        seconds = time.perf_counter() - t
    views = args.n * args.views
    results.append(("plain single-process loop", seconds, views / seconds, memory.peak / 2**20))
    for workers in (1, 2):
        out = str(work / f"ray{workers}")
        shutil.copytree(work / "source", out)
        config = load_config((), [*common, f"render.resources.render.concurrency={workers}"],
                             root=out)
        with PeakTreeMemory() as memory:
            t = time.perf_counter()
            report = run_render(config)
            seconds = time.perf_counter() - t
        assert report.ok == args.n, report
        rows = RunRoot(out).read_table(VIEWS.name, columns=["asset_id"]).num_rows
        assert rows == args.n * args.views and \
            RunRoot(out).read_table(POINTS.name, columns=["asset_id"]).num_rows == args.n
        results.append((f"Ray Data, {workers} CPU worker{'s' if workers > 1 else ''}", seconds,
                        views / seconds, memory.peak / 2**20))
    results.append(cold_row)
    shutil.rmtree(work, ignore_errors=True)

    base = results[0][1]
    lines = [SECTION, "",
             f"{args.n} procedural assets x {args.views} views at {args.size}x{args.size} px + "
             f"{args.points:,} surface points each, written as zstd Parquet shards "
             f"(2 assets per shard). Machine: {psutil.cpu_count()} CPU cores, "
             f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.machine()}; "
             f"measured {time.strftime('%Y-%m-%d')} by `python benchmarks/bench_render.py"
             + (f" --before {args.before}`" if args.before else "`")
             + f", all rows in one run. Local Ray start-up ({ray_start:.1f} s) is not "
             "included; the Ray rows except the last run on warm workers (the last row is the "
             "first render, which starts them, as the `before` rows did); peak memory is the "
             "resident set of the driver and all its child processes (Ray's raylet, object "
             "store and workers) for the Ray runs, and of the one process for the plain loop. "
             "Ray runs reuse one local Ray (`render.resources.render.concurrency` = 1 or 2 tasks "
             "at a time).", "",
             "| run | wall s | views/s | speed-up vs plain loop (this commit) | peak memory MiB |",
             "|---|---:|---:|---:|---:|"]
    for name, seconds, rate, peak in [*baseline, *results]:
        lines.append(f"| {name} | {seconds:.1f} | {rate:.1f} | {base / seconds:.2f}x | "
                     f"{peak:.0f} |")
    lines += ["",
              f"Reading untrusted mesh files in a warm child process (scan; render reads the "
              f"meshes partlift generated itself in-process): {isolated_read * 1e3:.2f} ms per "
              f"file vs {plain_read * 1e3:.2f} ms in-process on these {args.n} meshes (median of "
              f"3 passes: +{(isolated_read - plain_read) * 1e3:.2f} ms per file); the child "
              f"starts in {child_start:.2f} s, once per worker process, and again after a file "
              "crashes it.",
              "open3d casts rays with its own thread pool, so the plain loop already keeps both "
              "cores partly busy; on 2 cores the Ray gain is bounded by that. The Ray path's "
              "value is scaling out across nodes with resume and error isolation."]
    table = "\n".join(lines) + "\n"
    print(table)
    write_section(table, SECTION)


if __name__ == "__main__":
    main()
