"""Local paths and fsspec URLs (``s3://``, ``file://``, ...) behind one API.

S3 credentials come from the usual AWS sources (environment, ``~/.aws``,
instance roles) and are never read or logged here. The endpoint comes from
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` when set, which points s3fs
at an S3-compatible server (MinIO, Ceph, moto).

Requests to S3 are retried with exponential backoff and jitter, a bounded
number of times, so an unreachable endpoint fails in seconds with a
:class:`~kd_dagfm.errors.StorageError` that names the URL and the endpoint.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from kd_dagfm.errors import StorageError

# Attempts per request in botocore's "standard" retry mode, the first
# included. In botocore 1.43 retry i waits rand(0, 1) * base * 2**i seconds,
# with base 1 after throttling and 0.05 otherwise.
S3_REQUEST_ATTEMPTS = 3
# s3fs retries a whole request (its own backoff 0.1 s, 0.17 s, ...) on
# timeouts and truncated bodies, around botocore's attempts.
S3FS_RETRIES = 2
S3_CONNECT_TIMEOUT_S = 5
S3_READ_TIMEOUT_S = 30


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def is_s3(url: str) -> bool:
    return url.startswith(("s3://", "s3a://"))


def filesystem(
    url: str, **storage_options: Any
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (filesystem, path within it) for a local path or URL."""
    if is_s3(url):
        storage_options = {**s3_options(), **storage_options}
    fs, path = url_to_fs(url, **storage_options)
    if is_s3(url):
        fs.retries = S3FS_RETRIES  # a class attribute of S3FileSystem, not an option
    return fs, path


def s3_endpoint() -> str | None:
    """Return the S3 endpoint URL from the environment, or None for AWS's default."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_options() -> dict[str, Any]:
    """s3fs options: bounded retries with backoff and connection timeouts.

    The endpoint is passed explicitly (not only left to botocore's
    environment lookup) because fsspec caches filesystem instances by their
    options: a changed ``AWS_ENDPOINT_URL`` must give a new instance.
    """
    options: dict[str, Any] = {
        "config_kwargs": {
            "retries": {"total_max_attempts": S3_REQUEST_ATTEMPTS, "mode": "standard"},
            "connect_timeout": S3_CONNECT_TIMEOUT_S,
            "read_timeout": S3_READ_TIMEOUT_S,
        },
    }
    endpoint = s3_endpoint()
    if endpoint:
        options["endpoint_url"] = endpoint
    return options


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(base, *parts)
    return posixpath.join(base, *parts) if base else posixpath.join(*parts)


def _transport_error_types() -> tuple[type[BaseException], ...]:
    """Exception types of the network clients behind fsspec, where installed."""
    types: list[type[BaseException]] = [TimeoutError, ConnectionError]
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        types += [BotoCoreError, ClientError]
    except ImportError:
        pass
    try:
        from aiohttp import ClientError as AiohttpClientError

        types.append(AiohttpClientError)
    except ImportError:
        pass
    try:
        from fsspec.exceptions import FSTimeoutError

        types.append(FSTimeoutError)
    except ImportError:
        pass
    return tuple(types)


TRANSPORT_ERRORS = _transport_error_types()


def transport_cause(error: BaseException) -> BaseException | None:
    """Find the network-client error behind ``error`` (itself or in its cause chain).

    s3fs translates S3 error responses into OSError subclasses with the
    botocore error as ``__cause__``; pyarrow re-raises errors of Python file
    objects unchanged. A decoding error of a corrupt file has no such cause.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, TRANSPORT_ERRORS):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def storage_error(url: str, action: str, error: BaseException) -> StorageError:
    """Build the StorageError for a failed ``action`` on ``url`` after the client's retries."""
    cause = transport_cause(error) or error
    where = url
    if is_s3(url):
        endpoint = s3_endpoint() or "the default AWS endpoint"
        attempts = S3_REQUEST_ATTEMPTS * S3FS_RETRIES
        where = (
            f"{url} (S3 endpoint {endpoint}, up to {attempts} attempts with backoff)"
        )
    return StorageError(
        f"failed to {action} {where}: {type(cause).__name__}: {cause}. Check that "
        "the endpoint is reachable (AWS_ENDPOINT_URL for S3-compatible servers) "
        "and that the AWS credentials allow access, then run again; an "
        "interrupted training run resumes from its last checkpoint"
    )
