"""Procedural assets: determinism, coverage, labels, geometry, frames, alignment, colours."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from operators.data.procedural import (FRAME_KIND, PROCEDURAL_CATEGORIES, ProceduralAsset, align_to,
                                       make_asset, make_collection)
from operators.data.taxonomy import load_taxonomy
from operators.geometry.mesh import validate_mesh

SEEDS = range(4)


@pytest.fixture(scope="module")
def assets() -> list[ProceduralAsset]:
    return [make_asset(c, s) for c in PROCEDURAL_CATEGORIES for s in SEEDS]


def _part_faces(asset: ProceduralAsset, part: int) -> np.ndarray:
    return asset.mesh.triangles[asset.face_part == part]


def _part_vertices(asset: ProceduralAsset, part: int) -> np.ndarray:
    return asset.mesh.vertices[np.unique(_part_faces(asset, part))]


def _part_centroid(asset: ProceduralAsset, part: int) -> np.ndarray:
    corners = asset.mesh.vertices[_part_faces(asset, part)]
    area = np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1)
    return (corners.mean(axis=1) * area[:, None]).sum(axis=0) / area.sum()


def _part_colours(asset: ProceduralAsset) -> np.ndarray:
    first_vertex = [_part_faces(asset, i)[0, 0] for i in range(len(asset.part_names))]
    return asset.mesh.vertex_colors[first_vertex]


def test_same_seed_gives_identical_arrays() -> None:
    for category in PROCEDURAL_CATEGORIES:
        a, b = make_asset(category, 7), make_asset(category, 7)
        np.testing.assert_array_equal(a.mesh.vertices, b.mesh.vertices)
        np.testing.assert_array_equal(a.mesh.triangles, b.mesh.triangles)
        np.testing.assert_array_equal(a.mesh.vertex_colors, b.mesh.vertex_colors)
        np.testing.assert_array_equal(a.face_part, b.face_part)
        for fa, fb in zip(a.part_frames, b.part_frames):
            np.testing.assert_array_equal(fa.origin, fb.origin)
            np.testing.assert_array_equal(fa.axes, fb.axes)


def test_different_seeds_give_different_proportions() -> None:
    for category in PROCEDURAL_CATEGORIES:
        # extents are yaw-dependent, so compare yaw-free numbers: height and max distance from the y axis
        shapes = []
        for seed in range(5):
            v = make_asset(category, seed).mesh.vertices
            shapes.append((v[:, 1].max(), np.hypot(v[:, 0], v[:, 2]).max()))
        shapes = np.array(shapes)
        assert len(np.unique(shapes.round(4), axis=0)) == 5, category
        assert (shapes.max(axis=0) / shapes.min(axis=0)).max() > 1.1, category  # not just noise


def test_coverage_of_categories_and_functions() -> None:
    assert len(PROCEDURAL_CATEGORIES) >= 10
    taxonomy = load_taxonomy()
    functions = {f for c in PROCEDURAL_CATEGORIES for f in taxonomy.functions_of(c)}
    assert len(functions) >= 8
    assert {"pour-with", "scoop-with", "cut-with", "pierce-with", "pound-with", "hang-onto"} <= functions
    # the taxonomy marks exactly the generated categories as procedural
    assert {n for n, c in taxonomy.categories.items() if c.procedural} == set(PROCEDURAL_CATEGORIES)


def test_parts_and_functions_match_the_taxonomy(assets: list[ProceduralAsset]) -> None:
    taxonomy = load_taxonomy()
    for asset in assets:
        spec = taxonomy.category(asset.category).parts
        assert sorted(asset.part_names) == sorted(spec)
        assert len(asset.part_functions) == len(asset.part_frames) == len(asset.part_names)
        for name, functions in zip(asset.part_names, asset.part_functions):
            assert functions == spec[name].functions
            assert set(functions) <= set(taxonomy.functions)
        assert any(asset.part_functions), asset.category  # every object has a functional part


def test_frame_kinds_cover_all_functions_and_parts_use_one_kind(assets: list[ProceduralAsset]) -> None:
    assert set(FRAME_KIND) == set(load_taxonomy().functions)
    for asset in assets:
        for functions in asset.part_functions:
            assert len({FRAME_KIND[f] for f in functions}) <= 1


def test_face_labels_and_mesh(assets: list[ProceduralAsset]) -> None:
    faces = []
    for asset in assets:
        mesh = asset.mesh
        validate_mesh(mesh, asset.category)
        faces.append(mesh.n_faces)
        assert asset.face_part.dtype == np.int16 and asset.face_part.shape == (mesh.n_faces,)
        assert asset.face_part.min() == 0 and asset.face_part.max() == len(asset.part_names) - 1
        counts = np.bincount(asset.face_part, minlength=len(asset.part_names))
        assert (counts >= 20).all(), (asset.category, counts)
        assert mesh.vertex_colors is not None and mesh.vertex_colors.dtype == np.float32
        assert 0.0 <= mesh.vertex_colors.min() and mesh.vertex_colors.max() <= 1.0
        assert mesh.triangle_areas().min() > 0.0  # no degenerate triangles
        # parts do not share vertices, so per-vertex colours are per-face colours
        owners = [set(np.unique(_part_faces(asset, i))) for i in range(len(asset.part_names))]
        assert all(not (a & b) for a, b in itertools.combinations(owners, 2))
    assert 500 <= min(faces) and max(faces) <= 8000


def test_metre_scale_standing_on_the_floor(assets: list[ProceduralAsset]) -> None:
    for asset in assets:
        lo, hi = asset.mesh.bbox()
        size = np.linalg.norm(hi - lo)
        assert 0.05 <= (hi - lo).max() <= 0.4, (asset.category, hi - lo)
        assert abs(lo[1]) < 1e-6, asset.category
        centre = (lo + hi) / 2  # centred on x = z = 0 up to the yaw
        assert np.hypot(centre[0], centre[2]) < 0.3 * size


def test_frames_are_orthonormal_right_handed_and_on_their_part(assets: list[ProceduralAsset]) -> None:
    for asset in assets:
        for i, frame in enumerate(asset.part_frames):
            assert frame.origin.shape == (3,) and frame.axes.shape == (3, 3)
            assert frame.origin.dtype == frame.axes.dtype == np.float32
            np.testing.assert_allclose(frame.axes @ frame.axes.T, np.eye(3), atol=1e-5)
            assert np.linalg.det(frame.axes) == pytest.approx(1.0, abs=1e-5)
            v = _part_vertices(asset, i)
            lo, hi = v.min(axis=0), v.max(axis=0)
            margin = 0.1 * np.linalg.norm(hi - lo)
            assert ((frame.origin >= lo - margin) & (frame.origin <= hi + margin)).all(), \
                (asset.category, asset.part_names[i])


def test_frames_follow_their_kind_convention(assets: list[ProceduralAsset]) -> None:
    """Geometric meaning of each kind, checked on the part's own vertices."""
    up = np.array([0.0, 1.0, 0.0])
    checked = set()
    for asset in assets:
        for i, functions in enumerate(asset.part_functions):
            if not functions:
                continue
            kind, frame = FRAME_KIND[functions[0]], asset.part_frames[i]
            local = (_part_vertices(asset, i) - frame.origin) @ frame.axes.T  # coordinates in the frame
            x, y, z = frame.axes
            where = (asset.category, asset.part_names[i])
            if kind == "opening":  # the part lies behind its opening, the opening faces outward
                assert local[:, 2].max() < 1e-3 and z @ up > 0.3, where
                assert y @ up > -1e-6 and abs(x @ up) < 1e-5, where
            elif kind == "cavity":  # the origin is the lowest inner point, y points out of the hollow
                assert np.isclose(y @ up, 1.0) and np.percentile(local[:, 1], 5) > -0.01, where
            elif kind == "loop":  # the origin is in the hole, not inside the material
                assert np.linalg.norm(local, axis=1).min() > 0.003 and np.isclose(y @ up, 1.0), where
            elif kind == "axis":  # the origin is on the rolling axis: the body is round about y
                radial = np.hypot(local[:, 0], local[:, 2])
                assert abs(np.percentile(local[:, 1], 50)) < 0.05, where
                assert radial.max() < 1.5 * np.median(radial), where
            elif kind == "edge":  # nothing of the blade is beyond the edge in the cutting direction
                assert local[:, 1].max() < 1e-3 and z @ up > 0.99, where  # lying flat
            elif kind == "tip":  # the tip is the part's extreme point along x
                assert local[:, 0].max() < 4e-3 and abs(x @ up) < 1e-6 and y @ up > 0.99, where
            elif kind == "plate":  # the working face is up and the origin is within the plate
                assert np.isclose(y @ up, 1.0) and local[:, 0].min() < 0 < local[:, 0].max(), where
            elif kind == "face":  # the striking face is the extreme point along z
                towards_rest = asset.mesh.vertices.mean(axis=0) - frame.origin  # the handle side
                assert abs(local[:, 2].max()) < 1e-3 and y @ towards_rest > 0, where
            checked.add(kind)
    assert checked == {"opening", "cavity", "loop", "axis", "edge", "tip", "plate", "face"}


def _aligned_distances(pairs) -> tuple[np.ndarray, np.ndarray]:
    aligned, raw = [], []
    for (a, i), (b, j) in pairs:
        ca, cb = _part_centroid(a, i), _part_centroid(b, j)
        aligned.append(np.linalg.norm(align_to(a.part_frames[i], b.part_frames[j], ca[None])[0] - cb))
        raw.append(np.linalg.norm(ca - cb))
    return np.array(aligned), np.array(raw)


def _functional(asset: ProceduralAsset, function: str) -> int:
    return next(i for i, f in enumerate(asset.part_functions) if function in f)


def test_pour_alignment_mug_to_mug_and_kettle_spout_to_bottle_neck() -> None:
    mugs = [make_asset("mug", s) for s in range(5)]
    pairs = [((a, _functional(a, "pour-with")), (b, _functional(b, "pour-with")))
             for a, b in itertools.combinations(mugs, 2)]
    aligned, _ = _aligned_distances(pairs)
    assert aligned.max() < 0.01  # rim centres coincide up to the rim-band heights

    kettles = [make_asset("kettle", s) for s in range(5)]
    bottles = [make_asset("bottle", s) for s in range(5)]
    pairs = [((k, _functional(k, "pour-with")), (b, _functional(b, "pour-with")))
             for k in kettles for b in bottles]
    aligned, raw = _aligned_distances(pairs)
    assert aligned.max() < 0.05 and aligned.mean() < 0.03
    assert raw.mean() > 3 * aligned.mean()  # without the functional alignment they are far apart


def test_alignment_works_for_every_function_across_assets() -> None:
    collection = make_collection(len(PROCEDURAL_CATEGORIES) * 4, seed=3)
    parts: dict[str, list] = {}
    for asset in collection:
        for i, functions in enumerate(asset.part_functions):
            for function in functions:
                parts.setdefault(function, []).append((asset, i))
    for function, members in parts.items():
        aligned, raw = _aligned_distances(itertools.combinations(members, 2))
        assert aligned.max() < 0.06 and aligned.mean() < 0.025, (function, aligned.max(), aligned.mean())
        assert aligned.mean() < raw.mean(), function


def test_align_to_maps_frame_onto_frame() -> None:
    a, b = make_asset("knife", 1), make_asset("fork", 2)
    fa, fb = a.part_frames[_functional(a, "pierce-with")], b.part_frames[_functional(b, "pierce-with")]
    moved = align_to(fa, fb, np.stack([fa.origin, fa.origin + fa.axes[0], fa.origin + fa.axes[1]]))
    expected = np.stack([fb.origin, fb.origin + fb.axes[0], fb.origin + fb.axes[1]])
    np.testing.assert_allclose(moved, expected, atol=1e-5)


def test_colour_does_not_give_the_functional_part_away() -> None:
    collection = make_collection(60, seed=1)
    functional, other, shares_any, shares_non_functional = [], [], 0, 0
    for asset in collection:
        colours = _part_colours(asset)
        is_functional = np.array([bool(f) for f in asset.part_functions])
        functional += list(colours[is_functional])
        other += list(colours[~is_functional])
        same = (colours[:, None] == colours[None]).all(axis=2) & ~np.eye(len(colours), dtype=bool)
        shares_any += bool(same[is_functional].any())
        shares_non_functional += bool(same[np.ix_(is_functional, ~is_functional)].any())
    functional, other = np.array(functional), np.array(other)
    assert len(functional) > 50 and len(other) > 50
    # same distribution: mean colour and brightness agree, and the spread is wide for both
    assert np.abs(functional.mean(axis=0) - other.mean(axis=0)).max() < 0.08
    assert abs(functional.mean() - other.mean()) < 0.05
    assert functional.std(axis=0).min() > 0.2 and other.std(axis=0).min() > 0.2
    assert shares_any / 60 > 0.5 and shares_non_functional / 60 > 0.4


def test_a_part_has_no_fixed_colour() -> None:
    for category in ("mug", "kettle", "knife"):
        colours = np.array([_part_colours(make_asset(category, s)) for s in range(10)])  # seed, part, rgb
        for part in range(colours.shape[1]):
            assert len(np.unique(colours[:, part].round(3), axis=0)) >= 4


def test_collection_round_robin_deterministic_and_small() -> None:
    collection = make_collection(24, 0)
    k = len(PROCEDURAL_CATEGORIES)
    assert [a.category for a in collection] == [PROCEDURAL_CATEGORIES[i % k] for i in range(24)]
    assert all(a.mesh.n_faces <= 8000 for a in collection)
    again = make_collection(24, 0)
    assert all(np.array_equal(a.mesh.vertices, b.mesh.vertices) for a, b in zip(collection, again))
    # two mugs of one collection differ; another collection seed gives other assets
    mugs = [a for a in collection if a.category == "mug"]
    assert not np.array_equal(mugs[0].mesh.vertices, mugs[1].mesh.vertices)
    assert not np.array_equal(make_collection(1, 1)[0].mesh.vertices, collection[0].mesh.vertices)
    assert make_collection(0, 0) == []


def test_unknown_category_lists_the_valid_ones() -> None:
    with pytest.raises(KeyError) as info:
        make_asset("teapot", 0)  # in the taxonomy, but not procedural
    message = str(info.value)
    assert "teapot" in message and all(c in message for c in PROCEDURAL_CATEGORIES)
