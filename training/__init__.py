"""Models, losses, pair sampling, metrics and Ray Train loops (later issues)."""
