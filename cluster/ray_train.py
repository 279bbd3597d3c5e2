"""Run kd-dagfm phases on Ray Train workers with sharded TorchRec tables.

The driver (a ``jobs/`` entrypoint or ``kd-dagfm ray-pipeline``) builds a
:class:`ray.train.torch.TorchTrainer` from the run config:

- ``ScalingConfig``: ``num_workers`` workers with ``cpus_per_worker`` CPUs
  and ``gpus_per_worker`` GPUs each;
- ``TorchConfig``: gloo on CPU, NCCL when workers have GPUs;
- ``RunConfig``: ``storage_path`` (default ``output_dir``), a run name that
  stays the same across submissions of the same job, and
  ``FailureConfig(max_failures)``;
- ``worker_runtime_env``: ``OMP_NUM_THREADS=1`` and
  ``RAY_USAGE_STATS_ENABLED=0`` for every worker.

Each worker joins the process group Ray Train created, then runs
:func:`kd_dagfm.pipeline.run_pipeline` with the DistributedModelParallel
engine. Restarts need nothing from Ray's own checkpoints: when Ray Train
restarts the worker group after a failure (or a stopped job is submitted
again with the same ``output_dir``), every phase resumes from its newest
complete DCP checkpoint under ``output_dir`` and finished phases are skipped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

import torch

from kd_dagfm.config import RunConfig
from kd_dagfm.errors import ConfigError, KDDAGFMError
from kd_dagfm.phases import PIPELINE, Phase
from kd_dagfm.storage import filesystem, is_remote, join
from kd_dagfm.train.checkpoint import CheckpointManager
from kd_dagfm.train.trainer import PhaseResult, phase_directory

logger = logging.getLogger(__name__)

# Environment of every Ray Train worker. One intra-op thread per rank keeps
# ranks that share a host from oversubscribing its cores.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
WORKERS_DIR = "workers"
# Forwarded to the workers when the driver has them set.
_FORWARDED_ENV = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


@dataclasses.dataclass(frozen=True)
class WorkerStart:
    """One start of one rank, appended to ``<output_dir>/workers/rank-<r>.json``.

    Attributes:
        rank: world rank.
        world_size: ranks in the run.
        pid: process id of the worker.
        host: host name of the worker.
        start: 1 for the first start of this rank in ``output_dir``, then 2, ...
        started_at: UTC time, ISO 8601.
        resume_phase: first phase without a final checkpoint (None: all done).
        resume_checkpoint: newest complete checkpoint of ``resume_phase`` it
            resumes from (None: the phase starts from its beginning).
        torch_threads: ``torch.get_num_threads()`` of the worker.
    """

    rank: int
    world_size: int
    pid: int
    host: str
    start: int
    started_at: str
    resume_phase: str | None
    resume_checkpoint: str | None
    torch_threads: int


def resume_point(
    config: RunConfig, phases: Sequence[Phase]
) -> tuple[Phase | None, str | None]:
    """(first unfinished phase, its newest complete checkpoint or None).

    Returns (None, None) when every phase already has its final checkpoint.
    """
    for phase in phases:
        manager = CheckpointManager(
            join(phase_directory(config, phase), "checkpoints"),
            config.train.keep_last_checkpoints,
        )
        latest = manager.latest()
        if latest is None:
            return phase, None
        if latest.kind != "final":
            return phase, latest.path
    return None, None


def worker_starts(output_dir: str, rank: int) -> list[WorkerStart]:
    """Read every recorded start of ``rank`` in ``output_dir``, oldest first."""
    fs, path = filesystem(join(output_dir, WORKERS_DIR, f"rank-{rank}.json"))
    if not fs.exists(path):
        return []
    with fs.open(path, "r") as f:
        return [WorkerStart(**entry) for entry in json.load(f)]


def _record_start(
    config: RunConfig, phases: Sequence[Phase], rank: int, world_size: int
) -> WorkerStart:
    phase, checkpoint = resume_point(config, phases)
    previous = worker_starts(config.train.output_dir, rank)
    start = WorkerStart(
        rank=rank,
        world_size=world_size,
        pid=os.getpid(),
        host=socket.gethostname(),
        start=len(previous) + 1,
        started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        resume_phase=phase.value if phase is not None else None,
        resume_checkpoint=checkpoint,
        torch_threads=torch.get_num_threads(),
    )
    fs, directory = filesystem(join(config.train.output_dir, WORKERS_DIR))
    fs.makedirs(directory, exist_ok=True)
    entries = [dataclasses.asdict(s) for s in [*previous, start]]
    # Write then rename, so a reader never sees half a file.
    final = join(directory, f"rank-{rank}.json")
    with fs.open(final + ".tmp", "w") as f:
        json.dump(entries, f, indent=2)
    fs.mv(final + ".tmp", final)
    return start


def _phase_metrics(result: PhaseResult) -> dict[str, Any]:
    return {
        "phase": result.phase.value,
        "valid_auc": result.valid.auc,
        "valid_log_loss": result.valid.log_loss,
        "test_auc": result.test.auc,
        "test_log_loss": result.test.log_loss,
        "train_examples_per_s": result.train_examples_per_s,
        "wall_time_s": result.wall_time_s,
        "epochs": result.epochs,
        "best_epoch": result.best_epoch,
    }


def train_loop_per_worker(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Ray Train worker body: run ``payload["phases"]`` of ``payload["config"]``.

    Every rank reports each phase's metrics with ``ray.train.report`` (a
    barrier across ranks; Ray Train keeps rank 0's), and rank 0's return
    value, the phase results as dicts, reaches the driver.
    """
    import ray.train

    from kd_dagfm.distributed import dmp_engine_factory, init_process_group
    from kd_dagfm.pipeline import default_threads, run_pipeline

    config = RunConfig.from_dict(payload["config"])
    phases = [Phase.parse(p) for p in payload["phases"]]
    default_threads()
    rank, world_size = init_process_group()
    _setup_worker_logging(rank)

    start = _record_start(config, phases, rank, world_size)
    if rank == 0:
        logger.info(
            "worker start %d (%d ranks): %s",
            start.start,
            world_size,
            _describe_resume(start),
        )

    def report(result: PhaseResult) -> None:
        ray.train.report(_phase_metrics(result))

    results = run_pipeline(
        config,
        phases,
        make_engine=dmp_engine_factory(config),
        on_phase_end=report,
    )
    return [r.to_dict() for r in results]


def _describe_resume(start: WorkerStart) -> str:
    if start.resume_phase is None:
        return "every phase is already finished"
    if start.resume_checkpoint is None:
        return f"{start.resume_phase} starts from its beginning"
    return f"{start.resume_phase} resumes from {start.resume_checkpoint}"


def _setup_worker_logging(rank: int) -> None:
    """Log INFO from kd-dagfm on rank 0 and only warnings on the other ranks."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.WARNING,
            format=f"%(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s",
        )
    level = logging.INFO if rank == 0 else logging.WARNING
    for name in ("kd_dagfm", "cluster"):
        logging.getLogger(name).setLevel(level)


def resolve_paths(config: RunConfig) -> RunConfig:
    """Make local ``output_dir``, ``dataset`` and ``warm_up`` paths absolute, so
    workers (whose working directory differs from the driver's) find them.

    Raises:
        ConfigError: ``storage_path`` is a relative path; Ray Train needs an
            absolute path or a URL.
    """
    storage = config.distributed.storage_path
    if storage is not None and not is_remote(storage) and not os.path.isabs(storage):
        raise ConfigError(
            f"invalid storage_path {storage!r}: Ray Train needs an absolute path or "
            f"a URL, for example storage_path={os.path.abspath(storage)}"
        )
    overrides: dict[str, Any] = {}
    for key, value in (
        ("output_dir", config.train.output_dir),
        ("dataset", config.data.dataset),
        ("warm_up", config.train.warm_up),
    ):
        if key == "dataset" and value == "synthetic":
            continue
        if value and not is_remote(value) and not os.path.isabs(value):
            overrides[key] = os.path.abspath(value)
    if "output_dir" in overrides:
        logger.warning(
            "output_dir %r is relative; using %s. Under `ray job submit "
            "--working-dir` a relative path lands in the job's temporary working "
            "dir, so pass an absolute path or a URL",
            config.train.output_dir,
            overrides["output_dir"],
        )
    return config.replace(**overrides) if overrides else config


def check_config(config: RunConfig) -> None:
    """Reject settings that would fail on every worker and on every restart.

    Raises:
        ConfigError: naming the setting and the fix.
    """
    from kd_dagfm.distributed.engine import CPU_FUSED_OPTIMIZERS

    distributed = config.distributed
    train = config.train
    workers = distributed.num_workers
    if train.train_batch_size % workers:
        multiple = train.train_batch_size - train.train_batch_size % workers or workers
        raise ConfigError(
            f"train_batch_size {train.train_batch_size} is not divisible by "
            f"num_workers {workers}; use a multiple of {workers} such as {multiple}"
        )
    if distributed.gpus_per_worker == 0 and (
        train.embedding_optimizer not in CPU_FUSED_OPTIMIZERS
    ):
        raise ConfigError(
            f"embedding_optimizer {train.embedding_optimizer!r} has no fused CPU "
            f"kernel in FBGEMM and gpus_per_worker is 0; use one of "
            f"{', '.join(CPU_FUSED_OPTIMIZERS)} on CPU workers (rowwise_adagrad is "
            "the usual choice), or set gpus_per_worker >= 1"
        )
    if config.data.remainder == "keep" and workers > 1:
        raise ConfigError(
            "remainder 'keep' gives the last training batch a different size on "
            "each rank, which row-wise sharding on gloo cannot handle; use "
            "remainder 'drop' with num_workers > 1"
        )


def default_run_name(phases: Sequence[Phase]) -> str:
    """Return the Ray Train run name, the same for every submission of the job."""
    if tuple(phases) == PIPELINE:
        return "kd-dagfm-pipeline"
    return "kd-dagfm-" + "-".join(p.value for p in phases)


def build_trainer(
    config: RunConfig, phases: Sequence[Phase], name: str | None = None
) -> Any:
    """Build a TorchTrainer that runs ``phases`` of ``config`` (absolute paths).

    Raises:
        ConfigError: Ray Train V2 is switched off (``RAY_TRAIN_V2_ENABLED=0``);
            the runner needs V2's ``worker_runtime_env`` and return values.
    """
    from ray.train.torch import TorchConfig
    from ray.train.v2._internal.constants import is_v2_enabled

    if not is_v2_enabled():
        raise ConfigError(
            "RAY_TRAIN_V2_ENABLED=0 selects the old Ray Train API, which the kd-dagfm "
            "runner does not support; unset it (V2 is the default in Ray 2.60)"
        )
    # The V2 classes behind ray.train's public names; importing them from
    # their modules gives type checkers the V2 signatures.
    from ray.train.v2.api.config import FailureConfig, ScalingConfig
    from ray.train.v2.api.config import RunConfig as RayRunConfig
    from ray.train.v2.torch.torch_trainer import TorchTrainer

    distributed = config.distributed
    gpus = distributed.gpus_per_worker
    resources: dict[str, float] = {"CPU": float(distributed.cpus_per_worker)}
    if gpus:
        resources["GPU"] = float(gpus)
    env = dict(WORKER_ENV)
    env.update({k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ})
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.to_dict(),
            "phases": [p.value for p in phases],
        },
        # NOTE: no test runs GPU workers; the NCCL choice is checked only as far
        # as building the trainer (tests/test_ray_units.py).
        torch_config=TorchConfig(
            backend="nccl" if gpus else "gloo", timeout_s=_process_group_timeout_s()
        ),
        scaling_config=ScalingConfig(
            num_workers=distributed.num_workers,
            use_gpu=gpus > 0,
            resources_per_worker=resources,
        ),
        # NOTE: tests run Ray Train with a local storage_path only. For s3://,
        # Ray writes with pyarrow's S3 filesystem, which takes its endpoint and
        # credentials from the AWS_* variables of the driver and the workers.
        run_config=RayRunConfig(
            name=name or default_run_name(phases),
            storage_path=distributed.storage_path or config.train.output_dir,
            failure_config=FailureConfig(max_failures=distributed.max_failures),
            worker_runtime_env={"env_vars": env},
        ),
    )


def _process_group_timeout_s() -> int:
    """Return the collective timeout: ``KD_DAGFM_DIST_TIMEOUT_S`` or 600 s, as
    for process groups that kd-dagfm creates itself."""
    from kd_dagfm.distributed.process_group import DEFAULT_TIMEOUT_S

    return int(float(os.environ.get("KD_DAGFM_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)))


def run_on_ray(
    config: RunConfig,
    phases: Sequence[Phase] = PIPELINE,
    name: str | None = None,
) -> list[PhaseResult]:
    """Train ``phases`` on Ray Train workers; needs a connected Ray driver.

    The dataset is prepared here, once (RecBole atomic files converted, the
    synthetic dataset generated), so the workers never write it concurrently.

    Raises:
        ConfigError: for settings no worker could run with.
        KDDAGFMError: the first kd-dagfm error a worker raised, after Ray
            Train used up ``max_failures`` restarts.
        ray.train.TrainingFailedError: any other worker or controller failure.
    """
    from kd_dagfm.pipeline import prepare_dataset

    config = resolve_paths(config)
    check_config(config)
    dataset, _ = prepare_dataset(config)
    if dataset != config.data.dataset:
        config = config.replace(dataset=dataset)
    trainer = build_trainer(config, phases, name)
    logger.info(
        "training %s on %d Ray workers (%d CPUs, %d GPUs each), output %s",
        ", ".join(p.value for p in phases),
        config.distributed.num_workers,
        config.distributed.cpus_per_worker,
        config.distributed.gpus_per_worker,
        config.train.output_dir,
    )
    try:
        result = trainer.fit()
    except Exception as e:
        _raise_worker_error(e)
        raise
    if not result.return_value:
        raise KDDAGFMError(
            f"Ray Train finished without results from rank 0 (metrics: "
            f"{result.metrics}); see the worker logs under {result.path}"
        )
    return [PhaseResult.from_dict(r) for r in result.return_value]


def _raise_worker_error(error: BaseException) -> None:
    """Re-raise the lowest rank's KDDAGFMError inside a WorkerGroupError."""
    failures = getattr(error, "worker_failures", None)
    if not isinstance(failures, dict):
        return
    for rank in sorted(failures):
        cause: BaseException | None = failures[rank]
        while cause is not None:
            if isinstance(cause, KDDAGFMError):
                raise cause from error
            cause = cause.__cause__
