"""The torch.distributed process group and the device of this rank.

Launchers set the standard environment before a worker starts: ``torchrun``
and Ray Train set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
and ``MASTER_PORT`` (Ray Train also initialises the group itself). The
backend follows the hardware: gloo on CPU, NCCL when this rank has a GPU.
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from kd_dagfm.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0
_REQUIRED_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def default_backend() -> str:
    """Return ``nccl`` when this process has a GPU, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_process_group(
    backend: str | None = None, timeout_s: float | None = None
) -> tuple[int, int]:
    """Join the process group described by the environment; return (rank, world size).

    An already initialised group (Ray Train creates one before the training
    function runs) is used as it is. Without any of ``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT`` set, a one-rank group on an in-memory
    store is created, so a single process can run the sharded engine too.

    Args:
        backend: ``gloo`` or ``nccl``; default: ``nccl`` with a GPU, else ``gloo``.
        timeout_s: limit on each collective; default ``KD_DAGFM_DIST_TIMEOUT_S``
            from the environment, else 600 s.

    Raises:
        ConfigError: when only part of the environment is set, or ``nccl`` is
            requested without a GPU.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()

    backend = backend or default_backend()
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError(
            "backend 'nccl' needs a GPU but torch sees none; use backend 'gloo' on "
            "CPU, or set gpus_per_worker so that the worker gets a GPU"
        )
    if timeout_s is None:
        timeout_s = float(os.environ.get("KD_DAGFM_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    timeout = datetime.timedelta(seconds=timeout_s)

    present = [name for name in _REQUIRED_ENV if name in os.environ]
    if not present:
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
        logger.info("initialised a one-rank %s process group", backend)
        _select_device(backend)
        return 0, 1
    missing = [name for name in _REQUIRED_ENV if name not in os.environ]
    if missing:
        raise ConfigError(
            f"torch.distributed environment is incomplete: {', '.join(missing)} not "
            f"set (found {', '.join(present)}); launch with torchrun or Ray Train, "
            "which set all of them"
        )

    _select_device(backend)
    dist.init_process_group(backend, init_method="env://", timeout=timeout)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        logger.info(
            "initialised the %s process group: %d ranks, master %s:%s",
            backend,
            world_size,
            os.environ["MASTER_ADDR"],
            os.environ["MASTER_PORT"],
        )
    return rank, world_size


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size(world_size: int) -> int:
    """Ranks on this host: ``LOCAL_WORLD_SIZE`` when the launcher sets it."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))


def rank_device() -> torch.device:
    """Return this rank's device: its GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _select_device(backend: str) -> None:
    if backend != "nccl":
        return
    # Ray Train narrows CUDA_VISIBLE_DEVICES to the worker's GPU, so the
    # local rank can exceed the visible count; fall back to the only one.
    index = local_rank() % torch.cuda.device_count()
    torch.cuda.set_device(index)
