"""Job configuration: one pydantic model, YAML files in configs/, `--set a.b=value` overrides.

Unknown keys are an error everywhere (a typo must not silently fall back to a default).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator,
                      model_validator)

from operators.settings import RenderSettings
from operators.store.storage import StorageOptions

DEFAULT_ROOT = "./partlift-data"


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


class Section(BaseModel):
    # `--set job.name=2024` parses as a YAML int: string fields take it as text.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True,
                              coerce_numbers_to_str=True)


class StorageConfig(Section):
    """Object storage. Unset fields fall back to the standard AWS environment variables."""

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://127.0.0.1:9000")
    region: str | None = Field(None, description="S3 region (default: AWS_REGION or us-east-1)")
    access_key_id: SecretStr | None = Field(None, description="S3 access key (prefer AWS_ACCESS_KEY_ID)")
    secret_access_key: SecretStr | None = Field(None, description="S3 secret (prefer AWS_SECRET_ACCESS_KEY)")
    session_token: SecretStr | None = None
    connect_timeout_s: float = Field(5.0, gt=0)
    request_timeout_s: float = Field(30.0, gt=0)
    max_attempts: int = Field(3, ge=1)

    def options(self) -> StorageOptions:
        secret = lambda s: s.get_secret_value() if s is not None else None  # noqa: E731
        return StorageOptions(self.endpoint_url, self.region, secret(self.access_key_id),
                              secret(self.secret_access_key), secret(self.session_token),
                              self.connect_timeout_s, self.request_timeout_s, self.max_attempts)


class RayConfig(Section):
    address: str | None = Field(None, description="Ray cluster address; unset = start a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray (unset: all)")
    dashboard_host: str = Field("127.0.0.1", description="local Ray dashboard bind address")
    include_dashboard: bool = Field(False, description="start the dashboard with a local Ray")
    progress_bars: bool = Field(True, description="Ray Data progress bars")


class StageResources(Section):
    """How one Ray Data stage is scheduled (routed through rayjobs.resources)."""

    num_cpus: float = Field(1.0, gt=0, description="CPUs per task/actor")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per actor (unset: 1 for model actors when the cluster has GPUs, else 0)")
    concurrency: int | None = Field(None, ge=1, description="max parallel tasks / actor-pool size")
    batch_size: int = Field(2, ge=1, description="assets per task call (= per output shard)")


class JobConfig(Section):
    overwrite: bool = Field(False, description="redo everything instead of resuming")
    max_error_fraction: float = Field(0.1, ge=0, le=1, description="fail the job above this failed/input fraction")
    name: str | None = Field(None, description="run name recorded in _job.json")


class AssetsConfig(Section):
    n: int = Field(24, ge=1, description="procedural assets to make")
    seed: int = Field(0, ge=0, description="procedural generator seed")
    categories: list[str] | None = Field(None, description="procedural categories (default: all)")
    input: str | None = Field(None, description="directory/URI of mesh files to scan")
    up_axis: Literal["y", "z"] = Field("y", description="axis pointing up in the scanned files; z-up meshes (URDF/MJCF, pybullet) are turned to +y up")
    resources: StageResources = StageResources(batch_size=8, num_cpus=1.0)


class RenderConfig(Section):
    views: int = Field(19, ge=1, description="views per asset (DFC A.4: 19)")
    width: int = Field(224, ge=8, description="image width, pixels")
    height: int = Field(224, ge=8, description="image height, pixels")
    fov_deg: float = Field(40.0, gt=1, lt=170, description="vertical field of view, degrees")
    distribution: Literal["fibonacci", "rings"] = "fibonacci"
    elevation_min_deg: float = Field(-60.0, ge=-90, le=90, description="lowest camera elevation (negative = from below)")
    elevation_max_deg: float = Field(80.0, ge=-90, le=90, description="highest camera elevation")
    distance_margin: float = Field(1.15, ge=1, description="camera distance factor over the bounding-sphere fit")
    background: tuple[int, int, int] = (255, 255, 255)
    ambient: float = Field(0.35, ge=0, le=1)
    n_points: int = Field(100_000, ge=1, description="surface samples per asset (DFC A.4: 100K)")
    seed: int = Field(0, ge=0, description="seed for lights and surface sampling (mixed with the asset id)")
    resources: StageResources = StageResources(batch_size=2, num_cpus=1.0)

    @field_validator("background")
    @classmethod
    def _rgb(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= c <= 255 for c in value):
            raise ValueError("background channels must be in 0..255")
        return value

    @model_validator(mode="after")
    def _elevations(self) -> "RenderConfig":
        if self.elevation_min_deg > self.elevation_max_deg:
            raise ValueError(f"render.elevation_min_deg ({self.elevation_min_deg}) must not exceed "
                             f"render.elevation_max_deg ({self.elevation_max_deg})")
        return self

    def settings(self) -> RenderSettings:
        fields = RenderSettings.__dataclass_fields__
        try:
            return RenderSettings(**{k: v for k, v in self.model_dump().items() if k in fields})
        except ValueError as err:
            raise ConfigError(f"render: {err}") from None


class LabelConfig(Section):
    """Pseudo-labelling (DFC A.4): grounding backend, trials, aggregation and mask settings."""

    backend: Literal["oracle", "hf-zero-shot", "hf-vlm", "openai"] = Field(
        "oracle", description="grounding backend; oracle = procedural ground truth + noise (offline)")
    model_path: str | None = Field(None, description="local model directory (hf-zero-shot, hf-vlm)")
    functions: list[str] | None = Field(None, description="functions to label (default: all of the category's)")

    @field_validator("functions")
    @classmethod
    def _known_functions(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            from operators.data.taxonomy import load_taxonomy
            known = load_taxonomy().functions
            unknown = [f for f in value if f not in known]
            if unknown:
                raise ValueError(f"unknown functions {unknown}; known: {', '.join(sorted(known))}")
        return value
    template: Literal["cogvlm", "qwen", "zero-shot"] | None = Field(None, description="prompt template (cogvlm | qwen | zero-shot); default: the backend's own (zero-shot for detectors, cogvlm/qwen for VLMs)")
    trials: int = Field(4, ge=1, description="queries per view and part (DFC A.4: 4)")
    consensus: bool = Field(False, description="keep the largest cluster of a view's trial boxes")
    zoom: bool = Field(False, description="second zoomed query for small boxes")
    min_boxes_per_view: int = Field(1, ge=1, description="skip views with fewer boxes")
    visibility_rel_tol: float = Field(0.01, ge=0, description="depth-test tolerance, fraction of depth")
    visibility_abs_tol: float = Field(0.002, ge=0, description="depth-test tolerance, metres")
    mask_sigma: float = Field(1.0, ge=0, description="score smoothing before Otsu, pixels")
    closing_iterations: int = Field(2, ge=0, description="binary closing steps on the masks")
    box_threshold: float = Field(0.1, ge=0, description="hf-zero-shot: minimum box score")
    text_threshold: float = Field(0.1, ge=0, description="hf-zero-shot (Grounding DINO): text score")
    vlm_style: Literal["cogvlm", "qwen"] = Field("cogvlm", description="hf-vlm/openai box format")
    json_frame: Literal["model", "view", "norm1000"] | None = Field(None, description="hf-vlm/openai: frame of Qwen JSON boxes (model = the processor's resized image, Qwen2.5-VL; norm1000 = 0-1000, Qwen3-VL; default: the backend's)")
    trust_remote_code: bool = Field(False, description="hf-vlm: allow the model's own code (CogVLM needs it); only for models you trust")
    strict_output: bool = Field(True, description="hf-vlm/openai: an answer without parseable boxes (other than a plain 'none') is an error row, not an empty label")
    max_new_tokens: int = Field(64, ge=1, description="hf-vlm generation length")
    temperature: float = Field(0.7, ge=0, description="hf-vlm/openai sampling temperature")
    base_url: str | None = Field(None, description="openai: endpoint, e.g. http://127.0.0.1:8000/v1")
    model: str | None = Field(None, description="openai: served model name")
    api_key_env: str = Field("OPENAI_API_KEY", description="openai: environment variable with the key")
    timeout_s: float = Field(30.0, gt=0, description="openai: request timeout, seconds")
    max_retries: int = Field(3, ge=0, description="openai: retries with exponential backoff")
    max_concurrency: int = Field(4, ge=1, description="openai: parallel requests per actor")
    oracle_jitter: float = Field(0.1, ge=0, description="oracle: box corner noise, fraction of box size")
    oracle_miss_rate: float = Field(0.1, ge=0, le=1, description="oracle: chance a view's box is missed")
    oracle_false_positive_rate: float = Field(0.1, ge=0, le=1, description="oracle: chance of an extra wrong box")
    seed: int = Field(0, ge=0, description="seed for oracle noise (mixed with the asset id)")
    device: str | None = Field(None, description="torch device for transformers backends (default: cuda if the actor has a GPU)")
    grounding: StageResources = StageResources(batch_size=1, num_cpus=1.0, concurrency=1)
    aggregate: StageResources = StageResources(batch_size=2, num_cpus=1.0)

    def settings(self) -> "LabelSettings":
        from operators.settings import LabelSettings
        fields = LabelSettings.__dataclass_fields__
        return LabelSettings(**{k: v for k, v in self.model_dump().items()
                                if k in fields and v is not None})


class LiftConfig(Section):
    """2D -> 3D feature lifting (CMAT 3.1) and the cached per-view features (DFC 4.2)."""

    backbone: str = Field("dinov2-random-tiny", description="registry name (dinov2-small|base|large|giant, dinov3-*, *-random-tiny = NOT pretrained)")
    model_path: str | None = Field(None, description="local checkpoint directory (e.g. from `partlift weights import-onnx`)")
    stride: int | None = Field(None, ge=1, description="patch stride: the patch size (14) or half (7, DFC C.2)")
    n_last_blocks: int = Field(1, ge=1, description="concatenate the last n blocks' tokens")
    n_points: int = Field(2048, ge=1, description="points per asset to store features for (subsampled from points/)")
    allow_download: bool = Field(False, description="let transformers download a missing pretrained backbone (needs network; off: offline-first)")
    cache_view_features: bool = Field(True, description="also write the per-view patch grids to features/views/")
    seed: int = Field(0, ge=0, description="seed of the point subsample (mixed with the asset id)")
    device: str | None = Field(None, description="torch device (default: cuda when the actor has a GPU)")
    dtype: Literal["float32", "bfloat16", "auto"] = Field("auto", description="auto = bf16 on GPU, float32 on CPU")
    visibility_rel_tol: float = Field(0.01, ge=0, description="depth-test tolerance, fraction of depth")
    visibility_abs_tol: float = Field(0.002, ge=0, description="depth-test tolerance, metres")
    backbone_resources: StageResources = StageResources(batch_size=1, num_cpus=1.0, concurrency=1)
    project: StageResources = StageResources(batch_size=2, num_cpus=1.0)


class PipelineConfig(Section):
    stages: list[Literal["render", "label", "lift"]] = Field(
        ["render", "label"], description="stages in order; render -> label and render -> lift "
        "stream in one Ray Data pipeline, a third stage runs after them from storage")

    @field_validator("stages")
    @classmethod
    def _chain(cls, value: list[str]) -> list[str]:
        order = ["render", "label", "lift"]
        if not value or value != [s for s in order if s in value]:
            raise ValueError(f"stages must be a non-empty sub-sequence of {order}, in that order")
        return value


class PartliftConfig(Section):
    root: str = Field(DEFAULT_ROOT, description="run root: local dir, file:// or s3://bucket/prefix")
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    job: JobConfig = JobConfig()
    assets: AssetsConfig = AssetsConfig()
    render: RenderConfig = RenderConfig()
    label: LabelConfig = LabelConfig()
    lift: LiftConfig = LiftConfig()
    pipeline: PipelineConfig = PipelineConfig()

    def redacted(self) -> dict[str, Any]:
        """JSON-ready dict with secrets replaced (for _job.json and logs)."""
        data = self.model_dump(mode="json")
        for key in ("access_key_id", "secret_access_key", "session_token"):
            if data["storage"].get(key) is not None:
                data["storage"][key] = "***"
        return data


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`render.views=19` -> ("render.views", 19); values are YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set render.views=19")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out


def _describe(err: ValidationError, sources: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            section = _section_for(e["loc"][:-1])
            valid = ", ".join(sorted(section.model_fields)) if section else ""
            lines.append(f"unknown config key '{loc}'" + (f" (valid here: {valid})" if valid else ""))
        else:
            shown = "***" if _is_secret(loc) else repr(e.get("input"))
            lines.append(f"{loc}: {e['msg']} (got {shown})")
    return f"invalid configuration from {sources}:\n  " + "\n  ".join(lines)


SECRET_KEYS = ("access_key_id", "secret_access_key", "session_token")


def _is_secret(dotted: str) -> bool:
    return dotted.rsplit(".", 1)[-1] in SECRET_KEYS


def _section_for(path: Sequence[Any]) -> type[BaseModel] | None:
    model: type[BaseModel] = PartliftConfig
    for key in path:
        field = model.model_fields.get(str(key))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def load_config(files: Sequence[str | Path] = (), overrides: Sequence[str] = (),
                **explicit: Any) -> PartliftConfig:
    """Merge YAML files (in order), then `--set` overrides, then explicit CLI values (non-None)."""
    tree: dict = {}
    for file in files:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
        tree = _merge(tree, loaded)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    for dotted, value in explicit.items():
        if value is not None:
            _set_dotted(tree, dotted.replace("__", "."), value)
    shown = [f"--set {o.split('=', 1)[0]}=***" if _is_secret(o.split("=", 1)[0].strip())
             else f"--set {o}" for o in overrides]
    flags = [f"command-line option for {k.replace('__', '.')}={v!r}"
             for k, v in explicit.items() if v is not None]
    sources = ", ".join([str(f) for f in files] + shown + flags) or "defaults"
    try:
        return PartliftConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_describe(err, sources)) from None
