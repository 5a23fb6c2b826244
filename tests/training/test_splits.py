"""Asset splits: a hash of the id, stable when assets are added, held-out categories."""

from __future__ import annotations

from training.splits import assign_splits, hash_fraction, split_of


def test_split_follows_the_id_hash_and_holds_when_assets_are_added() -> None:
    ids = {f"asset{i:05d}": "mug" for i in range(2000)}
    splits = assign_splits(ids, 0.1)
    val = sum(s == "val" for s in splits.values())
    assert 160 <= val <= 240  # 10% of 2000 = 200, binomial sd ~13
    more = assign_splits({**ids, **{f"new{i}": "cup" for i in range(500)}}, 0.1)
    assert all(more[a] == s for a, s in splits.items())  # adding assets moves none
    assert all((hash_fraction(a) < 0.1) == (s == "val") for a, s in splits.items())


def test_held_out_categories_and_the_salt() -> None:
    assert split_of("x", "knife", 0.5, holdout_categories=["knife"]) == "holdout"
    assert split_of("x", "knife", 0.0) == "train" and split_of("x", "knife", 0.999999) == "val"
    ids = {f"a{i}": "mug" for i in range(200)}
    assert assign_splits(ids, 0.5, salt=0) != assign_splits(ids, 0.5, salt=1)
