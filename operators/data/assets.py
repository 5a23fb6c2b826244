"""Mesh files -> `Mesh` records and asset-manifest rows (DFC 4.1: the asset collection).

Files are read with open3d (OBJ with MTL/texture, PLY, STL, OFF, GLB/GLTF). Remote files are
copied to a temporary directory first, together with an OBJ's material library and textures.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open3d as o3d
import pyarrow.fs as pafs

from operators.settings import ReadLimits
from operators.geometry.mesh import Mesh, MeshError, to_y_up, validate_mesh
from operators.store.ids import content_asset_id
from operators.store.storage import StorageOptions, read_uri_bytes, resolve_filesystem

MESH_EXTENSIONS = (".obj", ".ply", ".stl", ".off", ".glb", ".gltf")
CATEGORY_SIDECARS = ("categories.csv", "categories.json")

o3d.utility.set_verbosity_level(o3d.utility.VerbosityLevel.Error)


@dataclass(frozen=True)
class AssetRecord:
    """One row of the `assets/` manifest (procedural extras empty for scanned meshes)."""

    asset_id: str
    uri: str
    category: str
    functions: tuple[str, ...]
    bbox: np.ndarray  # (2, 3) float32
    n_vertices: int
    n_faces: int
    source: str  # "scan" | "procedural"
    source_key: str  # what resume compares: the file URI, or "procedural:<category>:<seed>:<index>"
    up_axis: str = "y"  # the file's up axis; stages turn the mesh to +y up (bbox is already +y up)
    part_names: tuple[str, ...] = ()
    part_functions: tuple[tuple[str, ...], ...] = ()
    part_frames: np.ndarray | None = None  # (P, 4, 3): origin row, then x/y/z axis rows
    face_part: np.ndarray | None = None  # (F,) int16

    def to_row(self) -> dict:
        frames = self.part_frames if self.part_frames is not None else np.zeros((0, 4, 3))
        return {
            "asset_id": self.asset_id, "uri": self.uri, "category": self.category,
            "functions": list(self.functions),
            "bbox": self.bbox.astype(np.float32).reshape(-1).tolist(),
            "n_vertices": self.n_vertices, "n_faces": self.n_faces, "source": self.source, "source_key": self.source_key, "up_axis": self.up_axis,
            "part_names": list(self.part_names),
            "part_functions": [list(f) for f in self.part_functions],
            "part_frames": frames.astype(np.float32).reshape(-1).tolist(),
            "face_part": [] if self.face_part is None else self.face_part.astype(np.int16).tolist(),
        }


def mesh_from_open3d(tri: o3d.t.geometry.TriangleMesh | o3d.geometry.TriangleMesh) -> Mesh:
    """Arrays of an open3d mesh (vertex colours, texture UVs and albedo texture if any)."""
    if isinstance(tri, o3d.geometry.TriangleMesh):
        tri = o3d.t.geometry.TriangleMesh.from_legacy(tri)
    if "positions" not in tri.vertex:
        return Mesh(np.zeros((0, 3)), np.zeros((0, 3), np.int32))
    vertices = tri.vertex.positions.numpy().astype(np.float64)
    triangles = (tri.triangle.indices.numpy().astype(np.int32) if "indices" in tri.triangle
                 else np.zeros((0, 3), np.int32))
    colors = tri.vertex["colors"].numpy().astype(np.float32) if "colors" in tri.vertex else None
    uvs = texture = None
    if "texture_uvs" in tri.triangle and tri.has_valid_material() and \
            "albedo" in tri.material.texture_maps:
        image = tri.material.texture_maps["albedo"].as_tensor().numpy()
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim == 3 and image.shape[0] > 0:
            if image.shape[2] < 3:  # greyscale (+ alpha) textures: grey in all three channels
                image = np.repeat(image[..., :1], 3, axis=2)
            if image.dtype != np.uint8:  # float textures in [0, 1]
                image = np.clip(np.asarray(image, np.float32) * 255.0, 0, 255)
            texture = np.ascontiguousarray(image[..., :3]).astype(np.uint8)
            uvs = tri.triangle["texture_uvs"].numpy().astype(np.float32).reshape(-1, 3, 2)
    return Mesh(vertices, triangles, colors, uvs, texture)


def mesh_to_open3d(mesh: Mesh) -> o3d.geometry.TriangleMesh:
    tri = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(mesh.vertices),
                                    o3d.utility.Vector3iVector(mesh.triangles))
    if mesh.vertex_colors is not None:
        tri.vertex_colors = o3d.utility.Vector3dVector(mesh.vertex_colors.astype(np.float64))
    return tri


def mesh_to_ply_bytes(mesh: Mesh) -> bytes:
    """Binary PLY with vertex colours; face order is preserved (per-face labels stay valid)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "mesh.ply")
        if not o3d.io.write_triangle_mesh(path, mesh_to_open3d(mesh), write_ascii=False,
                                          write_vertex_colors=mesh.vertex_colors is not None):
            raise MeshError("open3d could not write the PLY")
        return Path(path).read_bytes()


def _obj_sidecars(obj_text: str, mtl_texts: Mapping[str, str]) -> set[str]:
    """Relative paths an OBJ needs besides itself: its material libraries and their textures."""
    names = set(re.findall(r"^\s*mtllib\s+(.+?)\s*$", obj_text, flags=re.M))
    for text in mtl_texts.values():
        names |= {m.split()[-1] for m in re.findall(r"^\s*map_Kd\s+(.+?)\s*$", text, flags=re.M)}
    return names


def _stage_locally(fs: pafs.FileSystem, path: str, uri: str, tmp: str) -> str:
    """Copy a remote mesh (and an OBJ's MTL + textures) into `tmp`; return the local path."""
    data = read_uri_bytes(fs, path, uri)
    name = os.path.basename(path)
    Path(tmp, name).write_bytes(data)
    if name.lower().endswith(".obj"):
        parent = path.rsplit("/", 1)[0]
        obj_text = data.decode("utf-8", errors="replace")
        mtls = {}
        for mtl in _obj_sidecars(obj_text, {}):
            try:
                mtls[mtl] = read_uri_bytes(fs, f"{parent}/{mtl}").decode("utf-8", "replace")
                Path(tmp, os.path.basename(mtl)).write_text(mtls[mtl])
            except (FileNotFoundError, OSError):
                continue  # open3d renders without the material; not an error of the mesh itself
        for extra in _obj_sidecars("", mtls):
            try:
                Path(tmp, os.path.basename(extra)).write_bytes(
                    read_uri_bytes(fs, f"{parent}/{extra}"))
            except (FileNotFoundError, OSError):
                continue
    return str(Path(tmp, name))


def parse_local_mesh(local: str, uri: str) -> Mesh:
    """Read a local mesh file with open3d (native code: run it isolated, see read_mesh_file)."""
    data = Path(local).read_bytes()
    if not data.strip():
        raise MeshError(f"{uri}: empty file (0 bytes of mesh data)")
    # The tensor reader keeps polygon faces (triangulated) that the legacy reader drops.
    try:
        mesh = mesh_from_open3d(o3d.t.io.read_triangle_mesh(local))
    except (RuntimeError, IndexError, ValueError) as err:
        if local.lower().endswith(".obj") and not re.search(rb"^\s*f\s", data, flags=re.M):
            raise MeshError(f"{uri}: no triangle faces (a point cloud or an empty mesh); "
                            "only triangle meshes can be rendered") from None
        raise MeshError(f"{uri}: unreadable mesh: open3d failed with {err}") from None
    return mesh


def read_mesh_file(uri: str, options: StorageOptions | None = None,
                   limits: ReadLimits = ReadLimits()) -> tuple[Mesh, bytes]:
    """Load and validate a mesh; returns it with the file's bytes (for the content hash).

    The native reader runs in a child process (`limits`): a file that crashes or hangs it is a
    MeshError naming the file and what happened, and the caller goes on. Raises
    FileNotFoundError or MeshError with a message naming `uri` and the problem.
    """
    if not uri.lower().endswith(MESH_EXTENSIONS):
        raise MeshError(f"{uri}: unsupported mesh format (supported: {', '.join(MESH_EXTENSIONS)})")
    fs, path = resolve_filesystem(uri, options)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound or info.type == pafs.FileType.Directory:
        raise FileNotFoundError(f"{uri}: no such file")
    if info.size is not None and info.size > limits.max_file_mb * 2**20:
        raise MeshError(f"{uri}: {info.size / 2**20:.0f} MB is over the {limits.max_file_mb:g} MB "
                        "limit (assets.max_file_mb / render.max_file_mb)")
    with tempfile.TemporaryDirectory() as tmp:
        local = path if isinstance(fs, pafs.LocalFileSystem) else _stage_locally(fs, path, uri, tmp)
        if not limits.isolate:
            mesh = parse_local_mesh(local, uri)
        else:
            from operators.data.isolation import ChildCrashed, ChildTimedOut, isolated_calls
            try:
                mesh = isolated_calls().call("operators.data.assets", "parse_local_mesh",
                                             (local, uri), limits.timeout_s)
            except (ChildCrashed, ChildTimedOut) as err:
                raise MeshError(f"{uri}: the mesh reader {err}") from None
        data = Path(local).read_bytes()  # here, not through the pipe: only a parsed file's
    if mesh.n_vertices == 0:
        raise MeshError(f"{uri}: unreadable or empty mesh: open3d found no vertices in the file")
    validate_mesh(mesh, name=uri)
    return mesh, data


def load_category_sidecar(fs: pafs.FileSystem, directory: str) -> dict[str, str]:
    """Categories from `categories.csv` (columns path,category) or `categories.json`
    ({"relative/path.obj": "mug"}) in the scanned directory; paths relative to it."""
    for name in CATEGORY_SIDECARS:
        path = f"{directory}/{name}"
        if fs.get_file_info(path).type != pafs.FileType.File:
            continue
        text = read_uri_bytes(fs, path).decode("utf-8")
        if name.endswith(".json"):
            mapping = json.loads(text)
            if not isinstance(mapping, dict):
                raise ValueError(f"{path}: expected a JSON object {{relative path: category}}")
            return {str(k): str(v) for k, v in mapping.items()}
        rows = list(csv.DictReader(io.StringIO(text)))
        if rows and not {"path", "category"} <= set(rows[0]):
            raise ValueError(f"{path}: needs the columns 'path' and 'category'")
        return {r["path"]: r["category"] for r in rows}
    return {}


def category_for(relative_path: str, sidecar: Mapping[str, str]) -> str:
    """Sidecar entry if present, else the name of the file's folder, else 'unknown'."""
    if relative_path in sidecar:
        return sidecar[relative_path].strip().lower()
    parent = os.path.dirname(relative_path)
    return os.path.basename(parent).lower() if parent else "unknown"


def inspect_mesh_file(uri: str, category: str, functions: tuple[str, ...],
                      options: StorageOptions | None = None, up_axis: str = "y",
                      limits: ReadLimits = ReadLimits()) -> AssetRecord:
    """Manifest row of a scanned mesh file (raises like `read_mesh_file`); bbox in +y up."""
    mesh, data = read_mesh_file(uri, options, limits)
    mesh = to_y_up(mesh, up_axis)
    return AssetRecord(asset_id=content_asset_id(data), uri=uri, category=category,
                       functions=functions, bbox=mesh.bbox(), n_vertices=mesh.n_vertices,
                       n_faces=mesh.n_faces, source="scan", source_key=uri, up_axis=up_axis)
