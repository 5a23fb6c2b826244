"""Configuration: YAML + --set overrides, unknown keys, secrets never written."""

from __future__ import annotations

import pytest

from rayjobs.config import ConfigError, load_config


def test_defaults_match_the_papers() -> None:
    config = load_config()
    assert config.render.views == 19 and config.render.n_points == 100_000  # DFC A.4
    assert config.render.width == config.render.height == 224
    assert config.root == "./partlift-data"


def test_yaml_then_set_overrides_then_explicit_values(tmp_path) -> None:
    file = tmp_path / "render.yaml"
    file.write_text("render:\n  views: 8\n  width: 64\nroot: /tmp/a\n")
    config = load_config([file], ["render.views=12", "render.background=[0, 0, 0]"], root="/tmp/b")
    assert config.render.views == 12 and config.render.width == 64
    assert config.render.background == (0, 0, 0) and config.root == "/tmp/b"
    assert config.render.settings().views == 12


def test_unknown_key_names_the_key_and_lists_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["render.vews=3"])
    message = str(info.value)
    assert "unknown config key 'render.vews'" in message and "views" in message
    assert "--set render.vews=***" in message  # an unknown key's value is never echoed


def test_unknown_top_level_key_in_yaml_is_an_error(tmp_path) -> None:
    file = tmp_path / "bad.yaml"
    file.write_text("rendr:\n  views: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'rendr'"):
        load_config([file])


@pytest.mark.parametrize("override, field", [("render.views=0", "render.views"),
                                             ("render.background=[300,0,0]", "render.background"),
                                             ("render.distribution=spiral", "render.distribution"),
                                             ("job.max_error_fraction=2", "job.max_error_fraction")])
def test_invalid_values_name_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(overrides=[override])


def test_malformed_override_and_missing_file_are_clear(tmp_path) -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(overrides=["render.views"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([tmp_path / "nope.yaml"])


def test_secrets_are_redacted_and_reach_storage_options() -> None:
    config = load_config(overrides=["storage.secret_access_key=hunter2",
                                    "storage.access_key_id=AKID123"])
    assert config.storage.options().secret_access_key == "hunter2"
    dumped = str(config.redacted())
    assert "hunter2" not in dumped and "AKID123" not in dumped and "***" in dumped
    assert "hunter2" not in repr(config)


@pytest.mark.parametrize("key", ["render.seed", "assets.seed", "label.seed"])
def test_negative_seeds_are_rejected_up_front(key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[f"{key}=-1"])


def test_secrets_are_redacted_in_config_error_messages() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["storage.secret_access_key=SuperSecret1", "render.views=0"])
    assert "SuperSecret1" not in str(info.value) and "secret_access_key=***" in str(info.value)


def test_numeric_strings_from_set_stay_strings() -> None:
    config = load_config(overrides=["storage.secret_access_key=12345678", "job.name=2024",
                                    "storage.access_key_id=1234"])
    assert config.storage.options().secret_access_key == "12345678" and config.job.name == "2024"


def test_malformed_yaml_and_cross_field_errors_are_config_errors(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("render: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([bad])
    with pytest.raises(ConfigError, match="elevation_min_deg .* must not exceed"):
        load_config(overrides=["render.elevation_min_deg=80", "render.elevation_max_deg=-60"])
    with pytest.raises(ConfigError, match=r"unknown functions \['fly'\]; known: .*pour-with"):
        load_config(overrides=["label.functions=[fly]"])


def test_explicit_cli_values_are_named_in_errors() -> None:
    with pytest.raises(ConfigError, match="command-line option for assets.seed=-1"):
        load_config(assets__seed=-1)


# --- one model per job, composed from sections -------------------------------------------------


def test_each_command_has_its_own_sections() -> None:
    from rayjobs.config import JOB_MODELS
    shared = {"root", "storage", "ray", "job"}
    assert set(JOB_MODELS["render"].model_fields) == shared | {"render"}
    assert set(JOB_MODELS["label"].model_fields) == shared | {"label"}
    assert set(JOB_MODELS["run"].model_fields) == shared | {"render", "label", "lift", "pipeline"}
    assert set(JOB_MODELS["status"].model_fields) == {"root", "storage"}


def test_a_project_file_serves_every_command_and_is_still_checked(tmp_path) -> None:
    from rayjobs.config import AssetsJob, LabelJob
    project = tmp_path / "project.yaml"
    project.write_text("render:\n  views: 5\nlabel:\n  trials: 2\nassets:\n  n: 3\n")
    assert load_config([project], model=LabelJob).label.trials == 2
    assert load_config([project], model=AssetsJob).assets.n == 3
    project.write_text("render:\n  vews: 5\n")  # a typo in another command's section
    with pytest.raises(ConfigError, match="unknown config key 'render.vews'"):
        load_config([project], model=LabelJob)
    # one list of settings for every command: each keeps its own, every key is checked
    assert load_config(overrides=["render.views=3", "label.trials=1"], model=LabelJob).label.trials == 1
    with pytest.raises(ConfigError, match="unknown config key 'render.vews'"):
        load_config(overrides=["render.vews=3"], model=LabelJob)


@pytest.mark.parametrize("old, new", [
    ("label.model_path=/m", "label.backend.model_path"),
    ("label.grounding.num_cpus=0.5", "label.resources.grounding"),
    ("label.oracle_jitter=0.2", "label.backend.jitter"),
    ("lift.stride=7", "lift.backbone.stride"),
    ("lift.backbone_resources.concurrency=2", "lift.resources.backbone"),
    ("render.resources.batch_size=4", "render.resources.render.batch_size"),
])
def test_old_keys_name_their_new_place(old: str, new: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[old])
    # the old key or its old section, and where it is now
    [line] = [ln.strip() for ln in str(info.value).splitlines() if "was renamed" in ln]
    renamed = line.split("'")[1]
    assert old.startswith(renamed) and f"use '{new}'" in line


def test_backends_are_chosen_by_registry_name_with_their_own_options() -> None:
    options = ["label.backend.base_url=http://127.0.0.1:8000/v1", "label.backend.model=qwen",
               "label.backend.style=qwen"]
    for order in (["label.backend=openai", *options], [*options, "label.backend=openai"]):
        backend = load_config(overrides=order).label.backend
        assert (backend.name, backend.base_url, backend.style) == ("openai", options[0].split("=")[1], "qwen")
    assert load_config().label.backend.name == "oracle"
    with pytest.raises(ConfigError, match="label.backend.base_url is required with label.backend=openai"):
        load_config(overrides=["label.backend=openai", "label.backend.model=m"])
    with pytest.raises(ConfigError, match=r"unknown config key 'label.backend.box_threshold' "
                                          r"\(valid here: false_positive_rate, jitter, miss_rate, name\)"):
        load_config(overrides=["label.backend.box_threshold=0.2"])  # an oracle option? no
    with pytest.raises(ConfigError, match="label.backend"):
        load_config(overrides=["label.backend=owl9"])
    # the settings the label operator gets: the backend's default prompt template
    assert load_config(overrides=["label.backend=hf-zero-shot", "label.backend.model_path=/m"]
                       ).label.settings().template == "zero-shot"


def test_backbones_are_chosen_by_registry_name_with_their_options() -> None:
    lift = load_config(overrides=["lift.backbone=dinov2-small", "lift.backbone.stride=7"]).lift
    assert (lift.backbone.name, lift.backbone.stride, lift.backbone.spec.patch_size) == ("dinov2-small", 7, 14)
    with pytest.raises(ConfigError, match="takes its patch size 14 or half of it 7"):
        load_config(overrides=["lift.backbone.stride=5"])
    with pytest.raises(ConfigError, match="is a text encoder"):
        load_config(overrides=["lift.backbone=minilm-text"])


def test_values_of_unknown_or_secret_keys_are_never_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["storage.secret_acess_key=hunter2", "label.backend=openai",
                               "label.backend.base_url=http://me:pw@host/v1"])
    message = str(info.value)
    assert "hunter2" not in message and "pw@" not in message
    assert "unknown config key 'storage.secret_acess_key'" in message
    redacted = load_config(overrides=["label.backend=openai", "label.backend.model=m",
                                      "label.backend.base_url=http://me:pw@host/v1"]).redacted()
    assert redacted["label"]["backend"]["base_url"] == "http://me:***@host/v1"


def test_half_configured_credentials_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="storage.access_key_id is set without its pair"):
        load_config(overrides=["storage.access_key_id=AKIAEXAMPLE"])
    with pytest.raises(ConfigError, match="session_token needs"):
        load_config(overrides=["storage.session_token=tok"])
    with pytest.raises(ConfigError, match="root: String should have at least 1 character"):
        load_config(root="")


def test_the_affordanceclip_backend_refuses_settings_it_would_ignore() -> None:
    from rayjobs.config import JOB_MODELS, load_config
    backend = ["label.backend.name=affordanceclip",
               "label.backend.model=/r/runs/affordanceclip/a"]
    assert load_config((), backend, model=JOB_MODELS["label"], root="/tmp/r").label.settings() \
        .template == "zero-shot"
    with pytest.raises(ConfigError, match="prompted with the function's action"):
        load_config((), [*backend, "label.template=qwen"], model=JOB_MODELS["label"],
                    root="/tmp/r")
    with pytest.raises(ConfigError, match="absolute path or URI"):
        load_config((), ["label.backend.name=affordanceclip",
                         "label.backend.model=affordanceclip/a"], model=JOB_MODELS["label"],
                    root="/tmp/r")
    with pytest.raises(ConfigError, match="expected best, last or a step"):
        load_config((), [*backend, "label.backend.checkpoint=bestt"], model=JOB_MODELS["label"],
                    root="/tmp/r")
