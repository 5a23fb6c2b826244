"""A run root means one thing: its format version, and the settings each stage's output was made
with.

- `_partlift.json` at the root records the format version of its layout. A root of an older
  format is refused with what changed and how to migrate (`partlift migrate`); a root of a
  newer one with a request to upgrade partlift.
- `<record_dir>/_settings.json` records the settings fingerprint of a stage's output: the
  settings that shape its rows (render views and size, label backend and trials, lift backbone
  and weights...), not how the job is scheduled. A run whose settings differ is refused before
  any work, naming each key with both values, unless it overwrites the output.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from operators.settings import ConfigError
from operators.store.commits import COMMITS_DIR, settings_hash
from operators.store.storage import FORMAT_VERSION, RunRoot
from operators.store.tables import STAGE_OUTPUTS, StageOutput

ROOT_MARKER = "_partlift.json"
SETTINGS_RECORD = "_settings.json"

# What each format version changed, for the refusal message of an older root.
FORMAT_CHANGES = {
    2: "commit records per shard set (<stage>/_commits/), settings fingerprints "
       "(<stage>/_settings.json), and mesh paths inside the root recorded relative to it",
}


class RootFormatError(ConfigError):
    """The run root was written by another format version of partlift."""


class SettingsMismatchError(ConfigError):
    """A run's settings differ from those the stage's output was made with."""


def root_format(root: RunRoot) -> int | None:
    """The format version of a root: its marker's, 1 for a root with tables but no marker (made
    before versions were recorded), None for an empty root."""
    if root.exists(ROOT_MARKER):
        try:
            return int(root.read_json(ROOT_MARKER).get("format_version", 1))
        except (OSError, ValueError, TypeError, AttributeError) as err:
            raise RootFormatError(f"{root.display(ROOT_MARKER)} cannot be read "
                                  f"({type(err).__name__}): it records the root's format; "
                                  f"restore it, or write {{\"format_version\": {FORMAT_VERSION}}} "
                                  "if this partlift wrote the root") from None
    has_data = root.exists("assets") or any(root.exists(o.record_dir)
                                            for o in STAGE_OUTPUTS.values())
    return 1 if has_data else None


def check_root_format(root: RunRoot, mark: bool = True) -> None:
    """Refuse a root of another format version; mark a new root with this one (`mark`)."""
    version = root_format(root)
    if version is None:
        if mark:
            root.write_json(ROOT_MARKER, {"format_version": FORMAT_VERSION, "created":
                                          dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
        return
    if version > FORMAT_VERSION:
        raise RootFormatError(f"run root {root.display()} was written by a newer partlift (format "
                              f"{version}; this one reads format {FORMAT_VERSION}): upgrade partlift")
    if version < FORMAT_VERSION:
        changes = "; ".join(f"format {v}: {FORMAT_CHANGES[v]}"
                            for v in range(version + 1, FORMAT_VERSION + 1))
        raise RootFormatError(
            f"run root {root.display()} was written by an older partlift (format {version}; this "
            f"one writes format {FORMAT_VERSION}: {changes}). Upgrade it in place with "
            f"`partlift migrate --root {root.display()}`, or start a new root.")


def stage_settings(root: RunRoot, output: StageOutput) -> dict[str, Any] | None:
    """The settings fingerprint recorded for a stage's output (None when nothing is recorded,
    or the record cannot be read)."""
    path = f"{output.record_dir}/{SETTINGS_RECORD}"
    try:
        return root.read_json(path)["settings"] if root.exists(path) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


# Settings keys added after roots were made, with the value that describes those older roots
# (their output was made as if the key had had this value): a root recorded without the key
# is compared as if it held this value.
ADDED_SETTINGS: dict[str, Any] = {"lift.cache_blocks": 0, "lift.background_variants": 1}


def check_stage_settings(root: RunRoot, output: StageOutput, settings: Mapping[str, Any],
                         command: str) -> None:
    """Refuse settings that differ from those the output's rows were made with (before any
    work). An output without committed rows takes any settings. The settings record names the
    keys; without it, a commit record's settings hash still tells."""
    records = root.list_files(f"{output.record_dir}/{COMMITS_DIR}", ".json")
    if not records:
        return
    recorded = stage_settings(root, output)
    if recorded is not None:
        recorded = {**{k: v for k, v in ADDED_SETTINGS.items() if k in settings}, **recorded}
    if recorded is None:
        first = root.read_json(f"{output.record_dir}/{COMMITS_DIR}/{min(records)}")
        if first.get("fingerprint") == settings_hash(settings):
            return
        differ = [f"settings hash {first.get('fingerprint')} in the root, "
                  f"{settings_hash(settings)} now ({output.record_dir}/{SETTINGS_RECORD}, which "
                  "names the keys, is missing or unreadable)"]
    elif settings_hash(recorded) == settings_hash(settings):
        return
    else:
        keys = sorted(set(recorded) | set(settings))
        differ = [f"{k}: {_shown(recorded.get(k))} in the root, {_shown(settings.get(k))} now"
                  for k in keys if recorded.get(k) != _jsonable(settings.get(k))]
    tables = ", ".join(f"{t.name}/" for t in output.tables)
    raise SettingsMismatchError(
        f"{command}: {tables} under {root.display()} were made with other settings:\n  "
        + "\n  ".join(differ)
        + f"\nOne table never mixes two settings. Use --overwrite to redo {output.stage} with the "
        f"new settings (what was made from it is redone by its next run), or another --root.")


def record_stage_settings(root: RunRoot, output: StageOutput, settings: Mapping[str, Any],
                          job_id: str) -> None:
    root.write_json(f"{output.record_dir}/{SETTINGS_RECORD}", {
        "stage": output.stage, "format_version": FORMAT_VERSION, "settings": _jsonable(settings),
        "hash": settings_hash(settings), "job_id": job_id})


def _jsonable(value: Any) -> Any:
    """As the value reads back from JSON (tuples become lists)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _shown(value: Any) -> str:
    return "unset" if value is None else repr(_jsonable(value))

