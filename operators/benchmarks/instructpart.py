"""InstructPart (instructpart.txt; public release zifuwan/InstructPart): a loader of its
released layout, and the procedural stand-in written in the same layout.

Layout read (a missing piece is one ConfigError naming it):

    <data>/<split>/data_<split>.json   [{"image_path": "x.jpg", "part_list": [{"object", "part",
                                        "affordance", "action", "instruction": [human, GPT-4,
                                        part-of-object sentence, ..., part-of-object name, ...]}]}]
    <data>/<split>/images/<stem>-<object>-<part>.jpg   (spaces in names as _; or the plain
                                        image_path)
    <data>/<split>/masks/<stem>-<object>-<part>.png    (non-zero = the part; .jpg accepted)
    <data>/<split>/objects/<stem>-<object>-<part>.png  optional, not in the release: the whole
                                        object's pixels (the stand-in writes it; a box -> mask
                                        step uses it when present)
    <data>/<split>/3d/<stem>-<object>-<part>.json      optional, the stand-in's: the procedural
                                        asset and camera behind the image (CAST runs on it)

Tasks (InstructPart §3): TRPS, a task instruction without part names -> mask (`instruction[0]`
human-written, `[1]` GPT-4 rewritten); ORPS, object + part -> mask, asked with the paper's
template "Where is the {part} of the {object} in the image" (its Appendix C).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from operators.benchmarks.function_views import FunctionViewSettings, function_views
from operators.settings import ConfigError

TASKS = ("TRPS", "ORPS")
ORPS_TEMPLATE = "Where is the {part} of the {object} in the image"
INSTRUCTIONS = {"human": 0, "gpt": 1}


@dataclass(frozen=True)
class PartSample:
    key: str                        # <stem>-<object>-<part>
    image: Path
    mask: Path
    objects: Path | None            # the object's pixels, when the data has them
    asset: Path | None              # the stand-in's 3D source (3d/<key>.json), when known
    object: str
    part: str
    affordance: str
    action: str
    instructions: tuple[str, ...]

    def text(self, task: str, instruction: str = "human") -> str:
        if task == "ORPS":
            return ORPS_TEMPLATE.format(part=self.part, object=self.object)
        if task != "TRPS":
            raise ConfigError(f"instructpart: unknown task {task!r}; known: {', '.join(TASKS)}")
        index = INSTRUCTIONS[instruction]
        if len(self.instructions) <= index:
            raise ConfigError(f"instructpart: {self.key} has no {instruction} instruction")
        return self.instructions[index]


def _underscored(name: str) -> str:
    return name.replace(" ", "_")


def sample_key(stem: str, obj: str, part: str) -> str:
    """The release's file stem of one (image, part): <stem>-<object>-<part>, spaces as _."""
    return f"{stem}-{_underscored(obj)}-{_underscored(part)}"


def _find(folder: Path, stem: str) -> Path | None:
    for suffix in (".png", ".jpg", ".jpeg", ".JPEG", ".PNG"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def load_samples(data: Path | str, split: str = "test") -> list[PartSample]:
    """One sample per (image, part) of `<data>/<split>/data_<split>.json`, in file order."""
    folder = Path(data).expanduser() / split
    index = folder / f"data_{Path(split).parts[0]}.json"  # train/train200/data_train.json
    for needed in (index, folder / "images", folder / "masks"):
        if not needed.exists():
            raise ConfigError(f"instructpart: {data} has no {needed.relative_to(Path(data).expanduser())}"
                              f" (expected <data>/{split}/{index.name}, images/, masks/: "
                              "the InstructPart release layout, see the README)")
    try:
        entries = json.loads(index.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ConfigError(f"instructpart: {index}: not readable JSON ({err})") from None
    samples = []
    for entry in entries:
        try:
            image_path, parts = str(entry["image_path"]), entry["part_list"]
        except (KeyError, TypeError):
            raise ConfigError(f"instructpart: {index}: an entry lacks image_path/part_list: "
                              f"{str(entry)[:120]}") from None
        stem = Path(image_path).stem
        for item in parts:
            try:
                obj, part = str(item["object"]), str(item["part"])
                instructions = tuple(str(t) for t in item["instruction"])
            except (KeyError, TypeError):
                raise ConfigError(f"instructpart: {index}: {image_path}: a part entry lacks "
                                  "object/part/instruction") from None
            key = sample_key(stem, obj, part)
            image = _find(folder / "images", key) or (folder / "images" / image_path)
            mask = _find(folder / "masks", key)
            if not image.is_file():
                raise ConfigError(f"instructpart: {key}: no image ({folder / 'images'}/{key}.jpg "
                                  f"or {image_path})")
            if mask is None:
                raise ConfigError(f"instructpart: {key}: no mask ({folder / 'masks'}/{key}.png)")
            asset = folder / "3d" / f"{key}.json"
            samples.append(PartSample(key, image, mask, _find(folder / "objects", key),
                                      asset if asset.is_file() else None, obj,
                                      part, str(item.get("affordance", "")),
                                      str(item.get("action", "")), instructions))
    return samples


def read_mask(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """bool (H, W): the non-zero pixels (> 127 for JPEG, whose compression smears 0 and 255);
    resized (nearest) to (H, W)."""
    with Image.open(path) as image:
        lossy = image.format == "JPEG"
        gray = image.convert("L")
        if size is not None and gray.size != (size[1], size[0]):
            gray = gray.resize((size[1], size[0]), Image.NEAREST)
        return np.asarray(gray) > (127 if lossy else 0)


def write_sample(folder: Path, stem: str, rgb: np.ndarray, mask: np.ndarray,
                 objects: np.ndarray | None, record: dict[str, Any]) -> dict[str, Any]:
    """Write one (image, part) in the release layout; returns its data_<split>.json entry."""
    key = sample_key(stem, record["object"], record["part"])
    for name in ("images", "masks", "objects"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(folder / "images" / f"{key}.jpg", quality=95)
    Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "masks" / f"{key}.png")
    if objects is not None:
        Image.fromarray(objects.astype(np.uint8) * 255).save(folder / "objects" / f"{key}.png")
    return {"image_path": f"{stem}.jpg", "part_list": [record]}


# ------------------------------------------------------------------ the procedural stand-in

StandinSettings = FunctionViewSettings


def instructions_for(category: str, function: str, part: str, description: str
                     ) -> list[str]:
    """The six instruction slots of the release, written from the taxonomy: [0] a task
    without part names, [1] a rephrasing, [2]/[3] part-of-object sentences, [4]/[5] names."""
    return [f"Show me where to {description} with this {category}.",
            f"Which area of the {category} would you use to {description}?",
            f"The {part} of the {category} is used to {description}.",
            f"The {part} of the {category} affords {function}.",
            f"{part} of the {category}", f"{part} of the {category} to {function}"]


def write_standin(out: Path | str, settings: StandinSettings = StandinSettings(),
                  split: str = "test") -> int:
    """Render fresh procedural assets; per asset and function, the view showing the function's
    parts best becomes one sample (mask = every part of the asset performing the function).
    Returns the number of samples written under `out/<split>/`."""
    from operators.data.taxonomy import load_taxonomy
    taxonomy = load_taxonomy()
    folder = Path(out) / split
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for shown in function_views(settings, salt=7919):
        part = shown.part_names[shown.parts[0]]
        texts = instructions_for(shown.category, shown.function, part,
                                 taxonomy.functions[shown.function])
        named = [n for n in shown.part_names
                 if any(f" {n} " in f" {t.lower().rstrip('.?')} " for t in texts[:2])]
        if named:  # TRPS instructions must not name a part of the asset
            continue
        entries.append(write_sample(
            folder, shown.stem, shown.rgb, shown.part_mask, shown.object_mask,
            {"object": shown.category, "part": part, "affordance": shown.function,
             "action": shown.function, "instruction": texts}))
        # where the image came from, so a 3D model (CAST) can be run on the asset itself
        (folder / "3d").mkdir(exist_ok=True)
        (folder / "3d" / f"{sample_key(shown.stem, shown.category, part)}.json").write_text(
            json.dumps({"category": shown.category, "seed": shown.seed, "view": shown.view,
                        "views": settings.views, "size": settings.size}))
    (folder / f"data_{Path(split).parts[0]}.json").write_text(json.dumps(entries, indent=1))
    return len(entries)
