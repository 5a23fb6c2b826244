"""Run roots on any filesystem: URI resolution, Parquet shards with tensor columns, resume, job records.

A run root is a URI (local directory, `file://`, `s3://bucket/prefix`, or anything fsspec
resolves). Every table is a directory of Parquet shards `<root>/<table>/<shard>.parquet`, one
object per shard, written so a half-written shard is never visible (S3: a single object appears
only when its upload completes; local: write to a temporary name, then rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from operators.store.ids import validate_id

PARQUET_SUFFIX = ".parquet"
# Version of the layout of a run root (tables, records, paths); stored in every shard's Parquet
# metadata, every _job.json and `_partlift.json` (operators.store.integrity says what changed).
FORMAT_VERSION = 2
FORMAT_KEY = b"partlift.format_version"


class StorageError(OSError):
    """The run root cannot be reached or read; the message names the URI (never credentials)."""


@dataclass(frozen=True)
class StorageOptions:
    """Where and how to reach object storage. Unset fields fall back to the standard AWS
    environment (AWS_ENDPOINT_URL, AWS_REGION/AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN). Secrets are excluded from repr."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 30.0
    max_attempts: int = 3


def _endpoint(opts: StorageOptions) -> str | None:
    return opts.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
        "AWS_ENDPOINT_URL")


def _region(opts: StorageOptions) -> str:
    return opts.region or os.environ.get("AWS_REGION") or os.environ.get(
        "AWS_DEFAULT_REGION") or "us-east-1"


def _credentials(opts: StorageOptions) -> tuple[str | None, str | None, str | None]:
    """Key, secret, token from one source: the config, else the environment (never a mix, so a
    configured key is not paired with another identity's session token)."""
    if opts.access_key_id or opts.secret_access_key:
        return opts.access_key_id, opts.secret_access_key, opts.session_token
    return (os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY"),
            os.environ.get("AWS_SESSION_TOKEN"))


def _s3_filesystem(opts: StorageOptions) -> tuple[pafs.S3FileSystem, str | None]:
    endpoint = _endpoint(opts)
    kwargs: dict = dict(
        region=_region(opts),
        connect_timeout=opts.connect_timeout_s,
        request_timeout=opts.request_timeout_s,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=opts.max_attempts),
    )
    key, secret, token = _credentials(opts)
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret)
        if token:
            kwargs["session_token"] = token
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
    return pafs.S3FileSystem(**kwargs), endpoint


def resolve_filesystem(uri: str, opts: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """Map a URI to (pyarrow filesystem, path inside it). Local paths become absolute."""
    opts = opts or StorageOptions()
    if not uri or not uri.strip():
        raise StorageError("an empty path or URI: name a directory, file:///abs/path or "
                           "s3://bucket/prefix")
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"{uri}: a file URI names an absolute path, file:///abs/path "
                               f"(here '{parsed.netloc}' would be a host); for a path relative "
                               "to the current directory, leave out file://")
        return pafs.LocalFileSystem(), os.path.abspath(unquote(parsed.path))
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    if scheme in ("s3", "s3a"):
        if not parsed.netloc:
            raise StorageError(f"{uri}: an S3 URI needs a bucket, e.g. s3://bucket/prefix")
        fs, _ = _s3_filesystem(opts)
        return fs, f"{parsed.netloc}{parsed.path}".rstrip("/")
    try:  # anything else fsspec knows (gcs, abfs, memory, ...)
        import fsspec
        fsspec_fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as err:
        raise StorageError(f"{uri}: no filesystem for scheme '{scheme}': {err}") from err
    return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_fs)), path


def _s3fs(opts: StorageOptions) -> Any:
    """An s3fs filesystem on the same endpoint and credentials as `_s3_filesystem` (s3fs can
    send conditional PUTs, which pyarrow's S3 filesystem cannot)."""
    import s3fs
    endpoint = _endpoint(opts)
    key, secret, token = _credentials(opts)
    client = {"region_name": _region(opts), **({"endpoint_url": endpoint} if endpoint else {})}
    return s3fs.S3FileSystem(key=key, secret=secret, token=token, client_kwargs=client,
                             skip_instance_cache=True)


def describe_endpoint(uri: str, opts: StorageOptions | None) -> str:
    """Human description of where a URI lives, without secrets."""
    if urlparse(uri).scheme.lower() in ("s3", "s3a"):
        endpoint = _endpoint(opts or StorageOptions()) or "AWS default endpoint"
        return f"{uri} (endpoint {endpoint})"
    return uri


def shard_name(ids: Iterable[str]) -> str:
    """Deterministic shard name from the set of ids it holds: the same work gets the same name,
    different work never collides."""
    digest = hashlib.sha1("\n".join(sorted(set(ids))).encode()).hexdigest()[:20]
    return f"part-{digest}"


# Field metadata of a tensor column: {"dtype": "uint8", "shape": [H, W, 3]} (JSON).
TENSOR_KEY = b"partlift.tensor"


def tensor_column(values: np.ndarray) -> tuple[pa.Array, dict[bytes, bytes]]:
    """A fixed-shape tensor column from a stacked array (n, ...): one fixed-size binary value per
    row holding the tensor's bytes (C order, little-endian), with its dtype and shape in the
    field metadata. Parquet writes such a column about ten times faster than Arrow's list-based
    tensor type (no repetition levels per element), in the same number of bytes."""
    values = np.ascontiguousarray(values)
    dtype = "bool" if values.dtype == np.bool_ else values.dtype.newbyteorder("<").str[1:]
    data = values.astype(values.dtype.newbyteorder("<"), copy=False).view(np.uint8)
    width = int(np.prod(values.shape[1:], dtype=np.int64)) * values.dtype.itemsize
    array = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(values),
                                                 [None, pa.py_buffer(data)])
    meta = json.dumps({"dtype": dtype, "shape": list(values.shape[1:])}).encode()
    return array, {TENSOR_KEY: meta}


def is_tensor_field(field: pa.Field) -> bool:
    return bool(field.metadata and TENSOR_KEY in field.metadata) or isinstance(
        field.type, pa.FixedShapeTensorType)


def make_table(columns: Mapping[str, np.ndarray | Sequence]) -> pa.Table:
    """Build a table: arrays with ndim >= 2 become tensor columns (one tensor per row, see
    `tensor_column`), 1-D arrays and lists plain columns."""
    arrays, fields = [], []
    for name, values in columns.items():
        if isinstance(values, np.ndarray) and values.ndim >= 2:
            array, meta = tensor_column(values)
            fields.append(pa.field(name, array.type, metadata=meta))
        else:
            array = pa.array(values)
            fields.append(pa.field(name, array.type))
        arrays.append(array)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def rows_to_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Row dicts -> columns (a Ray Data batch, or `make_table`'s input); {} for no rows."""
    return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


def concatenated(parts: Mapping[str, Sequence]) -> dict[str, np.ndarray | Sequence]:
    """Columns collected in parts (per asset): lists of arrays are concatenated along the rows,
    lists of plain values stay as they are. Feed the result to `make_table`."""
    return {k: (np.concatenate(v) if isinstance(v, list) and v and isinstance(v[0], np.ndarray)
                else v) for k, v in parts.items()}


def column_to_numpy(column: pa.ChunkedArray | pa.Array, field: pa.Field | None = None) -> np.ndarray:
    """Stack a column back to numpy: tensor columns -> (n, ...) arrays (bool restored when the
    field is tagged), other columns -> 1-D arrays (object arrays for lists)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    if field is not None and field.metadata and TENSOR_KEY in field.metadata:
        spec = json.loads(field.metadata[TENSOR_KEY])
        dtype = np.dtype(np.bool_) if spec["dtype"] == "bool" else np.dtype("<" + spec["dtype"])
        width = column.type.byte_width
        raw = np.frombuffer(column.buffers()[1], dtype=np.uint8,
                            count=len(column) * width, offset=column.offset * width)
        return raw.view(dtype).reshape(len(column), *spec["shape"])  # zero-copy (read-only)
    if isinstance(column.type, pa.FixedShapeTensorType):  # shards written before (format 1)
        values = column.to_numpy_ndarray()
        if field is not None and field.metadata and field.metadata.get(b"partlift.bool_tensor"):
            values = values.astype(np.bool_)
        return values
    return column.to_numpy(zero_copy_only=False)


def current_encoding(table: pa.Table) -> pa.Table:
    """`table` with tensor columns of roots of format 1 (Arrow's fixed-shape tensor type)
    re-encoded as `tensor_column` does, so shards of a migrated root written before and after
    the change concatenate (a no-op for current shards)."""
    for i, spec in enumerate(table.schema):
        if isinstance(spec.type, pa.FixedShapeTensorType):
            array, meta = tensor_column(column_to_numpy(table.column(i), spec))
            table = table.set_column(i, pa.field(spec.name, array.type, metadata=meta), array)
    return table


def table_columns(table: pa.Table, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The named (default: all) columns of a table as numpy arrays."""
    names = list(names) if names is not None else table.column_names
    return {n: column_to_numpy(table.column(n), table.schema.field(n)) for n in names}


class RunRoot:
    """A run root: tables of Parquet shards, JSON records and raw files under one URI."""

    def __init__(self, uri: str, options: StorageOptions | None = None) -> None:
        self.options = options or StorageOptions()
        self.fs, self.base = resolve_filesystem(uri, self.options)
        # Local roots are kept absolute: URIs recorded in tables must work from any directory.
        self.uri = self.base if isinstance(self.fs, pafs.LocalFileSystem) else uri.rstrip("/")

    def __repr__(self) -> str:
        return f"RunRoot({self.uri!r})"

    def __reduce__(self):  # rebuild on Ray workers from the URI; filesystems re-resolve there
        return (RunRoot, (self.uri, self.options))

    # -- paths -----------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.base, *[p.strip("/") for p in parts if p]])

    def display(self, *parts: str) -> str:
        """Where a user finds something: the URI form, not the filesystem-internal path."""
        return "/".join([self.uri.rstrip("/"), *[p.strip("/") for p in parts if p]])

    def resolve(self, uri: str) -> str:
        """A file URI as recorded in a table: relative means inside this root (so a root can be
        moved or synced), anything else (absolute path, scheme://) is used as is."""
        if "://" in uri or os.path.isabs(uri):
            return uri
        return self.display(uri)

    def check_reachable(self, create: bool = True) -> None:
        """Fail fast with a clear message when storage is unreachable or the bucket is missing;
        a local root that does not exist is created, or (create=False) an error."""
        where = describe_endpoint(self.uri, self.options)
        try:
            info = self.fs.get_file_info(self.base)
            if info.type == pafs.FileType.File:
                raise StorageError(f"run root {where} is a file, not a directory")
            if info.type == pafs.FileType.NotFound and isinstance(self.fs, pafs.LocalFileSystem):
                if not create:
                    raise StorageError(f"run root {where} does not exist")
                self._ensure_dir(self.base)
            if isinstance(self.fs, pafs.S3FileSystem):
                bucket = self.base.split("/", 1)[0]
                if self.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                    raise StorageError(f"run root {where}: bucket '{bucket}' does not exist "
                                       f"(create it first, e.g. `aws s3 mb s3://{bucket}`)")
                self.fs.get_file_info(pafs.FileSelector(self.base, allow_not_found=True))
        except StorageError:
            raise
        except OSError as err:
            from operators.failures import infrastructure_problem
            problem = infrastructure_problem(err)
            if problem is not None and "credentials" in problem:
                raise StorageError(f"run root {where}: {problem}") from err
            raise StorageError(f"cannot reach run root {where}: {_first_line(err)}") from err

    def _ensure_dir(self, path: str) -> None:
        # Object stores have no directories; creating one there leaves a stray marker object.
        if isinstance(self.fs, pafs.LocalFileSystem):
            self.fs.create_dir(path, recursive=True)

    # -- tables ----------------------------------------------------------------------------
    def list_shards(self, table: str) -> list[str]:
        """Names (without suffix) of the shards of a table, sorted (committed or not: see
        operators.store.commits for which count)."""
        return sorted(self.shard_sizes(table))

    def shard_sizes(self, table: str) -> dict[str, int]:
        """Shard name -> size in bytes, from one listing (no shard is opened)."""
        return {name[: -len(PARQUET_SUFFIX)]: size
                for name, size in self.list_files(table, PARQUET_SUFFIX).items()}

    def list_files(self, relpath: str, suffix: str = "") -> dict[str, int]:
        """Names -> sizes of the files directly under `relpath` ending with `suffix` (hidden
        temporary files excluded)."""
        return {name: size for name, (size, _) in self.list_file_info(relpath, suffix).items()}

    def list_file_info(self, relpath: str, suffix: str = "") -> dict[str, tuple[int, int]]:
        """Names -> (size, modification time in ns; 0 where the store has none), as
        `list_files`, from the same one listing."""
        selector = pafs.FileSelector(self.path(relpath), allow_not_found=True, recursive=False)
        try:
            infos = self.fs.get_file_info(selector)
        except OSError as err:
            raise StorageError(f"cannot list {self.display(relpath)}: {_first_line(err)}") from err
        return {i.base_name: (int(i.size or 0), int(i.mtime_ns or 0)) for i in infos
                if i.type == pafs.FileType.File and i.base_name.endswith(suffix)
                and not i.base_name.startswith(".")}

    def list_dirs(self, relpath: str) -> list[str]:
        """Names of the directories directly under `relpath`, sorted (on object stores: the
        common prefixes)."""
        selector = pafs.FileSelector(self.path(relpath), allow_not_found=True, recursive=False)
        try:
            infos = self.fs.get_file_info(selector)
        except OSError as err:
            raise StorageError(f"cannot list {self.display(relpath)}: {_first_line(err)}") from err
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def write_shard(self, table: str, shard: str, data: pa.Table) -> int:
        """Write one shard (zstd Parquet, the format version in its metadata) so that it appears
        whole or not at all; returns its size in bytes."""
        validate_id(shard, what="shard name")
        final = self.path(table, shard + PARQUET_SUFFIX)
        self._ensure_dir(self.path(table))
        data = data.replace_schema_metadata({**(data.schema.metadata or {}),
                                             FORMAT_KEY: str(FORMAT_VERSION).encode()})
        # Dictionary encoding only where values repeat (ids, names): tried on the big tensor
        # columns it costs most of the write time and makes larger files.
        # Statistics (min/max per page) likewise only for the plain key columns.
        plain = [f.name for f in data.schema if not is_tensor_field(f)]
        # A CRC32 per page lets a full read (`status --verify`) find damage that keeps the size.
        options = {"compression": "zstd", "write_statistics": plain, "write_page_checksum": True,
                   "use_dictionary": [
            f.name for f in data.schema if pa.types.is_string(f.type) or
            pa.types.is_large_string(f.type)]}
        if isinstance(self.fs, pafs.LocalFileSystem):
            tmp = self.path(table, f".{shard}.{uuid.uuid4().hex}.tmp")
            pq.write_table(data, tmp, filesystem=self.fs, **options)
            self.fs.move(tmp, final)  # atomic rename on one filesystem
        else:  # object stores: the object becomes visible only when the upload completes
            pq.write_table(data, final, filesystem=self.fs, **options)
        return int(self.fs.get_file_info(final).size or 0)

    def read_shard(self, table: str, shard: str, columns: Sequence[str] | None = None,
                   verify: bool = False) -> pa.Table:
        """A shard (the `columns`, default all); `verify` checks every page's CRC32."""
        return pq.read_table(self.path(table, shard + PARQUET_SUFFIX), columns=columns,
                             filesystem=self.fs, page_checksum_verification=verify)

    def read_table(self, table: str, columns: Sequence[str] | None = None) -> pa.Table | None:
        """All shards of a table concatenated, or None when the table has no shards."""
        shards = self.list_shards(table)
        if not shards:
            return None
        parts = [current_encoding(self.read_shard(table, s, columns)) for s in shards]
        return pa.concat_tables(parts, promote_options="default")

    def ids_in(self, table: str, column: str = "asset_id") -> set[str]:
        data = self.read_table(table, columns=[column])
        return set() if data is None else set(data.column(column).to_pylist())

    def delete_shards(self, table: str, prefix: str) -> int:
        """Delete the shards of `table` whose names start with `prefix`; returns how many."""
        names = [s for s in self.list_shards(table) if s.startswith(prefix)]
        for name in names:
            self.delete_shard(table, name)
        return len(names)

    def delete_shard(self, table: str, shard: str) -> None:
        self.fs.delete_file(self.path(table, shard + PARQUET_SUFFIX))

    def delete_table(self, table: str) -> None:
        path = self.path(table)
        if self.fs.get_file_info(path).type == pafs.FileType.Directory:
            self.fs.delete_dir(path)

    def remove_temporary(self, table: str) -> None:
        """Delete leftover temporary files of killed local writes."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            selector = pafs.FileSelector(self.path(table), allow_not_found=True)
            for info in self.fs.get_file_info(selector):
                if info.base_name.startswith(".") and info.base_name.endswith(".tmp"):
                    self.fs.delete_file(info.path)

    # -- JSON records and raw files ------------------------------------------------------------
    def write_json(self, relpath: str, record: Mapping) -> str:
        data = json.dumps(record, indent=2, sort_keys=True, default=str).encode()
        self.write_bytes(relpath, data)
        return self.display(relpath)

    def read_json(self, relpath: str) -> dict:
        return json.loads(self.read_bytes(relpath))

    def write_bytes(self, relpath: str, data: bytes) -> None:
        """Write a file whole or not at all (local: temporary name + rename; object stores: one
        PUT that appears when complete)."""
        path = self.path(relpath)
        self._ensure_dir(path.rsplit("/", 1)[0])
        if isinstance(self.fs, pafs.LocalFileSystem):
            folder, name = path.rsplit("/", 1)
            tmp = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
            with self.fs.open_output_stream(tmp) as out:
                out.write(data)
            self.fs.move(tmp, path)
        else:
            with self.fs.open_output_stream(path) as out:
                out.write(data)

    def create_exclusive(self, relpath: str, data: bytes) -> bool:
        """Create a file, whole, only if it does not exist; False when it does (or when another
        writer is creating it at the same moment). Atomic locally (written aside, then a hard
        link, which fails if the name exists) and on S3 (a conditional PUT, If-None-Match: *).
        Other filesystems: check, then write (advisory only)."""
        path = self.path(relpath)
        self._ensure_dir(path.rsplit("/", 1)[0])
        try:
            if isinstance(self.fs, pafs.LocalFileSystem):
                folder, name = path.rsplit("/", 1)
                tmp = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
                with open(tmp, "wb") as out:
                    out.write(data)
                try:
                    os.link(tmp, path)
                finally:
                    os.unlink(tmp)
            elif isinstance(self.fs, pafs.S3FileSystem):
                try:
                    _s3fs(self.options).pipe_file(path, data, mode="create")
                except OSError as err:  # 409: another conditional write to the key under way
                    if "ConditionalRequestConflict" in str(err) or "409" in str(err):
                        return False
                    raise
            else:
                if self.exists(relpath):
                    return False
                self.write_bytes(relpath, data)
        except FileExistsError:
            return False
        return True

    def delete(self, relpath: str) -> None:
        """Delete a file; a missing one is fine."""
        try:
            self.fs.delete_file(self.path(relpath))
        except FileNotFoundError:
            pass

    def read_bytes(self, relpath: str) -> bytes:
        return read_uri_bytes(self.fs, self.path(relpath), self.display(relpath))

    def exists(self, relpath: str) -> bool:
        return self.fs.get_file_info(self.path(relpath)).type != pafs.FileType.NotFound


def read_uri_bytes(fs: pafs.FileSystem, path: str, display: str | None = None) -> bytes:
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{display or path}: no such file") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
