"""The papers' benchmarks as data: loaders of their public layouts and procedural stand-ins
written in the same layouts (SOCO, InstructPart, AGD20K). Plain IO and geometry, no models:
the predictors and the eval loop live in `training/`, the job in `rayjobs/eval_job.py`."""
