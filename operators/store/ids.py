"""Stable identifiers, their validation before they become object keys, and seeds derived from them."""

from __future__ import annotations

import hashlib
import re

import numpy as np

# Object keys are built from ids: no separators, no parent references, no control characters.
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ASSET_ID_HEX_CHARS = 20


class InvalidIdError(ValueError):
    """An id that cannot safely become part of an object key."""


def validate_id(value: str, what: str = "asset_id") -> str:
    """Return `value` if it is a safe key component, else raise InvalidIdError naming it."""
    if not isinstance(value, str) or not _ID_PATTERN.fullmatch(value) or ".." in value:
        raise InvalidIdError(
            f"invalid {what} {value!r}: use 1-128 characters from letters, digits, '.', '_', '-', "
            "starting with a letter or digit, without '..', '/' or control characters")
    return value


def content_asset_id(data: bytes) -> str:
    """Stable asset id: the first 20 hex digits of the SHA-256 of the mesh file's bytes."""
    return hashlib.sha256(data).hexdigest()[:ASSET_ID_HEX_CHARS]


def seed_for(seed: int, asset_id: str) -> int:
    """A per-asset seed that depends on the run's seed and the asset id only: not on batch
    composition, worker or order."""
    digest = int(hashlib.sha256(asset_id.encode()).hexdigest()[:15], 16)
    return int(np.random.SeedSequence([seed, digest]).generate_state(1)[0])
