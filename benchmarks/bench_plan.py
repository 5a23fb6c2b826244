"""Resume planning at scale: how long a stage takes to find what is left to do in a run root of
100,000 assets whose renders are in 50,000 shard sets, locally and on a real S3-compatible HTTP
server (moto's, on this machine), from the commit records one by one vs from their index.

The root is synthetic where only the layout matters: a manifest of scanned-mesh rows, and per
shard set two tiny shard files and a real commit record (planning lists the shards and reads the
records; it opens no shard). Writes the table to benchmarks/RESULTS.md.

    python benchmarks/bench_plan.py [--assets 100000] [--per-shard 2] [--s3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from operators.store.commits import (ShardCommit, commit_path, compact, read_output,
                                     settings_hash, write_shard_set)
from operators.store.readers import read_manifest
from operators.store.storage import RunRoot, StorageOptions, make_table, shard_name
from operators.store.tables import ASSETS_OUTPUT, POINTS, RENDER_OUTPUT, VIEWS
from results import write_section

SECTION = "## Resume planning at scale"
PLAN_FIELDS = ("category", "part_names", "face_part", "uri", "up_axis", "source")


def build(root: RunRoot, n_assets: int, per_shard: int, threads: int) -> None:
    ids = [f"asset{i:07d}" for i in range(n_assets)]
    for start in range(0, n_assets, 1000):  # the manifest, 1,000 rows a shard as `assets scan`
        chunk = ids[start:start + 1000]
        write_shard_set(root, ASSETS_OUTPUT, shard_name(chunk), {"assets": make_table({
            "asset_id": chunk, "uri": [f"s3://meshes/{a}.glb" for a in chunk],
            "category": ["mug"] * len(chunk), "part_names": [[] for _ in chunk],
            "face_part": [[] for _ in chunk], "up_axis": ["y"] * len(chunk),
            "source": ["scan"] * len(chunk)})}, job_id="bench", fingerprint="f", assets=chunk)
    fingerprint = settings_hash({"render.views": 19})
    blob = b"PAR1-placeholder"

    def shard_set(start: int) -> None:
        assets = ids[start:start + per_shard]
        shard = shard_name(assets)
        for table in (VIEWS.name, POINTS.name):
            root.write_bytes(f"{table}/{shard}.parquet", blob)
        commit = ShardCommit("render", shard, "render-bench-000000", fingerprint, tuple(assets),
                             {VIEWS.name: len(blob), POINTS.name: len(blob)})
        root.write_json(commit_path(RENDER_OUTPUT, shard), commit.to_json())

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(shard_set, range(0, n_assets, per_shard)))


def plan_seconds(root: RunRoot) -> tuple[float, int, int]:
    """What `partlift render` does before any work: the manifest and the render output's state,
    then the assets left. Returns (seconds, assets done, records read one by one)."""
    started = time.perf_counter()
    manifest = read_manifest(root, PLAN_FIELDS)
    state = read_output(root, RENDER_OUTPUT)
    todo = [r for r in manifest if r["asset_id"] not in state.by_asset]
    seconds = time.perf_counter() - started
    assert not todo and len(state.by_asset) == len(manifest), (len(todo), len(manifest))
    return seconds, len(state.by_asset), state.loose


def measure(label: str, root: RunRoot, built: float, args: argparse.Namespace) -> tuple:
    """Plan from the records one by one, compact them, plan from the index."""
    loose, done, read = plan_seconds(root)
    t = time.perf_counter()
    compact(root, RENDER_OUTPUT)
    compacting = time.perf_counter() - t
    indexed, _, left = plan_seconds(root)
    return (label, done, done // args.per_shard, built, loose, read, indexed, left, compacting)


def serve_populated(source: Path, port: int) -> None:
    """Subprocess: a moto S3 server whose bucket `plan` holds the files of the local root
    `source` under `run/`, put into its backend directly (building 150,000 objects through
    HTTP takes this in-memory Python server most of an hour; the planning is what is timed)."""
    import logging

    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    backend = s3_backends["123456789012"]["global"]
    backend.create_bucket("plan", "us-east-1")
    for path in source.rglob("*"):
        if path.is_file():
            backend.put_object("plan", f"run/{path.relative_to(source).as_posix()}",
                               path.read_bytes())
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    print("ready", flush=True)
    while True:
        time.sleep(3600)


def moto_root(source: Path) -> tuple[subprocess.Popen, RunRoot]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(source), "--port",
                               str(port)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "AWS_ACCESS_KEY_ID": "k",
                                   "AWS_SECRET_ACCESS_KEY": "s"})
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    return server, RunRoot("s3://plan/run", StorageOptions(
        endpoint_url=f"http://127.0.0.1:{port}", access_key_id="k", secret_access_key="s"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=int, default=100_000)
    parser.add_argument("--per-shard", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16, help="writers building the root")
    parser.add_argument("--s3", action="store_true", help="also on a local moto S3 server")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # serve_populated
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_populated(args.serve, args.port)
        return
    work = Path(tempfile.mkdtemp(prefix="partlift-plan-"))
    t = time.perf_counter()
    build(RunRoot(str(work / "run")), args.assets, args.per_shard, args.threads)
    built = time.perf_counter() - t
    if args.s3:  # the same root, before its index exists, for the S3 server
        shutil.copytree(work / "run", work / "s3")
    rows = [measure("local directory", RunRoot(str(work / "run")), built, args)]
    if args.s3:
        server, root = moto_root(work / "s3")
        try:
            rows.append(measure("S3 (moto server over HTTP, 127.0.0.1)", root, built, args))
        finally:
            server.kill()
    shutil.rmtree(work, ignore_errors=True)
    lines = [SECTION, "",
             f"Assets whose renders are in shard sets of {args.per_shard}: the time a stage takes "
             "to plan a resume (read the manifest and the render output's state, diff them) "
             "before any work. Machine: "
             f"{psutil.cpu_count()} CPU cores, {platform.machine()}; measured "
             f"{time.strftime('%Y-%m-%d')} by `python benchmarks/bench_plan.py"
             + (" --s3`" if args.s3 else "`") + ". The root is built locally and handed to "
             "the S3 server as it is (build s is the local build); moto is an in-memory Python "
             "server, far slower per request than S3 itself, so its row shows what the number "
             "of requests costs, not S3's latency. Planning lists the shards (sizes) and reads "
             "the commit records, no shard: one GET per record, or the index a job writes when "
             "it ends (one object for the many, records newer than it read one by one).", "",
             "| run root | assets | shard sets | build s | plan s, records one by one | records "
             "read | plan s, from the index | records read | compacting s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, done, sets, built, loose, read, indexed, left, compacting in rows:
        lines.append(f"| {label} | {done:,} | {sets:,} | {built:.0f} | {loose:.1f} | {read:,} | "
                     f"{indexed:.1f} | {left:,} | {compacting:.1f} |")
    lines += ["", "From the index, planning still lists the render tables and the records "
              "(3 x 50,000 objects: 150 LIST pages of 1,000), which is most of the S3 row's time "
              "on moto; those listings' sizes are what catch a missing or truncated shard. One by "
              "one, each record costs a HEAD and a GET through pyarrow."]
    table = "\n".join(lines) + "\n"
    print(table)
    write_section(table, SECTION)


if __name__ == "__main__":
    main()
