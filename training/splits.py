"""Asset splits shared by every learning stage: train / val from a hash of the asset id, plus
held-out categories that no training run reads.

A hash (not a shuffled list) keeps an asset's split when assets are added to a root, so a
validation asset never becomes a training asset of a later run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Literal

Split = Literal["train", "val", "holdout"]


def hash_fraction(asset_id: str, salt: int = 0) -> float:
    """A stable number in [0, 1) from the asset id (blake2b, not Python's salted hash)."""
    digest = hashlib.blake2b(f"{salt}:{asset_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def split_of(asset_id: str, category: str, val_fraction: float,
             holdout_categories: Iterable[str] = (), salt: int = 0) -> Split:
    """The split of one asset: holdout (its category is held out), else val for a hash below
    val_fraction, else train."""
    if category in set(holdout_categories):
        return "holdout"
    return "val" if hash_fraction(asset_id, salt) < val_fraction else "train"


def assign_splits(categories: Mapping[str, str], val_fraction: float,
                  holdout_categories: Iterable[str] = (), salt: int = 0) -> dict[str, Split]:
    """asset_id -> split for a manifest's {asset_id: category}."""
    held = set(holdout_categories)
    return {asset: split_of(asset, category, val_fraction, held, salt)
            for asset, category in categories.items()}
