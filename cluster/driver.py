"""The Ray driver: connect to a cluster (or start a local one), train, disconnect.

The address comes from ``ray_address`` in the config, else ``RAY_ADDRESS``
(``ray job submit`` sets it for the entrypoint). With neither, the driver
starts a loopback-only head with :class:`cluster.local.LocalRayHead` and
stops it when training ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence

from cluster.local import LocalClusterConfig, LocalRayHead
from cluster.ray_train import run_on_ray
from kd_dagfm.config import RunConfig
from kd_dagfm.phases import PIPELINE, Phase
from kd_dagfm.train.trainer import PhaseResult

logger = logging.getLogger(__name__)


def local_cluster_config(config: RunConfig) -> LocalClusterConfig:
    """Size a local head with enough logical CPUs and GPUs for ``config``'s workers.

    Logical CPUs may exceed the machine's cores: Ray only uses them to
    decide where actors fit.
    """
    distributed = config.distributed
    needed_cpus = distributed.num_workers * distributed.cpus_per_worker
    needed_gpus = distributed.num_workers * distributed.gpus_per_worker
    return LocalClusterConfig(
        num_cpus=max(os.cpu_count() or 1, needed_cpus),
        num_gpus=needed_gpus,
    )


@contextlib.contextmanager
def ray_session(
    config: RunConfig, local: LocalClusterConfig | None = None
) -> Iterator[str]:
    """Connect this process to Ray for the block; yields the GCS address.

    Args:
        config: uses ``ray_address``; without it, ``RAY_ADDRESS``.
        local: the head to start when there is no address (default:
            :func:`local_cluster_config`).
    """
    import ray

    address = config.distributed.ray_address or os.environ.get("RAY_ADDRESS")
    with contextlib.ExitStack() as stack:
        if not address:
            head = LocalRayHead(local or local_cluster_config(config))
            stack.enter_context(head)
            stack.enter_context(head.client_environment())
            address = head.address
            logger.info("no Ray address given; started a local head at %s", address)
        # No runtime_env here: under `ray job submit` the job's own runtime_env
        # (its working_dir) applies, and the workers get WORKER_ENV from the
        # trainer's worker_runtime_env.
        ray.init(address=address, logging_level=logging.WARNING)
        stack.callback(ray.shutdown)
        yield address


def run_driver(
    config: RunConfig,
    phases: Sequence[Phase] = PIPELINE,
    name: str | None = None,
    local: LocalClusterConfig | None = None,
) -> list[PhaseResult]:
    """Connect to Ray (or start a local head), run ``phases``, return their results."""
    with ray_session(config, local):
        return run_on_ray(config, phases, name)
