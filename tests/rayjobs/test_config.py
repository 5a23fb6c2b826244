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
    config = load_config(overrides=["storage.secret_access_key=12345678", "job.name=2024"])
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
