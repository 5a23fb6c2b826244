"""The in-memory triangle mesh every stage works on, and its validation.

Loading from files lives in `operators.data.assets`; the renderer and the procedural generator only
see this record.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

# Coordinates beyond this are almost always a unit or export bug (e.g. millimetres written as
# metres by a factor 1e6); the renderer's float32 rays lose precision long before float64 does.
MAX_ABS_COORDINATE = 1.0e6


class MeshError(ValueError):
    """A mesh that cannot be processed; the message names what is wrong with it."""


@dataclass(frozen=True)
class Mesh:
    """Triangle mesh in its own model frame (+y up by convention for procedural assets).

    vertices: (V, 3) float64. triangles: (F, 3) int32 vertex indices.
    vertex_colors: optional (V, 3) float32 in [0, 1].
    triangle_uvs: optional (F, 3, 2) float32 texture coordinates per triangle corner (OBJ/GLB).
    texture: optional (H, W, 3) uint8 image the UVs index (u right, v up, as in OBJ).
    """

    vertices: np.ndarray
    triangles: np.ndarray
    vertex_colors: np.ndarray | None = None
    triangle_uvs: np.ndarray | None = None
    texture: np.ndarray | None = None

    @property
    def n_vertices(self) -> int:
        return int(self.vertices.shape[0])

    @property
    def n_faces(self) -> int:
        return int(self.triangles.shape[0])

    def bbox(self) -> np.ndarray:
        """(2, 3) float32: min corner, max corner."""
        return np.stack([self.vertices.min(axis=0), self.vertices.max(axis=0)]).astype(np.float32)

    def triangle_areas(self) -> np.ndarray:
        v = self.vertices[self.triangles]
        return 0.5 * np.linalg.norm(np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]), axis=1)


# Files from robotics packages (URDF/MJCF, pybullet, metaworld) are often z-up; the project's
# frame is +y up. Turning -90 degrees about x maps (x, y, z) -> (x, z, -y): z becomes up.
Z_UP_TO_Y_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


def to_y_up(mesh: Mesh, up_axis: str) -> Mesh:
    """The mesh in the +y-up frame, given the axis that points up in its file ("y" or "z")."""
    if up_axis == "y":
        return mesh
    if up_axis != "z":
        raise MeshError(f"up axis must be 'y' or 'z', got {up_axis!r}")
    return replace(mesh, vertices=mesh.vertices @ Z_UP_TO_Y_UP.T)


def validate_mesh(mesh: Mesh, name: str = "mesh") -> None:
    """Raise MeshError naming `name` and the problem if the mesh cannot be rendered or sampled."""
    v, f = mesh.vertices, mesh.triangles
    if v.ndim != 2 or v.shape[1] != 3:
        raise MeshError(f"{name}: vertices must have shape (V, 3), got {v.shape}")
    if v.shape[0] == 0:
        raise MeshError(f"{name}: empty mesh (no vertices)")
    if f.ndim != 2 or f.shape[1] != 3 or f.shape[0] == 0:
        raise MeshError(f"{name}: no triangle faces (a point cloud or an empty mesh); "
                        "only triangle meshes can be rendered")
    if not np.isfinite(v).all():
        bad = int((~np.isfinite(v)).any(axis=1).sum())
        raise MeshError(f"{name}: {bad} of {v.shape[0]} vertices have NaN or infinite coordinates")
    if np.abs(v).max() > MAX_ABS_COORDINATE:
        raise MeshError(f"{name}: coordinates up to {np.abs(v).max():.3g} exceed "
                        f"{MAX_ABS_COORDINATE:.0e}; rescale the mesh")
    if f.min() < 0 or f.max() >= v.shape[0]:
        raise MeshError(f"{name}: face indices out of range [0, {v.shape[0]})")
    area = float(mesh.triangle_areas().sum())
    if not area > 0.0:
        raise MeshError(f"{name}: zero surface area (all faces degenerate)")
    if mesh.vertex_colors is not None and mesh.vertex_colors.shape != v.shape:
        raise MeshError(f"{name}: vertex_colors shape {mesh.vertex_colors.shape} != {v.shape}")
