"""Failures a user sees as one line (no traceback); light to import, for the client."""

from __future__ import annotations


from operators.failures import InfrastructureError


class JobFailedError(RuntimeError):
    """Too many rows failed (above job.max_error_fraction); the message says where to look."""


class ClusterError(InfrastructureError):
    """The Ray cluster cannot be reached or joined; the message says which and what to check."""
