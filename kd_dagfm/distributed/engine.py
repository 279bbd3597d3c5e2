"""KDDAGFM under TorchRec's DistributedModelParallel: sharded tables, fused optimizers.

The embedding tables are sharded by a plan (see :mod:`.planning`). FBGEMM's
fused optimizers update them inside the backward pass
(``apply_optimizer_in_backward``). The dense towers are replicated with DDP
and updated by Adam. Both optimizers sit in one ``CombinedOptimizer`` whose
state dict is keyed by parameter name and holds ShardedTensors for the
tables, so ``torch.distributed.checkpoint`` can save it and reshard it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.comm_ops import get_gradient_division
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import (
    CombinedOptimizer,
    KeyedOptimizer,
    KeyedOptimizerWrapper,
)
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
from kd_dagfm.model import KDDAGFM, ModelOutput
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
# NOTE: the GPU path (NCCL, fused Adam, CUDA metric state) has not run yet,
# because the test machine has no GPU; tests/test_distributed.py on 2 GPUs
# with the NCCL backend is the check to run first.
CPU_FUSED_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")
# Optimizers whose state has one value per table row rather than per element.
ROWWISE_STATE_OPTIMIZERS = ("rowwise_adagrad",)


class DMPEngine:
    """One rank of a DistributedModelParallel KDDAGFM for one phase.

    The tables get the fused optimizer in every phase, so the checkpoint
    layout is the same in all three. In distillation ``KDDAGFM.forward``
    computes the embeddings under ``torch.no_grad``, so no gradient reaches
    the fused kernels and the tables keep their weights.

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
        # TorchRec divides the sharded tables' gradients by the world size in
        # its backward all-to-all and DDP averages the rest, so a step on W
        # ranks equals a single-process step on the global batch.
        if not get_gradient_division():
            raise ConfigError(
                "torchrec.distributed.comm_ops.set_gradient_division(False) was "
                "called; the sharded engine needs the default (True) so that table "
                "gradients are averaged over ranks like the dense ones"
            )
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = device or rank_device()
        self.phase = phase
        self.config = config
        train = config.train
        self.embedding_optimizer = train.embedding_optimizer
        fused_class = _fused_optimizer_class(train.embedding_optimizer, self.device)

        _register_model_output()
        split_parameters(model, phase)
        ebc = model.sparse_arch.embedding_bag_collection
        embedding_lr = train.embedding_learning_rate or train.learning_rate
        for table in ebc.parameters():
            # The fused kernel is attached through a gradient hook, which
            # needs requires_grad; distillation's no_grad keeps tables fixed.
            table.requires_grad_(True)
        apply_optimizer_in_backward(
            fused_class,
            ebc.parameters(),
            _embedding_optimizer_kwargs(self.embedding_optimizer, embedding_lr),
        )

        # DistributedModelParallel allocates and initialises the shards itself.
        # Copying the model's tables in afterwards makes a sharded run start
        # from the same seeded weights as a single process. Tables built on
        # the meta device have no weights, so their shards keep DMP's init.
        initial_tables = {
            f"{EBC_PATH}.{name}": tensor.detach().clone()
            for name, tensor in ebc.state_dict().items()
            if not tensor.is_meta
        }
        table_shapes = {
            c.name: (c.num_embeddings, c.embedding_dim)
            for c in ebc.embedding_bag_configs()
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
        dmp = DistributedModelParallel(
            model,
            device=self.device,
            plan=plan,
            sharders=[sharder],  # type: ignore[list-item]
        )
        self.model: nn.Module = dmp
        copy_into_state(initial_tables, dmp.state_dict())
        self.stepped_optimizers = self._stepped_optimizers(dmp, fused_class)
        self.optimizer = CombinedOptimizer(
            [dmp.fused_optimizer, *self.stepped_optimizers]
        )
        self._log_plan(table_shapes)

    def _stepped_optimizers(
        self, dmp: DistributedModelParallel, fused_class: type[torch.optim.Optimizer]
    ) -> list[KeyedOptimizer]:
        """Build the optimizers that step after ``backward()``.

        Sharded tables update inside backward (``dmp.fused_optimizer``).
        Data-parallel tables use TorchRec's dense kernel, whose gradients DDP
        all-reduces, so they get the torch optimizer of the same kind. The
        towers get Adam.
        """
        train = self.config.train
        embedding_lr = train.embedding_learning_rate or train.learning_rate
        dense: dict[str, Any] = {}
        replicated_tables: dict[str, Any] = {}
        for name, parameter in in_backward_optimizer_filter(dmp.named_parameters()):
            if name.startswith(EBC_PATH + "."):
                replicated_tables[name] = parameter
            elif parameter.requires_grad:
                dense[name] = parameter
        optimizers: list[KeyedOptimizer] = [
            KeyedOptimizerWrapper(
                dense,
                lambda params: torch.optim.Adam(
                    params,
                    lr=train.learning_rate,
                    weight_decay=train.weight_decay,
                    # One kernel for all tensors, as the single-process engine.
                    fused=self.device.type in ("cpu", "cuda"),
                ),
            )
        ]
        if replicated_tables:
            kwargs = _embedding_optimizer_kwargs(self.embedding_optimizer, embedding_lr)
            optimizers.append(
                KeyedOptimizerWrapper(
                    replicated_tables, lambda params: fused_class(params, **kwargs)
                )
            )
        return optimizers

    @property
    def unwrapped(self) -> KDDAGFM:
        dmp = self.model
        assert isinstance(dmp, DistributedModelParallel)
        module = dmp.module
        assert isinstance(module, KDDAGFM)
        return module

    def optimize(self, loss: torch.Tensor) -> None:
        # The fused table optimizers step inside backward().
        for optimizer in self.stepped_optimizers:
            optimizer.zero_grad()
        loss.backward()
        for optimizer in self.stepped_optimizers:
            optimizer.step()

    def model_state(self) -> dict[str, Any]:
        return self.model.state_dict()

    def optimizer_state(self) -> dict[str, Any]:
        """Return the state of every optimizer, keyed by parameter name.

        Adam creates its state on the first step; before that a zero-gradient
        step materialises it, so that ``dcp.load`` finds a tensor for every
        saved key (an absent key is silently not loaded). The model weights a
        weight-decay step moves are loaded from the same checkpoint afterwards.
        """
        for optimizer in self.stepped_optimizers:
            if not optimizer.state:
                optimizer.init_state()
                optimizer.zero_grad()
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


def _register_model_output() -> None:
    """Register ModelOutput as a pytree node, so DDP finds the logits inside it.

    DDP looks for the output's tensors with torch's pytree. With TorchRec's
    default ``static_graph=True`` it queues the gradient all-reduce from an
    autograd node it attaches to those tensors, so with an opaque output the
    ranks' dense gradients are silently never averaged.
    """
    if ModelOutput not in pytree.SUPPORTED_NODES:
        pytree.register_dataclass(ModelOutput)


def _embedding_optimizer_kwargs(name: str, lr: float) -> dict[str, Any]:
    # FBGEMM's default eps (1e-8) for both the fused kernels and the torch
    # optimizers of data-parallel tables, so both update alike.
    return {"lr": lr} if name == "sgd" else {"lr": lr, "eps": 1e-8}


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

    DCP reshards table weights between any two plans, and optimizer state
    between world sizes and between row-wise, table-wise and column-wise
    layouts of elementwise state (Adagrad, Adam). Two layouts do not convert:
    row-wise Adagrad on a column-wise table keeps one accumulator per row and
    column shard (a ShardedTensor of rows x shards elements), and a
    data-parallel table has torch optimizer state where a sharded table has
    FBGEMM's. DCP would reject both with a size or missing-key error that
    does not say why.
    """
    if saved.get("engine") != "dmp":
        raise CheckpointError(
            f"the checkpoint was written by the {saved.get('engine', 'unknown')!r} "
            "engine, whose optimizer state has another layout than the sharded "
            "engine's; resume it with the engine that wrote it, or start the phase "
            "again from its warm_up"
        )
    optimizer = current["embedding_optimizer"]
    if saved.get("embedding_optimizer") != optimizer:
        raise CheckpointError(
            f"the checkpoint's embedding optimizer is {saved.get('embedding_optimizer')!r}, "
            f"this run uses {optimizer!r}; resume with "
            f"embedding_optimizer={saved.get('embedding_optimizer')}, or start the phase "
            "again in a new output_dir"
        )
    if optimizer == "sgd":
        return  # Plain SGD keeps no optimizer state.

    saved_plan: dict[str, Any] = saved.get("plan", {})
    current_plan: dict[str, Any] = current["plan"]
    for table, before in sorted(saved_plan.items()):
        after = current_plan.get(table, {})
        was_replicated = before.get("sharding_type") == "data_parallel"
        if was_replicated != (after.get("sharding_type") == "data_parallel"):
            raise CheckpointError(
                f"cannot restore the {optimizer} state of table {table!r}: it was "
                f"{before.get('sharding_type')} on {saved.get('world_size')} ranks, this "
                f"run has it {after.get('sharding_type')}. Data-parallel tables keep "
                "torch optimizer state and sharded tables FBGEMM's, which do not "
                f"convert. Resume with sharding={saved.get('sharding')}, or start the "
                "phase again from its warm_up (model weights reshard)"
            )
        if (
            optimizer in ROWWISE_STATE_OPTIMIZERS
            and before.get("sharding_type") == "column_wise"
            and _column_split(before) != _column_split(after)
        ):
            raise CheckpointError(
                f"cannot reshard column-wise optimizer state: table {table!r} was "
                f"column_wise with column shards {_column_split(before)} "
                f"([offset, columns]) on {saved.get('world_size')} ranks, this run has "
                f"it {after.get('sharding_type')} with "
                f"{_column_split(after) or 'no column shards'} on "
                f"{current['world_size']} ranks, and {optimizer} keeps one accumulator "
                "per row and column shard. Resume with sharding=column_wise and "
                f"num_workers={saved.get('world_size')}, or start the phase again from "
                "its warm_up (model weights reshard, this optimizer state does not)"
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
    """Return an engine factory for :class:`~kd_dagfm.train.trainer.PhaseTrainer`
    that shards the tables. Call :func:`init_process_group` on every rank first.

    The embedding optimizer is checked here, before any phase starts.
    """
    device = rank_device() if dist.is_initialized() else _default_device()
    _fused_optimizer_class(config.train.embedding_optimizer, device)

    def make(model: KDDAGFM, phase: Phase) -> Engine:
        return DMPEngine(model, config, phase)

    return make


def _default_device() -> torch.device:
    """Return the device init_process_group would choose: a GPU when torch finds one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
