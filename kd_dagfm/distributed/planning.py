"""Sharding plans for the embedding tables: TorchRec's planner or one type for all.

``sharding = auto`` runs TorchRec's ``EmbeddingShardingPlanner`` on a
:class:`~torchrec.distributed.planner.Topology` built from the memory this
rank really has (TorchRec's default assumes 128 GiB of DDR and 32 GiB of HBM
per rank). Every other value builds a manual plan that gives each table the
same sharding type; TorchRec 1.8's planner never proposes ``row_wise`` on CPU,
so a manual plan is the way to get it there.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.sharding_plan import (
    ParameterShardingGenerator,
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    row_wise,
    table_row_wise,
    table_wise,
)
from torchrec.distributed.types import ParameterSharding, ShardingPlan

from kd_dagfm.errors import ConfigError

logger = logging.getLogger(__name__)

EBC_PATH = "sparse_arch.embedding_bag_collection"
"""Module path of the EmbeddingBagCollection inside KDDAGFM."""

MANUAL_SHARDING_TYPES = (
    "table_wise",
    "row_wise",
    "column_wise",
    "table_row_wise",
    "data_parallel",
)

# Bytes of optimizer state per table element, by embedding optimizer
# (fp32 state). rowwise_adagrad keeps one value per row, see _optimizer_bytes.
_STATE_VALUES_PER_ELEMENT = {"sgd": 0, "adagrad": 1, "adam": 2}


@dataclasses.dataclass(frozen=True)
class RankMemory:
    """Memory the planner may fill on one rank, in bytes."""

    ddr_bytes: int
    hbm_bytes: int


def host_memory_bytes() -> int:
    """Memory available to this process now: ``MemAvailable`` from
    /proc/meminfo, capped by the cgroup v2 limit minus its current use."""
    available = _meminfo_bytes("MemAvailable")
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _read_int("/sys/fs/cgroup/memory.max")
    usage = _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and usage is not None:
        available = min(available, max(limit - usage, 0))
    return int(available)


def rank_memory(device: torch.device, local_world_size: int) -> RankMemory:
    """Measure this rank's share of host memory and, on a GPU, its free HBM.

    Both are reduced to the minimum over all ranks, so the planner on rank 0
    plans with the tightest rank's memory.
    """
    ddr = host_memory_bytes() // max(local_world_size, 1)
    hbm = 0
    if device.type == "cuda":
        hbm = int(torch.cuda.mem_get_info(device)[0])
    if dist.is_initialized():
        values = torch.tensor([ddr, hbm], dtype=torch.int64, device=device)
        dist.all_reduce(values, op=dist.ReduceOp.MIN)
        ddr, hbm = (int(v) for v in values.tolist())
    return RankMemory(ddr_bytes=ddr, hbm_bytes=hbm)


def build_topology(
    world_size: int, local_world_size: int, device: torch.device, memory: RankMemory
) -> Topology:
    return Topology(
        world_size=world_size,
        local_world_size=local_world_size,
        compute_device=device.type,
        hbm_cap=memory.hbm_bytes if device.type == "cuda" else None,
        ddr_cap=memory.ddr_bytes,
    )


def plan_sharding(
    model: nn.Module,
    sharding: str,
    sharder: EmbeddingBagCollectionSharder,
    world_size: int,
    local_world_size: int,
    device: torch.device,
    batch_size_per_rank: int,
) -> ShardingPlan:
    """Plan the sharding of KDDAGFM's EmbeddingBagCollection.

    Call it on every rank: the planner plans on rank 0 and broadcasts. Attach
    the fused embedding optimizer with ``apply_optimizer_in_backward`` first,
    because it decides the compute kernel.

    Args:
        model: the unsharded KDDAGFM.
        sharding: ``auto`` or one of :data:`MANUAL_SHARDING_TYPES`.
        sharder: the sharder DistributedModelParallel will use.
        world_size, local_world_size: ranks in total and on this host.
        device: this rank's compute device.
        batch_size_per_rank: training examples per rank and step (planner
            cost model).
    """
    ebc = model.get_submodule(EBC_PATH)
    assert isinstance(ebc, EmbeddingBagCollection)
    if sharding == "auto":
        memory = rank_memory(device, local_world_size)
        topology = build_topology(world_size, local_world_size, device, memory)
        if _rank() == 0:
            logger.info(
                "planner topology: %d ranks (%d per host) on %s, %.1f GiB DDR%s per rank",
                world_size,
                local_world_size,
                device.type,
                memory.ddr_bytes / 2**30,
                f", {memory.hbm_bytes / 2**30:.1f} GiB HBM"
                if device.type == "cuda"
                else "",
            )
        planner = EmbeddingShardingPlanner(
            topology=topology, batch_size=batch_size_per_rank, debug=_rank() == 0
        )
        sharders: list[Any] = [sharder]
        if dist.is_initialized():
            return planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
        return planner.plan(model, sharders)

    return manual_plan(ebc, sharding, sharder, world_size, local_world_size, device)


def manual_plan(
    ebc: EmbeddingBagCollection,
    sharding: str,
    sharder: EmbeddingBagCollectionSharder,
    world_size: int,
    local_world_size: int,
    device: torch.device,
) -> ShardingPlan:
    """Build a plan that gives every table of ``ebc`` the sharding type ``sharding``."""
    generators = manual_generators(ebc, sharding, world_size, local_world_size)
    module_plan = construct_module_sharding_plan(
        ebc,
        generators,
        sharder=sharder,
        local_size=local_world_size,
        world_size=world_size,
        device_type=device.type,
    )
    return ShardingPlan({EBC_PATH: module_plan})


def manual_generators(
    ebc: EmbeddingBagCollection,
    sharding: str,
    world_size: int,
    local_world_size: int,
) -> dict[str, ParameterShardingGenerator]:
    """Return one parameter-sharding generator per table, all of type ``sharding``.

    table_wise places the largest table first, each on the rank with the
    fewest table elements so far. table_row_wise spreads tables over hosts
    the same way and splits each by rows over the ranks of its host.
    """
    configs = {c.name: c for c in ebc.embedding_bag_configs()}
    if sharding not in MANUAL_SHARDING_TYPES:
        raise ConfigError(
            f"invalid sharding {sharding!r}: expected auto or one of "
            + ", ".join(MANUAL_SHARDING_TYPES)
        )
    if sharding == "row_wise":
        return {name: row_wise() for name in configs}
    if sharding == "data_parallel":
        return {name: data_parallel() for name in configs}
    if sharding == "column_wise":
        dims = {c.embedding_dim for c in configs.values()}
        bad = sorted(d for d in dims if d % world_size)
        if bad:
            raise ConfigError(
                f"sharding column_wise splits each table's {bad[0]} columns over "
                f"{world_size} ranks, which does not divide evenly; use an "
                f"embedding_size divisible by {world_size}, or sharding row_wise"
            )
        ranks = list(range(world_size))
        return {name: column_wise(ranks=ranks) for name in configs}

    sizes = {name: c.num_embeddings * c.embedding_dim for name, c in configs.items()}
    if sharding == "table_wise":
        placement = _balance(sizes, world_size)
        return {name: table_wise(rank=placement[name]) for name in configs}

    if world_size % local_world_size:
        raise ConfigError(
            f"sharding table_row_wise needs the same number of ranks on every host; "
            f"world size {world_size} is not a multiple of {local_world_size} ranks "
            "per host"
        )
    hosts = _balance(sizes, world_size // local_world_size)
    return {name: table_row_wise(host_index=hosts[name]) for name in configs}


def _balance(sizes: dict[str, int], bins: int) -> dict[str, int]:
    """Assign each item to the bin with the smallest total, largest items first."""
    totals = [0] * bins
    placement: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        index = min(range(bins), key=lambda b: (totals[b], b))
        placement[name] = index
        totals[index] += sizes[name]
    return placement


def describe_plan(plan: ShardingPlan) -> dict[str, dict[str, Any]]:
    """Describe each table's sharding type, compute kernel, ranks and shards.

    Each shard is ``[rows, columns, row offset, column offset, rank]``. A
    data-parallel table has no shards because every rank has a full copy.
    The result is JSON-compatible and goes into every checkpoint's meta.json.
    """
    module_plan = plan.get_plan_for_module(EBC_PATH)
    if module_plan is None:
        return {}
    described: dict[str, dict[str, Any]] = {}
    for table, sharding in sorted(module_plan.items()):  # type: ignore[attr-defined]
        assert isinstance(sharding, ParameterSharding)
        shards: list[list[int]] = []
        spec = sharding.sharding_spec
        for shard in getattr(spec, "shards", None) or []:
            rank = shard.placement.rank() if shard.placement is not None else -1
            shards.append([*shard.shard_sizes, *shard.shard_offsets, int(rank)])
        described[table] = {
            "sharding_type": sharding.sharding_type,
            "compute_kernel": sharding.compute_kernel,
            "ranks": list(sharding.ranks or []),
            "shards": shards,
        }
    return described


def embedding_bytes_per_rank(
    plan: dict[str, dict[str, Any]],
    table_shapes: dict[str, tuple[int, int]],
    world_size: int,
    optimizer: str,
    element_bytes: int = 4,
) -> list[int]:
    """Bytes of table weights plus fused optimizer state held by each rank."""
    totals = [0] * world_size
    for table, entry in plan.items():
        rows, columns = table_shapes[table]
        if entry["sharding_type"] == "data_parallel":
            for rank in range(world_size):
                totals[rank] += _shard_bytes(rows, columns, optimizer, element_bytes)
            continue
        for shard_rows, shard_columns, _, _, rank in entry["shards"]:
            totals[rank] += _shard_bytes(
                shard_rows, shard_columns, optimizer, element_bytes
            )
    return totals


def _shard_bytes(rows: int, columns: int, optimizer: str, element_bytes: int) -> int:
    weights = rows * columns * element_bytes
    if optimizer == "rowwise_adagrad":
        return weights + rows * 4
    return weights + rows * columns * 4 * _STATE_VALUES_PER_ELEMENT.get(optimizer, 0)


def format_plan(
    plan: dict[str, dict[str, Any]], bytes_per_rank: list[int], available_bytes: int
) -> str:
    """Format the plan and the memory per rank as a text table for the log."""
    lines = ["table | sharding | kernel | ranks | shards (rows x columns @ rank)"]
    for table, entry in plan.items():
        shards = ", ".join(f"{r}x{c}@{k}" for r, c, _, _, k in entry["shards"])
        lines.append(
            f"{table} | {entry['sharding_type']} | {entry['compute_kernel']} | "
            f"{entry['ranks'] or 'all'} | {shards or 'full copy per rank'}"
        )
    budget = f" of {format_bytes(available_bytes)}" if available_bytes else ""
    lines.append(
        "embedding memory per rank (weights + optimizer state): "
        + ", ".join(
            f"rank {rank} {format_bytes(size)}{budget}"
            for rank, size in enumerate(bytes_per_rank)
        )
    )
    return "\n".join(lines)


def format_bytes(size: int) -> str:
    """``size`` in B, KiB, MiB or GiB, whichever keeps the number below 1024."""
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:,.1f} {unit}" if unit != "B" else f"{size} B"
        value /= 1024
    return f"{value:,.1f} GiB"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _meminfo_bytes(field: str) -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
