"""Geometry: meshes, cameras, projection and visibility, rendering, label aggregation, feature lifting."""
