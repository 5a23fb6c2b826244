"""`partlift status`: what a run root holds, whether it is whole, and what is left to do.

Per table: committed rows and shards (from the commit records: no shard is opened). Per stage
output: assets held, coverage of the manifest, assets missing, stale (made from a render that
changed since), duplicated, broken or uncommitted shard sets (named), the settings it was made
with, its last job, and its errors (current, or resolved because the asset succeeded later).
With `verify`, every committed shard is read and checked against its commit record; with
`repair` too, the shard sets that fail are removed so the next run of their stage redoes them.
A damaged file is named, never a traceback.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from operators.store.commits import OutputState, drop_shard_sets, read_output
from operators.store.integrity import SETTINGS_RECORD, root_format
from operators.store.readers import read_manifest
from operators.store.storage import FORMAT_VERSION, PARQUET_SUFFIX, RunRoot
from operators.store.tables import ASSETS_OUTPUT, ERRORS, STAGE_OUTPUTS, TABLES, StageOutput
from rayjobs.config import StatusJob
from rayjobs.errors import JobFailedError


@dataclass
class StageStatus:
    output: StageOutput
    state: OutputState | None
    problem: str = ""                       # why the state could not be read
    stale: set[str] = field(default_factory=set)
    settings: str = ""
    last_job: str = ""
    current_errors: list[dict[str, Any]] = field(default_factory=list)
    resolved_errors: int = 0


def table_counts(root: RunRoot, statuses: list[StageStatus]) -> dict[str, tuple[int, int]]:
    """table -> (committed shards, committed rows), from the commit records."""
    counts: dict[str, tuple[int, int]] = {}
    for status in statuses:
        for commit in (status.state.commits.values() if status.state is not None else ()):
            for table in commit.tables:
                shards, rows = counts.get(table, (0, 0))
                counts[table] = (shards + 1, rows + commit.rows.get(table, 0))
    return {name: counts[name] for name in TABLES if name in counts}


def _read_json(root: RunRoot, relpath: str) -> tuple[dict[str, Any] | None, str]:
    if not root.exists(relpath):
        return None, ""
    try:
        return root.read_json(relpath), ""
    except (OSError, ValueError) as err:
        return None, f"{relpath} cannot be read ({type(err).__name__})"


def _error_stage(stage: str) -> str:
    """The output an errors/ row belongs to (assets-make and assets-scan write the manifest)."""
    return "assets" if stage.startswith("assets") else stage


def stage_statuses(root: RunRoot) -> tuple[list[StageStatus], list[str]]:
    statuses, problems = [], []
    for output in STAGE_OUTPUTS.values():
        try:
            state = read_output(root, output)
        except OSError as err:
            statuses.append(StageStatus(output, None, f"cannot be read: {err}"))
            continue
        status = StageStatus(output, state)
        record, problem = _read_json(root, output.record)
        settings, settings_problem = _read_json(root, f"{output.record_dir}/{SETTINGS_RECORD}")
        problems += [p for p in (problem, settings_problem) if p]
        if record:
            counts = record.get("counts", {})
            status.last_job = (f"{record.get('stage')} {record.get('ended')}: ok "
                               f"{counts.get('ok')}, failed {counts.get('failed')} "
                               f"({record.get('job_id')})")
        if settings:
            status.settings = str(settings.get("hash", ""))
        statuses.append(status)
    by_stage = {s.output.stage: s for s in statuses}
    render = by_stage["render"].state
    if render is not None:
        current = {a: c.id for a, c in render.by_asset.items()}
        for status in statuses:
            if status.state is not None and status.output.upstream == "render":
                status.stale = {a for c in status.state.commits.values() for a in c.assets
                                if c.upstream.get(a) != current.get(a)}
    _attach_errors(root, by_stage, problems)
    return statuses, problems


def _attach_errors(root: RunRoot, by_stage: dict[str, StageStatus], problems: list[str]) -> None:
    """Sort each stage's errors/ rows into current ones and those resolved by a later success
    (the asset is held now; for the manifest, the file is in it)."""
    errors = []
    for shard in root.list_shards(ERRORS.name):
        try:
            errors += root.read_shard(ERRORS.name, shard, ["stage", "asset_id", "error_type",
                                                           "message", "time"]).to_pylist()
        except Exception:
            problems.append(f"{ERRORS.name}/{shard}{PARQUET_SUFFIX} cannot be read")
    manifest_keys: set[str] = set()
    if any(_error_stage(e["stage"]) == "assets" for e in errors):
        manifest_keys = {k for r in read_manifest(root, ["source_key", "uri"])
                         for k in (r["asset_id"], r["source_key"], r["uri"])}
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for error in sorted(errors, key=lambda e: e["time"]):
        latest[(_error_stage(error["stage"]), error["asset_id"])] = error
    for (stage, asset), error in latest.items():
        status = by_stage.get(stage)
        if status is None or status.state is None:
            continue
        held = manifest_keys if stage == "assets" else status.state.by_asset
        if asset in held:
            status.resolved_errors += 1
        else:
            status.current_errors.append(error)


def verify(root: RunRoot, statuses: list[StageStatus]) -> dict[tuple[StageOutput, str], str]:
    """Read every committed shard: each must parse and hold exactly its commit's assets and
    rows. Returns (output, shard) -> the problem, for the shard sets that fail."""
    failing: dict[tuple[StageOutput, str], str] = {}
    for status in statuses:
        if status.state is None:
            continue
        for shard, commit in sorted(status.state.commits.items()):
            for table in commit.tables:
                where = f"{table}/{shard}{PARQUET_SUFFIX}"
                try:
                    ids = root.read_shard(table, shard, verify=True)["asset_id"].to_pylist()
                except Exception as err:  # a damaged shard is named, not raised
                    failing[(status.output, shard)] = f"{where} cannot be read ({type(err).__name__})"
                    break
                expected_rows = commit.rows.get(table, len(ids))
                if set(ids) != set(commit.assets) or len(ids) != expected_rows:
                    failing[(status.output, shard)] = (
                        f"{where} holds {len(ids)} rows of {len(set(ids))} assets, its commit "
                        f"record {expected_rows} rows of {len(commit.assets)} assets")
                    break
    return failing


RUN_KINDS = ("train", "pretrain", "finetune", "affordanceclip", "sweep")
RUN_METRICS = {"train": "val_pck@10", "pretrain": "val_loss", "finetune": "val_aiou",
               "affordanceclip": "val_miou"}


def run_lines(root: RunRoot) -> list[str]:
    """One line per learning run and sweep under runs/ (status, steps or trials, best metric),
    from their run.json / sweep.json and best/meta.json only (no torch here)."""
    lines = []
    for kind in RUN_KINDS:
        if not root.exists(f"runs/{kind}"):
            continue
        for name in sorted(root.list_dirs(f"runs/{kind}")):
            folder = f"runs/{kind}/{name}"
            try:
                if kind == "sweep":
                    if not root.exists(f"{folder}/sweep.json"):
                        continue
                    record = root.read_json(f"{folder}/sweep.json")
                    best = record.get("best") or {}
                    metric = record.get("metric", "")
                    value = best.get(metric)
                    detail = (f"{record.get('trials', '?')} trials, best {metric} "
                              f"{value if not isinstance(value, float) else round(value, 4)} "
                              f"({best.get('trial', '-')})"
                              if record.get("status") == "finished" else
                              f"{record.get('job')} trials, {metric}")
                else:
                    if not root.exists(f"{folder}/run.json"):
                        continue
                    record = root.read_json(f"{folder}/run.json")
                    meta = (root.read_json(f"{folder}/best/meta.json")
                            if root.exists(f"{folder}/best/meta.json") else {})
                    metric = RUN_METRICS[kind]
                    detail = (f"best at step {meta.get('step')}: {metric} {meta[metric]:.4f}"
                              if metric in meta else "no validated checkpoint yet")
                lines.append(f"  {kind + '/' + name:<28} {record.get('status', '?'):<9} {detail}")
            except (OSError, ValueError, KeyError, TypeError) as err:
                lines.append(f"  {kind + '/' + name:<28} unreadable ({type(err).__name__})")
    return (["", "  runs (partlift train|pretrain|finetune|affordanceclip|sweep):"] + lines) \
        if lines else []


def print_status(config: StatusJob, check_all: bool = False, repair: bool = False) -> None:
    root = RunRoot(config.root, config.storage.options())
    root.check_reachable(create=False)  # a mistyped local root is an error, not "empty"
    version = root_format(root)
    print(f"run root {root.display()}" + (f" (format {version})" if version else ""))
    if version is None:
        print("  (empty: run `partlift assets make` or `partlift demo`)")
        return
    if version < FORMAT_VERSION:
        print(f"  written by an older partlift (format {version}): `partlift migrate --root "
              f"{root.display()}` upgrades it in place; every job refuses it until then")
        return
    statuses, problems = stage_statuses(root)
    print(f"  {'table':<16} {'rows':>9} {'shards':>7}   (committed)")
    for table, (shards, rows) in table_counts(root, statuses).items():
        print(f"  {table:<16} {rows:>9} {shards:>7}")
    manifest = len(statuses[0].state.by_asset) if statuses[0].state is not None else 0
    print(f"\n  {'stage':<7} {'assets':>6} {'of manifest':>11} {'missing':>7} {'stale':>5} "
          f"{'duplicated':>10} {'broken':>6} {'uncommitted':>11}  settings          last job")
    for status in statuses:
        state = status.state
        if state is None:
            print(f"  {status.output.stage:<7} {status.problem}")
            continue
        held = len(state.by_asset)
        if not held and not state.broken and not state.uncommitted:
            continue
        missing = "-" if status.output is ASSETS_OUTPUT else str(max(manifest - held, 0))
        stale = str(len(status.stale)) if status.output.upstream else "-"
        print(f"  {status.output.stage:<7} {held:>6} {f'{held}/{manifest}':>11} {missing:>7} "
              f"{stale:>5} {len(state.duplicates):>10} {len(state.broken):>6} "
              f"{len(state.uncommitted):>11}  {status.settings or '-':<16}  {status.last_job}")
        problems += [f"{status.output.record_dir}/_commits/{s}.json: {why}"
                     for s, why in state.broken.items()]
        problems += [f"{u}{PARQUET_SUFFIX}: no commit record (an interrupted run; the next "
                     f"`partlift {status.output.stage}` removes it)" for u in state.uncommitted]
        if state.duplicates:
            problems.append(f"{status.output.record_dir}/: {len(state.duplicates)} assets are "
                            "held by two shard sets (a root from before leases); readers use the "
                            "last one")
    for status in statuses:
        if status.current_errors or status.resolved_errors:
            kinds = Counter(e["error_type"] for e in status.current_errors)
            first = status.current_errors[0] if status.current_errors else None
            print(f"  errors of {status.output.stage}: {len(status.current_errors)} current"
                  + (f" ({', '.join(f'{k} {n}' for k, n in kinds.items())}; e.g. "
                     f"{first['asset_id']}: {str(first['message'])[:120]})" if first else "")
                  + f", {status.resolved_errors} resolved by a later success")
    failing = verify(root, statuses) if check_all or repair else {}
    if check_all or repair:
        print(f"  verify: read every committed shard: {len(failing)} shard sets fail")
        problems += [f"{output.record_dir}/_commits/{shard}.json: {why}"
                     for (output, shard), why in failing.items()]
    for line in run_lines(root):
        print(line)
    for problem in problems:
        print(f"  problem: {problem}")
    if repair and failing:
        for (output, shard), _ in failing.items():
            drop_shard_sets(root, output, [shard])
        print(f"  repair: removed the {len(failing)} shard sets that fail; the next run of "
              f"{', '.join(sorted({o.stage for o, _ in failing}))} redoes their assets")
    elif check_all and problems:
        raise JobFailedError(
            f"status --verify: {len(problems)} problems in {root.display()} (listed above). "
            "Broken or uncommitted shard sets are redone by their stage's next run; shard sets "
            "that only --verify finds are removed by `partlift status --repair`, then redone")
