"""Mesh files -> Mesh records: formats, categories, and every kind of broken file."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import numpy as np
import open3d as o3d
import pyarrow.fs as pafs
import pytest

from operators.data.assets import (category_for, inspect_mesh_file, load_category_sidecar,
                                   mesh_from_open3d, mesh_to_ply_bytes, read_mesh_file)
from operators.geometry.mesh import MeshError
from operators.store.ids import content_asset_id


def _box() -> o3d.geometry.TriangleMesh:
    box = o3d.geometry.TriangleMesh.create_box(0.2, 0.1, 0.3)
    box.vertex_colors = o3d.utility.Vector3dVector(np.tile([[0.9, 0.1, 0.1]], (8, 1)))
    return box


def _write_glb(gltf_path: Path, glb_path: Path) -> None:
    """Pack the glTF open3d writes into a binary GLB (open3d's own GLB writer emits a broken
    buffer length): header, JSON chunk, BIN chunk, each 4-byte aligned."""
    doc = json.loads(gltf_path.read_text())
    uri = doc["buffers"][0].pop("uri")
    blob = base64.b64decode(uri.split(",", 1)[1]) if uri.startswith("data:") else \
        (gltf_path.parent / uri).read_bytes()
    blob += b"\0" * (-len(blob) % 4)
    doc["buffers"][0]["byteLength"] = len(blob)
    text = json.dumps(doc).encode()
    text += b" " * (-len(text) % 4)
    chunks = struct.pack("<I4s", len(text), b"JSON") + text + struct.pack("<I4s", len(blob), b"BIN\0") + blob
    glb_path.write_bytes(struct.pack("<4sII", b"glTF", 2, 12 + len(chunks)) + chunks)


@pytest.mark.parametrize("suffix", [".ply", ".stl", ".obj", ".off", ".gltf", ".glb"])
def test_every_supported_format_loads_with_counts_and_bbox(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"box{suffix}"
    mesh = _box()
    if suffix == ".stl":
        mesh.compute_triangle_normals()
    if suffix == ".glb":
        assert o3d.io.write_triangle_mesh(str(tmp_path / "box.gltf"), mesh)
        _write_glb(tmp_path / "box.gltf", path)
    else:
        assert o3d.io.write_triangle_mesh(str(path), mesh)
    loaded, data = read_mesh_file(str(path))
    assert loaded.n_faces == 12
    np.testing.assert_allclose(loaded.bbox(), [[0, 0, 0], [0.2, 0.1, 0.3]], atol=1e-6)
    assert data == path.read_bytes()


def test_obj_with_material_and_texture_keeps_uvs_and_texture(tmp_path: Path) -> None:
    mesh = o3d.geometry.TriangleMesh.create_box(create_uv_map=True)
    texture = np.zeros((8, 8, 3), dtype=np.uint8)
    texture[:, :4] = (255, 0, 0)
    mesh.textures = [o3d.geometry.Image(texture)]
    mesh.triangle_material_ids = o3d.utility.IntVector([0] * len(mesh.triangles))
    assert o3d.io.write_triangle_mesh(str(tmp_path / "tex.obj"), mesh)
    assert (tmp_path / "tex.mtl").exists()
    loaded, _ = read_mesh_file(str(tmp_path / "tex.obj"))
    assert loaded.texture is not None and loaded.texture.shape[2] == 3
    assert loaded.triangle_uvs is not None and loaded.triangle_uvs.shape == (12, 3, 2)


def test_procedural_ply_round_trip_preserves_face_order_and_colours(tmp_path: Path) -> None:
    mesh = mesh_from_open3d(_box())
    data = mesh_to_ply_bytes(mesh)
    assert data == mesh_to_ply_bytes(mesh), "PLY bytes must be deterministic (content-hash ids)"
    (tmp_path / "m.ply").write_bytes(data)
    loaded, _ = read_mesh_file(str(tmp_path / "m.ply"))
    np.testing.assert_array_equal(loaded.triangles, mesh.triangles)
    np.testing.assert_allclose(loaded.vertex_colors, mesh.vertex_colors, atol=1 / 255)


BROKEN = {
    "garbage.ply": (b"ply\nthis is not a mesh\x00\x01", "unreadable or empty"),
    "empty.obj": (b"", "empty file"),
    "nan.obj": (b"v nan 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n", "NaN or infinite"),
    "huge.obj": (b"v 1e9 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n", "exceed"),
    "points.obj": (b"v 0 0 0\nv 1 0 0\nv 0 1 0\n", "no triangle faces"),
    "flat.obj": (b"v 0 0 0\nv 0 0 0\nv 0 0 0\nf 1 2 3\n", "zero surface area"),
    "mesh.fbx": (b"whatever", "unsupported mesh format"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_meshes_raise_mesh_error_naming_the_file(tmp_path: Path, name: str) -> None:
    content, expected = BROKEN[name]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(MeshError) as info:
        read_mesh_file(str(tmp_path / name))
    assert name in str(info.value) and expected in str(info.value)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.obj"):
        read_mesh_file(str(tmp_path / "nope.obj"))


def test_categories_from_sidecar_then_folder_name(tmp_path: Path) -> None:
    (tmp_path / "categories.csv").write_text("path,category\nmisc/a.obj,kettle\n")
    sidecar = load_category_sidecar(pafs.LocalFileSystem(), str(tmp_path))
    assert category_for("misc/a.obj", sidecar) == "kettle"
    assert category_for("Mug/b.obj", sidecar) == "mug"
    assert category_for("c.obj", sidecar) == "unknown"
    (tmp_path / "categories.csv").unlink()
    (tmp_path / "categories.json").write_text('{"x.ply": "bowl"}')
    assert load_category_sidecar(pafs.LocalFileSystem(), str(tmp_path)) == {"x.ply": "bowl"}


def test_inspect_gives_a_content_hash_id(tmp_path: Path) -> None:
    o3d.io.write_triangle_mesh(str(tmp_path / "a.ply"), _box())
    record = inspect_mesh_file(str(tmp_path / "a.ply"), "box", ())
    assert record.asset_id == content_asset_id((tmp_path / "a.ply").read_bytes())
    assert (record.n_vertices, record.n_faces, record.source) == (8, 12, "scan")


def test_real_third_party_mesh_shipped_by_pybullet() -> None:
    """A real mug mesh (with handle) from the pybullet package, through the same loader."""
    pybullet_data = pytest.importorskip("pybullet_data", reason="optional extra: realmeshes")
    path = Path(pybullet_data.getDataPath()) / "objects" / "mug.obj"
    mesh, _ = read_mesh_file(str(path))
    # 48 triangles + 408 quads in the file: every polygon triangulated, none dropped.
    assert mesh.n_faces == 48 + 2 * 408 and mesh.n_vertices == 446
    extent = mesh.bbox()[1] - mesh.bbox()[0]
    assert np.all(extent > 0.01) and np.all(extent < 1.0)  # a mug-sized object in metres


def test_greyscale_texture_is_expanded_to_rgb(tmp_path: Path) -> None:
    mesh = o3d.geometry.TriangleMesh.create_box(create_uv_map=True)
    mesh.textures = [o3d.geometry.Image(np.full((8, 8), 200, dtype=np.uint8))]
    mesh.triangle_material_ids = o3d.utility.IntVector([0] * len(mesh.triangles))
    assert o3d.io.write_triangle_mesh(str(tmp_path / "grey.obj"), mesh)
    loaded, _ = read_mesh_file(str(tmp_path / "grey.obj"))
    assert loaded.texture is not None and loaded.texture.shape[2] == 3
    assert int(loaded.texture[0, 0, 0]) == int(loaded.texture[0, 0, 2])


def test_z_up_meshes_are_turned_to_y_up(tmp_path: Path) -> None:
    """pybullet's mug is z-up: scanned with up_axis="z", its height (file z) becomes y."""
    pybullet_data = pytest.importorskip("pybullet_data", reason="optional extra: realmeshes")
    path = str(Path(pybullet_data.getDataPath()) / "objects" / "mug.obj")
    raw = read_mesh_file(path)[0].bbox()
    record = inspect_mesh_file(path, "mug", (), up_axis="z")
    np.testing.assert_allclose(record.bbox[:, 1], raw[:, 2], atol=1e-6)  # up: file z -> y
    np.testing.assert_allclose(record.bbox[:, 0], raw[:, 0], atol=1e-6)
    assert record.up_axis == "z" and record.to_row()["up_axis"] == "z"
