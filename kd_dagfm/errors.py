"""Exception types raised by kd-dagfm.

Every error names the value that was rejected, what was expected, and what
to do next, so that a user can act on the message alone.
"""

from __future__ import annotations


class KDDAGFMError(Exception):
    """Base class of all errors raised on purpose by this package."""


class ConfigError(KDDAGFMError, ValueError):
    """An invalid configuration key or value."""


class SchemaError(KDDAGFMError, ValueError):
    """A feature schema that is malformed or does not match the data."""


class DataError(KDDAGFMError, ValueError):
    """Input data that cannot be read or fails validation."""


class TrainingError(KDDAGFMError, RuntimeError):
    """Training that cannot continue, such as a loss that became NaN or infinite."""


class CheckpointError(KDDAGFMError, RuntimeError):
    """A checkpoint that is missing, unreadable, incomplete or incompatible."""


class StorageError(DataError):
    """Storage (local disk or an object store such as S3) that failed after retries."""
