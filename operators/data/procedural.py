"""Procedural household objects with per-face functional-part labels and functional part frames.

The generator is the offline demo dataset, the test fixture and the quality benchmark (DESIGN 6):
every asset knows which faces belong to which part, which functions each part performs (from
`taxonomy.yaml`), and a *functional frame* per part, so two assets sharing a function can be
aligned in 3D by their functional parts (DFC 3.2) and dense ground truth derived from the
alignment (DFC Supplement: Hungarian matching of back-projected points).

Geometry: plain numpy lofts (surfaces of revolution, swept tubes, flat plates), one vertex set per
part so per-vertex colours are per-face colours. Metres, +y up, objects stand on y = 0 centred on
x = z = 0. Containers are open shells with a rim so their inside is visible; tools lie flat on the
table. Each asset is built in a canonical pose with its *forward* direction along +x (the spout,
the tool's working end, the side away from a mug's handle), then turned by a random yaw about +y;
frames turn with it. Colours come from one shared palette, drawn independently of the part type,
and parts often share a colour, so colour alone does not reveal the functional part.

Functional frames. `PartFrame.axes` rows are unit x, y, z (right-handed). Each function has a
frame kind (`FRAME_KIND`); all functions of one part share a kind, and a functional part's frame
follows that kind's convention, so mapping frame A onto frame B (p -> o_B + R_B^T R_A (p - o_A))
puts A's functional part where B's is:
- opening (pour-with): origin at the centre of the opening the contents leave through (spout tip,
  bottle mouth, rim circle); z = outward axis of the opening; y = world up made orthogonal to z
  (for a vertical opening: -forward); x = y cross z.
- cavity (scoop-with, sift-with): origin at the deepest point of the hollow's inner surface;
  y = out of the hollow through its opening; x = forward (towards the lip / tool tip); z = x cross y.
- loop (hang-onto): origin at the centre of the hole a peg goes through (handle loop, hook bend);
  y = world up; x = horizontal, from the hole towards the object's body / mounting; z = x cross y
  (the peg direction).
- axis (roll-onto): origin on the rolling body's axis at mid-length; y = axis towards the open or
  top end; x = forward; z = x cross y.
- edge (cut-with, peel-with, wedge-with): origin at the middle of the sharpened edge; x = along
  the edge towards the tip; y = edge normal in the blade plane, pointing out of the blade (the
  cutting direction); z = x cross y (the blade-plane normal).
- tip (pierce-with, poke-with, pry-with, pull-with, write-with, mix-with): origin at the working
  end's extreme point (centre of the tips for several prongs); x = direction the tip points;
  y = world up made orthogonal to x; z = x cross y.
- plate (lift-with, spread-with, scrape-with, dig-with, sweep-with, brush-with): origin at the
  centre (area centroid) of the working face; y = working-face normal (the side that carries
  the load); x = forward along the tool axis towards the leading edge; z = x cross y.
- face (pound-with, press-with): origin at the centre of the striking / pressing face;
  z = outward face normal; y = from the face towards the handle, orthogonal to z; x = y cross z.
- jaw (pick-up-with, apply-torque-with): origin between the jaws; x = opening direction of the
  jaws; y = across the gap; z = x cross y (no generator uses it yet).
Parts without a function get a neutral frame: origin at the part's area centroid, axes = the
asset's canonical (forward, up, side) axes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np

from operators.data.taxonomy import Taxonomy, UnknownNameError, load_taxonomy
from operators.geometry.mesh import Mesh


@dataclass(frozen=True)
class PartFrame:
    origin: np.ndarray  # (3,) float32
    axes: np.ndarray  # (3, 3) float32, rows = unit x, y, z axes, right-handed


@dataclass(frozen=True)
class ProceduralAsset:
    category: str
    mesh: Mesh  # vertex_colors set
    face_part: np.ndarray  # (F,) int16 index into part_names
    part_names: tuple[str, ...]
    part_functions: tuple[tuple[str, ...], ...]  # per part, from the taxonomy (may be empty)
    part_frames: tuple[PartFrame, ...]  # per part, its functional frame


FRAME_KIND: dict[str, str] = {
    "pour-with": "opening",
    "scoop-with": "cavity", "sift-with": "cavity",
    "hang-onto": "loop",
    "roll-onto": "axis",
    "cut-with": "edge", "peel-with": "edge", "wedge-with": "edge",
    "pierce-with": "tip", "poke-with": "tip", "pry-with": "tip", "pull-with": "tip",
    "write-with": "tip", "mix-with": "tip",
    "lift-with": "plate", "spread-with": "plate", "scrape-with": "plate", "dig-with": "plate",
    "sweep-with": "plate", "brush-with": "plate",
    "pound-with": "face", "press-with": "face",
    "pick-up-with": "jaw", "apply-torque-with": "jaw",
}

UP = np.array([0.0, 1.0, 0.0])
FORWARD = np.array([1.0, 0.0, 0.0])
SIDE = np.array([0.0, 0.0, 1.0])
_SEGMENTS = 40  # around a surface of revolution; tubes use fewer

# Shared material palette (RGB 0..1), deliberately independent of part type.
_PALETTE = np.array([
    [0.92, 0.92, 0.90], [0.10, 0.10, 0.11], [0.55, 0.56, 0.58], [0.74, 0.76, 0.79],
    [0.76, 0.16, 0.14], [0.16, 0.30, 0.70], [0.20, 0.55, 0.26], [0.93, 0.80, 0.22],
    [0.90, 0.50, 0.16], [0.55, 0.36, 0.20], [0.10, 0.55, 0.56], [0.90, 0.56, 0.65],
    [0.46, 0.26, 0.60], [0.93, 0.87, 0.72],
])

Geometry = tuple[np.ndarray, np.ndarray]  # vertices (V, 3) float64, triangles (F, 3) int32


@dataclass(frozen=True)
class _Part:
    name: str
    geometry: Geometry
    kind: str | None = None  # frame kind; None for a non-functional part (neutral frame)
    frame: PartFrame | None = None


# ------------------------------------------------------------------ primitives


def _loft(rings: list[np.ndarray], cap_start: bool = False, cap_end: bool = False) -> Geometry:
    """Stitch consecutive rings of equal size (a 1-point ring is a pole) into a triangle strip;
    caps close an end with a fan around the ring's mean point."""
    rings = [np.atleast_2d(np.asarray(r, float)) for r in rings]
    if cap_start:
        rings.insert(0, rings[0].mean(axis=0, keepdims=True))
    if cap_end:
        rings.append(rings[-1].mean(axis=0, keepdims=True))
    n = max(len(r) for r in rings)
    ids, start = [], 0
    for r in rings:
        ids.append(np.full(n, start) if len(r) == 1 else np.arange(start, start + n))
        start += len(r)
    tris = []
    for a, b in zip(ids[:-1], ids[1:]):
        a1, b1 = np.roll(a, -1), np.roll(b, -1)
        tris += [np.stack([a, b, a1], 1), np.stack([a1, b, b1], 1)]
    triangles = np.concatenate(tris)
    vertices = np.concatenate(rings)
    keep = ((triangles[:, 0] != triangles[:, 1]) & (triangles[:, 1] != triangles[:, 2])
            & (triangles[:, 0] != triangles[:, 2]))
    triangles = triangles[keep]
    corners = vertices[triangles]
    area = np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1)
    return vertices, triangles[area > 1e-12].astype(np.int32)


def _revolve(profile: list[tuple[float, float]] | np.ndarray, segments: int = _SEGMENTS) -> Geometry:
    """Surface of revolution about +y of a polyline of (radius, y); radius 0 makes a pole."""
    theta = np.linspace(0.0, 2.0 * np.pi, segments, endpoint=False)
    circle = np.stack([np.cos(theta), np.zeros_like(theta), np.sin(theta)], 1)
    rings = [np.array([[0.0, y, 0.0]]) if r < 1e-9 else circle * r + [0.0, y, 0.0]
             for r, y in np.asarray(profile, float)]
    return _loft(rings)


def _sweep(path: np.ndarray, radii: np.ndarray | float, segments: int = 16) -> Geometry:
    """Closed tube of circular cross-section along a 3D polyline (rotation-minimising frames)."""
    path = np.asarray(path, float)
    radii = np.broadcast_to(np.asarray(radii, float), (len(path),))
    tangents = np.gradient(path, axis=0)
    tangents /= np.linalg.norm(tangents, axis=1, keepdims=True)
    normal = np.cross(tangents[0], UP if abs(tangents[0] @ UP) < 0.9 else SIDE)
    phi = np.linspace(0.0, 2.0 * np.pi, segments, endpoint=False)
    rings = []
    for p, t, r in zip(path, tangents, radii):
        normal = normal - (normal @ t) * t  # carry the previous normal along: no twist
        normal /= np.linalg.norm(normal)
        binormal = np.cross(t, normal)
        rings.append(p + r * (np.outer(np.cos(phi), normal) + np.outer(np.sin(phi), binormal)))
    return _loft(rings, cap_start=True, cap_end=True)


def _plate(xs: np.ndarray, z_lo: np.ndarray | float, z_hi: np.ndarray | float,
           thickness: np.ndarray | float, y_mid: Callable[[np.ndarray], np.ndarray] | float = 0.0,
           columns: int = 7) -> Geometry:
    """Flat closed plate along x: at each x it spans z in [z_lo, z_hi] and `thickness` in y
    around `y_mid` (a constant or a function of (x, z), to bend the plate)."""
    xs = np.asarray(xs, float)
    n = len(xs)
    z_lo, z_hi, thickness = (np.broadcast_to(np.asarray(a, float), (n,))
                             for a in (z_lo, z_hi, thickness))
    u = np.linspace(0.0, 1.0, columns)
    rings = []
    for x, lo, hi, t in zip(xs, z_lo, z_hi, thickness):
        z = lo + (hi - lo) * u
        zz = np.concatenate([z, z[::-1]])  # top edge lo -> hi, then bottom edge hi -> lo
        dy = np.concatenate([np.full(columns, t / 2), np.full(columns, -t / 2)])
        mid = y_mid(np.full_like(zz, x), zz) if callable(y_mid) else np.full_like(zz, y_mid)
        rings.append(np.stack([np.full_like(zz, x), mid + dy, zz], 1))
    return _loft(rings, cap_start=True, cap_end=True)


def _box(lo: tuple[float, float, float], hi: tuple[float, float, float], divisions: int = 4) -> Geometry:
    """Axis-aligned box, its sides split into `divisions` strips (finer sampling of big faces)."""
    return _plate(np.linspace(lo[0], hi[0], divisions + 1), lo[2], hi[2], hi[1] - lo[1],
                  (lo[1] + hi[1]) / 2, columns=divisions + 1)


def _transform(geometry: Geometry, rotation: np.ndarray | None = None,
               translation: tuple[float, float, float] | np.ndarray = (0.0, 0.0, 0.0)) -> Geometry:
    vertices, triangles = geometry
    if rotation is not None:
        vertices = vertices @ rotation.T
    return vertices + np.asarray(translation, float), triangles


def _merge(*geometries: Geometry) -> Geometry:
    offsets = np.cumsum([0] + [len(v) for v, _ in geometries[:-1]])
    return (np.concatenate([v for v, _ in geometries]),
            np.concatenate([t + o for (_, t), o in zip(geometries, offsets)]).astype(np.int32))


def _rotation(axis: str, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


_Y_TO_X = _rotation("z", -np.pi / 2)  # turns a surface of revolution about +y to lie along +x
_Y_TO_Z = _rotation("x", np.pi / 2)


# ------------------------------------------------------------------ frames


def _frame(origin: np.ndarray, **hints: np.ndarray) -> PartFrame:
    """Orthonormal right-handed frame from two named axis hints: the first is kept exactly, the
    second is made orthogonal to it, the third completes x cross y = z."""
    (first, a), (second, b) = hints.items()
    axes = {first: np.asarray(a, float) / np.linalg.norm(a)}
    b = np.asarray(b, float) - (np.asarray(b, float) @ axes[first]) * axes[first]
    if np.linalg.norm(b) < 1e-6:
        raise ValueError(f"frame hints {first} and {second} are parallel")
    axes[second] = b / np.linalg.norm(b)
    third = ({"x", "y", "z"} - set(axes)).pop()
    nxt = {"x": ("y", "z"), "y": ("z", "x"), "z": ("x", "y")}[third]
    axes[third] = np.cross(axes[nxt[0]], axes[nxt[1]])
    return PartFrame(np.asarray(origin, np.float32),
                     np.stack([axes["x"], axes["y"], axes["z"]]).astype(np.float32))


def _opening(origin: np.ndarray, outward: np.ndarray) -> PartFrame:
    outward = np.asarray(outward, float)
    vertical = abs(outward @ UP) > 0.99 * np.linalg.norm(outward)
    return _frame(origin, z=outward, y=-FORWARD if vertical else UP)


def _loop(origin: np.ndarray, towards_body: np.ndarray) -> PartFrame:
    return _frame(origin, y=UP, x=towards_body)


def _tip(origin: np.ndarray, direction: np.ndarray) -> PartFrame:
    return _frame(origin, x=direction, y=UP)


def _upright(origin: np.ndarray) -> PartFrame:
    """Cavity, axis and plate frames in the canonical pose (containers stand, tools lie flat with
    the working face up): y = up, x = forward."""
    return _frame(origin, y=UP, x=FORWARD)


def _outline_centroid_x(xs: np.ndarray, z_lo: np.ndarray, z_hi: np.ndarray) -> float:
    width = np.asarray(z_hi) - np.asarray(z_lo)
    return float(np.sum(xs * width) / np.sum(width))


# ------------------------------------------------------------------ shared sub-assemblies


def _vessel(radius_at: Callable[[np.ndarray], np.ndarray], bottom: float, height: float,
            wall: float, floor: float, rim: float, closed: bool = True,
            segments: int = _SEGMENTS) -> tuple[Geometry, Geometry, Geometry]:
    """Body (outer wall, with a bottom disc if `closed`), rim band and interior of an open vessel
    whose outer radius at height y is radius_at(y); the interior floor is at y = floor."""
    ys = np.linspace(bottom, height - rim, 7)
    outer = [(float(radius_at(y)), y) for y in ys]
    body = _revolve(([(0.0, bottom)] if closed else []) + outer, segments)
    r_lo, r_hi = float(radius_at(height - rim)), float(radius_at(height))
    rim_band = _revolve([(r_lo, height - rim), (r_hi, height), (r_hi - wall, height),
                         (r_lo - wall, height - rim)], segments)
    yi = np.linspace(height - rim, floor, 7)
    interior = _revolve([(float(radius_at(y)) - wall, y) for y in yi] + [(0.0, floor)], segments)
    return body, rim_band, interior


def _side_handle(body_radius: float, y_centre: float, half_height: float,
                 reach: float, tube: float) -> tuple[Geometry, np.ndarray]:
    """C-shaped loop on the -x side of a round body; returns it and the centre of its hole."""
    theta = np.linspace(np.pi / 2, 3 * np.pi / 2, 20)
    attach = body_radius - 0.002  # ends sink into the wall
    path = np.stack([-attach + reach * np.cos(theta), y_centre + half_height * np.sin(theta),
                     np.zeros_like(theta)], 1)
    inner_edge = -attach - reach + tube
    hole = np.array([(inner_edge - body_radius) / 2, y_centre, 0.0])
    return _sweep(path, tube), hole


def _grip(length: float, radius: float, y: float, taper: float = 0.15) -> Geometry:
    """Rounded tool handle lying along x in [-length, 0] at height y."""
    v = np.linspace(0.0, 1.0, 13)
    r = radius * (1 - taper + taper * np.sqrt(np.abs(np.sin(np.pi * v))))  # fuller in the middle
    r[[0, -1]] *= 0.85  # rounded ends
    profile = [(0.0, 0.0), *zip(r, v * length), (0.0, length)]
    return _transform(_revolve(profile, 24), _Y_TO_X, (-length, y, 0.0))


# ------------------------------------------------------------------ builders (canonical pose)


def _mug(rng: np.random.Generator) -> list[_Part]:
    draw = rng.uniform
    radius, height = draw(0.035, 0.05), draw(0.08, 0.12)
    bulge, wall = draw(-0.04, 0.08), draw(0.003, 0.006)
    floor, rim = draw(0.006, 0.012), draw(0.006, 0.012)
    radius_at = lambda y: radius * (1 + bulge * np.sin(np.pi * y / height))
    body, rim_band, interior = _vessel(radius_at, 0.0, height, wall, floor, rim)
    y_c = draw(0.45, 0.58) * height
    half = min(draw(0.22, 0.32) * height, height - rim - y_c - 0.01, y_c - 0.012)
    handle, hole = _side_handle(float(radius_at(y_c)), y_c, half, draw(0.022, 0.035), draw(0.005, 0.008))
    return [_Part("body", body, "axis", _upright([0, height / 2, 0])),
            _Part("rim", rim_band, "opening", _opening([0, height, 0], UP)),
            _Part("interior", interior, "cavity", _upright([0, floor, 0])),
            _Part("handle", handle, "loop", _loop(hole, FORWARD))]


def _cup(rng: np.random.Generator) -> list[_Part]:
    draw = rng.uniform
    r_base, height = draw(0.025, 0.035), draw(0.07, 0.13)
    r_top, base_h = r_base * draw(1.15, 1.45), draw(0.004, 0.01)
    wall, rim = draw(0.002, 0.004), draw(0.004, 0.01)
    floor = base_h + draw(0.003, 0.008)
    radius_at = lambda y: r_base + (r_top - r_base) * y / height
    body, rim_band, interior = _vessel(radius_at, base_h, height, wall, floor, rim, closed=False)
    base = _revolve([(0.0, 0.0), (r_base, 0.0), (float(radius_at(base_h)), base_h), (0.0, base_h)])
    return [_Part("body", body, "axis", _upright([0, height / 2, 0])),
            _Part("rim", rim_band, "opening", _opening([0, height, 0], UP)),
            _Part("interior", interior, "cavity", _upright([0, floor, 0])),
            _Part("base", base)]


def _bowl(rng: np.random.Generator) -> list[_Part]:
    draw = rng.uniform
    radius, height = draw(0.06, 0.1), draw(0.04, 0.08)
    foot_r, foot_h = radius * draw(0.35, 0.5), draw(0.004, 0.01)
    wall, rim = draw(0.003, 0.005), draw(0.003, 0.008)
    r_bottom, floor = foot_r * 1.1, foot_h + draw(0.003, 0.006)

    def radius_at(y: np.ndarray) -> np.ndarray:  # round-bottomed wall, vertical at the rim
        s = np.clip((y - foot_h) / (height - foot_h), 0.0, 1.0)
        return r_bottom + (radius - r_bottom) * np.sqrt(1 - (1 - s) ** 2)

    body, rim_band, interior = _vessel(radius_at, foot_h, height, wall, floor, rim)
    foot = _revolve([(foot_r * 0.85, foot_h), (foot_r * 0.85, 0.0), (foot_r, 0.0), (foot_r, foot_h)])
    return [_Part("body", body), _Part("rim", rim_band, "opening", _opening([0, height, 0], UP)),
            _Part("interior", interior, "cavity", _upright([0, floor, 0])), _Part("foot", foot)]


def _pan(rng: np.random.Generator) -> list[_Part]:
    draw = rng.uniform
    radius, height = draw(0.08, 0.11), draw(0.035, 0.06)
    r_bottom = radius * draw(0.8, 0.9)
    wall, floor, rim = draw(0.003, 0.005), draw(0.004, 0.007), draw(0.003, 0.006)
    radius_at = lambda y: r_bottom + (radius - r_bottom) * y / height
    body, rim_band, interior = _vessel(radius_at, 0.0, height, wall, floor, rim)
    length, tilt, grip = draw(0.12, 0.18), np.radians(draw(5, 20)), draw(0.008, 0.012)
    y0 = height * 0.7
    start = np.array([-float(radius_at(y0)) + 0.004, y0, 0.0])
    path = start + np.linspace(0, length, 12)[:, None] * [-np.cos(tilt), np.sin(tilt), 0.0]
    handle = _sweep(path, np.linspace(grip * 0.8, grip, 12))
    return [_Part("body", body), _Part("rim", rim_band, "opening", _opening([0, height, 0], UP)),
            _Part("interior", interior, "cavity", _upright([0, floor, 0])), _Part("handle", handle)]


def _bottle(rng: np.random.Generator) -> list[_Part]:
    draw = rng.uniform
    radius, body_h = draw(0.03, 0.045), draw(0.10, 0.18)
    shoulder_h, neck_r, neck_h = draw(0.03, 0.06), draw(0.01, 0.016), draw(0.03, 0.06)
    wall, lip = 0.0025, draw(0.001, 0.003)
    top = body_h + shoulder_h + neck_h
    body = _revolve([(0.0, 0.0), (radius, 0.0), (radius, body_h / 2), (radius, body_h)])
    s = np.linspace(0.0, 1.0, 7)
    shoulder = _revolve(np.stack([neck_r + (radius - neck_r) * np.cos(s * np.pi / 2),
                                  body_h + s * shoulder_h], 1))
    base_y = body_h + shoulder_h
    neck = _revolve([(neck_r, base_y), (neck_r, top - 0.004), (neck_r + lip, top - 0.004),
                     (neck_r + lip, top), (neck_r - wall, top), (neck_r - wall, base_y - 0.005)], 24)
    y0 = draw(0.2, 0.35) * body_h
    label = _revolve([(radius * 1.01, y0), (radius * 1.01, y0 + draw(0.3, 0.5) * body_h)])
    return [_Part("body", body, "axis", _upright([0, body_h / 2, 0])), _Part("label", label),
            _Part("shoulder", shoulder), _Part("neck", neck, "opening", _opening([0, top, 0], UP))]


def _kettle(rng: np.random.Generator) -> list[_Part]:
    draw = rng.uniform
    radius, height = draw(0.065, 0.09), draw(0.11, 0.17)
    r_top, widest = radius * draw(0.45, 0.6), draw(0.3, 0.45) * height

    def radius_at(y: np.ndarray) -> np.ndarray:
        low = radius * (0.88 + 0.12 * np.sin(np.pi / 2 * np.minimum(y, widest) / widest))
        high = r_top + (radius - r_top) * np.cos(np.pi / 2 * (y - widest) / (height - widest))
        return np.where(y < widest, low, high)

    ys = np.linspace(0.0, height, 10)
    body = _revolve([(0.0, 0.0)] + [(float(radius_at(y)), y) for y in ys])
    lid_h, knob_r, knob_h = draw(0.012, 0.025), draw(0.008, 0.014), draw(0.01, 0.018)
    lid = _revolve([(0.0, height), (r_top * 1.04, height), (r_top * 1.04, height + 0.004),
                    (r_top * 0.6, height + lid_h * 0.8), (knob_r, height + lid_h),
                    (knob_r * 1.2, height + lid_h + knob_h), (0.0, height + lid_h + knob_h)], 32)
    # Spout: hollow tapered tube from inside the body, tilted up towards +x.
    tilt, length = np.radians(draw(35, 55)), draw(0.06, 0.10)
    r0, r1 = draw(0.012, 0.018), draw(0.005, 0.008)
    y_s = draw(0.25, 0.4) * height
    base = np.array([float(radius_at(y_s)) * 0.7, y_s, 0.0])
    direction = np.array([np.cos(tilt), np.sin(tilt), 0.0])
    spout_local = _revolve([(r0, 0.0), ((r0 + r1) / 2, length / 2), (r1, length), (r1 - 0.0015, length),
                            ((r0 + r1) / 2 - 0.0015, length / 2), (r0 - 0.0015, 0.0)], 24)
    spout = _transform(spout_local, _rotation("z", tilt - np.pi / 2), base)
    tube = draw(0.008, 0.012)
    if rng.random() < 0.5:  # loop on the back
        y_c = draw(0.5, 0.62) * height
        half = min(draw(0.25, 0.35) * height, height - y_c - 0.01)
        handle, _ = _side_handle(float(radius_at(y_c)), y_c, half, draw(0.035, 0.05), tube)
    else:  # arch over the lid, front to back
        span = r_top * draw(0.7, 0.95)
        rise = lid_h + knob_h + draw(0.03, 0.05)
        theta = np.linspace(0.0, np.pi, 20)
        path = np.stack([span * np.cos(theta), height - 0.006 + rise * np.sin(theta),
                         np.zeros_like(theta)], 1)
        handle = _sweep(path, tube)
    return [_Part("body", body), _Part("lid", lid),
            _Part("spout", spout, "opening", _opening(base + length * direction, direction)),
            _Part("handle", handle)]


def _knife(rng: np.random.Generator) -> list[_Part]:
    draw = rng.uniform
    grip_len, grip_r = draw(0.09, 0.13), draw(0.008, 0.012)
    blade_len, width = draw(0.10, 0.20), draw(0.02, 0.045)
    tip_z = draw(0.0, 0.35) * width / 2
    y = grip_r

    def edges(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # edge (low z) and spine (high z)
        lo = -width / 2 + (tip_z + width / 2) * np.clip((u - 0.55) / 0.45, 0, 1) ** 2
        hi = width / 2 - (width / 2 - tip_z) * np.clip((u - 0.75) / 0.25, 0, 1) ** 2
        return lo, np.maximum(hi, lo + 0.0006)

    split = 0.8
    u_blade, u_point = np.linspace(0.0, split, 14), np.linspace(split, 1.0, 6)
    blade = _plate(u_blade * blade_len, *edges(u_blade), 0.002, y)
    point = _plate(u_point * blade_len, *edges(u_point), 0.002, y)
    handle = _grip(grip_len, grip_r, y)
    edge_mid_u = split / 2
    edge_mid = np.array([edge_mid_u * blade_len, y, float(edges(np.array(edge_mid_u))[0])])
    tip = np.array([blade_len, y, tip_z])
    return [_Part("blade", blade, "edge", _frame(edge_mid, x=FORWARD, y=-SIDE)),
            _Part("point", point, "tip", _tip(tip, FORWARD)), _Part("handle", handle)]


def _spoon(rng: np.random.Generator) -> list[_Part]:
    draw = rng.uniform
    half_len, depth, t = draw(0.022, 0.035), draw(0.006, 0.012), 0.0015
    half_wid = half_len * draw(0.6, 0.75)
    r = np.linspace(0.0, 1.0, 7)
    outer = np.stack([r, depth * r ** 2], 1)
    inner = np.stack([r[::-1] * 0.94, depth * (r[::-1] * 0.94) ** 2 + t], 1)
    bowl_v, bowl_t = _revolve(np.concatenate([outer, inner]), 32)
    bowl = (bowl_v * [half_len, 1.0, half_wid] + [half_len, 0.0, 0.0], bowl_t)
    length, rise = draw(0.1, 0.15), draw(0.005, 0.02)
    xs = np.linspace(-length, 0.004, 16)
    width = 0.003 + 0.0035 * np.clip(-xs / length, 0, 1)  # widens towards the end
    handle = _plate(xs, -width, width, 0.002,
                    lambda x, z: depth + rise * np.clip(-x / length, 0, 1) ** 1.5)
    return [_Part("bowl", bowl, "cavity", _upright([half_len, t, 0])), _Part("handle", handle)]


def _fork(rng: np.random.Generator) -> list[_Part]:
    draw = rng.uniform
    length, head_len, tine_len = draw(0.1, 0.14), draw(0.015, 0.025), draw(0.025, 0.04)
    width, n_tines, t = draw(0.018, 0.026), int(rng.integers(3, 5)), 0.002
    rise = draw(0.005, 0.02)
    xs = np.linspace(-length, 0.0, 16)
    w = 0.004 + 0.005 * (-xs / length)
    handle = _plate(xs, -w, w, t + 0.001, lambda x, z: t / 2 + rise * (-x / length) ** 1.5)
    hx = np.linspace(0.0, head_len, 5)
    hw = 0.004 + (width / 2 - 0.004) * np.sqrt(hx / head_len)
    head = _plate(hx, -hw, hw, t, t / 2)
    pitch = width / n_tines
    tx = np.linspace(head_len - 0.001, head_len + tine_len, 6)
    taper = np.linspace(1.0, 0.35, 6) * pitch * 0.3
    tines = _merge(*(_plate(tx, c - taper, c + taper, t, t / 2)
                     for c in (np.arange(n_tines) - (n_tines - 1) / 2) * pitch))
    return [_Part("tines", tines, "tip", _tip([head_len + tine_len, t / 2, 0], FORWARD)),
            _Part("head", head), _Part("handle", handle)]


def _flat_tool(rng: np.random.Generator, blade_len: float,
               half_width: Callable[[np.ndarray], np.ndarray], curl: float) -> list[_Part]:
    """Spatula / trowel lying on the table: grip, a shank bending down, and a flat blade whose
    half width at fraction u of its length is half_width(u) and whose sides rise by curl * z^2."""
    draw = rng.uniform
    grip_len, grip_r, shank_len, t = draw(0.1, 0.14), draw(0.01, 0.014), draw(0.04, 0.07), 0.002
    shank_r = 0.004
    s = np.linspace(0.0, 1.0, 8)
    shank_path = np.stack([s * shank_len, grip_r + (shank_r - grip_r) * np.sin(s * np.pi / 2), 0 * s], 1)
    u = np.linspace(0.0, 1.0, 16)
    xs, hw = shank_len - shank_r + u * blade_len, half_width(u)
    blade = _plate(xs, -hw, hw, t, lambda x, z: t / 2 + curl * z ** 2, columns=7)
    u_fine = np.linspace(0.0, 1.0, 101)
    centre_x = xs[0] + _outline_centroid_x(u_fine * blade_len, -half_width(u_fine), half_width(u_fine))
    return [_Part("blade", blade, "plate", _upright(np.array([centre_x, t, 0.0]))),
            _Part("shank", _sweep(shank_path, shank_r)),
            _Part("handle", _grip(grip_len, grip_r, grip_r))]


def _spatula(rng: np.random.Generator) -> list[_Part]:
    draw = rng.uniform
    blade_len, width, corner = draw(0.06, 0.1), draw(0.05, 0.08), draw(0.005, 0.02)

    def half_width(u: np.ndarray) -> np.ndarray:  # rectangle with rounded front corners
        into_corner = np.clip(u * blade_len - (blade_len - corner), 0.0, corner)
        return width / 2 - corner + np.sqrt(corner ** 2 - into_corner ** 2 * 0.999)

    return _flat_tool(rng, blade_len, half_width, 0.0)


def _trowel(rng: np.random.Generator) -> list[_Part]:
    draw = rng.uniform
    blade_len, width = draw(0.1, 0.15), draw(0.06, 0.09)
    half_width = lambda u: np.maximum(width / 2 * (1 - u) ** 0.7, 0.0005)  # pointed
    curl = draw(0.008, 0.015) / (width / 2) ** 2  # sides rise 8-15 mm: a scoop
    return _flat_tool(rng, blade_len, half_width, curl)


def _hammer(rng: np.random.Generator) -> list[_Part]:
    draw = rng.uniform
    grip_len, grip_r = draw(0.22, 0.30), draw(0.011, 0.015)
    size, front, back = draw(0.022, 0.03), draw(0.035, 0.05), draw(0.02, 0.035)
    y = size / 2  # lies on its side: head and handle axis at the same height
    head = _box((-size / 2, 0.0, -back), (size / 2, size, front))
    face_r, face_len = size / 2 * draw(0.8, 1.0), draw(0.01, 0.02)
    face_end = front + face_len
    face = _transform(_revolve([(0.0, 0.0), (face_r * 0.9, 0.0), (face_r, face_len * 0.3),
                                (face_r, face_len), (0.0, face_len)], 24), _Y_TO_Z, (0.0, y, front))
    claw_len = draw(0.04, 0.06)
    s = np.linspace(0.0, 1.0, 10)
    # two prongs side by side, curling back towards the handle
    prongs = [np.stack([-0.6 * claw_len * s ** 2, np.full_like(s, y + side * size * 0.22),
                        -back + 0.004 - claw_len * s], 1) for side in (-1, 1)]
    claw = _merge(*(_sweep(p, np.linspace(0.006, 0.0025, 10)) for p in prongs))
    claw_tip = np.array([-0.6 * claw_len, y, -back + 0.004 - claw_len])
    handle = _grip(grip_len, grip_r, y, taper=0.05)
    return [_Part("head", head),
            _Part("face", face, "face", _frame([0.0, y, face_end], z=SIDE, y=-FORWARD)),
            _Part("claw", claw, "tip", _tip(claw_tip, [-1.2 * claw_len, 0.0, -claw_len])),
            _Part("handle", handle)]


def _screwdriver(rng: np.random.Generator) -> list[_Part]:
    draw = rng.uniform
    grip_len, grip_r = draw(0.08, 0.12), draw(0.012, 0.018)
    shaft_len, shaft_r, tip_len = draw(0.06, 0.14), draw(0.0025, 0.004), draw(0.008, 0.014)
    y = grip_r
    handle = _grip(grip_len, grip_r, y, taper=0.25)
    shaft = _sweep(np.stack([np.linspace(-0.005, shaft_len, 6), np.full(6, y), np.zeros(6)], 1), shaft_r)
    tx = shaft_len - 0.001 + np.linspace(0.0, tip_len, 5)
    tip = _plate(tx, -shaft_r * 1.1, shaft_r * 1.1, np.linspace(2 * shaft_r, 0.0007, 5), y, columns=4)
    return [_Part("tip", tip, "tip", _tip([tx[-1], y, 0.0], FORWARD)),
            _Part("shaft", shaft), _Part("handle", handle)]


def _hook(rng: np.random.Generator) -> list[_Part]:
    draw = rng.uniform
    wire, bend_r, drop = draw(0.003, 0.005), draw(0.012, 0.02), draw(0.01, 0.03)
    reach, plate_t, plate_w, knee = draw(0.02, 0.05), draw(0.004, 0.007), draw(0.02, 0.03), 0.008
    y_bend = bend_r + wire + draw(0.0, 0.01)  # the J's bottom clears the floor
    y_arm = y_bend + drop + knee
    plate = _box((-plate_t, 0.0, -plate_w / 2), (0.0, y_arm + draw(0.015, 0.03), plate_w / 2))
    phi = np.linspace(0.0, np.pi / 2, 6)[1:]
    arm = np.concatenate([np.stack([np.linspace(-plate_t / 2, reach, 6), np.full(6, y_arm)], 1),
                          np.stack([reach + knee * np.sin(phi), y_arm - knee + knee * np.cos(phi)], 1),
                          [[reach + knee, y_bend]]])
    centre_x = reach + knee + bend_r
    theta = np.linspace(0.0, np.pi, 20)
    tip_len = draw(0.5, 1.0) * bend_r
    bend = np.concatenate([np.stack([centre_x - bend_r * np.cos(theta),
                                     y_bend - bend_r * np.sin(theta)], 1),
                           [[centre_x + bend_r, y_bend + tip_len]]])
    to3d = lambda p: np.column_stack([p, np.zeros(len(p))])
    return [_Part("plate", plate), _Part("shank", _sweep(to3d(arm), wire)),
            _Part("bend", _sweep(to3d(bend), wire), "loop", _loop([centre_x, y_bend, 0.0], -FORWARD))]


_BUILDERS: dict[str, Callable[[np.random.Generator], list[_Part]]] = {
    "mug": _mug, "cup": _cup, "bowl": _bowl, "pan": _pan, "bottle": _bottle, "kettle": _kettle,
    "knife": _knife, "spoon": _spoon, "fork": _fork, "spatula": _spatula, "trowel": _trowel,
    "hammer": _hammer, "screwdriver": _screwdriver, "hook": _hook,
}
PROCEDURAL_CATEGORIES: tuple[str, ...] = tuple(_BUILDERS)


# ------------------------------------------------------------------ assembly


@lru_cache(maxsize=1)
def _taxonomy() -> Taxonomy:
    return load_taxonomy()


def _part_colours(rng: np.random.Generator, n_parts: int) -> np.ndarray:
    """1-3 materials per asset from the shared palette, each part picking one at random."""
    n_materials = int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
    materials = _PALETTE[rng.choice(len(_PALETTE), n_materials, replace=False)]
    materials = np.clip(materials * rng.uniform(0.85, 1.1, (n_materials, 1)), 0.0, 1.0)
    return materials[rng.integers(0, n_materials, n_parts)]


def _area_centroid(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    corners = vertices[triangles]
    area = np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1)
    return (corners.mean(axis=1) * area[:, None]).sum(axis=0) / area.sum()


def make_asset(category: str, seed: int) -> ProceduralAsset:
    """One randomised object of `category`; identical arrays for identical (category, seed)."""
    if category not in _BUILDERS:
        raise UnknownNameError(f"no procedural generator for category {category!r}; "
                               f"procedural categories: {', '.join(PROCEDURAL_CATEGORIES)}")
    rng = np.random.default_rng(seed)
    parts = _BUILDERS[category](rng)
    spec = _taxonomy().category(category).parts
    if sorted(p.name for p in parts) != sorted(spec):  # the generator and taxonomy.yaml must agree
        raise RuntimeError(f"{category}: generator parts {[p.name for p in parts]} "
                           f"!= taxonomy parts {sorted(spec)}")
    functions = tuple(spec[p.name].functions for p in parts)
    for part, funcs in zip(parts, functions):
        kinds = {FRAME_KIND[f] for f in funcs}
        if kinds and kinds != {part.kind}:
            raise RuntimeError(f"{category}.{part.name}: frame kind {part.kind} does not fit {funcs}")

    vertices, triangles = _merge(*(p.geometry for p in parts))
    face_part = np.repeat(np.arange(len(parts), dtype=np.int16), [len(p.geometry[1]) for p in parts])
    colours = np.repeat(_part_colours(rng, len(parts)), [len(p.geometry[0]) for p in parts], axis=0)
    frames = [p.frame if p.frame is not None
              else PartFrame(_area_centroid(*p.geometry).astype(np.float32), np.eye(3, dtype=np.float32))
              for p in parts]

    # Stand on y = 0 centred on x = z = 0, then a random yaw; frames move with the mesh.
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    shift = np.array([-(lo[0] + hi[0]) / 2, -lo[1], -(lo[2] + hi[2]) / 2])
    yaw = _rotation("y", rng.uniform(0.0, 2.0 * np.pi))
    vertices = (vertices + shift) @ yaw.T
    frames = [PartFrame(((f.origin + shift) @ yaw.T).astype(np.float32),
                        (f.axes @ yaw.T).astype(np.float32)) for f in frames]
    mesh = Mesh(vertices=vertices, triangles=triangles, vertex_colors=colours.astype(np.float32))
    return ProceduralAsset(category, mesh, face_part, tuple(p.name for p in parts), functions,
                           tuple(frames))


def make_collection(n: int, seed: int) -> list[ProceduralAsset]:
    """`n` assets, categories round-robin over PROCEDURAL_CATEGORIES, each with its own seed
    drawn from `seed` (so proportions differ between assets of one category)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    seeds = np.random.default_rng(seed).integers(0, 2**63 - 1, size=n)
    return [make_asset(PROCEDURAL_CATEGORIES[i % len(PROCEDURAL_CATEGORIES)], int(s))
            for i, s in enumerate(seeds)]


def align_to(source: PartFrame, target: PartFrame, points: np.ndarray) -> np.ndarray:
    """Functional alignment (DFC 3.2): move points of the source asset rigidly so that its part
    frame `source` lands on the target asset's part frame `target`."""
    local = (np.asarray(points, float) - source.origin) @ source.axes.T
    return local @ target.axes + target.origin


def procedural_seed(seed: int, index: int) -> int:
    """The generator seed of the `index`-th asset of a collection made with `seed`."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
