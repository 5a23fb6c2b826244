"""The cluster manifests (cluster/) and .rayignore, checked without a cluster: Ray's own
validation of the launcher config, the shape KubeRay needs, the pins they share with the project,
and that every `partlift` command cluster/README.md shows exists with the options it uses.
No Ray is started; the whole module takes about a second."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import click
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
SECRET = "partlift-s3"
# Credentials every Ray container must get from the Secret; AWS_ENDPOINT_URL may be absent.
REQUIRED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
OPTIONAL_ENV = ("AWS_ENDPOINT_URL",)
GPU = "nvidia.com/gpu"
# Commands being written elsewhere: checked when the CLI has them, skipped until then.
EXPECTED_LATER = {"submit"}


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def lock_pin(name: str) -> str:
    """The version requirements.lock pins for a package."""
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line.lower().startswith(f"{name.lower()}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"requirements.lock pins no {name}")


def makefile_torch_spec() -> str:
    match = re.search(r"^TORCH_SPEC \?= (\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert match, "the Makefile sets no TORCH_SPEC default"
    return match.group(1)


# ----------------------------------------------------------------------------- AWS launcher


@pytest.fixture(scope="module")
def aws() -> dict:
    return load(CLUSTER / "aws.yaml")


def test_aws_config_passes_ray_validation(aws: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config
    validate_config(copy.deepcopy(aws))  # the file as written
    # ... and as `ray up` sees it: merged with the AWS defaults (offline), then validated.
    validate_config(prepare_config(copy.deepcopy(aws)))


def test_aws_head_runs_no_work_and_a_gpu_type_exists(aws: dict) -> None:
    types = aws["available_node_types"]
    head = aws["head_node_type"]
    assert types[head]["resources"] == {"CPU": 0}, "the head must offer no CPU (no tasks there)"
    workers = {name: t for name, t in types.items() if name != head}
    gpu = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    cpu = {name: t for name, t in workers.items() if not t["resources"].get("GPU")}
    assert gpu and cpu, "a CPU worker type and a GPU worker type"
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= aws["max_workers"], name
    for name, t in gpu.items():
        assert t["docker"]["worker_image"].endswith("-gpu"), f"{name} needs Ray's GPU image"


def test_aws_images_and_setup_match_the_project_pins(aws: dict) -> None:
    ray = lock_pin("ray")
    images = [aws["docker"]["head_image"], aws["docker"]["worker_image"]] + [
        t["docker"]["worker_image"] for t in aws["available_node_types"].values() if "docker" in t]
    for image in images:
        assert image.startswith(f"rayproject/ray:{ray}-"), (image, ray)
    setup = aws["setup_commands"]
    torch = [i for i, cmd in enumerate(setup) if f"pip install {makefile_torch_spec()}" in cmd]
    lock = [i for i, cmd in enumerate(setup)
            if re.search(r"pip install -c (~/partlift/)?requirements\.lock -e ", cmd)]
    assert torch and lock and torch[0] < lock[0], "torch first, then the pinned set"
    assert "[sweep,tracking]" in setup[lock[0]]
    assert any("--autoscaling-config=~/ray_bootstrap_config.yaml" in cmd and "--head" in cmd
               for cmd in aws["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP" in cmd for cmd in aws["worker_start_ray_commands"])


def test_aws_syncs_the_checkout_without_venv_data_or_git(aws: dict) -> None:
    # `ray up` runs from the repository root, so "." is the project; rsync leaves out what git
    # ignores (rsync_filter) and .git itself.
    assert aws["file_mounts"] == {"~/partlift": "."}
    assert ".gitignore" in aws["rsync_filter"]
    assert "**/.git" in aws["rsync_exclude"]
    ignored = (REPO / ".gitignore").read_text().split()
    assert ".venv/" in ignored and "partlift-data/" in ignored


# ----------------------------------------------------------------------------- KubeRay


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d]


@pytest.fixture(scope="module")
def raycluster() -> dict:
    (doc,) = documents("raycluster.yaml")
    return doc


@pytest.fixture(scope="module")
def rayjob() -> dict:
    (doc,) = documents("rayjob.yaml")
    return doc


def cluster_specs(raycluster: dict, rayjob: dict) -> Iterator[tuple[str, dict]]:
    yield "RayCluster", raycluster["spec"]
    yield "RayJob.rayClusterSpec", rayjob["spec"]["rayClusterSpec"]


def test_kinds_and_api_version(raycluster: dict, rayjob: dict) -> None:
    assert (raycluster["apiVersion"], raycluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")


def test_names_are_valid_for_kuberay(raycluster: dict, rayjob: dict) -> None:
    # KubeRay refuses names that are not DNS-1035 labels, longer than 53 characters (RayCluster)
    # or 47 (RayJob: its clusters get a 6-character suffix).
    dns1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
    for doc, limit in [(raycluster, 53), (rayjob, 47)]:
        name = doc["metadata"]["name"]
        assert dns1035.fullmatch(name) and len(name) <= limit, name


def test_cluster_shape(raycluster: dict, rayjob: dict) -> None:
    ray = lock_pin("ray")
    for where, spec in cluster_specs(raycluster, rayjob):
        assert spec["rayVersion"] == ray, where
        assert spec["enableInTreeAutoscaling"] is True, where
        head = spec["headGroupSpec"]["rayStartParams"]
        assert head["num-cpus"] == "0", f"{where}: the head must offer no CPU"
        assert head["dashboard-host"] == "0.0.0.0", where
        groups = spec["workerGroupSpecs"]
        for group in [spec["headGroupSpec"], *groups]:  # KubeRay's map[string]string
            assert all(isinstance(v, str) for v in group["rayStartParams"].values()), where
        for group in groups:
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where
        gpu = [g for g in groups if any(GPU in c["resources"].get("limits", {})
                                        for c in g["template"]["spec"]["containers"])]
        assert gpu and len(gpu) < len(groups), f"{where}: a GPU group and a CPU group"
        for group in gpu:
            for c in group["template"]["spec"]["containers"]:
                assert c["resources"]["requests"][GPU] == c["resources"]["limits"][GPU] == 1
            assert any(t["key"] == GPU and t["effect"] == "NoSchedule"
                       for t in group["template"]["spec"].get("tolerations", [])), where


def test_every_ray_container_gets_the_storage_secret(raycluster: dict, rayjob: dict) -> None:
    seen = 0
    for where, spec in cluster_specs(raycluster, rayjob):
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            for c in group["template"]["spec"]["containers"]:
                env = {e["name"]: e for e in c.get("env", [])}
                for name in REQUIRED_ENV + OPTIONAL_ENV:
                    assert name in env, f"{where}/{c['name']}: no {name}"
                    ref = env[name]["valueFrom"]["secretKeyRef"]
                    assert (ref["name"], ref["key"]) == (SECRET, name), (where, ref)
                    assert ref.get("optional", False) is (name in OPTIONAL_ENV), (where, ref)
                seen += 1
    assert seen == 6  # head, CPU and GPU group, in both files


def test_secret_example_holds_every_key(raycluster: dict, rayjob: dict) -> None:
    (secret,) = documents("secret-example.yaml")
    assert (secret["kind"], secret["metadata"]["name"]) == ("Secret", SECRET)
    assert set(REQUIRED_ENV) <= set(secret["stringData"])


def test_rayjob_retries_on_new_clusters_and_resumes(rayjob: dict) -> None:
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1
    assert spec["submissionMode"] == "K8sJobMode"
    entry = spec["entrypoint"]
    assert entry.startswith("partlift ")
    args = shlex.split(entry)
    # Each retry runs on a new cluster: the state must be on object storage, under a stable name.
    assert args[args.index("--root") + 1].startswith("s3://")
    assert args[args.index("--name") + 1]
    check_command_line(args[1:], where="rayjob.yaml entrypoint")


# ----------------------------------------------------------------------------- image, .rayignore


def test_dockerfile_installs_the_pinned_set() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^ARG BASE_IMAGE=rayproject/ray:{re.escape(lock_pin('ray'))}-py311$",
                     text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert re.search(rf"^ARG TORCH_SPEC={re.escape(makefile_torch_spec())}$", text, re.M)
    runs = [m.group(0) for m in re.finditer(r"^RUN (?:.*\\\n)*.*", text, re.M)]
    torch = [i for i, r in enumerate(runs) if '"$TORCH_SPEC"' in r]
    lock = [i for i, r in enumerate(runs) if re.search(r"pip install .*-c requirements\.lock ", r)]
    assert torch and lock and torch[0] < lock[0], "torch first, then the pinned set"
    assert not re.search(r"pip install[^\n]* -e ", text), "the image installs non-editable"
    assert "sweep,tracking" in text
    # Every package pyproject.toml installs is copied in (read without tomllib: Python 3.10).
    find = re.search(r"^\[tool\.setuptools\.packages\.find\]\ninclude = \[(.*?)\]",
                     (REPO / "pyproject.toml").read_text(), re.M | re.S)
    assert find, "pyproject.toml: no [tool.setuptools.packages.find] include list"
    packages = re.findall(r'"(\w+)\*?"', find.group(1))
    assert packages
    for package in packages:
        assert re.search(rf"^COPY .*\b{package} \./{package}$", text, re.M), package


def test_rayignore_prunes_venv_git_and_data() -> None:
    # Ray's own matcher for the file; the directories themselves must match, so that Ray does
    # not walk into them (a `dir/` pattern matches only what is below it).
    from ray._private.runtime_env.packaging import _get_ignore_file
    ignored = _get_ignore_file(REPO, ".rayignore")
    assert ignored is not None
    for path in [".venv", ".git", "partlift-data", "rayjobs/__pycache__", "partlift.egg-info"]:
        assert ignored(REPO / path), path
    for path in ["pyproject.toml", "requirements.lock", "rayjobs/cli.py", "configs/demo.yaml",
                 "operators/data/taxonomy.yaml", "cluster/aws.yaml"]:
        assert not ignored(REPO / path), path


# ----------------------------------------------------------------------------- README commands


@pytest.fixture(scope="module")
def cli() -> click.Group:
    from rayjobs.cli import main
    return main


def _options(command: click.Command) -> set[str]:
    return {o for p in command.params for o in [*p.opts, *p.secondary_opts]} | {"-h", "--help"}


def check_command_line(args: list[str], where: str, main: click.Group | None = None) -> None:
    """`args` after `partlift`: the (sub)command exists and takes every --option used; after
    `submit ... --` the wrapped command is checked the same way."""
    if main is None:
        from rayjobs.cli import main
    args = [a for a in args if not a.startswith("--debug")]
    command: click.Command = main
    while isinstance(command, click.Group):
        assert args, f"{where}: no command"
        name, args = args[0], args[1:]
        if name not in command.commands and command is main and name in EXPECTED_LATER:
            wrapped = args[args.index("--") + 1:] if "--" in args else []
            if wrapped and not wrapped[0].startswith("<"):
                check_command_line(wrapped, where, main)
            return
        assert name in command.commands, f"{where}: no command {name!r}"
        command = command.commands[name]
    rest: list[str] = []
    if "--" in args:
        args, rest = args[:args.index("--")], args[args.index("--") + 1:]
    for arg in args:
        if arg.startswith("--"):
            assert arg.split("=", 1)[0] in _options(command), f"{where}: {arg} ({command.name})"
    if rest and not rest[0].startswith("<"):  # `<...>`: a placeholder in a usage line
        check_command_line(rest, where, main)


def readme_command_lines() -> list[str]:
    text = (CLUSTER / "README.md").read_text()
    lines = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M):
        for line in block.splitlines():
            line = line.strip().rstrip("\\").strip()
            line = re.sub(r"^(?:[A-Z_]+=\S*\s+)+", "", line)  # env assignments in front
            if line.startswith("partlift "):
                lines.append(line)
    return lines


def test_readme_partlift_commands_exist(cli: click.Group) -> None:
    lines = readme_command_lines()
    used = set()
    for line in lines:
        args = shlex.split(line, comments=True)
        check_command_line(args[1:], f"cluster/README.md: {line}", cli)
        used.add(args[1])
    assert len(lines) >= 8 and {"submit", "status"} <= used, lines


def test_command_check_catches_mistakes(cli: click.Group) -> None:
    # The checker itself: an unknown command, group member or option fails.
    for bad in ["rendr --root /r", "assets mk --root /r", "render --wokers 2",
                "submit --address http://h:8265 -- trian --root s3://b/r"]:
        with pytest.raises(AssertionError):
            check_command_line(shlex.split(bad), bad, cli)
    check_command_line(shlex.split("assets make --n 2 --root /r"), "ok", cli)
    # Before `submit` exists in the CLI, the README's submit lines still check the command
    # they wrap.
    without = click.Group("partlift", commands={k: v for k, v in cli.commands.items()
                                                if k not in EXPECTED_LATER})
    for line in readme_command_lines():
        check_command_line(shlex.split(line, comments=True)[1:], line, without)
    with pytest.raises(AssertionError):
        check_command_line(shlex.split("submit --address http://h:8265 -- trian"), "bad", without)
