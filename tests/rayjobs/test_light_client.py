"""The client path (`partlift --help`, `status`, config validation, the Python API's configs)
runs where open3d, torch and transformers cannot be imported: a laptop that only submits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BLOCK = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("open3d", "torch", "transformers", "ray"):
            raise ImportError(f"heavy import on the client path: {name}")
sys.meta_path.insert(0, Block())
"""


def run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True,
                          timeout=120)


def test_cli_help_status_and_config_errors_without_heavy_modules(tmp_path: Path) -> None:
    cli = ("from rayjobs.cli import main\nimport sys\nsys.argv = ['partlift', *{args!r}]\n"
           "main()\n")
    help_text = run_blocked(cli.format(args=["--help"]))
    assert help_text.returncode == 0, help_text.stderr
    assert "render" in help_text.stdout and "status" in help_text.stdout
    for command in (["render", "--help"], ["label", "--help"], ["lift", "--help"]):
        assert run_blocked(cli.format(args=command)).returncode == 0
    status = run_blocked(cli.format(args=["status", "--root", str(tmp_path)]))
    assert status.returncode == 0 and "empty" in status.stdout, status.stderr
    typo = run_blocked(cli.format(args=["render", "--root", str(tmp_path), "--set",
                                        "render.vews=3"]))
    assert typo.returncode == 2 and "unknown config key 'render.vews'" in typo.stderr
    renamed = run_blocked(cli.format(args=["label", "--root", str(tmp_path), "--set",
                                           "label.model_path=/m"]))
    assert renamed.returncode == 2 and "use 'label.backend.model_path'" in renamed.stderr


def test_python_api_configs_without_heavy_modules() -> None:
    done = run_blocked(
        "from rayjobs.api import LiftJob, LabelJob, load_config\n"
        "job = LiftJob(root='/tmp/x', lift={'backbone': 'dinov2-small', 'n_points': 64})\n"
        "assert job.lift.backbone.name == 'dinov2-small' and job.lift.backbone.spec.patch_size == 14\n"
        "label = load_config((), ['label.backend=openai', 'label.backend.base_url=http://h/v1',"
        " 'label.backend.model=m'], model=LabelJob)\n"
        "assert label.label.backend.name == 'openai'\n"
        "print('light')\n")
    assert done.returncode == 0 and done.stdout.strip() == "light", done.stderr
