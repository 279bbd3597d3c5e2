"""KDDAGFM under TorchRec's DistributedModelParallel: sharded tables, fused optimizers.

The embedding tables are sharded by a plan (see :mod:`.planning`) and updated
by FBGEMM's fused optimizers inside the backward pass
(``apply_optimizer_in_backward``); the dense towers are replicated with DDP
and updated by Adam. Both optimizers sit in one ``CombinedOptimizer`` whose
state dict is keyed by parameter name and holds ShardedTensors for the
tables, so ``torch.distributed.checkpoint`` can save it and reshard it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from kd_dagfm.config import RunConfig
from kd_dagfm.distributed.planning import (
    EBC_PATH,
    describe_plan,
    embedding_bytes_per_rank,
    format_plan,
    host_memory_bytes,
    plan_sharding,
)
from kd_dagfm.distributed.process_group import local_world_size, rank_device
from kd_dagfm.errors import CheckpointError, ConfigError
from kd_dagfm.model import KDDAGFM
from kd_dagfm.phases import Phase
from kd_dagfm.train.engine import Engine, split_parameters
from kd_dagfm.train.trainer import EngineFactory

logger = logging.getLogger(__name__)

# Fused (FBGEMM) embedding optimizers by ``embedding_optimizer`` value; the
# class only selects the FBGEMM kernel, which does the update.
FUSED_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rowwise_adagrad": RowWiseAdagrad,
    "adam": torch.optim.Adam,
}
# FBGEMM's CPU kernels (fbgemm-gpu-cpu 1.8) implement only these; Adam asserts.
CPU_FUSED_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")


class DMPEngine:
    """One rank of a DistributedModelParallel KDDAGFM for one phase.

    The tables always get the fused optimizer, also in distillation: there
    ``KDDAGFM.forward`` computes the embeddings under ``torch.no_grad``, so
    no gradient reaches the fused kernels and the tables keep their weights,
    while the checkpoint layout stays the same in every phase.

    Args:
        model: the unsharded model, built identically on every rank.
        config: the run; uses ``sharding``, the optimizer settings and
            ``train_batch_size``.
        phase: decides which dense parameters Adam trains.
        device: this rank's device; default: its GPU under NCCL, else CPU.

    Raises:
        ConfigError: for an embedding optimizer the device has no fused kernel
            for, or a sharding that does not fit the world size.
    """

    def __init__(
        self,
        model: KDDAGFM,
        config: RunConfig,
        phase: Phase,
        device: torch.device | None = None,
    ) -> None:
        if not dist.is_initialized():
            raise ConfigError(
                "the sharded engine needs torch.distributed: call "
                "kd_dagfm.distributed.init_process_group() on every rank first"
            )
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = device or rank_device()
        self.phase = phase
        self.config = config
        train = config.train
        self.embedding_optimizer = train.embedding_optimizer
        fused_class = _fused_optimizer_class(train.embedding_optimizer, self.device)

        split_parameters(model, phase)
        tables = list(model.sparse_arch.embedding_bag_collection.parameters())
        for table in tables:
            # The fused kernel is attached through a gradient hook, which
            # needs requires_grad; distillation's no_grad keeps tables fixed.
            table.requires_grad_(True)
        apply_optimizer_in_backward(
            fused_class,
            tables,
            {"lr": train.embedding_learning_rate or train.learning_rate},
        )

        # DistributedModelParallel allocates and initialises the sharded tables
        # itself; copy the model's weights in, so a sharded run starts from the
        # same (seeded) weights as a single-process one.
        initial_tables = {
            f"{EBC_PATH}.{name}": tensor.detach().clone()
            for name, tensor in model.sparse_arch.embedding_bag_collection.state_dict().items()
        }
        table_shapes = {
            c.name: (c.num_embeddings, c.embedding_dim)
            for c in model.sparse_arch.embedding_bag_collection.embedding_bag_configs()
        }
        sharder = EmbeddingBagCollectionSharder()
        plan = plan_sharding(
            model,
            config.distributed.sharding,
            sharder,
            world_size=self.world_size,
            local_world_size=local_world_size(self.world_size),
            device=self.device,
            batch_size_per_rank=max(train.train_batch_size // self.world_size, 1),
        )
        self.plan = describe_plan(plan)
        self.model: nn.Module = DistributedModelParallel(
            model,
            device=self.device,
            plan=plan,
            sharders=[sharder],  # type: ignore[list-item]
        )
        copy_into_state(initial_tables, self.model.state_dict())

        dense = {
            name: parameter
            for name, parameter in in_backward_optimizer_filter(
                self.model.named_parameters()
            )
            if parameter.requires_grad
        }
        self.dense_optimizer = KeyedOptimizerWrapper(
            dense,
            lambda params: torch.optim.Adam(
                params, lr=train.learning_rate, weight_decay=train.weight_decay
            ),
        )
        dmp = self.model
        assert isinstance(dmp, DistributedModelParallel)
        self.optimizer = CombinedOptimizer([dmp.fused_optimizer, self.dense_optimizer])
        self._log_plan(table_shapes)

    @property
    def unwrapped(self) -> KDDAGFM:
        dmp = self.model
        assert isinstance(dmp, DistributedModelParallel)
        module = dmp.module
        assert isinstance(module, KDDAGFM)
        return module

    def optimize(self, loss: torch.Tensor) -> None:
        # The fused table optimizers step inside backward().
        self.dense_optimizer.zero_grad()
        loss.backward()
        self.dense_optimizer.step()

    def model_state(self) -> dict[str, Any]:
        return self.model.state_dict()

    def optimizer_state(self) -> dict[str, Any]:
        """Both optimizers' state, keyed by parameter name.

        Adam creates its state on the first step; before that a zero-gradient
        step materialises it, so that ``dcp.load`` finds a tensor for every
        saved key (an absent key is silently not loaded). The model weights a
        weight-decay step moves are loaded from the same checkpoint afterwards.
        """
        if not self.dense_optimizer.state:
            self.dense_optimizer.init_state()
            self.dense_optimizer.zero_grad()
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def describe(self) -> dict[str, Any]:
        return {
            "engine": "dmp",
            "device": str(self.device),
            "backend": str(dist.get_backend()),
            "world_size": self.world_size,
            "sharding": self.config.distributed.sharding,
            "embedding_optimizer": self.embedding_optimizer,
            "plan": self.plan,
        }

    def check_resume(self, meta: dict[str, Any]) -> None:
        """Raise CheckpointError when this engine cannot restore the optimizer
        state of the checkpoint whose meta.json is ``meta``."""
        check_resumable(meta.get("engine", {}), self.describe())

    def _log_plan(self, table_shapes: dict[str, tuple[int, int]]) -> None:
        if self.rank != 0:
            return
        sizes = embedding_bytes_per_rank(
            self.plan, table_shapes, self.world_size, self.embedding_optimizer
        )
        available = host_memory_bytes() // local_world_size(self.world_size)
        if self.device.type == "cuda":
            available = int(torch.cuda.mem_get_info(self.device)[0])
        logger.info(
            "%s: sharding plan (%s, %d ranks, embedding optimizer %s):\n%s",
            self.phase.value,
            self.config.distributed.sharding,
            self.world_size,
            self.embedding_optimizer,
            format_plan(self.plan, sizes, available),
        )


def copy_into_state(source: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Copy full tensors into the matching entries of a (sharded) state dict.

    A ShardedTensor entry receives, in each local shard, the slice of the
    full tensor at the shard's offsets; a plain tensor receives all of it.
    """
    for key, full in source.items():
        target = state[key]
        if isinstance(target, ShardedTensor):
            for shard in target.local_shards():
                index = tuple(
                    slice(offset, offset + size)
                    for offset, size in zip(
                        shard.metadata.shard_offsets, shard.metadata.shard_sizes
                    )
                )
                shard.tensor.detach().copy_(full[index])
        else:
            target.detach().copy_(full)


def check_resumable(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise CheckpointError when optimizer state saved under the engine
    description ``saved`` cannot be loaded into the engine ``current``.

    TorchRec reshards table weights between any plans, and row-wise,
    table-wise and data-parallel optimizer state between world sizes and
    between those types. FBGEMM keeps a column-wise table's optimizer state
    per column shard, so it loads only into the same column split.
    """
    if saved.get("engine") != "dmp":
        raise CheckpointError(
            f"the checkpoint was written by the {saved.get('engine', 'unknown')!r} "
            "engine, whose optimizer state has another layout than the sharded "
            "engine's; resume it with the engine that wrote it, or start the phase "
            "again from its warm_up"
        )
    if saved.get("embedding_optimizer") != current["embedding_optimizer"]:
        raise CheckpointError(
            f"the checkpoint's embedding optimizer is {saved.get('embedding_optimizer')!r}, "
            f"this run uses {current['embedding_optimizer']!r}; resume with "
            f"embedding_optimizer={saved.get('embedding_optimizer')}, or start the phase "
            "again in a new output_dir"
        )
    if current["embedding_optimizer"] == "sgd":
        return  # SGD has no optimizer state to reshard.
    saved_plan: dict[str, Any] = saved.get("plan", {})
    current_plan: dict[str, Any] = current["plan"]
    changed = [
        table
        for table, entry in sorted(saved_plan.items())
        if entry.get("sharding_type") == "column_wise"
        and _column_split(entry) != _column_split(current_plan.get(table, {}))
    ]
    if changed:
        before = saved_plan[changed[0]]
        after = current_plan.get(changed[0], {})
        raise CheckpointError(
            f"cannot reshard column-wise optimizer state: table {changed[0]!r}"
            f"{f' (and {len(changed) - 1} more)' if len(changed) > 1 else ''} was "
            f"column_wise with column shards {_column_split(before)} on "
            f"{saved.get('world_size')} ranks, this run has "
            f"{after.get('sharding_type')} with {_column_split(after) or 'no column shards'} "
            f"on {current['world_size']} ranks. Resume with sharding=column_wise and "
            f"num_workers={saved.get('world_size')}, or start the phase again from its "
            "warm_up (model weights reshard, optimizer state does not)"
        )


def _column_split(entry: dict[str, Any]) -> list[list[int]]:
    """[column offset, columns] of each shard of a column-wise table."""
    if entry.get("sharding_type") != "column_wise":
        return []
    return sorted([shard[3], shard[1]] for shard in entry.get("shards", []))


def _fused_optimizer_class(
    name: str, device: torch.device
) -> type[torch.optim.Optimizer]:
    if name not in FUSED_OPTIMIZERS:
        raise ConfigError(
            f"invalid embedding_optimizer {name!r} for the sharded engine: expected "
            f"one of {', '.join(FUSED_OPTIMIZERS)}"
        )
    if device.type == "cpu" and name not in CPU_FUSED_OPTIMIZERS:
        raise ConfigError(
            f"embedding_optimizer {name!r} has no fused CPU kernel in FBGEMM; on CPU "
            f"use one of {', '.join(CPU_FUSED_OPTIMIZERS)} (rowwise_adagrad is the "
            "usual choice), or run on GPUs with gpus_per_worker >= 1"
        )
    return FUSED_OPTIMIZERS[name]


def dmp_engine_factory(config: RunConfig) -> EngineFactory:
    """An engine factory for :class:`~kd_dagfm.train.trainer.PhaseTrainer` that
    shards the tables; call :func:`init_process_group` on every rank first.

    The embedding optimizer is checked here, before any phase starts.
    """
    _fused_optimizer_class(config.train.embedding_optimizer, rank_device())

    def make(model: KDDAGFM, phase: Phase) -> Engine:
        return DMPEngine(model, config, phase)

    return make
