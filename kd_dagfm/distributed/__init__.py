"""Sharded training with TorchRec's DistributedModelParallel.

Every rank calls :func:`init_process_group`, then runs the usual pipeline
with the sharded engine::

    rank, world_size = init_process_group()
    run_pipeline(config, make_engine=dmp_engine_factory(config))

``python -m torch.distributed.run --nproc-per-node 2 -m
kd_dagfm.distributed.launch pipeline ...`` does this without Ray.
"""

from kd_dagfm.distributed.engine import DMPEngine, check_resumable, dmp_engine_factory
from kd_dagfm.distributed.planning import MANUAL_SHARDING_TYPES, plan_sharding
from kd_dagfm.distributed.process_group import init_process_group, rank_device

__all__ = [
    "DMPEngine",
    "MANUAL_SHARDING_TYPES",
    "check_resumable",
    "dmp_engine_factory",
    "init_process_group",
    "plan_sharding",
    "rank_device",
]
