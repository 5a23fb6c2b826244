"""Data: mesh files and the asset manifest, the procedural generator, the function taxonomy."""
