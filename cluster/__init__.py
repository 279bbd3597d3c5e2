"""Ray integration: a loopback-only local head, the Ray Train runner, the driver."""

from cluster.local import (
    AUTH_MODES,
    LocalClusterConfig,
    LocalClusterError,
    LocalRayHead,
)

__all__ = ["AUTH_MODES", "LocalClusterConfig", "LocalClusterError", "LocalRayHead"]
