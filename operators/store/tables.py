"""The data contract: every table a run root holds, its keys and columns, and which stage writes
it (DESIGN §3). Jobs write these tables, trainers and the scorer read them, `partlift status`
lists them; all of them take the names from here. A table added later is one `table(...)` here
(and one `StageOutput` when a new stage writes it).

A stage writes one shard set per batch: a shard in each of its tables under the same name, then
a commit record (`operators.store.commits`).
"""

from __future__ import annotations

from dataclasses import dataclass

JOB_RECORD = "_job.json"
MESH_DIR = "meshes/procedural"  # procedural meshes, inside the root (recorded relative to it)


@dataclass(frozen=True)
class Table:
    """One table: `<root>/<name>/part-*.parquet`, one row per `keys`, promising `columns`."""

    name: str
    keys: tuple[str, ...]
    columns: tuple[str, ...]

    @property
    def all_columns(self) -> tuple[str, ...]:
        return self.keys + self.columns


TABLES: dict[str, Table] = {}  # every table of a run root, by name, in declaration order


def table(name: str, keys: tuple[str, ...], columns: tuple[str, ...]) -> Table:
    """Declare a table (the one place a table is named)."""
    if name in TABLES:
        raise ValueError(f"table {name} is declared twice")
    TABLES[name] = Table(name, keys, columns)
    return TABLES[name]


# The manifest: mesh URI, category, functions, bbox, vertex and face counts, source; procedural
# assets add part names, functions, frames and per-face parts.
ASSETS = table("assets", ("asset_id",),
               ("uri", "category", "functions", "bbox", "n_vertices", "n_faces", "source",
                "source_key", "up_axis", "part_names", "part_functions", "part_frames",
                "face_part"))
# Rendered views: rgb, depth (0 = background), mask, face ids, K, OpenCV cam_to_world, normals.
VIEWS = table("views", ("asset_id", "view_id"),
              ("rgb", "depth", "mask", "face_id", "K", "cam_to_world", "normal"))
# Surface samples per asset at a fixed N (part = procedural part index, -1 else).
POINTS = table("points", ("asset_id",), ("xyz", "normal", "face_id", "part"))
# Pseudo-labels: boxes of every prompt, view and trial; 3D-aggregated per-view masks; per-point
# scores 0-1.
LABEL_BOXES = table("labels/boxes", ("asset_id", "view_id", "function", "part", "trial"),
                    ("boxes", "scores"))
LABEL_MASKS = table("labels/masks", ("asset_id", "view_id", "function", "part"), ("mask",))
LABEL_POINTS = table("labels/points", ("asset_id", "function", "part"), ("score",))
# Lifted features: the per-view patch grids (the training cache) and per-point features.
FEATURE_VIEWS = table("features/views", ("asset_id", "view_id"), ("features",))
# The correspondence trainer's cache: the last lift.cache_blocks blocks before the final
# LayerNorm, (n_blocks, h, w, D) float16 per view and background variant (0 = as rendered;
# DFC §4.2).
FEATURE_BLOCKS = table("features/blocks", ("asset_id", "view_id", "variant"), ("blocks",))
FEATURE_POINTS = table("features/points", ("asset_id",),
                       ("point_index", "xyz", "features", "n_views_seen"))
# Row-level failures of every job.
ERRORS = table("errors", ("stage", "job_id", "asset_id", "view_id"),
               ("error_type", "message", "time"))

# Per-view arrays a downstream stage reads (normals stay in the table only).
VIEW_ARRAYS = ("rgb", "depth", "mask", "face_id", "K", "cam_to_world")


@dataclass(frozen=True)
class StageOutput:
    """The tables one stage writes, in write order (the last is its commit table), where its
    records live (`_job.json`, settings, commit records), and the stage whose output it is made
    from (lineage)."""

    stage: str
    tables: tuple[Table, ...]
    record_dir: str
    upstream: str | None = None

    @property
    def commit(self) -> Table:
        return self.tables[-1]

    @property
    def record(self) -> str:
        return f"{self.record_dir}/{JOB_RECORD}"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tables)


ASSETS_OUTPUT = StageOutput("assets", (ASSETS,), record_dir="assets")
RENDER_OUTPUT = StageOutput("render", (VIEWS, POINTS), record_dir="views")
LABEL_OUTPUT = StageOutput("label", (LABEL_BOXES, LABEL_MASKS, LABEL_POINTS), record_dir="labels",
                           upstream="render")
LIFT_OUTPUT = StageOutput("lift", (FEATURE_VIEWS, FEATURE_BLOCKS, FEATURE_POINTS),
                          record_dir="features",
                          upstream="render")
STAGE_OUTPUTS: dict[str, StageOutput] = {o.stage: o for o in (ASSETS_OUTPUT, RENDER_OUTPUT,
                                                              LABEL_OUTPUT, LIFT_OUTPUT)}
