"""Ray drivers, config schemas, the `partlift` CLI and job submission."""
