"""Sharding plans for clusters this process is not running on, without allocating.

The model is built on ``device="meta"``, so a 1,000,000,000 x 16 table costs
no memory, and TorchRec's ``EmbeddingShardingPlanner`` plans it for a
:class:`ClusterSpec`: a number of ranks of one kind of hardware. The report
gives the sharding of each table and, per rank, the bytes of table weights and
of fused optimizer state, next to what the rank has free. A plan that does
not fit raises :class:`~kd_dagfm.errors.ConfigError` with those numbers and
the changes that would make it fit.

Bytes per table row follow FBGEMM's table-batched embedding layout
(fbgemm-gpu 1.8, ``split_table_batched_embeddings_ops_training.py``). A row
has D weights in the table's precision, plus 8 bytes of row-wise scale and
bias for int8. Optimizer state is fp32 (FBGEMM's default state type): none
for SGD, D values for Adagrad, one value per row for row-wise Adagrad and
2 x D for Adam. TorchRec 1.8's planner sizes optimizer state as a multiple of the weight
bytes instead, so for fp16 and int8 tables it counts less state than FBGEMM
allocates; the report shows both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import (
    EmbeddingShardingPlanner,
    ParameterConstraints,
    Topology,
)
from torchrec.distributed.planner.storage_reservations import (
    HeuristicalStorageReservation,
)
from torchrec.distributed.planner.types import (
    KernelConfig,
    PlannerError,
    ShardingOption,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.sharding_plan import construct_module_sharding_plan
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_configs import DataType
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from kd_dagfm.config import EMBEDDING_OPTIMIZERS, ModelConfig, RunConfig
from kd_dagfm.data.reader import load_schema
from kd_dagfm.data.synthetic import synthetic_schema
from kd_dagfm.distributed.engine import FUSED_OPTIMIZERS
from kd_dagfm.distributed.planning import (
    EBC_PATH,
    MANUAL_SHARDING_TYPES,
    describe_plan,
    manual_generators,
)
from kd_dagfm.errors import ConfigError
from kd_dagfm.model import KDDAGFM
from kd_dagfm.modules.sparse import embedding_bag_configs
from kd_dagfm.pipeline import recbole_atomic_name
from kd_dagfm.schema import FeatureSchema, make_schema

logger = logging.getLogger(__name__)

GiB = 2**30
MiB = 2**20

# Storage precision of the table weights: (TorchRec data type, bytes per element).
PRECISIONS: dict[str, tuple[DataType, int]] = {
    "fp32": (DataType.FP32, 4),
    "fp16": (DataType.FP16, 2),
    "int8": (DataType.INT8, 1),
}
# FBGEMM stores an int8 row as D bytes plus an fp32 scale and bias.
INT8_ROW_OVERHEAD_BYTES = 8
OPTIMIZER_STATE_BYTES = 4  # fp32 state values

# Share of each rank's memory kept free for activations, the allocator and
# the runtime (TorchRec's planner default for HBM; applied to DDR on CPU too).
RESERVED_FRACTION = 0.15
# Dense towers: weights, Adam's two moments and DDP's gradient buckets
# (TorchRec's HeuristicalStorageReservation uses the same factor).
DENSE_BYTES_PER_PARAMETER = 6 * 4


@dataclasses.dataclass(frozen=True)
class HardwareSpec:
    """One kind of training host.

    Attributes:
        name: registry key, for example ``h100-80gb``.
        description: what the numbers describe and where they come from.
        compute_device: ``cuda`` or ``cpu``.
        hbm_bytes: memory of one GPU (0 on CPU hosts).
        ddr_bytes_per_host: host memory, shared by the ranks of the host.
        ranks_per_host: GPUs per host, or training processes per CPU host.
    """

    name: str
    description: str
    compute_device: str
    hbm_bytes: int
    ddr_bytes_per_host: int
    ranks_per_host: int


# NOTE: HBM sizes are the totals nvidia-smi reports for these boards and host
# memory that of NVIDIA's DGX systems, not values measured here; pass
# --hbm_gib and --ddr_gib_per_host to plan for other machines.
HARDWARE: dict[str, HardwareSpec] = {
    "a100-80gb": HardwareSpec(
        "a100-80gb",
        "NVIDIA A100 80GB (81,920 MiB HBM2e), 8 per host, 1 TiB host memory (DGX A100)",
        "cuda",
        81_920 * MiB,
        1024 * GiB,
        8,
    ),
    "h100-80gb": HardwareSpec(
        "h100-80gb",
        "NVIDIA H100 80GB SXM (81,559 MiB HBM3), 8 per host, 2 TiB host memory (DGX H100)",
        "cuda",
        81_559 * MiB,
        2048 * GiB,
        8,
    ),
    "h200-141gb": HardwareSpec(
        "h200-141gb",
        "NVIDIA H200 141GB (143,771 MiB HBM3e), 8 per host, 2 TiB host memory (DGX H200)",
        "cuda",
        143_771 * MiB,
        2048 * GiB,
        8,
    ),
    "cpu": HardwareSpec(
        "cpu",
        "CPU host with 512 GiB memory and 4 training processes (128 GiB per rank, "
        "TorchRec's default DDR per rank)",
        "cpu",
        0,
        512 * GiB,
        4,
    ),
}


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """``world_size`` ranks on hosts of one hardware kind."""

    hardware: HardwareSpec
    world_size: int

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ConfigError(
                f"invalid number of ranks {self.world_size}: expected >= 1"
            )

    @property
    def ranks_per_host(self) -> int:
        return min(self.hardware.ranks_per_host, self.world_size)

    @property
    def ddr_bytes_per_rank(self) -> int:
        return self.hardware.ddr_bytes_per_host // self.hardware.ranks_per_host

    @property
    def name(self) -> str:
        unit = "GPUs" if self.hardware.compute_device == "cuda" else "CPU ranks"
        return f"{self.world_size} {unit} ({self.hardware.name})"


def make_cluster(
    hardware: str,
    world_size: int,
    hbm_gib: float | None = None,
    ddr_gib_per_host: float | None = None,
    ranks_per_host: int | None = None,
) -> ClusterSpec:
    """Build a cluster of ``world_size`` ranks of a :data:`HARDWARE` kind, with
    optional overrides of its memory sizes and ranks per host."""
    if hardware not in HARDWARE:
        raise ConfigError(
            f"unknown hardware {hardware!r}: expected one of {', '.join(HARDWARE)}"
        )
    spec = HARDWARE[hardware]
    changes: dict[str, Any] = {}
    if hbm_gib is not None:
        if spec.compute_device != "cuda":
            raise ConfigError(
                f"--hbm_gib applies to GPUs, but hardware {hardware!r} is a CPU host; "
                "use --ddr_gib_per_host"
            )
        changes["hbm_bytes"] = int(hbm_gib * GiB)
    if ddr_gib_per_host is not None:
        changes["ddr_bytes_per_host"] = int(ddr_gib_per_host * GiB)
    if ranks_per_host is not None:
        if ranks_per_host < 1:
            raise ConfigError(f"invalid ranks_per_host {ranks_per_host}: expected >= 1")
        changes["ranks_per_host"] = ranks_per_host
    if changes:
        spec = dataclasses.replace(spec, **changes)
    return ClusterSpec(spec, world_size)


# --- model presets ---------------------------------------------------------

# Criteo 1TB Click Logs: distinct values of C1..C26 over the 24 days, as in
# TorchRec's DLRM example (torchrec 1.8, torchrec/inference/dlrm_packager.py).
CRITEO_1TB_CARDINALITIES = (
    45_833_188, 36_746, 17_245, 7_413, 20_243, 3, 7_114, 1_441, 62, 29_275_261,
    1_572_176, 345_138, 10, 2_209, 11_267, 128, 4, 974, 14, 48_937_457,
    11_316_796, 40_094_537, 452_104, 12_606, 104, 35,
)  # fmt: skip


def billion_row_schema() -> FeatureSchema:
    """Build the schema of a 1,000,000,000-row id table (hashed user or item
    ids) plus seven context fields of 100,000 rows each."""
    sparse = {"item_id": 1_000_000_000}
    sparse.update({f"context_{i}": 100_000 for i in range(1, 8)})
    return make_schema("label", sparse)


def criteo_1tb_schema() -> FeatureSchema:
    """Build the schema of Criteo 1TB's 26 categorical fields at their full
    cardinality and its 13 numerical fields."""
    sparse = {f"C{i + 1}": n for i, n in enumerate(CRITEO_1TB_CARDINALITIES)}
    return make_schema("label", sparse, dense=[f"I{i}" for i in range(1, 14)])


SCHEMA_PRESETS = {
    "billion": billion_row_schema,
    "criteo_1tb": criteo_1tb_schema,
}


# --- memory model ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RowBytes:
    """Bytes one table row takes on the rank that stores it."""

    weights: int
    optimizer_state: int

    @property
    def total(self) -> int:
        return self.weights + self.optimizer_state


def row_bytes(embedding_dim: int, precision: str, optimizer: str) -> RowBytes:
    """Bytes of one row of D columns: weights in ``precision`` plus the fused
    ``optimizer``'s fp32 state (FBGEMM layout, see the module doc)."""
    if precision not in PRECISIONS:
        raise ConfigError(
            f"invalid precision {precision!r}: expected one of {', '.join(PRECISIONS)}"
        )
    if optimizer not in EMBEDDING_OPTIMIZERS:
        raise ConfigError(
            f"invalid embedding_optimizer {optimizer!r}: expected one of "
            f"{', '.join(EMBEDDING_OPTIMIZERS)}"
        )
    weights = embedding_dim * PRECISIONS[precision][1]
    if precision == "int8":
        weights += INT8_ROW_OVERHEAD_BYTES
    state_values = {
        "sgd": 0,
        "adagrad": embedding_dim,
        "rowwise_adagrad": 1,
        "adam": 2 * embedding_dim,
    }[optimizer]
    return RowBytes(weights, state_values * OPTIMIZER_STATE_BYTES)


# --- plans -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TablePlacement:
    """How one table is split: ``shards`` lists (rank, rows, columns)."""

    name: str
    rows: int
    columns: int
    sharding_type: str
    compute_kernel: str
    shards: tuple[tuple[int, int, int], ...]


@dataclasses.dataclass(frozen=True)
class RankUsage:
    """Embedding memory of one rank, in bytes.

    Attributes:
        weights_bytes: table weights of the rank's shards.
        optimizer_bytes: fused optimizer state of those shards.
        planner_bytes: TorchRec's estimate for the shards (weights, its
            optimizer-state model, input/output buffers, caches), in the
            memory the kernels use; None for manual plans.
        host_bytes: part of ``planner_bytes`` the planner puts in host
            memory (UVM-backed tables); 0 otherwise.
        planner_step_ms: TorchRec's cost-model estimate of the rank's
            embedding work per training step (lookups, gradients, their
            communication), in ms; None for manual plans.
    """

    rank: int
    weights_bytes: int
    optimizer_bytes: int
    planner_bytes: int | None
    host_bytes: int
    planner_step_ms: float | None = None

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.optimizer_bytes


@dataclasses.dataclass(frozen=True)
class PlanReport:
    """A sharding plan of a model's tables on a cluster, with memory per rank."""

    cluster: ClusterSpec
    precision: str
    optimizer: str
    sharding: str
    embedding_dim: int
    batch_size_per_rank: int
    capacity_bytes: int
    reserved_bytes: int
    tables: tuple[TablePlacement, ...]
    ranks: tuple[RankUsage, ...]
    plan_seconds: float

    @property
    def total_weights_bytes(self) -> int:
        return sum(r.weights_bytes for r in self.ranks)

    @property
    def total_optimizer_bytes(self) -> int:
        return sum(r.optimizer_bytes for r in self.ranks)

    @property
    def slowest_rank_step_ms(self) -> float | None:
        """TorchRec's cost-model time of the busiest rank's embedding work per
        step, in ms; None for manual plans."""
        times = [r.planner_step_ms for r in self.ranks if r.planner_step_ms]
        return max(times) if times else None


def build_meta_model(
    schema: FeatureSchema, model_config: ModelConfig, precision: str, optimizer: str
) -> KDDAGFM:
    """KDDAGFM on the meta device, tables in ``precision``, with the fused
    ``optimizer`` attached so the planner counts its state."""
    model = KDDAGFM(schema, model_config, device="meta")
    data_type = PRECISIONS[precision][0]
    if data_type is not DataType.FP32:
        configs = [
            dataclasses.replace(c, data_type=data_type)
            for c in embedding_bag_configs(schema, model_config.embedding_size)
        ]
        model.sparse_arch.embedding_bag_collection = EmbeddingBagCollection(
            tables=configs, device=torch.device("meta")
        )
    tables = list(model.sparse_arch.embedding_bag_collection.parameters())
    apply_optimizer_in_backward(FUSED_OPTIMIZERS[optimizer], tables, {"lr": 0.01})
    return model


def plan_model(
    schema: FeatureSchema,
    model_config: ModelConfig,
    cluster: ClusterSpec,
    optimizer: str = "rowwise_adagrad",
    precision: str = "fp32",
    sharding: str = "auto",
    global_batch_size: int = 2048,
    allow_uvm: bool = False,
) -> PlanReport:
    """Plan the tables of KDDAGFM on ``cluster`` and account memory per rank.

    Nothing is allocated: the model lives on the meta device.

    Args:
        schema: the features; fixes the tables and their rows.
        model_config: fixes D and the dense towers.
        cluster: ranks and their memory.
        optimizer: the fused embedding optimizer (its state is counted).
        precision: table weight precision: fp32, fp16 or int8.
        sharding: ``auto`` (TorchRec's planner) or one of
            :data:`~kd_dagfm.distributed.planning.MANUAL_SHARDING_TYPES`.
        global_batch_size: examples per step over all ranks.
        allow_uvm: on GPUs, let the planner keep tables in host memory with an
            HBM cache (``fused_uvm_caching``); by default tables must fit in HBM.

    Raises:
        ConfigError: when the tables do not fit; the message gives bytes needed
            and available per rank and the changes that would fit.
    """
    row_bytes(model_config.embedding_size, precision, optimizer)  # validates
    started = time.perf_counter()
    model = build_meta_model(schema, model_config, precision, optimizer)
    ebc = model.get_submodule(EBC_PATH)
    assert isinstance(ebc, EmbeddingBagCollection)
    batch_size_per_rank = max(global_batch_size // cluster.world_size, 1)
    topology, reservation = _topology(model, cluster, batch_size_per_rank)
    capacity = _capacity_per_rank(topology, reservation, model, batch_size_per_rank)
    device_memory = (
        cluster.hardware.hbm_bytes
        if cluster.hardware.compute_device == "cuda"
        else cluster.ddr_bytes_per_rank
    )
    sharder = EmbeddingBagCollectionSharder()

    options: list[ShardingOption] | None = None
    if sharding == "auto":
        try:
            with _quiet("torchrec", logging.WARNING):
                planner = EmbeddingShardingPlanner(
                    topology=topology,
                    batch_size=batch_size_per_rank,
                    storage_reservation=reservation,
                    constraints=_kernel_constraints(ebc, cluster, allow_uvm),
                    debug=False,
                )
                plan = planner.plan(model, [sharder])  # type: ignore[list-item]
        except PlannerError as error:
            reason = str(error).splitlines()[0].strip().rstrip(".")
            raise _unfit_error(
                schema, model_config, cluster, optimizer, precision, sharding,
                capacity, allow_uvm, f"TorchRec's planner: {reason}",
            ) from None  # fmt: skip
        # NOTE: TorchRec 1.8 keeps the chosen options, with their storage
        # estimates, only in this private attribute.
        options = getattr(planner, "_best_plan", None)
    elif sharding in MANUAL_SHARDING_TYPES:
        generators = manual_generators(
            ebc, sharding, cluster.world_size, cluster.ranks_per_host
        )
        plan = ShardingPlan(
            {
                EBC_PATH: construct_module_sharding_plan(
                    ebc,
                    generators,
                    sharder=sharder,
                    local_size=cluster.ranks_per_host,
                    world_size=cluster.world_size,
                    device_type=cluster.hardware.compute_device,
                )
            }
        )
    else:
        raise ConfigError(
            f"invalid sharding {sharding!r}: expected auto or one of "
            + ", ".join(MANUAL_SHARDING_TYPES)
        )

    tables = _placements(plan, ebc, cluster.world_size)
    ranks = _rank_usage(
        tables, cluster.world_size, model_config.embedding_size, precision, optimizer
    )
    if options is not None:
        ranks = _add_planner_estimates(ranks, options)
    report = PlanReport(
        cluster=cluster,
        precision=precision,
        optimizer=optimizer,
        sharding=sharding,
        embedding_dim=model_config.embedding_size,
        batch_size_per_rank=batch_size_per_rank,
        capacity_bytes=capacity,
        reserved_bytes=device_memory - capacity,
        tables=tables,
        ranks=ranks,
        plan_seconds=time.perf_counter() - started,
    )
    fullest = max(ranks, key=lambda r: r.total_bytes)
    in_host_memory = any(t.compute_kernel.startswith("fused_uvm") for t in tables)
    if fullest.total_bytes > capacity and not in_host_memory:
        raise _unfit_error(
            schema, model_config, cluster, optimizer, precision, sharding,
            capacity, allow_uvm,
            f"rank {fullest.rank} would hold {_gib(fullest.total_bytes)} of "
            f"weights and optimizer state",
        )  # fmt: skip
    return report


def _topology(
    model: nn.Module, cluster: ClusterSpec, batch_size_per_rank: int
) -> tuple[Topology, HeuristicalStorageReservation]:
    hardware = cluster.hardware
    on_gpu = hardware.compute_device == "cuda"
    ddr = cluster.ddr_bytes_per_rank
    if not on_gpu:
        # TorchRec reserves its percentage of HBM only; keep the same margin
        # of host memory on CPU ranks.
        ddr = int(ddr * (1 - RESERVED_FRACTION))
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(
            world_size=cluster.world_size,
            local_world_size=cluster.ranks_per_host,
            hbm_cap_bytes=hardware.hbm_bytes if on_gpu else None,
            ddr_cap_bytes=ddr,
        ),
        kernel_config=KernelConfig(compute_device=hardware.compute_device),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        reservation = HeuristicalStorageReservation(
            RESERVED_FRACTION, dense_tensor_estimate=_dense_bytes(model)
        )
    return topology, reservation


def _dense_bytes(model: nn.Module) -> int:
    tables = {id(p) for p in model.get_submodule(EBC_PATH).parameters()}
    dense = sum(p.numel() for p in model.parameters() if id(p) not in tables)
    return max(dense * DENSE_BYTES_PER_PARAMETER, 1)


def _capacity_per_rank(
    topology: Topology,
    reservation: HeuristicalStorageReservation,
    model: nn.Module,
    batch_size_per_rank: int,
) -> int:
    """Bytes of the rank's kernel memory left for tables after TorchRec's
    reservation (margin, dense towers, input batches)."""
    with warnings.catch_warnings(), _quiet("torchrec"):
        warnings.simplefilter("ignore")
        reserved = reservation.reserve(
            topology=topology,
            batch_size=batch_size_per_rank,
            module=model,
            sharders=[EmbeddingBagCollectionSharder()],  # type: ignore[list-item]
        )
    storage = reserved.devices[0].storage
    return int(storage.hbm if topology.compute_device == "cuda" else storage.ddr)


class _quiet:
    """Raise a logger's level inside a ``with`` block (TorchRec logs each
    proposal the planner tries at INFO)."""

    def __init__(self, name: str, level: int = logging.ERROR) -> None:
        self.logger = logging.getLogger(name)
        self.level = self.logger.level
        self.quiet_level = level

    def __enter__(self) -> None:
        self.logger.setLevel(self.quiet_level)

    def __exit__(self, *args: object) -> None:
        self.logger.setLevel(self.level)


def _kernel_constraints(
    ebc: EmbeddingBagCollection, cluster: ClusterSpec, allow_uvm: bool
) -> dict[str, ParameterConstraints] | None:
    if cluster.hardware.compute_device != "cuda" or allow_uvm:
        return None
    return {
        c.name: ParameterConstraints(compute_kernels=["fused", "dense"])
        for c in ebc.embedding_bag_configs()
    }


def _placements(
    plan: ShardingPlan, ebc: EmbeddingBagCollection, world_size: int
) -> tuple[TablePlacement, ...]:
    shapes = {c.name: (c.num_embeddings, c.embedding_dim) for c in ebc.embedding_bag_configs()}  # fmt: skip
    placements = []
    for name, entry in describe_plan(plan).items():
        rows, columns = shapes[name]
        if entry["sharding_type"] == "data_parallel":
            shards = tuple((rank, rows, columns) for rank in range(world_size))
        else:
            shards = tuple(
                (rank, shard_rows, shard_columns)
                for shard_rows, shard_columns, _, _, rank in entry["shards"]
            )
        placements.append(
            TablePlacement(
                name=name,
                rows=rows,
                columns=columns,
                sharding_type=entry["sharding_type"],
                compute_kernel=entry["compute_kernel"],
                shards=shards,
            )
        )
    return tuple(sorted(placements, key=lambda t: (-t.rows * t.columns, t.name)))


def _rank_usage(
    tables: Sequence[TablePlacement],
    world_size: int,
    embedding_dim: int,
    precision: str,
    optimizer: str,
) -> tuple[RankUsage, ...]:
    weights = [0] * world_size
    state = [0] * world_size
    for table in tables:
        for rank, rows, columns in table.shards:
            per_row = row_bytes(columns, precision, optimizer)
            weights[rank] += rows * per_row.weights
            # Row-wise Adagrad keeps one value per row of every column shard.
            state[rank] += rows * per_row.optimizer_state
    return tuple(
        RankUsage(rank, weights[rank], state[rank], None, 0) for rank in range(world_size)
    )  # fmt: skip


def _add_planner_estimates(
    ranks: tuple[RankUsage, ...], options: Sequence[ShardingOption]
) -> tuple[RankUsage, ...]:
    device = [0] * len(ranks)
    host = [0] * len(ranks)
    step_ms = [0.0] * len(ranks)
    for option in options:
        for shard in option.shards:
            if shard.rank is None:
                continue
            if shard.storage is not None:
                device[shard.rank] += shard.storage.hbm + shard.storage.ddr
                host[shard.rank] += shard.storage.ddr if shard.storage.hbm else 0
            if shard.perf is not None:
                step_ms[shard.rank] += shard.perf.total
    return tuple(
        dataclasses.replace(
            r,
            planner_bytes=device[r.rank],
            host_bytes=host[r.rank],
            planner_step_ms=step_ms[r.rank],
        )
        for r in ranks
    )


# --- errors and text ---------------------------------------------------------


def _gib(size: float) -> str:
    """Bytes as GiB, or as MiB below 1 GiB."""
    if abs(size) < GiB:
        return f"{size / MiB:,.1f} MiB"
    return f"{size / GiB:,.2f} GiB"


def _table_bytes(
    schema: FeatureSchema, embedding_dim: int, precision: str, optimizer: str
) -> tuple[int, int]:
    """(all tables' bytes, largest table's bytes) of weights plus state."""
    per_row = row_bytes(embedding_dim, precision, optimizer).total
    sizes = [f.num_embeddings * per_row for f in schema.sparse_features]
    return sum(sizes), max(sizes)


def _unfit_error(
    schema: FeatureSchema,
    model_config: ModelConfig,
    cluster: ClusterSpec,
    optimizer: str,
    precision: str,
    sharding: str,
    capacity: int,
    allow_uvm: bool,
    detail: str,
) -> ConfigError:
    """Build the error for tables that do not fit, with the numbers and the fixes."""
    dim = model_config.embedding_size
    world = cluster.world_size
    total, largest = _table_bytes(schema, dim, precision, optimizer)
    per_row = row_bytes(dim, precision, optimizer)
    rows = sum(f.num_embeddings for f in schema.sparse_features)
    even = math.ceil(total / world)
    memory = "HBM" if cluster.hardware.compute_device == "cuda" else "host memory"

    lines = [
        f"the embedding tables do not fit on {cluster.name}: {rows:,} rows x "
        f"{per_row.total} bytes ({per_row.weights} of {precision} weights + "
        f"{per_row.optimizer_state} of {optimizer} state) = {_gib(total)}, "
        f"{_gib(even)} per rank even when split evenly, but each rank has "
        f"{_gib(capacity)} of {memory} free for tables after the reservation; "
        f"{detail}. Fixes:"
    ]
    fixes = []
    if capacity > 0 and math.ceil(total / capacity) > world:
        fixes.append(
            f"more ranks: at least {math.ceil(total / capacity)} ranks of this "
            f"kind hold {_gib(total)} split evenly"
        )
    if largest > capacity and (
        sharding not in ("auto", "row_wise", "table_row_wise", "column_wise")
        or cluster.hardware.compute_device == "cpu"
    ):
        fixes.append(
            f"sharding=row_wise: the largest table ({_gib(largest)}) is larger than "
            f"one rank and must be split by rows over the {world} ranks; TorchRec's "
            "planner never proposes row_wise on CPU"
        )

    alternatives = [(smaller, dim, optimizer) for smaller in ("fp16", "int8")]
    alternatives = [
        a for a in alternatives if PRECISIONS[a[0]][1] < PRECISIONS[precision][1]
    ]
    fitting_dim = _largest_fitting_dim(schema, world, capacity, precision, optimizer)
    if 0 < fitting_dim < dim:
        alternatives.append((precision, fitting_dim, optimizer))
    if optimizer in ("adam", "adagrad"):
        alternatives.append((precision, dim, "rowwise_adagrad"))
    for alt_precision, alt_dim, alt_optimizer in alternatives:
        alt_total, alt_largest = _table_bytes(
            schema, alt_dim, alt_precision, alt_optimizer
        )
        if alt_precision != precision:
            change = f"{alt_precision} weights"
        elif alt_dim != dim:
            change = f"embedding_size={alt_dim} (the largest multiple of 4 that fits)"
        else:
            change = f"embedding_optimizer=rowwise_adagrad (one state value per row) instead of {optimizer}"
        fixes.append(
            f"{change}: {_gib(math.ceil(alt_total / world))} per rank split evenly, "
            f"largest table {_gib(alt_largest)}"
        )

    if cluster.hardware.compute_device == "cuda" and not allow_uvm:
        fixes.append(
            "--allow_uvm: keep tables in host memory with an HBM cache "
            f"({_gib(cluster.ddr_bytes_per_rank)} host memory per rank), slower"
        )
    lines += [f"  {i}) {fix}" for i, fix in enumerate(fixes, start=1)]
    return ConfigError("\n".join(lines))


def _largest_fitting_dim(
    schema: FeatureSchema, world: int, capacity: int, precision: str, optimizer: str
) -> int:
    """Largest D, a multiple of 4, whose tables fit split evenly; 0 if none."""
    best = 0
    for dim in range(4, 1025, 4):
        if _table_bytes(schema, dim, precision, optimizer)[0] / world > capacity:
            break
        best = dim
    return best


def _ranks_text(ranks: Sequence[int], world_size: int) -> str:
    if len(ranks) == world_size and world_size > 1:
        return f"all {world_size}"
    if len(ranks) > 4 and list(ranks) == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(str(r) for r in ranks)


def format_report(report: PlanReport) -> str:
    """Format the plan as text: the cluster, one line per table, one line per
    group of ranks with equal memory."""
    cluster = report.cluster
    hardware = cluster.hardware
    memory = "HBM" if hardware.compute_device == "cuda" else "host memory"
    device_bytes = (
        hardware.hbm_bytes if hardware.compute_device == "cuda" else cluster.ddr_bytes_per_rank
    )  # fmt: skip
    lines = [
        f"== {cluster.name}: {hardware.description}",
        f"   tables in {report.precision}, embedding optimizer {report.optimizer}, "
        f"D={report.embedding_dim}, sharding {report.sharding}, "
        f"{report.batch_size_per_rank} examples per rank and step",
        f"   per rank: {_gib(device_bytes)} {memory}, {_gib(report.reserved_bytes)} "
        f"reserved (15% margin, dense towers, input batches), "
        f"{_gib(report.capacity_bytes)} for tables",
        f"   all ranks: {_gib(report.total_weights_bytes)} weights + "
        f"{_gib(report.total_optimizer_bytes)} optimizer state "
        f"(planned in {report.plan_seconds:.1f} s, nothing allocated)",
    ]
    slowest = report.slowest_rank_step_ms
    if slowest is not None:
        lines.append(
            f"   TorchRec's cost model: {slowest:.3f} ms of embedding work per step "
            "on the busiest rank (a bandwidth model without kernel overheads: "
            "compares plans, does not forecast throughput)"
        )

    lines += [
        "   table | rows x D | sharding | kernel | ranks | rows per shard",
    ]
    for table in report.tables:
        ranks = sorted({rank for rank, _, _ in table.shards})
        shard_rows = sorted({rows for _, rows, _ in table.shards})
        rows_text = (
            f"{shard_rows[0]:,}"
            if len(shard_rows) == 1
            else f"{shard_rows[0]:,}-{shard_rows[-1]:,}"
        )
        lines.append(
            f"   {table.name} | {table.rows:,} x {table.columns} | "
            f"{table.sharding_type} | {table.compute_kernel} | "
            f"{_ranks_text(ranks, cluster.world_size)} | {rows_text}"
        )

    lines.append(
        "   ranks | weights | optimizer state | weights + state | "
        "planner estimate | used of table memory"
    )
    for first, last, usage in _group_ranks(report.ranks):
        label = f"{first}" if first == last else f"{first}-{last}"
        planner = (
            "n/a (manual plan)"
            if usage.planner_bytes is None
            else _gib(usage.planner_bytes)
            + (f" ({_gib(usage.host_bytes)} in host memory)" if usage.host_bytes else "")
        )  # fmt: skip
        used = usage.total_bytes / max(report.capacity_bytes, 1)
        lines.append(
            f"   {label} | {_gib(usage.weights_bytes)} | "
            f"{_gib(usage.optimizer_bytes)} | {_gib(usage.total_bytes)} | "
            f"{planner} | {used:.0%}"
        )
    return "\n".join(lines)


def _group_ranks(
    ranks: Sequence[RankUsage],
) -> list[tuple[int, int, RankUsage]]:
    """Consecutive ranks with equal usage, as (first, last, usage)."""
    groups: list[tuple[int, int, RankUsage]] = []

    def key(usage: RankUsage) -> RankUsage:
        return dataclasses.replace(usage, rank=0, planner_step_ms=None)

    for usage in ranks:
        if groups and key(groups[-1][2]) == key(usage):
            groups[-1] = (groups[-1][0], usage.rank, groups[-1][2])
        else:
            groups.append((usage.rank, usage.rank, usage))
    return groups


def report_to_dict(report: PlanReport) -> dict[str, Any]:
    """Convert the report to JSON-compatible types."""
    return {
        "cluster": {
            "hardware": report.cluster.hardware.name,
            "world_size": report.cluster.world_size,
            "ranks_per_host": report.cluster.ranks_per_host,
            "hbm_bytes": report.cluster.hardware.hbm_bytes,
            "ddr_bytes_per_rank": report.cluster.ddr_bytes_per_rank,
        },
        "precision": report.precision,
        "optimizer": report.optimizer,
        "sharding": report.sharding,
        "embedding_dim": report.embedding_dim,
        "batch_size_per_rank": report.batch_size_per_rank,
        "capacity_bytes": report.capacity_bytes,
        "slowest_rank_step_ms": report.slowest_rank_step_ms,
        "tables": [dataclasses.asdict(t) for t in report.tables],
        "ranks": [
            {**dataclasses.asdict(r), "total_bytes": r.total_bytes}
            for r in report.ranks
        ],
    }


# --- command line ------------------------------------------------------------


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kd-dagfm plan`` besides the config flags."""
    group = parser.add_argument_group("planning")
    group.add_argument(
        "--hardware",
        default="h100-80gb",
        choices=sorted(HARDWARE),
        help="kind of rank to plan for (default: h100-80gb)",
    )
    group.add_argument(
        "--num_ranks",
        default="8,16,64",
        help="comma-separated cluster sizes in ranks (GPUs, or processes on CPU "
        "hosts); one plan each (default: 8,16,64)",
    )
    group.add_argument(
        "--tables",
        default=None,
        choices=sorted(SCHEMA_PRESETS),
        help="plan a preset instead of the config's dataset: billion (one "
        "1,000,000,000-row table) or criteo_1tb (26 tables at Criteo 1TB "
        "cardinalities)",
    )
    group.add_argument(
        "--precision",
        default="fp32",
        choices=sorted(PRECISIONS),
        help="table weight precision to plan with (training uses fp32 today)",
    )
    group.add_argument(
        "--hbm_gib", type=float, default=None, help="memory of one GPU in GiB"
    )
    group.add_argument(
        "--ddr_gib_per_host", type=float, default=None, help="host memory in GiB"
    )
    group.add_argument(
        "--ranks_per_host", type=int, default=None, help="GPUs or processes per host"
    )
    group.add_argument(
        "--allow_uvm",
        action="store_true",
        help="on GPUs, allow tables in host memory with an HBM cache "
        "(fused_uvm_caching)",
    )
    group.add_argument(
        "--json", action="store_true", help="print the reports as JSON lines"
    )


def plan_schema(config: RunConfig, preset: str | None) -> FeatureSchema:
    """Pick the features to plan: a preset, the synthetic schema, or the
    dataset's schema.json (read without touching the data)."""
    if preset is not None:
        return SCHEMA_PRESETS[preset]()
    data = config.data
    if data.dataset == "synthetic":
        return synthetic_schema(data.synthetic_fields, data.synthetic_vocab_size)
    if recbole_atomic_name(data.dataset) is not None:
        raise ConfigError(
            f"dataset {data.dataset!r} contains RecBole atomic files, whose table sizes "
            "are known only after conversion; run kd-dagfm convert recbole first "
            "and plan the converted directory"
        )
    return load_schema(data.dataset)


def plan_command(config: RunConfig, args: argparse.Namespace) -> int:
    """Plan the config's tables on each cluster size; return 2 when any
    plan does not fit, after printing every report and error."""
    try:
        sizes = [int(n) for n in str(args.num_ranks).split(",") if n.strip()]
    except ValueError:
        raise ConfigError(
            f"invalid --num_ranks {args.num_ranks!r}: expected comma-separated "
            "integers such as 8,16,64"
        ) from None
    if not sizes:
        raise ConfigError("--num_ranks is empty: give at least one cluster size")
    schema = plan_schema(config, args.tables)
    failed = 0
    for world_size in sizes:
        cluster = make_cluster(
            args.hardware,
            world_size,
            hbm_gib=args.hbm_gib,
            ddr_gib_per_host=args.ddr_gib_per_host,
            ranks_per_host=args.ranks_per_host,
        )
        try:
            report = plan_model(
                schema,
                config.model,
                cluster,
                optimizer=config.train.embedding_optimizer,
                precision=args.precision,
                sharding=config.distributed.sharding,
                global_batch_size=config.train.train_batch_size,
                allow_uvm=args.allow_uvm,
            )
        except ConfigError as error:
            failed += 1
            if args.json:
                print(json.dumps({"cluster": cluster.name, "error": str(error)}))
            else:
                print(f"== {cluster.name}: does not fit\nerror: {error}\n")
            continue
        if args.json:
            print(json.dumps(report_to_dict(report)))
        else:
            print(format_report(report) + "\n")
    return 2 if failed else 0
