"""Per-batch compute and IO for partlift. Nothing in this package imports Ray."""
