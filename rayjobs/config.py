"""Job configuration: one pydantic model per job, composed from sections; YAML files in configs/
and `--set a.b=value` overrides.

- Shared sections (every job): `root`, `storage`, `ray`, `job`.
- Stage sections: `assets`, `render`, `label`, `lift`, `pipeline`. Operators keep their own
  settings (`operators.settings`) and their model options (`operators.models.registry`: a
  backbone or a grounding backend is chosen by registry name, with that entry's own options);
  `training/` and `tuning/` add theirs the same way.
- Resources: `<stage>.resources.<step>` everywhere (e.g. `label.resources.grounding`).
- A job's model = the shared sections + its stage sections (`JOB_MODELS`). Unknown keys are an
  error naming the key and the valid ones; keys of older versions name their new place
  (`RENAMED_KEYS`). Values of unknown or secret keys are never echoed.

This module imports neither open3d nor torch nor transformers: the client stays light.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator

from operators.models.registry import GROUNDING_BACKENDS, BackboneOptions, grounding_choice
from operators.settings import ConfigError, LabelSettings, ReadLimits, RenderSettings, Section
from operators.store.records import REDACTED, redact, redact_url
from operators.store.storage import StorageOptions
from training.config import (AffordanceClipSection, Agd20kSection, CastSection, DataSection, EvalSection, InstructPartSection,
                             PretrainSection, SocoSection, TrainSection)
from tuning.space import SweepSection, TrackingSection

DEFAULT_ROOT = "./partlift-data"

__all__ = ["ConfigError", "Section", "DEFAULT_ROOT", "load_config", "JOB_MODELS"]


# ----------------------------------------------------------------------------- shared sections


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

    @model_validator(mode="after")
    def _whole_credentials(self) -> "StorageConfig":
        if (self.access_key_id is None) != (self.secret_access_key is None):
            given = "access_key_id" if self.access_key_id is not None else "secret_access_key"
            raise ValueError(f"storage.{given} is set without its pair: give both "
                             "storage.access_key_id and storage.secret_access_key, or neither "
                             "(then the standard AWS environment is used)")
        if self.session_token is not None and self.access_key_id is None:
            raise ValueError("storage.session_token needs storage.access_key_id and "
                             "storage.secret_access_key")
        return self

    def options(self) -> StorageOptions:
        secret = lambda s: s.get_secret_value() if s is not None else None  # noqa: E731
        return StorageOptions(self.endpoint_url, self.region, secret(self.access_key_id),
                              secret(self.secret_access_key), secret(self.session_token),
                              self.connect_timeout_s, self.request_timeout_s, self.max_attempts)


class RayConfig(Section):
    address: str | None = Field(None, description="Ray cluster address; unset = RAY_ADDRESS if set, else a private local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the private local Ray (unset: all)")
    dashboard_host: str = Field("127.0.0.1", description="local Ray dashboard bind address")
    include_dashboard: bool = Field(False, description="start the dashboard with a local Ray")
    progress_bars: bool = Field(True, description="Ray Data progress bars")
    connect_timeout_s: float = Field(10.0, gt=0, description="how long to wait for a cluster's head to answer, seconds")


class StepResources(Section):
    """How one step of a stage is scheduled (routed through rayjobs.resources)."""

    num_cpus: float = Field(1.0, gt=0, description="CPUs per task/actor")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per actor (unset: 1 for model actors when the cluster has GPUs, else 0)")
    concurrency: int | None = Field(None, ge=1, description="max parallel tasks / actor-pool size")
    batch_size: int = Field(2, ge=1, description="assets per task call (= per output shard)")


class JobConfig(Section):
    overwrite: bool = Field(False, description="redo everything instead of resuming")
    max_error_fraction: float = Field(0.1, ge=0, le=1, description="fail the job above this failed/input fraction")
    name: str | None = Field(None, description="run name, recorded in _job.json and in the stage's lease (a rerun with the same name takes over the lease of a run that is gone)")
    force: bool = Field(False, description="break another job's lease on the stage (only when it is surely not running)")
    max_consecutive_failures: int = Field(50, ge=0, description="stop the job when this many assets in a row failed: every asset failing the same way is a problem of the job, not of its inputs (0: never)")
    lease_timeout_s: float = Field(120.0, gt=0, description="a lease not renewed for this long is stale and may be taken over, seconds")


# ----------------------------------------------------------------------------- stage sections


class AssetsResources(Section):
    mesh: StepResources = Field(StepResources(batch_size=8), description="generate (make) or read and validate (scan) meshes")


class MeshReading(Section):
    """How a stage reads mesh files it did not make (operators.data.isolation)."""

    read_timeout_s: float = Field(30.0, gt=0, description="a mesh file whose reader (a child process) takes longer is an error row, seconds")
    max_file_mb: float = Field(1024.0, gt=0, description="mesh files larger than this are error rows, not read, MiB")
    isolate: bool = Field(True, description="parse mesh files in a child process, so a reader crash or hang is an error row; false parses in the worker (a crash takes the worker down)")

    def read_limits(self) -> ReadLimits:
        return ReadLimits(timeout_s=self.read_timeout_s, max_file_mb=self.max_file_mb,
                          isolate=self.isolate)


class AssetsConfig(MeshReading):
    n: int = Field(24, ge=1, description="procedural assets to make")
    seed: int = Field(0, ge=0, description="procedural generator seed")
    categories: list[str] | None = Field(None, description="procedural categories (default: all)")
    input: str | None = Field(None, description="directory/URI of mesh files to scan")
    up_axis: Literal["y", "z"] = Field("y", description="axis pointing up in the scanned files; z-up meshes (URDF/MJCF, pybullet) are turned to +y up")
    resources: AssetsResources = AssetsResources()


class RenderResources(Section):
    render: StepResources = Field(StepResources(batch_size=2), description="render tasks (open3d ray casting), one shard per task")


class RenderConfig(MeshReading):
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
    read_timeout_s: float = Field(60.0, gt=0, description="a mesh file whose reader (a child process) takes longer is an error row, seconds")
    resources: RenderResources = RenderResources()

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
        return _settings(RenderSettings, self, "render")

    def fingerprint(self) -> dict[str, Any]:
        """The settings that shape views/ and points/ (not how the tasks are scheduled)."""
        return _fingerprint("render", self, exclude={"resources", "read_timeout_s", "max_file_mb",
                                                          "isolate"})


class LabelResources(Section):
    load: StepResources = Field(StepResources(batch_size=2), description="read views and points back from storage")
    grounding: StepResources = Field(StepResources(batch_size=1, concurrency=1), description="grounding model actors")
    aggregate: StepResources = Field(StepResources(batch_size=2), description="vote, mask and write tasks (one shard per task)")


class LabelConfig(Section):
    """Pseudo-labelling (DFC A.4): grounding backend, trials, aggregation and mask settings."""

    backend: grounding_choice() = Field(  # type: ignore[valid-type]
        "oracle", description="grounding backend by registry name (oracle | hf-zero-shot | hf-vlm | openai), with its own options, e.g. label.backend.model_path; oracle = procedural ground truth + noise (offline)")
    functions: list[str] | None = Field(None, description="functions to label (default: all of the category's)")
    template: Literal["cogvlm", "qwen", "zero-shot"] | None = Field(None, description="prompt template; default: the backend's own (zero-shot for detectors, the answer style for VLMs)")
    trials: int = Field(4, ge=1, description="queries per view and part (DFC A.4: 4)")
    consensus: bool = Field(False, description="keep the largest cluster of a view's trial boxes")
    zoom: bool = Field(False, description="second zoomed query for small boxes")
    min_boxes_per_view: int = Field(1, ge=1, description="skip views with fewer boxes")
    visibility_rel_tol: float = Field(0.01, ge=0, description="depth-test tolerance, fraction of depth")
    visibility_abs_tol: float = Field(0.002, ge=0, description="depth-test tolerance, metres")
    mask_sigma: float = Field(1.0, ge=0, description="score smoothing before Otsu, pixels")
    closing_iterations: int = Field(2, ge=0, description="binary closing steps on the masks")
    seed: int = Field(0, ge=0, description="seed for the backend's sampling and the oracle's noise (mixed with the asset id)")
    device: str | None = Field(None, description="torch device for model backends (default: cuda if the actor has a GPU)")
    resources: LabelResources = LabelResources()

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

    @model_validator(mode="after")
    def _template_used(self) -> "LabelConfig":
        if self.template is not None and self.backend.name == "affordanceclip":
            raise ValueError("label.template: the affordanceclip backend is prompted with the "
                             "function's action (\"pour with\"), not a template; drop the key")
        return self

    def settings(self) -> LabelSettings:
        template = self.template or self.backend.default_template()
        return _settings(LabelSettings, self, "label", template=template)

    def fingerprint(self) -> dict[str, Any]:
        """The settings that shape labels/ (the backend and its weights, prompts, trials,
        aggregation; not the device or the scheduling)."""
        return {**_fingerprint("label", self, exclude={"resources", "device", "backend",
                                                        "template"}),
                "label.template": self.settings().template,
                **self.backend.fingerprint("label.backend")}


class LiftResources(Section):
    load: StepResources = Field(StepResources(batch_size=2), description="read views and points back from storage")
    backbone: StepResources = Field(StepResources(batch_size=1, concurrency=1), description="backbone actors")
    project: StepResources = Field(StepResources(batch_size=2), description="projection and write tasks (one shard per task)")


class LiftConfig(Section):
    """2D -> 3D feature lifting (CMAT 3.1) and the cached per-view features (DFC 4.2)."""

    backbone: BackboneOptions = Field(BackboneOptions(), description="image backbone by registry name, with its options (model_path, stride, dtype, device, allow_download)")
    n_last_blocks: int = Field(1, ge=1, description="concatenate the last n blocks' tokens")
    n_points: int = Field(2048, ge=1, description="points per asset to store features for (subsampled from points/)")
    cache_view_features: bool = Field(True, description="also write the per-view patch grids to features/views/")
    cache_blocks: int = Field(3, ge=0, description="also write the last n blocks before the final LayerNorm per view to features/blocks/ (the correspondence trainer's cache, DFC 4.2; 0 = off)")
    background_variants: int = Field(1, ge=1, description="features/blocks/ rows per view: 1 = the render's own background; K > 1 adds K-1 replaced backgrounds (solid or gradient, noise half the time) for the trainer's augmentation")
    seed: int = Field(0, ge=0, description="seed of the point subsample (mixed with the asset id)")
    visibility_rel_tol: float = Field(0.01, ge=0, description="depth-test tolerance, fraction of depth")
    visibility_abs_tol: float = Field(0.002, ge=0, description="depth-test tolerance, metres")
    resources: LiftResources = LiftResources()

    def fingerprint(self) -> dict[str, Any]:
        """The settings that shape features/ (backbone, weights, blocks, points; not the device
        or the scheduling)."""
        return {**_fingerprint("lift", self, exclude={"resources", "backbone"}),
                **self.backbone.fingerprint("lift.backbone")}

    @model_validator(mode="after")
    def _variants_need_the_cache(self) -> "LiftConfig":
        if self.background_variants > 1 and self.cache_blocks == 0:
            raise ValueError(f"lift.background_variants={self.background_variants} caches block "
                             "features of extra backgrounds: it needs lift.cache_blocks > 0")
        return self

    @model_validator(mode="after")
    def _image_backbone(self) -> "LiftConfig":
        if self.backbone.spec.is_text:
            raise ValueError(f"lift.backbone={self.backbone.name} is a text encoder; lifting "
                             "needs an image backbone (dinov2-*, dinov3-*)")
        return self


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


def _fingerprint(name: str, section: Section, exclude: set[str]) -> dict[str, Any]:
    return {f"{name}.{k}": v for k, v in section.model_dump(mode="json").items() if k not in exclude}


def _settings(cls: type, section: Section, name: str, **extra: Any) -> Any:
    """An operator's settings dataclass from the section's fields of the same names."""
    fields = cls.__dataclass_fields__
    values = {k: getattr(section, k) for k in fields if k in type(section).model_fields}
    try:
        return cls(**{**values, **extra})
    except ValueError as err:
        raise ConfigError(f"{name}: {err}") from None


# ----------------------------------------------------------------------------- job models


class JobBase(Section):
    """The sections every job shares."""

    root: str = Field(DEFAULT_ROOT, min_length=1, description="run root: local dir, file:///abs/path or s3://bucket/prefix")
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    job: JobConfig = JobConfig()

    def redacted(self) -> dict[str, Any]:
        """JSON-ready dict with every secret replaced (by type), for _job.json and logs."""
        return redact(self)


class StatusJob(Section):
    """`partlift status`: where the root is and how to reach it."""

    root: str = Field(DEFAULT_ROOT, min_length=1, description="run root to inspect")
    storage: StorageConfig = StorageConfig()


class AssetsJob(JobBase):
    assets: AssetsConfig = AssetsConfig()


class RenderJob(JobBase):
    render: RenderConfig = RenderConfig()


class LabelJob(JobBase):
    label: LabelConfig = LabelConfig()


class LiftJob(JobBase):
    lift: LiftConfig = LiftConfig()


class ScoreResources(Section):
    load: StepResources = Field(StepResources(batch_size=2), description="read views and points back from storage")
    model: StepResources = Field(StepResources(batch_size=1, concurrency=None), description="model actors (backbone + correspondence model + CAST; a GPU each when the cluster has them; default pool: the cluster's GPUs, else half its CPUs)")
    write: StepResources = Field(StepResources(batch_size=2), description="post-processing and write tasks (one shard per task)")


class ScoreSection(Section):
    """`partlift score`: trained models over every rendered asset of a root."""

    name: str | None = Field(None, description="the scores' name: they go to <root>/scores/<name>/ (default: the model names joined by +)")
    models: list[str] = Field(default_factory=list, description="model references: a correspondence run (train/NAME, required: embeddings and masks) and optionally a CAST run (finetune/NAME: per-point scores)")
    checkpoint: str = Field("best", description="which checkpoint of each run: best, last or a step")
    render: bool = Field(True, description="render the manifest's assets that have no views yet (render.* settings) before scoring; false: score only rendered assets (the rest wait)")
    features: Literal["auto", "cache", "backbone"] = Field("auto", description="the model's input: the root's cached blocks (features/blocks, lift.cache_blocks) of an asset's current render, else the backbone on its views (auto); only the cache (an asset without is an error); only the backbone")
    functions: list[str] | None = Field(None, description="functions to score (default: every function of the correspondence model)")
    n_points: int = Field(512, ge=16, description="points per asset scored (a seeded subsample of points/)")
    mask_stride: int = Field(4, ge=1, description="pixels between the samples of the per-view masks")
    seed: int = Field(0, description="seed of the point subsample")
    query: str | None = Field(None, description="ASSET:FUNCTION: after scoring, rank the collection by similarity to this asset's functional part")
    top_k: int = Field(5, ge=1, description="how many assets a query returns")
    resources: ScoreResources = ScoreResources()

    @field_validator("query")
    @classmethod
    def _query_form(cls, value: str | None) -> str | None:
        if value is not None and (value.count(":") != 1 or not all(value.split(":"))):
            raise ValueError(f"{value!r}: give ASSET_ID:FUNCTION")
        return value

    def checkpoint_ref(self) -> str | int:
        """`checkpoint` as `load_model` takes it: best, last or a step number."""
        return int(self.checkpoint) if self.checkpoint.isdigit() else self.checkpoint

    def fingerprint(self) -> dict[str, Any]:
        """What shapes the rows (not the query, which reads them)."""
        return {f"score.{k}": v for k, v in self.model_dump(
            mode="json", exclude={"name", "query", "top_k", "resources", "render"}).items()}


class ScoreJob(AssetsJob, RenderJob, LiftJob):
    """`partlift score`: `assets.input` (--assets) adds a directory or bucket of meshes to the
    manifest first; `render.*` renders the assets without views; `lift.backbone` must be the
    backbone the correspondence model was trained on (the root's features/)."""

    score: ScoreSection = ScoreSection()


class PipelineJob(RenderJob, LabelJob, LiftJob):
    pipeline: PipelineConfig = PipelineConfig()


class TrainJob(LiftJob):
    """Correspondence training; `lift.backbone` is read on the backbone-in-the-loop path."""

    train: TrainSection = TrainSection()
    data: DataSection = DataSection()
    eval: EvalSection = EvalSection()


class PretrainJob(JobBase):
    """CMAT pretraining of the point encoder."""

    pretrain: PretrainSection = PretrainSection()
    data: DataSection = DataSection()


class FinetuneJob(PretrainJob):
    """CAST on a pretrained (or a scratch) encoder; pretrain.* gives a scratch encoder's shape."""

    cast: CastSection = CastSection()


class SweepJob(FinetuneJob, TrainJob):
    """`partlift sweep`: the sections of every learning job plus `sweep.*` (which job, metric,
    search space)."""

    sweep: SweepSection | None = None
    tracking: TrackingSection = TrackingSection()


class AffordanceClipJob(JobBase):
    """`partlift affordanceclip`: AffordanceCLIP's FPN on referring composites of the root's
    rendered assets (data.* splits them)."""

    data: DataSection = DataSection()
    affordanceclip: AffordanceClipSection = AffordanceClipSection()


class EvalJob(LabelJob, LiftJob):
    """`partlift eval`: `lift.backbone` = the backbone of the raw-feature rows (and of a model's
    features, which must be the one it was trained on); `label.backend` = the grounding backend
    InstructPart's box rows use."""

    data: DataSection = DataSection()
    eval: EvalSection = EvalSection()
    soco: SocoSection = SocoSection()
    instructpart: InstructPartSection = InstructPartSection()
    agd20k: Agd20kSection = Agd20kSection()


DEMO_DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"val_fraction": 0.25}, "eval": {"pairs": 16},
    "train": {"steps": 100, "checkpoint_every": 25, "val_pairs": 8},
    "pretrain": {"steps": 50, "checkpoint_every": 25},
    "cast": {"steps": 80, "checkpoint_every": 40},
    "soco": {"standin_assets": 2, "standin_views": 4, "standin_pairs": 2},
    "instructpart": {"standin_assets": 1}, "agd20k": {"standin_assets": 1},
    "affordanceclip": {"steps": 30, "checkpoint_every": 15}}


class DemoJob(AssetsJob, RenderJob, LabelJob, TrainJob, FinetuneJob):
    """The demo runs every stage: its model holds every stage section. A quarter of its 24
    assets validate (so that validation assets share functions); 100 training steps and 16
    evaluation pairs keep training and evaluation near two minutes on 2 cores; the benchmarks'
    stand-ins are small (2 assets per category for SOCO, 1 for InstructPart and AGD20K) and
    AffordanceCLIP trains 30 steps."""

    data: DataSection = DataSection(**DEMO_DEFAULTS["data"])
    eval: EvalSection = EvalSection(**DEMO_DEFAULTS["eval"])
    train: TrainSection = TrainSection(**DEMO_DEFAULTS["train"])
    pretrain: PretrainSection = PretrainSection(**DEMO_DEFAULTS["pretrain"])
    cast: CastSection = CastSection(**DEMO_DEFAULTS["cast"])
    soco: SocoSection = SocoSection(**DEMO_DEFAULTS["soco"])
    instructpart: InstructPartSection = InstructPartSection(**DEMO_DEFAULTS["instructpart"])
    agd20k: Agd20kSection = Agd20kSection(**DEMO_DEFAULTS["agd20k"])
    affordanceclip: AffordanceClipSection = AffordanceClipSection(
        **DEMO_DEFAULTS["affordanceclip"])

    @model_validator(mode="before")
    @classmethod
    def _demo_defaults(cls, value: Any) -> Any:
        """The demo's values stay under a user's other keys of the same section."""
        if isinstance(value, dict):
            value = dict(value)
            for section, defaults in DEMO_DEFAULTS.items():
                given = value.get(section)
                if isinstance(given, dict):
                    value[section] = {**defaults, **given}
        return value


class ProjectConfig(ScoreJob, PipelineJob, SweepJob):
    """Every section of every command: what a project file may hold."""

    soco: SocoSection = SocoSection()
    instructpart: InstructPartSection = InstructPartSection()
    agd20k: Agd20kSection = Agd20kSection()
    affordanceclip: AffordanceClipSection = AffordanceClipSection()


JOB_MODELS: dict[str, type[Section]] = {
    "assets": AssetsJob, "render": RenderJob, "label": LabelJob, "lift": LiftJob,
    "run": PipelineJob, "train": TrainJob, "pretrain": PretrainJob, "finetune": FinetuneJob,
    "sweep": SweepJob, "eval": EvalJob, "demo": DemoJob, "score": ScoreJob,
    "affordanceclip": AffordanceClipJob,
    "status": StatusJob}


# ----------------------------------------------------------------------------- renamed keys


def _renamed_keys() -> dict[str, str]:
    steps = {f: f for f in StepResources.model_fields}
    renamed = {f"render.resources.{f}": f"render.resources.render.{f}" for f in steps}
    renamed |= {f"assets.resources.{f}": f"assets.resources.mesh.{f}" for f in steps}
    renamed |= {"label.grounding": "label.resources.grounding",
                "label.aggregate": "label.resources.aggregate",
                "lift.backbone_resources": "lift.resources.backbone",
                "lift.project": "lift.resources.project",
                "label.vlm_style": "label.backend.style",
                "label.oracle_jitter": "label.backend.jitter",
                "label.oracle_miss_rate": "label.backend.miss_rate",
                "label.oracle_false_positive_rate": "label.backend.false_positive_rate"}
    for key in ("model_path", "box_threshold", "text_threshold", "json_frame",
                "trust_remote_code", "strict_output", "max_new_tokens", "temperature", "base_url",
                "model", "api_key_env", "timeout_s", "max_retries", "max_concurrency"):
        renamed[f"label.{key}"] = f"label.backend.{key}"
    for key in ("model_path", "stride", "dtype", "device", "allow_download"):
        renamed[f"lift.{key}"] = f"lift.backbone.{key}"
    return renamed


# Keys of earlier versions -> where they are now (a key under a renamed section moves with it).
RENAMED_KEYS: dict[str, str] = _renamed_keys()


def renamed_key(dotted: str) -> str | None:
    """The current name of an old key (or of a key under an old section), else None."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in RENAMED_KEYS:
            return ".".join([RENAMED_KEYS[prefix], *parts[n:]])
    return None


# ----------------------------------------------------------------------------- loading


def _section(value: Any) -> Any:
    """A registry choice may be given by its name alone: "openai" is {name: openai}."""
    return {"name": value} if isinstance(value, str) else value


def _switched_options(old: dict, name: str) -> dict:
    """`old` (a chosen grounding backend's options) when another backend is named: the options
    only the previous backend takes are dropped (a project file's oracle noise does not stop
    `--backend hf-zero-shot`); anything else stays, so a typo is still an error."""
    before, after = GROUNDING_BACKENDS.get(old.get("name", "")), GROUNDING_BACKENDS.get(name)
    if before is None or after is None or before is after:
        return {**old, "name": name}
    only_before = set(before.model_fields) - set(after.model_fields)
    return {**{k: v for k, v in old.items() if k not in only_before}, "name": name}


def _assign(node: dict, key: str, value: Any) -> None:
    """node[key] = value, except that a name given for a section that already holds options
    chooses the name and keeps the options (`label.backend=openai` after its base_url)."""
    if isinstance(value, str) and isinstance(node.get(key), dict):
        node[key] = _switched_options(node[key], value)
    else:
        node[key] = value


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node[key] = _section(node.get(key, {}))
        node = node[key]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a section")
    _assign(node, keys[-1], value)


def _merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(_section(out.get(key)), dict):
            out[key] = _merge(_section(out[key]), value)
        else:
            _assign(out, key, value)
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """`render.views=19` -> ("render.views", 19); values are YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set render.views=19")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"--set {key.strip()}: the value is not valid YAML") from None
    return key.strip(), value


def _union_members(annotation: Any) -> dict[str, type[BaseModel]]:
    """Members of a tagged union of sections, by their `name` tag ({} for anything else)."""
    members: dict[str, type[BaseModel]] = {}
    for arg in get_args(annotation):
        for inner in (get_args(arg) or (arg,)):
            if isinstance(inner, type) and issubclass(inner, BaseModel) and "name" in inner.model_fields:
                members[str(inner.model_fields["name"].default)] = inner
    return members


def _as_section(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _walk(model: type[BaseModel], path: Sequence[Any]
          ) -> tuple[list[str], type[BaseModel] | None, Any, dict[str, str]]:
    """Follow `path` (a pydantic error location or a dotted key split) from `model`.

    Returns the dotted key parts (tagged-union tags such as 'hf-zero-shot' under label.backend
    dropped), the section holding the last key, that key's annotation (None when the key is not
    a field), and the tags met (dotted union key -> tag). Under a union whose member is not
    named in the path, a key is looked up in every member."""
    parts: list[str] = []
    tags: dict[str, str] = {}
    holder: type[BaseModel] | None = None
    annotation: Any = model
    for raw in path:
        key = str(raw)
        members = _union_members(annotation)
        if key in members:
            annotation, tags[".".join(parts)] = members[key], key
            continue
        parts.append(key)
        section = _as_section(annotation)
        candidates = [section] if section is not None else list(members.values())
        holder = next((c for c in candidates if key in c.model_fields), None)
        if holder is None:
            holder = candidates[0] if len(candidates) == 1 else None
            return parts, holder, None, tags
        annotation = holder.model_fields[key].annotation
    return parts, holder, annotation, tags


def _is_secret(annotation: Any) -> bool:
    if annotation is SecretStr:
        return True
    return any(_is_secret(a) for a in get_args(annotation))


def _describe_error(model: type[BaseModel], error: Mapping[str, Any]) -> str:
    parts, holder, annotation, tags = _walk(model, error["loc"])
    loc = ".".join(parts)
    if error["type"] == "extra_forbidden":
        new = renamed_key(loc)
        if new is not None:
            return f"config key '{loc}' was renamed: use '{new}'" + _backend_option_note(new)
        valid = ", ".join(sorted(holder.model_fields)) if holder is not None else ""
        return f"unknown config key '{loc}'" + (f" (valid here: {valid})" if valid else "")
    if error["type"] == "missing":
        chosen = " and ".join(f"{k}={v}" for k, v in tags.items())
        return f"{loc} is required" + (f" with {chosen}" if chosen else "")
    message = str(error["msg"]).removeprefix("Value error, ")
    value = error.get("input")
    if _is_secret(annotation):
        return f"{loc}: {message} (got {REDACTED})"
    if isinstance(value, (str, int, float, bool)) or value is None:
        return f"{loc}: {message} (got {redact(value)!r})"
    return f"{loc}: {message}"  # a whole section: its values are not echoed


def _backend_option_note(key: str) -> str:
    """For a grounding option: which backends take it (an option of one backend only is
    rejected while another one is chosen)."""
    if not key.startswith("label.backend.") or key.count(".") != 2:
        return ""
    option = key.rsplit(".", 1)[1]
    takers = sorted(name for name, cls in GROUNDING_BACKENDS.items() if option in cls.model_fields)
    return f" (an option of the {', '.join(takers)} backend{'s' if len(takers) > 1 else ''})" \
        if takers and len(takers) < len(GROUNDING_BACKENDS) else ""


def _shown_override(model: type[BaseModel], text: str) -> str:
    """How an override is quoted in an error: its value only for a known, non-secret key."""
    key = text.split("=", 1)[0].strip()
    _, _, annotation, _ = _walk(model, key.split("."))
    if annotation is None or _is_secret(annotation):
        return f"--set {key}={REDACTED}"
    return f"--set {key}={redact_url(text.split('=', 1)[1])}" if "=" in text else f"--set {text}"


def describe(model: type[BaseModel], err: ValidationError, sources: str) -> ConfigError:
    """A config error for people: each problem on a line, keys dotted, old keys renamed, values
    of unknown or secret keys never echoed."""
    lines = [_describe_error(model, e) for e in err.errors()]
    return ConfigError(f"invalid configuration from {sources}:\n  " + "\n  ".join(lines))


def load_config(files: Sequence[str | Path] = (), overrides: Sequence[str] = (), *,
                model: type[Section] = DemoJob, **explicit: Any) -> Any:
    """Merge YAML files (in order), then `--set` overrides, then explicit CLI values (non-None;
    `a__b=v` sets a.b), and validate them as `model` (default: the demo's, which holds every data
    stage's section).

    Files and overrides may hold the sections of every command (one project file, one list of
    settings for every command): all of them are checked, and the command keeps its own.
    `status` checks only its own (root, storage)."""
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
    checked: type[BaseModel] = model if model is StatusJob else ProjectConfig
    own = {k: v for k, v in tree.items() if k in model.model_fields
           or k not in ProjectConfig.model_fields}  # unknown top-level keys stay: an error
    try:
        if checked is ProjectConfig:
            ProjectConfig.model_validate(tree)
        checked = model
        return model.model_validate(own)
    except ValidationError as err:
        shown = [_shown_override(checked, o) for o in overrides]
        flags = [f"command-line option for {k.replace('__', '.')}={v!r}"
                 for k, v in explicit.items() if v is not None]
        sources = ", ".join([str(f) for f in files] + shown + flags) or "defaults"
        raise describe(checked, err, sources) from None
