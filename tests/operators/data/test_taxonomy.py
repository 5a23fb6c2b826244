"""Taxonomy data (DFC Table 6) and its loader: content, queries, errors, validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from operators.data.taxonomy import (DEFAULT_TAXONOMY_PATH, Taxonomy, TaxonomyError,
                                     UnknownNameError, load_taxonomy)

TABLE_6_FUNCTIONS = {
    "pour-with", "cut-with", "scoop-with", "pound-with", "pierce-with", "poke-with", "mix-with",
    "roll-onto", "dig-with", "sweep-with", "pry-with", "lift-with", "pull-with", "spread-with",
    "brush-with", "write-with", "hang-onto", "peel-with", "pick-up-with", "wedge-with",
    "apply-torque-with", "sift-with", "scrape-with", "press-with",
}


@pytest.fixture(scope="module")
def taxonomy() -> Taxonomy:
    return load_taxonomy()


def test_has_exactly_the_24_table6_functions_with_descriptions(taxonomy: Taxonomy) -> None:
    assert set(taxonomy.functions) == TABLE_6_FUNCTIONS
    assert len(taxonomy.functions) == 24
    assert all(len(d.split()) >= 5 for d in taxonomy.functions.values())


def test_every_function_is_performed_by_some_category(taxonomy: Taxonomy) -> None:
    for function in TABLE_6_FUNCTIONS:
        assert taxonomy.categories_with(function), function


def test_every_part_has_a_prompt_description_and_known_functions(taxonomy: Taxonomy) -> None:
    assert len(taxonomy.categories) >= 20
    for category in taxonomy.categories.values():
        assert category.parts
        for name, part in category.parts.items():
            assert part.name == name
            assert len(part.description.split()) >= 3, (category.name, name)
            assert set(part.functions) <= TABLE_6_FUNCTIONS
        # a category is in the taxonomy because some part of it does something
        assert category.functions, category.name


def test_queries(taxonomy: Taxonomy) -> None:
    assert taxonomy.functions_of("mug") == ("roll-onto", "pour-with", "scoop-with", "hang-onto")
    assert [p.name for p in taxonomy.parts_for("kettle", "pour-with")] == ["spout"]
    assert [p.name for p in taxonomy.parts_for("knife", "pierce-with")] == ["point"]
    assert taxonomy.parts_for("knife", "pour-with") == ()  # known function, not this category
    pour = taxonomy.categories_with("pour-with")
    assert {"mug", "cup", "bottle", "kettle", "bowl"} <= set(pour)
    assert "knife" not in pour
    assert taxonomy.category("hammer").parts["face"].functions == ("pound-with",)
    assert taxonomy.category("teapot").procedural is False
    assert taxonomy.category("mug").procedural is True


@pytest.mark.parametrize("call", [
    lambda t: t.category("mugg"),
    lambda t: t.functions_of("teacup"),
    lambda t: t.parts_for("spaceship", "pour-with"),
])
def test_unknown_category_lists_valid_names(taxonomy: Taxonomy, call) -> None:
    with pytest.raises(UnknownNameError) as info:
        call(taxonomy)
    assert isinstance(info.value, KeyError)
    message = str(info.value)
    assert "unknown category" in message and "mug" in message and "screwdriver" in message


@pytest.mark.parametrize("call", [
    lambda t: t.categories_with("pour"),
    lambda t: t.parts_for("mug", "pour_with"),
])
def test_unknown_function_lists_valid_names(taxonomy: Taxonomy, call) -> None:
    with pytest.raises(KeyError) as info:
        call(taxonomy)
    message = str(info.value)
    assert "unknown function" in message and "pour-with" in message and "hang-onto" in message


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "taxonomy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _minimal() -> dict:
    return {"functions": {"pour-with": "let liquid flow out of a container"},
            "categories": {"jug": {"parts": {"spout": {"functions": ["pour-with"],
                                                       "description": "the pinched lip"}}}}}


def test_loads_a_custom_file(tmp_path: Path) -> None:
    taxonomy = load_taxonomy(_write(tmp_path, _minimal()))
    assert taxonomy.functions_of("jug") == ("pour-with",)
    assert taxonomy.category("jug").procedural is False


def test_unknown_function_in_a_part_names_the_entry(tmp_path: Path) -> None:
    data = _minimal()
    data["categories"]["jug"]["parts"]["spout"]["functions"] = ["pour-with", "teleport-with"]
    with pytest.raises(TaxonomyError, match=r"'jug'.*'spout'.*'teleport-with'.*pour-with"):
        load_taxonomy(_write(tmp_path, data))


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.pop("functions"), "top-level keys"),
    (lambda d: d["functions"].update({"cut-with": ""}), "'cut-with' needs a one-line description"),
    (lambda d: d["categories"]["jug"]["parts"]["spout"].pop("description"), "'spout': expected exactly"),
    (lambda d: d["categories"]["jug"]["parts"]["spout"].update(functions="pour-with"),
     "list without repeats"),
    (lambda d: d["categories"]["jug"].update(procedural="yes"), "'procedural' must be true or false"),
    (lambda d: d["categories"]["jug"].update(parts={}), "'jug': 'parts' must be a non-empty"),
])
def test_malformed_entries_are_rejected(tmp_path: Path, mutate, match: str) -> None:
    data = _minimal()
    mutate(data)
    with pytest.raises(TaxonomyError, match=match):
        load_taxonomy(_write(tmp_path, data))


def test_default_path_is_the_packaged_file() -> None:
    assert DEFAULT_TAXONOMY_PATH.name == "taxonomy.yaml" and DEFAULT_TAXONOMY_PATH.is_file()
    assert load_taxonomy(DEFAULT_TAXONOMY_PATH) == load_taxonomy()
