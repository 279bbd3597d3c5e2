"""Kubernetes deployment: manifests rendered from a run config, and their
offline validation.

``kd-dagfm render-k8s`` is the command-line front end; see docs/deploy.md.
"""

from cluster.k8s.render import RenderedDeployment, check_deployable, render
from cluster.k8s.sizing import MemoryEstimate, estimate_worker_memory

__all__ = [
    "MemoryEstimate",
    "RenderedDeployment",
    "check_deployable",
    "estimate_worker_memory",
    "render",
]
