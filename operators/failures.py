"""Row errors and infrastructure errors (DESIGN §8).

A row error says this input is bad (an unreadable mesh, a malformed model answer): it becomes an
`errors/` row and the job goes on. An infrastructure error says something the whole job depends
on failed (storage unreachable, credentials refused, a model endpoint down, a device out of
memory, the cluster gone): every further row would fail the same way, so the job stops at once
with one line naming what failed and what to check, instead of an error row per asset.
`infrastructure_problem` tells them apart from the exception alone (its type, or the provider's
error code in its message), importing nothing heavy.
"""

from __future__ import annotations

import errno

# Provider error codes and messages that mean "storage or credentials", not "this file".
_CREDENTIALS = ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                "ExpiredToken", "InvalidToken", "NoCredentialsError",
                "Unable to locate credentials")
_UNREACHABLE = ("NETWORK_CONNECTION", "Couldn't connect", "Could not connect", "Connection refused",
                "Failed to connect", "Could not resolve host", "Name or service not known",
                "EndpointConnectionError", "Connection reset", "Timeout was reached")
# The writer's disk or quota is full, or it is read-only: every further write fails alike.
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)

# Errors of cloud clients (botocore, requests) that are not OSErrors.
_CLIENT_ERRORS = ("ClientError", "NoCredentialsError", "EndpointConnectionError",
                  "ConnectTimeoutError", "ReadTimeoutError", "ConnectionError")


class InfrastructureError(RuntimeError):
    """Something the job depends on failed; the message says what and what to check."""


def infrastructure_problem(err: BaseException) -> str | None:
    """One line describing `err` when it is an infrastructure failure, else None (a row error)."""
    kind = type(err).__name__
    module = type(err).__module__ or ""
    text = str(err).strip().splitlines()[0] if str(err).strip() else kind
    if isinstance(err, InfrastructureError):
        return str(err)
    if kind in ("StorageError", "LeaseLostError"):
        return text
    if kind == "OutOfMemoryError" and module.startswith("ray"):
        return (f"Ray killed a worker because its node ran out of memory ({text[:200]}): lower "
                "the batch_size or concurrency of the step (<stage>.resources.<step>) or add "
                "memory")
    if (kind == "OutOfMemoryError" and module.startswith("torch")) or "CUDA out of memory" in text:
        return (f"the device ran out of memory ({text[:200]}): lower the batch size of the "
                "model step or use a larger GPU")
    if isinstance(err, OSError) and err.errno in _DISK_ERRNOS:
        return (f"the disk is full or read-only ({text[:300]}): free space or choose another "
                "run root / temporary directory")
    if isinstance(err, (FileNotFoundError, IsADirectoryError, NotADirectoryError,
                        PermissionError)) and not any(m in text for m in _CREDENTIALS):
        return None  # this input is missing or unreadable: a row error
    status = getattr(err, "status", None)
    if kind == "GroundingEndpointError" and isinstance(status, int) and 400 <= status < 500 \
            and status not in (401, 403, 404, 408, 429):
        return None  # the endpoint refused this request (e.g. this image): a row error
    if not isinstance(err, OSError) and kind not in _CLIENT_ERRORS:
        return None  # a ValueError, a malformed answer, a bad mesh...: this input
    message = f"{kind}: {text}"
    if kind == "GroundingEndpointError" and status in (401, 403):
        return (f"the model endpoint refused the API key ({text[:300]}): check the grounding "
                "backend's api_key_env variable on the workers")
    if any(marker in message for marker in _CREDENTIALS):
        return (f"storage refused the credentials ({text[:300]}): check storage.access_key_id / "
                "secret_access_key or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket's "
                "permissions")
    # A timeout counts when a client says so (socket, botocore, curl), not any "timed out" text.
    if isinstance(err, (ConnectionError, TimeoutError)) \
            or any(marker in message for marker in _UNREACHABLE) or "AWS Error" in message \
            or kind in ("ConnectTimeoutError", "ReadTimeoutError", "EndpointConnectionError"):
        return (f"a service the job needs is unreachable ({text[:300]}): check that the "
                "storage endpoint or model server is up and reachable from the workers")
    return None
