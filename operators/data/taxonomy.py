"""The function / category / functional-part taxonomy (DFC Appendix A.1-A.2, Table 6).

`taxonomy.yaml` beside this module is the data; `load_taxonomy()` reads and validates it. Every
later stage (grounding prompts, labels, pair sampling, evaluation) asks this module which parts of
a category perform a function, so the names here are the project's vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_TAXONOMY_PATH = Path(__file__).parent / "taxonomy.yaml"
_PART_KEYS = {"functions", "description"}
_CATEGORY_KEYS = {"parts", "procedural"}


class TaxonomyError(ValueError):
    """The taxonomy file is malformed; the message names the offending entry."""


class UnknownNameError(KeyError):
    """A category or function name the taxonomy does not know; the message lists valid names."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


@dataclass(frozen=True)
class Part:
    name: str
    functions: tuple[str, ...]  # empty: a non-functional part (grip, body, ...)
    description: str  # appearance, usable as a grounding prompt


@dataclass(frozen=True)
class Category:
    name: str
    parts: dict[str, Part]
    procedural: bool = False  # made by operators.data.procedural

    @property
    def functions(self) -> tuple[str, ...]:
        """Functions any part performs, in part order, without repeats."""
        return tuple(dict.fromkeys(f for part in self.parts.values() for f in part.functions))


@dataclass(frozen=True)
class Taxonomy:
    functions: dict[str, str]  # name -> one-line description
    categories: dict[str, Category]

    def category(self, name: str) -> Category:
        try:
            return self.categories[name]
        except KeyError:
            raise UnknownNameError(_unknown("category", name, self.categories)) from None

    def functions_of(self, category: str) -> tuple[str, ...]:
        return self.category(category).functions

    def parts_for(self, category: str, function: str) -> tuple[Part, ...]:
        """Parts of `category` that perform `function` (empty if the category cannot)."""
        self._check_function(function)
        return tuple(p for p in self.category(category).parts.values() if function in p.functions)

    def categories_with(self, function: str) -> tuple[str, ...]:
        self._check_function(function)
        return tuple(name for name, cat in self.categories.items() if function in cat.functions)

    def _check_function(self, function: str) -> None:
        if function not in self.functions:
            raise UnknownNameError(_unknown("function", function, self.functions))


def _unknown(kind: str, name: str, valid: Any) -> str:
    return f"unknown {kind} {name!r}; valid {kind} names: {', '.join(sorted(valid))}"


def load_taxonomy(path: str | Path | None = None) -> Taxonomy:
    """Read and validate the taxonomy YAML (the packaged `taxonomy.yaml` by default)."""
    source = Path(path) if path is not None else DEFAULT_TAXONOMY_PATH
    with open(source, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    return parse_taxonomy(raw, str(source))


def parse_taxonomy(raw: Any, source: str = "taxonomy") -> Taxonomy:
    """Build a Taxonomy from already-parsed YAML, raising TaxonomyError on the first bad entry."""
    if not isinstance(raw, dict) or set(raw) != {"functions", "categories"}:
        keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise TaxonomyError(f"{source}: expected top-level keys 'functions' and 'categories', "
                            f"got {keys}")
    functions = raw["functions"]
    if not isinstance(functions, dict) or not functions:
        raise TaxonomyError(f"{source}: 'functions' must be a non-empty mapping name -> description")
    for name, description in functions.items():
        if not isinstance(description, str) or not description.strip():
            raise TaxonomyError(f"{source}: function {name!r} needs a one-line description")
    if not isinstance(raw["categories"], dict) or not raw["categories"]:
        raise TaxonomyError(f"{source}: 'categories' must be a non-empty mapping")
    categories = {name: _parse_category(name, entry, functions, source)
                  for name, entry in raw["categories"].items()}
    return Taxonomy(functions=dict(functions), categories=categories)


def _parse_category(name: str, entry: Any, functions: dict[str, str], source: str) -> Category:
    where = f"{source}: category {name!r}"
    if not isinstance(entry, dict) or not set(entry) <= _CATEGORY_KEYS or "parts" not in entry:
        raise TaxonomyError(f"{where}: expected keys {sorted(_CATEGORY_KEYS)} with 'parts' required")
    if not isinstance(entry.get("procedural", False), bool):
        raise TaxonomyError(f"{where}: 'procedural' must be true or false")
    if not isinstance(entry["parts"], dict) or not entry["parts"]:
        raise TaxonomyError(f"{where}: 'parts' must be a non-empty mapping part -> entry")
    parts = {}
    for part_name, part in entry["parts"].items():
        at = f"{where}, part {part_name!r}"
        if not isinstance(part, dict) or set(part) != _PART_KEYS:
            raise TaxonomyError(f"{at}: expected exactly the keys {sorted(_PART_KEYS)}")
        if not isinstance(part["description"], str) or not part["description"].strip():
            raise TaxonomyError(f"{at}: description must be a non-empty string")
        names = part["functions"]
        if not isinstance(names, list) or len(set(names)) != len(names):
            raise TaxonomyError(f"{at}: functions must be a list without repeats")
        for function in names:
            if not isinstance(function, str) or function not in functions:
                raise TaxonomyError(f"{at}: {_unknown('function', function, functions)}")
        parts[part_name] = Part(part_name, tuple(names), part["description"].strip())
    return Category(name, parts, entry.get("procedural", False))
