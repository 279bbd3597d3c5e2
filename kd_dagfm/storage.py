"""Local paths and fsspec URLs (``s3://``, ``file://``, ...) behind one API.

S3 credentials and endpoints come from the usual AWS sources (environment,
``~/.aws/config``, instance roles); ``AWS_ENDPOINT_URL`` points s3fs at an
S3-compatible server. Nothing here logs credentials.
"""

from __future__ import annotations

import posixpath
from typing import Any

import fsspec
from fsspec.core import url_to_fs


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def filesystem(
    url: str, **storage_options: Any
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (filesystem, path within it) for a local path or URL."""
    if is_remote(url) and url.startswith(("s3://", "s3a://")):
        storage_options = {**s3_options(), **storage_options}
    fs, path = url_to_fs(url, **storage_options)
    return fs, path


def s3_options() -> dict[str, Any]:
    """s3fs options: bounded retries with backoff, so an unreachable endpoint
    fails in seconds rather than minutes."""
    return {
        "config_kwargs": {
            "retries": {"max_attempts": 3, "mode": "standard"},
            "connect_timeout": 5,
            "read_timeout": 30,
        },
    }


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(base, *parts)
    return posixpath.join(base, *parts) if base else posixpath.join(*parts)
