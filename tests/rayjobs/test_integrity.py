"""A run root means one thing (issue 8): each numbered failure of the issue, reproduced on a
real local Ray and shown fixed. One small root (3 assets, rendered, labelled, lifted) is built
once and copied for each test."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pandas as pd
import pytest

from operators.store.commits import read_output
from operators.store.integrity import RootFormatError, SettingsMismatchError
from operators.store.lease import LeaseHeldError, acquire
from operators.store.readers import read_manifest
from operators.store.storage import RunRoot, make_table, rows_to_columns
from operators.store.tables import RENDER_OUTPUT
from rayjobs.assets_job import run_assets_make
from rayjobs.config import StatusJob
from rayjobs.errors import JobFailedError
from rayjobs.label_job import run_label
from rayjobs.lift_job import run_lift
from rayjobs.migrate import migrate
from rayjobs.render_job import run_render
from rayjobs.status import print_status
from tests.rayjobs.test_jobs import small_config

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]
BASE = ["render.views=3", "render.resources.render.batch_size=1", "label.trials=1",
        "lift.n_points=64"]


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_session) -> Path:
    root = tmp_path_factory.mktemp("integrity") / "base"
    run_assets_make(small_config(str(root), "assets.n=3", *BASE))
    run_render(small_config(str(root), *BASE))
    run_label(small_config(str(root), *BASE))
    run_lift(small_config(str(root), *BASE))
    return root


@pytest.fixture
def root(built: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(built, copy)
    return copy


def config(root: Path, *extra: str):
    return small_config(str(root), *BASE, *extra)


def rows(root: Path, table: str) -> int:
    data = RunRoot(str(root)).read_table(table, columns=["asset_id"])
    return 0 if data is None else data.num_rows


def status_text(root: Path, capsys, verify: bool = False) -> str:
    capsys.readouterr()
    print_status(StatusJob(root=str(root)), check_all=verify)
    return capsys.readouterr().out


def test_1_changed_settings_are_refused_before_any_work(root: Path) -> None:
    run_assets_make(config(root, "assets.n=5"))  # two more assets arrive
    with pytest.raises(SettingsMismatchError, match=r"render\.views: 3 in the root, 5 now") as info:
        run_render(config(root, "render.views=5"))
    assert "--overwrite" in str(info.value) and rows(root, "views") == 9  # nothing written
    with pytest.raises(SettingsMismatchError, match=r"label\.trials: 1 in the root, 2 now"):
        run_label(config(root, "label.trials=2"))
    with pytest.raises(SettingsMismatchError, match=r"lift\.backbone\.name: 'dinov2-random-tiny'"):
        run_lift(config(root, "lift.backbone=dinov3-random-tiny"))
    with pytest.raises(SettingsMismatchError, match=r"lift\.n_points: 64 in the root, 32 now"):
        run_lift(config(root, "lift.n_points=32"))
    assert run_render(config(root)).ok == 2  # the same settings resume
    views = pd.read_parquet(root / "views")  # one shape per column: pandas reads the table
    assert len(views) == 15 and {len(r) for r in views["rgb"]} == {24 * 32 * 3}


def test_2_redoing_a_stage_makes_what_was_made_from_it_stale(root: Path) -> None:
    redo = run_render(config(root, "render.views=4", "job.overwrite=true"))
    assert redo.ok == 3
    assert any(n.startswith("labels/ holds 3 assets made from the render output") for n in redo.notes)
    assert any(n.startswith("features/ holds 3 assets") for n in redo.notes)
    label = run_label(config(root))
    assert (label.ok, label.skipped_done) == (3, 0)  # not "nothing to do"
    assert "3 assets of labels/ are redone: 3 were re-rendered (or their render is gone) since" \
        in label.notes
    masks = RunRoot(str(root)).read_table("labels/masks", columns=["asset_id", "view_id"])
    prompts = rows(root, "labels/points")
    assert masks.num_rows == prompts * 4 and set(masks["view_id"].to_pylist()) == {0, 1, 2, 3}
    assert run_lift(config(root)).ok == 3
    assert run_label(config(root)).skipped_done == 3  # and now they are current


def test_3_lost_or_damaged_shards_are_named_and_redone(root: Path, capsys) -> None:
    shards = sorted((root / "views").glob("part-*.parquet"))
    assert len(shards) == 3  # one asset per shard
    shards[0].unlink()                                      # lost
    shards[1].write_bytes(shards[2].read_bytes())           # overwritten with another's bytes
    (root / "points" / shards[2].name).write_bytes(b"PAR1")  # truncated
    (root / "labels" / "_job.json").write_text("{not json")
    text = status_text(root, capsys)  # never a traceback: every damaged file is named
    assert f"views/{shards[0].name} is missing" in text
    assert f"views/{shards[1].name} has" in text and "truncated or replaced" in text
    assert f"points/{shards[2].name} has 4 bytes" in text and "labels/_job.json cannot be read" in text
    report = run_render(config(root))
    assert (report.ok, report.skipped_done) == (3, 0)
    assert sum("its assets are redone" in n for n in report.notes) == 3
    assert rows(root, "views") == 9 and rows(root, "points") == 3
    label = run_label(config(root))
    assert label.ok == 3 and rows(root, "labels/points") == label.units["part labels (all runs)"]
    assert "0 shard sets fail" in status_text(root, capsys, verify=True)
    # damage that keeps the size: only reading finds it; --repair removes the set to redo it
    shard = sorted((root / "views").glob("part-*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    shard.write_bytes(bytes(data))
    assert run_render(config(root)).skipped_done == 3  # the listing cannot tell
    with pytest.raises(JobFailedError, match="status --repair"):
        status_text(root, capsys, verify=True)
    print_status(StatusJob(root=str(root)), repair=True)
    assert "removed the 1 shard sets that fail" in capsys.readouterr().out
    assert run_render(config(root)).ok == 1


def test_4_two_writers_on_one_stage_and_root(root: Path) -> None:
    run_assets_make(config(root, "assets.n=6"))
    results: dict[str, object] = {}

    def render(name: str) -> None:
        try:
            results[name] = run_render(config(root))
        except LeaseHeldError as err:
            results[name] = err

    threads = [threading.Thread(target=render, args=(n,)) for n in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    refused = [r for r in results.values() if isinstance(r, LeaseHeldError)]
    assert len(refused) == 1 and "is being written by run 'render-" in str(refused[0])
    assert rows(root, "views") == 18 and rows(root, "points") == 6  # every view once
    acquire(RunRoot(str(root)), "render", "my-run").release()  # free again afterwards


def test_5_a_moved_root_stays_valid(root: Path, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere"
    root.rename(moved)
    assert run_render(config(moved)).skipped_done == 3
    redo = run_render(config(moved, "job.overwrite=true"))  # reads the meshes inside the root
    assert redo.ok == 3 and redo.failed == 0


def test_6_unrendered_assets_and_resolved_errors_are_shown(root: Path, capsys) -> None:
    run_assets_make(config(root, "assets.n=5"))
    label = run_label(config(root))
    assert (label.counts.input, label.skipped_done, label.counts.waiting, label.ok) == (5, 3, 2, 0)
    assert any("2 assets of the manifest have no renders yet" in n for n in label.notes)
    rendered = read_output(RunRoot(str(root)), RENDER_OUTPUT).by_asset
    row = next(r for r in read_manifest(RunRoot(str(root))) if r["asset_id"] not in rendered)
    missing, mesh = row["asset_id"], root / row["uri"]
    saved = mesh.read_bytes()
    mesh.unlink()
    run_render(config(root, "job.max_error_fraction=1"))
    assert f"errors of render: 1 current (FileNotFoundError 1; e.g. {missing}" in status_text(root, capsys)
    mesh.write_bytes(saved)
    run_render(config(root))
    assert "errors of render: 0 current, 1 resolved by a later success" in status_text(root, capsys)


def test_7_an_older_format_is_refused_and_migrated(root: Path) -> None:
    base = RunRoot(str(root))
    # what format 1 looked like: no marker, commits or settings records, absolute mesh paths,
    # the old config keys in the job records
    (root / "_partlift.json").unlink()
    for stage_dir in ("assets", "views", "labels", "features"):
        shutil.rmtree(root / stage_dir / "_commits")
        (root / stage_dir / "_settings.json").unlink()
    manifest = base.read_table("assets").to_pylist()
    for shard in (root / "assets").glob("part-*.parquet"):
        shard.unlink()
    absolute = [{**r, "uri": str(root / r["uri"])} for r in manifest]
    base.write_shard("assets", "part-old", make_table(rows_to_columns(absolute)))
    for record, section in (("views", {"render": {"views": 3, "width": 32, "height": 24,
                                                  "n_points": 300, "resources": {"batch_size": 1}}}),
                            ("labels", {"label": {"backend": "oracle", "trials": 1,
                                                  "oracle_jitter": 0.1, "model_path": None,
                                                  "grounding": {"num_cpus": 1.0}}})):
        job = json.loads((root / record / "_job.json").read_text())
        (root / record / "_job.json").write_text(json.dumps({**job, "config": section}))
    with pytest.raises(RootFormatError, match=r"format 1.*partlift migrate --root"):
        run_render(config(root))
    shutil.rmtree(root / "features")  # its record keeps the new shape; redone after migrating
    notes = migrate(StatusJob(root=str(root)))
    assert notes[-1].endswith("is now format 2") and "views/, points/: 3 assets committed" in notes
    assert all(not r["uri"].startswith("/") for r in base.read_table("assets").to_pylist())
    assert run_render(config(root)).skipped_done == 3
    assert run_label(config(root)).skipped_done == 3
