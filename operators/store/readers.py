"""Readers of a run root's tables, per asset: what the jobs, the demo, `status` and the trainers
read through.

- `shard_index(root, table)`: asset_id -> the shard that holds it (reads the key column only);
- `read_manifest(root, columns)`: the `assets/` rows as dicts;
- `TableReader`: the rows of one asset from one table, as an Arrow table or numpy arrays
  (tensor columns stacked), sorted by the table's keys; it keeps the last few shards it read,
  so reading the assets of one shard one after another reads the shard once;
- `RootReader`: the per-asset views, points, labels and features of a whole root.

A shard that cannot be read raises `ShardReadError` naming the table and the shard.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators.store.commits import read_output
from operators.store.storage import RunRoot, current_encoding, table_columns
from operators.store.tables import (ASSETS, ASSETS_OUTPUT, FEATURE_BLOCKS, FEATURE_POINTS,
                                    FEATURE_VIEWS, LABEL_MASKS, LABEL_POINTS, POINTS, STAGE_OUTPUTS, VIEW_ARRAYS,
                                    VIEWS, StageOutput, Table, TABLES)


class ShardReadError(OSError):
    """A shard of a table cannot be read (missing, truncated, not Parquet)."""


class AssetNotFoundError(KeyError):
    """The table holds no rows of this asset."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence
        return str(self.args[0])


def output_of(table: Table | str) -> StageOutput | None:
    """The stage output a table belongs to (None for errors/)."""
    name = table.name if isinstance(table, Table) else table
    return next((o for o in STAGE_OUTPUTS.values() if name in o.names), None)


def shard_index(root: RunRoot, table: Table | str) -> dict[str, str]:
    """asset_id -> the committed shard of `table` that holds it, from the commit records (no
    shard is opened; an asset in two shards, in roots from before leases, maps to the last)."""
    output = output_of(table)
    name = table.name if isinstance(table, Table) else table
    if output is not None:
        return {asset: commit.shard
                for asset, commit in read_output(root, output).holding(name).items()}
    index: dict[str, str] = {}
    for shard in root.list_shards(name):
        for asset_id in dict.fromkeys(_read(root, name, shard, ["asset_id"])["asset_id"].to_pylist()):
            index[asset_id] = shard
    return index


def read_manifest(root: RunRoot, columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The manifest rows (all columns, or `columns` plus asset_id) of its committed shards, one
    dict per asset; [] when the root has no manifest."""
    wanted = None if columns is None else list(dict.fromkeys(["asset_id", *columns]))
    commits = read_output(root, ASSETS_OUTPUT).commits
    rows: dict[str, dict[str, Any]] = {}
    for shard in sorted(commits):
        for row in _read(root, ASSETS.name, shard, wanted).to_pylist():
            rows[row["asset_id"]] = row  # one row per asset, whatever an old root holds
    return list(rows.values())


def read_arrays(root: RunRoot | str, table: Table | str, columns: Sequence[str] | None = None,
                asset_ids: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """A table (its committed shards; only the rows of `asset_ids` when given) as numpy: tensor
    columns stacked and shaped (views' rgb: (n, H, W, 3)), other columns 1-D. For tables of
    modest size; per asset, `TableReader`/`RootReader` read one shard at a time."""
    root = RunRoot(root) if isinstance(root, str) else root
    spec = table if isinstance(table, Table) else TABLES[table]
    index = shard_index(root, spec)
    wanted = set(index) if asset_ids is None else set(asset_ids)
    names = None if columns is None else list(dict.fromkeys([*spec.keys, *columns]))
    by_shard: dict[str, list[str]] = {}
    for asset in sorted(wanted & set(index)):
        by_shard.setdefault(index[asset], []).append(asset)
    parts = []
    for shard, assets in sorted(by_shard.items()):  # each asset from the one shard it maps to
        data = current_encoding(_read(root, spec.name, shard, names))  # a migrated root mixes
        parts.append(data.filter(pc.is_in(data["asset_id"], pa.array(assets))))
    if not parts:
        return {}
    data = pa.concat_tables(parts).sort_by([(k, "ascending") for k in spec.keys])
    return table_columns(data, names)


def _read(root: RunRoot, table: str, shard: str, columns: Sequence[str] | None) -> pa.Table:
    try:
        return root.read_shard(table, shard, None if columns is None else list(columns))
    except (OSError, pa.ArrowException) as err:
        raise ShardReadError(f"{root.display(table, shard)}.parquet: cannot read it "
                             f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                             ) from err


class TableReader:
    """Per-asset rows of one table. `index` (asset_id -> shard) defaults to `shard_index`, read
    on first use; `cache_shards` shards stay in memory (whole shards, the requested columns)."""

    def __init__(self, root: RunRoot, table: Table, index: Mapping[str, str] | None = None,
                 cache_shards: int = 2) -> None:
        self.root, self.table = root, table
        self._index = dict(index) if index is not None else None
        self._cache: OrderedDict[tuple[str, tuple[str, ...] | None], pa.Table] = OrderedDict()
        self._cache_shards = max(1, cache_shards)

    @property
    def index(self) -> dict[str, str]:
        if self._index is None:
            self._index = shard_index(self.root, self.table)
        return self._index

    def __contains__(self, asset_id: str) -> bool:
        return asset_id in self.index

    def shard_of(self, asset_id: str) -> str:
        try:
            return self.index[asset_id]
        except KeyError:
            raise AssetNotFoundError(f"{self.root.display(self.table.name)}/ holds no rows of asset "
                                     f"{asset_id}") from None

    def _shard(self, shard: str, columns: tuple[str, ...] | None) -> pa.Table:
        key = (shard, columns)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        data = _read(self.root, self.table.name, shard, columns)
        self._cache[key] = data
        while len(self._cache) > self._cache_shards:
            self._cache.popitem(last=False)
        return data

    def rows(self, asset_id: str, columns: Sequence[str] | None = None) -> pa.Table:
        """The asset's rows (keys + `columns`, default all), sorted by the table's keys."""
        wanted = None if columns is None else tuple(dict.fromkeys([*self.table.keys, *columns]))
        data = self._shard(self.shard_of(asset_id), wanted)
        rows = data.filter(pc.equal(data["asset_id"], asset_id))
        sort_keys = [(k, "ascending") for k in self.table.keys if k != "asset_id"]
        return rows.sort_by(sort_keys) if sort_keys else rows

    def arrays(self, asset_id: str, columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """`rows` as numpy: tensor columns stacked (n, ...), others 1-D."""
        rows = self.rows(asset_id, columns)
        return table_columns(rows, list(columns) if columns is not None else None)


class RootReader:
    """Per-asset reads across the tables of one run root (one `TableReader` per table, created
    on first use)."""

    def __init__(self, root: RunRoot) -> None:
        self.root = root
        self._readers: dict[str, TableReader] = {}

    def table(self, table: Table) -> TableReader:
        if table.name not in self._readers:
            self._readers[table.name] = TableReader(self.root, table)
        return self._readers[table.name]

    def manifest(self, columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
        return read_manifest(self.root, columns)

    def views(self, asset_id: str, columns: Sequence[str] = VIEW_ARRAYS) -> dict[str, np.ndarray]:
        """The asset's views stacked (V, ...) in view_id order, plus `view_id`."""
        return self.table(VIEWS).arrays(asset_id, ["view_id", *columns])

    def points(self, asset_id: str, columns: Sequence[str] = ("xyz",)) -> dict[str, np.ndarray]:
        """The asset's surface samples: each column's one row, e.g. xyz (N, 3)."""
        arrays = self.table(POINTS).arrays(asset_id, columns)
        return {name: values[0] for name, values in arrays.items()}

    def label_scores(self, asset_id: str) -> dict[str, np.ndarray]:
        """function (P,), part (P,) and score (P, N) float16 of the asset's pseudo-labels."""
        return self.table(LABEL_POINTS).arrays(asset_id, ["function", "part", "score"])

    def label_masks(self, asset_id: str, function: str, part: str) -> dict[str, np.ndarray]:
        """view_id (V,) and mask (V, H, W) of one (function, part) pseudo-label."""
        rows = self.table(LABEL_MASKS).rows(asset_id, ["view_id", "mask"])
        rows = rows.filter(pc.and_(pc.equal(rows["function"], function),
                                   pc.equal(rows["part"], part)))
        return table_columns(rows, ["view_id", "mask"])

    def point_features(self, asset_id: str) -> dict[str, np.ndarray]:
        """point_index (n,), xyz (n, 3), features (n, C) float16, n_views_seen (n,)."""
        arrays = self.table(FEATURE_POINTS).arrays(asset_id, FEATURE_POINTS.columns)
        return {name: values[0] for name, values in arrays.items()}

    def view_features(self, asset_id: str) -> np.ndarray:
        """The cached patch grids (V, h, w, C) float16 in view_id order."""
        return self.table(FEATURE_VIEWS).arrays(asset_id, ["features"])["features"]

    def view_blocks(self, asset_id: str, variant: int | None = 0) -> np.ndarray:
        """The cached raw blocks in view_id order: (V, n_blocks, h, w, D) float16 of one
        background variant (0 = as rendered), or (V, K, n_blocks, h, w, D) of all (None)."""
        arrays = self.table(FEATURE_BLOCKS).arrays(asset_id, ["variant", "blocks"])
        n_variants = int(arrays["variant"].max()) + 1 if arrays["variant"].size else 1
        blocks = arrays["blocks"].reshape(-1, n_variants, *arrays["blocks"].shape[1:])
        return blocks if variant is None else blocks[:, variant]
