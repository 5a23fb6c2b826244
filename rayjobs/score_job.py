"""`partlift score`: trained models over every rendered asset of a root, as one Ray Data stream.

    load views and points (CPU tasks) -> ScoreActor pool (backbone + correspondence model +
    CAST, loaded once per actor; a GPU each on a GPU cluster) -> write tasks (one shard set per
    task) -> <root>/scores/<name>/{masks,points}/ ; then, given --query ASSET:FUNCTION, the
    collection ranked by functional descriptor (streamed over the table's files) with a picture

    <root>/scores/<name>/points/   asset x function: point_index, xyz, score, score_mask,
                                   score_cast, n_views_seen, embedding (N, D) float16,
                                   descriptor (D,) (the commit table)
    <root>/scores/<name>/masks/    asset x view x function: the functional-part mask on the
                                   pixel lattice (score.mask_stride)
    <root>/scores/<name>/queries/<asset>-<function>.{md,parquet,png}

Resume is per asset and settings-aware (the models' checkpoints are in the fingerprint: other
models under the same name are refused); failed assets go to errors/ (stage score/<name>).
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from operators.settings import ConfigError
from operators.store.integrity import stage_settings
from operators.store.storage import (RunRoot, concatenated, make_table, rows_to_columns,
                                     shard_name, table_columns)
from operators.store.commits import read_output
from operators.store.readers import TableReader
from operators.store.tables import FEATURE_BLOCKS, LIFT_OUTPUT, StageOutput, Table
from rayjobs.config import ScoreJob, StepResources
from rayjobs.driver import (AssetErrors, JobContext, Plan, StageReport, TaskContext, map_actors,
                            map_tasks, run_stage)
from rayjobs.streams import RenderedAssetsStage, read_rendered

POINT_COLUMNS = ("point_index", "xyz", "score", "score_mask", "score_cast", "n_views_seen",
                 "embedding", "descriptor")


def score_name(config: ScoreJob) -> str:
    if config.score.name:
        return config.score.name
    return "+".join(ref.split("/")[-1] for ref in config.score.models) or "scores"


def score_output(name: str) -> StageOutput:
    """The tables of one named scoring (declared here, not in the root's fixed table list: a
    root holds any number of them)."""
    base = f"scores/{name}"
    return StageOutput(f"score/{name}", (
        Table(f"{base}/masks", ("asset_id", "view_id", "function"), ("mask",)),
        Table(f"{base}/points", ("asset_id", "function"), POINT_COLUMNS)),
        record_dir=base, upstream="render")


@dataclass(frozen=True)
class Models:
    """The references split by kind, each checked loadable (the driver loads them once to
    check; every actor loads them again)."""

    correspondence: str
    cast: str | None
    steps: dict[str, int]
    functions: list[str]
    n_blocks: int               # backbone blocks the correspondence model reads


def check_backbone(root: RunRoot, config: ScoreJob) -> None:
    """The model reads blocks of the backbone the root's features were made with (what it was
    trained on): another `lift.backbone` is refused, naming the keys."""
    made_with = stage_settings(root, LIFT_OUTPUT) or {}
    asked = config.lift.fingerprint()
    differ = sorted(k for k in made_with if k.startswith("lift.backbone")
                    and k in asked and made_with[k] != asked[k])
    if differ:
        raise ConfigError("score: the root's features/ (what the correspondence model was "
                          "trained on) were made with " + ", ".join(
                              f"{k}={made_with[k]!r}" for k in differ)
                          + "; give the same lift.* settings (the lift config you used)")


def resolve_models(root: RunRoot, config: ScoreJob) -> Models:
    from training.cmat import TrainedCast
    from training.runs import TrainedModel, load_model
    from training.scoring import model_functions
    cfg = config.score
    if not cfg.models:
        raise ConfigError("score: give the models (--model train/NAME [--model finetune/NAME]): "
                          "a correspondence run, and optionally a CAST run")
    correspondence = cast = None
    steps: dict[str, int] = {}
    for ref in cfg.models:
        loaded = load_model(root, ref, cfg.checkpoint_ref())
        steps[ref] = loaded.step
        if isinstance(loaded, TrainedModel):
            if correspondence is not None:
                raise ConfigError(f"score: two correspondence models ({correspondence[0]}, {ref})")
            correspondence = (ref, loaded)
        elif isinstance(loaded, TrainedCast):
            if cast is not None:
                raise ConfigError(f"score: two CAST models ({cast}, {ref})")
            cast = ref
        else:
            raise ConfigError(f"score: {ref} is a pretrained point encoder; score with a "
                              "correspondence run (train/NAME) and a CAST run (finetune/NAME)")
    if correspondence is None:
        raise ConfigError("score: a correspondence model is required (--model train/NAME): it "
                          "makes the embeddings and masks")
    functions = model_functions(correspondence[1], cfg.functions)
    return Models(correspondence[0], cast, steps, functions,
                  int(correspondence[1].model.block_logits.numel()))


class ScoreActor:
    """Actor: loads the backbone and the models once, then scores each asset of a batch."""

    def __init__(self, config: ScoreJob, models: Models, task: TaskContext, stage: str,
                 cached: dict[str, str]):
        from operators.models.backbones import load_backbone
        from operators.models.loading import resolve_device, resolve_dtype
        from training.runs import load_model
        from training.scoring import AssetScorer
        self.task, self.stage, self.models = task, stage, models
        cfg = config.score
        root = task.root()
        checkpoint = cfg.checkpoint_ref()
        options = config.lift.backbone
        device = resolve_device(options.device)
        correspondence = load_model(root, models.correspondence, checkpoint)
        cast = load_model(root, models.cast, checkpoint) if models.cast else None
        # the backbone only when some asset has no cached blocks (loading it costs seconds)
        backbone = None if cfg.features == "cache" else load_backbone(
            options.name, options.model_path, device=device,
            dtype=resolve_dtype(options.dtype, device), stride=options.stride, n_last_blocks=1,
            allow_download=options.allow_download)
        self.cached = TableReader(root, FEATURE_BLOCKS, index=cached)
        self.features = cfg.features
        self.scorer = AssetScorer(correspondence, cast, backbone, n_points=cfg.n_points,
                                  mask_stride=cfg.mask_stride,
                                  visibility_tol=(config.lift.visibility_rel_tol,
                                                  config.lift.visibility_abs_tol),
                                  device=str(device))
        self.seed = cfg.seed

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        errors = AssetErrors(self.stage, self.task)
        ids = [str(a) for a in batch["asset_id"]]

        def score(i: int) -> list[Any]:
            views = {k: batch[k][i] for k in ("rgb", "depth", "mask", "K", "cam_to_world")}
            grids = None
            if ids[i] in self.cached:   # variant 0: the render's own background
                arrays = self.cached.arrays(ids[i], ["variant", "blocks"])
                grids = arrays["blocks"][arrays["variant"] == 0]
            elif self.features == "cache":
                raise ValueError("score.features=cache: features/blocks holds no blocks of this "
                                 "asset's current render (run `partlift lift` with "
                                 "lift.cache_blocks > 0)")
            return self.scorer.score(ids[i], views, batch["xyz"][i], self.models.functions,
                                     self.seed, grids)

        done = dict(errors.attempt(range(len(ids)), score, asset_of=ids.__getitem__))
        errors.write()
        # one row per asset: its functions' arrays stacked (F, ...)
        rows = []
        for i, results in done.items():
            rows.append({
                "asset_id": ids[i], "render_commit": str(batch["render_commit"][i]),
                "functions": "\n".join(r.function for r in results),
                **{column: np.stack([getattr(r, column) for r in results])
                   for column in POINT_COLUMNS},
                "masks": np.stack([r.masks for r in results]) if results[0].masks is not None
                else np.zeros((0, 0, 0, 0), bool)})
        return rows_to_columns(rows) if rows else {}


def score_write_batch(batch: dict[str, Any], task: TaskContext, output: StageOutput
                      ) -> dict[str, list]:
    """CPU task: one shard set of masks and points (the commit table) for a batch of assets."""
    ids = [str(a) for a in batch["asset_id"]]
    points: dict[str, list] = defaultdict(list)
    masks: dict[str, list] = defaultdict(list)
    for i, asset in enumerate(ids):
        functions = str(batch["functions"][i]).split("\n")
        for f, function in enumerate(functions):
            points["asset_id"].append(asset)
            points["function"].append(function)
            for column in POINT_COLUMNS:
                points[column].append(np.asarray(batch[column][i][f])[None])
            per_view = batch["masks"][i]
            if per_view.size:
                n_views = per_view.shape[1]
                masks["asset_id"] += [asset] * n_views
                masks["view_id"].append(np.arange(n_views, dtype=np.int32))
                masks["function"] += [function] * n_views
                masks["mask"].append(np.asarray(per_view[f], bool))
    shard = shard_name(ids)
    tables = {}
    if masks:
        tables[output.tables[0].name] = make_table(concatenated(masks))
    tables[output.commit.name] = make_table(concatenated(points))
    task.commit(output, shard, tables, assets=ids,
                upstream={a: str(c) for a, c in zip(ids, batch["render_commit"], strict=True)})
    return rows_to_columns([{"asset_id": a, "status": "ok"} for a in ids])


class ScoreStage(RenderedAssetsStage):
    id_prefix = "score"

    def __init__(self, config: ScoreJob, models: Models) -> None:
        self.score_name = score_name(config)
        self.name = f"score/{self.score_name}"
        self.output = score_output(self.score_name)
        self.outputs = (self.output,)
        self.models = models
        self.cached: dict[str, str] = {}

    def check(self, config: ScoreJob) -> None:
        config.lift.backbone.check_available()

    def plan(self, ctx: JobContext, source: Any) -> Plan:
        """The assets left, and which of them have cached blocks of their current render (asset
        -> features/blocks shard; sorted by shard, as the items are)."""
        plan = super().plan(ctx, source)
        self.cached = {}
        config: ScoreJob = ctx.config  # type: ignore[assignment]
        made = stage_settings(ctx.root, LIFT_OUTPUT) or {}
        if config.score.features == "backbone" or \
                int(made.get("lift.cache_blocks", 0)) < self.models.n_blocks:
            return plan
        holding = read_output(ctx.root, LIFT_OUTPUT).holding(FEATURE_BLOCKS.name)
        for item in plan.items:
            commit = holding.get(item["asset_id"])
            if commit is not None and commit.upstream.get(item["asset_id"]) == \
                    item["render_commit"]:
                self.cached[item["asset_id"]] = commit.shard
        if config.score.features == "cache" and len(self.cached) < len(plan.items):
            print(f"note: {len(plan.items) - len(self.cached)} assets have no cached blocks of "
                  "their current render: they fail (score.features=cache)")
        return plan

    def settings(self, config: ScoreJob) -> dict[str, dict[str, Any]]:
        return {self.output.stage: {
            **config.score.fingerprint(), "score.functions": self.models.functions,
            "score.model_steps": self.models.steps,
            **{k: v for k, v in config.lift.fingerprint().items()
               if k.startswith("lift.backbone") or k.startswith("lift.visibility")}}}

    def load_resources(self, config: ScoreJob) -> StepResources:
        return config.score.resources.load

    def add_steps(self, ds: ray.data.Dataset, ctx: JobContext,
                  forward: bool = False) -> ray.data.Dataset:
        config: ScoreJob = ctx.config  # type: ignore[assignment]
        model = config.score.resources.model
        if model.concurrency is None:   # the pool from the cluster: a GPU each, else half the CPUs
            resources = ray.cluster_resources()
            gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 1))
            size = gpus if gpus and model.num_gpus != 0 else max(1, int(cpus // (2 * model.num_cpus)))
            model = model.model_copy(update={"concurrency": size})
        ds = map_actors(ds, ScoreActor, model, config=config, models=self.models, task=ctx.task,
                        stage=self.name, cached=self.cached)
        return map_tasks(ds, score_write_batch, config.score.resources.write, task=ctx.task,
                         output=self.output)

    def inputs(self, ctx: JobContext) -> dict[str, str]:
        return {**super().inputs(ctx), "models": ", ".join(
            f"{ref} (step {step})" for ref, step in self.models.steps.items()),
            "functions": ", ".join(self.models.functions)}

    def units(self, ctx: JobContext, plan: Plan, ok: int) -> dict[str, int]:
        return {"asset x function rows": ok * len(self.models.functions)}


# ------------------------------------------------------------------------------- query


@dataclass(frozen=True)
class QueryReport:
    query: tuple[str, str]
    matches: list[Any]
    table: str
    where: str


def descriptor_batches(root: RunRoot, output: StageOutput
                       ) -> Iterator[tuple[list[str], list[str], np.ndarray]]:
    """(asset ids, functions, descriptors) per committed shard of the points table, three
    columns read: the driver never holds the collection."""
    committed = {c.shard for c in read_output(root, output).holding(output.commit.name).values()}
    for shard in sorted(committed):
        data = table_columns(root.read_shard(output.commit.name, shard,
                                             ["asset_id", "function", "descriptor"]))
        yield ([str(a) for a in data["asset_id"]], [str(f) for f in data["function"]],
               data["descriptor"])


def function_row(reader: Any, asset: str, function: str) -> dict[str, np.ndarray] | None:
    """One (asset, function) row of the points table as arrays (None when absent)."""
    if asset not in reader:
        return None
    arrays = reader.arrays(asset)
    where = [i for i, f in enumerate(arrays["function"]) if str(f) == function]
    return {k: v[where[0]] for k, v in arrays.items()} if where else None


def run_query(root: RunRoot, config: ScoreJob) -> QueryReport:
    """Rank the scored collection by similarity to the query's functional part: the top-k
    assets of the same function, with each match's point correspondences to the query, as
    markdown, Parquet and a picture."""
    from training.scoring import point_matches, top_matches
    name = score_name(config)
    output = score_output(name)
    asset, function = str(config.score.query).split(":")
    reader = TableReader(root, output.commit)
    query = function_row(reader, asset, function)
    if query is None:
        held = (sorted({str(f) for f in reader.arrays(asset, ["function"])["function"]})
                if asset in reader else [])
        raise ConfigError(f"score.query={config.score.query}: scores/{name}/ holds no row for "
                          f"asset {asset} and function {function}"
                          + (f" (its functions: {', '.join(held)})" if held else
                             " (the asset is not scored)"))
    matches = top_matches(descriptor_batches(root, output), query["descriptor"],
                          config.score.top_k, exclude=(asset, function), function=function)
    lines = [f"query: {asset} {function}", "",
             "| rank | asset | similarity | mean point similarity |", "|---|---|---|---|"]
    records = []
    for rank, match in enumerate(matches, 1):
        target = function_row(reader, match.asset_id, function)
        assert target is not None   # the match came from this table
        q_idx, t_idx, sim = point_matches(query["embedding"], query["score"],
                                          target["embedding"], 16)
        lines.append(f"| {rank} | {match.asset_id} | {match.similarity:.3f} | "
                     f"{float(sim.mean()):.3f} |")
        records.append({"rank": rank, "asset_id": match.asset_id, "function": function,
                        "similarity": match.similarity,
                        "query_points": query["point_index"][q_idx].astype(np.int32).tolist(),
                        "target_points": target["point_index"][t_idx].astype(np.int32).tolist(),
                        "point_similarity": sim.astype(np.float32).tolist()})
    base = f"{output.record_dir}/queries/{asset}-{function}"
    table = "\n".join(lines) + "\n"
    root.write_bytes(f"{base}.md", table.encode())
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records) if records else pa.table({}), buffer)
    root.write_bytes(f"{base}.parquet", buffer.getvalue())
    if records:
        root.write_bytes(f"{base}.png", query_picture(root, reader, asset, function,
                                                      records[:3]))
    return QueryReport((asset, function), matches, table, root.display(base))


def query_picture(root: RunRoot, reader: Any, asset: str, function: str,
                  records: list[dict[str, Any]]) -> bytes:
    """PNG: the query asset's per-point scores, then each best match's, seen from each asset's
    first render camera (blue 0 -> red 1)."""
    from operators.store.readers import RootReader
    from rayjobs.demo import _grid_png, _points_picture, _score_colors
    views_of = RootReader(root)

    def picture(asset_id: str) -> tuple[np.ndarray, np.ndarray]:
        row = function_row(reader, asset_id, function)
        assert row is not None
        views = views_of.views(asset_id, ["rgb", "depth", "K", "cam_to_world"])
        camera = (views["K"][0], views["cam_to_world"][0], views["depth"][0])
        return views["rgb"][0], _points_picture(row["xyz"], _score_colors(row["score"]),
                                                *camera, row["score"])

    rgb, scores = picture(asset)
    rows = [(f"query {asset} ({function})", [rgb, scores])]
    for record in records:
        rgb, scores = picture(record["asset_id"])
        rows.append((f"#{record['rank']} {record['asset_id']} {record['similarity']:.2f}",
                     [rgb, scores]))
    return _grid_png(rows)


# ------------------------------------------------------------------------------- entry


def run_score(config: ScoreJob) -> tuple[StageReport, QueryReport | None]:
    """Score every rendered asset the named scores do not hold; then the query, if given."""
    root = RunRoot(config.root, config.storage.options())
    root.check_reachable(create=bool(config.assets.input))
    check_backbone(root, config)
    models = resolve_models(root, config)
    stage = ScoreStage(config, models)
    if config.assets.input:   # a directory or bucket of meshes: into the manifest first
        from rayjobs.assets_job import run_assets_scan
        run_assets_scan(config.model_copy(update={"job": config.job.model_copy(
            update={"overwrite": False})}))
    source = read_rendered(root)
    unrendered = len({r["asset_id"] for r in source.manifest} - source.render.by_asset.keys())
    if unrendered and config.score.render:
        # a render step first, never with --overwrite (that redoes the scores only), then the
        # scoring stream reads the views back (and the cached blocks where they exist)
        from rayjobs.render_job import run_render
        print(f"score: {unrendered} assets of the manifest are not rendered: rendering them "
              "first (render.* settings; score.render=false to score only rendered assets)")
        run_render(config.model_copy(update={"job": config.job.model_copy(
            update={"overwrite": False})}))
    report = run_stage(config, stage)
    query = None
    if config.score.query:
        query = run_query(root, config)
        print(f"\nquery {config.score.query}: the {len(query.matches)} most similar assets "
              f"({query.where}.md, .parquet, .png)\n\n{query.table}")
    return report, query
