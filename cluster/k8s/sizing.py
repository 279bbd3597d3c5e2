"""Pod memory requests estimated from the model config and the feature schema.

A worker pod needs memory for its share of the embedding tables plus their
training state, the activations of one step, the Python/PyTorch/Ray runtime and the
Ray object store:

    table_bytes    = rows x D x 4 bytes x optimizer_factor
    optimizer_factor = 1 (weight) + 1 (gradient) + state values per weight
                     (sgd 0, adagrad 1, adam 2, rowwise_adagrad 1/D)
    share          = table_bytes / W for row_wise, column_wise, table_row_wise;
                     max(table_bytes / W, largest table) for table_wise and auto,
                     since a table never splits there; table_bytes for data_parallel
    worker memory  = headroom x (share + activations + prefetch + runtime)
                     + object store (Ray pods only)

The gradient term is exact for the single-process engine, which materialises a
dense gradient per table. TorchRec's fused optimizers (the sharded engine)
never materialise it, so there the estimate has one value per weight to spare.
Activations count the teacher and the student of one training step at the
per-rank batch, doubled for the backward pass, or one evaluation batch without
gradients, whichever is larger (see :func:`activation_values`).

With GPUs the tables and activations live in GPU memory: the GPU estimate is
reported next to the host request, and the host keeps the runtime, the
prefetched batches and room to stage a checkpoint shard.
"""

from __future__ import annotations

import dataclasses
import math

from kd_dagfm.config import RunConfig
from kd_dagfm.schema import FeatureSchema

GIB = 1024**3
MIB = 1024**2
BYTES_PER_VALUE = 4
"""fp32 weights, gradients, optimizer state and activations."""

OPTIMIZER_STATE_VALUES = {"sgd": 0.0, "adagrad": 1.0, "adam": 2.0}
"""Optimizer state values per table weight. rowwise_adagrad keeps one per row."""

RUNTIME_BYTES = 2 * GIB
"""Per training process: Python, PyTorch, TorchRec/FBGEMM, pyarrow and the Ray
core worker. Importing the stack alone measured 0.47 GB RSS (CPU build, x86_64),
and the rest is an estimate for the CUDA context, gloo/NCCL buffers and allocator
slack."""

PREFETCH_BYTES_PER_VALUE = 8
"""int64 ids in a prefetched batch."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Memory of one worker pod, in bytes, with the terms that produced it."""

    embedding_rows: int
    embedding_dim: int
    optimizer_factor: float
    table_bytes: int
    share_bytes: int
    activation_bytes: int
    prefetch_bytes: int
    runtime_bytes: int
    object_store_bytes: int
    headroom: float
    host_bytes: int
    """headroom x the working set in host memory, without the object store."""
    gpu_bytes: int
    override_bytes: int

    @property
    def ray_worker_bytes(self) -> int:
        """Memory request of a Ray worker pod: the override, else the host
        estimate plus the object store."""
        return self.override_bytes or self.host_bytes + self.object_store_bytes

    @property
    def rank_bytes(self) -> int:
        """Memory request of an indexed-Job pod, which runs no Ray object store."""
        return self.override_bytes or self.host_bytes

    def summary(self) -> str:
        """Format the estimate as one line for a manifest annotation."""
        line = (
            f"rows={self.embedding_rows} D={self.embedding_dim} "
            f"optimizer_factor={self.optimizer_factor:g} "
            f"tables={_gib(self.table_bytes)} share={_gib(self.share_bytes)} "
            f"activations={_gib(self.activation_bytes)} "
            f"runtime={_gib(self.runtime_bytes)} headroom={self.headroom:g} "
            f"object_store={_gib(self.object_store_bytes)} "
            f"host={_gib(self.host_bytes)}"
        )
        if self.gpu_bytes:
            line += f" gpu={_gib(self.gpu_bytes)}"
        if self.override_bytes:
            line += f" request={_gib(self.override_bytes)} (worker_memory_gib)"
        return line


def optimizer_factor(optimizer: str, embedding_dim: int) -> float:
    """Return the values kept per table weight: weight, gradient and state."""
    if optimizer == "rowwise_adagrad":
        state = 1.0 / embedding_dim
    else:
        state = OPTIMIZER_STATE_VALUES[optimizer]
    return 2.0 + state


def activation_values(config: RunConfig, schema: FeatureSchema) -> int:
    """Estimate the fp32 values alive in one step of one rank (see module doc).

    Per example with F fields and dimension D: the field embeddings (F D), each
    DAGFM layer (3 F D, plus F F edge weights for the outer type) and the
    dagfm_plus MLP, and the teacher's interaction layers (see
    :func:`teacher_values_per_example`).
    """
    model = config.model
    fields = schema.num_fields
    dim = model.embedding_size

    student = model.depth * (3 * fields * dim)
    if model.student_type == "outer":
        student += model.depth * fields * fields
    if model.student == "dagfm_plus":
        student += 2 * sum(model.student_mlp)
    per_example = fields * dim + student + teacher_values_per_example(config, fields)

    workers = config.distributed.num_workers
    train_rows = math.ceil(config.train.train_batch_size / workers)
    eval_rows = config.train.eval_batch_size
    return max(2 * train_rows * per_example, eval_rows * per_example)


def teacher_values_per_example(config: RunConfig, fields: int) -> int:
    """Count the activation values per example of the teacher's layers.

    CrossNet and DCNv2's cross network: 3 F D per layer. CIN (cin, xdeepfm):
    H_{k-1} F D for layer k's outer product plus H_k D, with H_0 = F.
    AutoInt: per layer the F x F attention of each head plus query, key,
    value and output (4 F A for A = t_attention_dim). An MLP (dcnv2, xdeepfm,
    autoint): 2 values per hidden unit (pre- and post-activation).
    """
    model = config.model
    dim = model.embedding_size
    teacher = model.teacher
    values = 0
    if teacher in ("crossnet", "dcnv2"):
        values += model.t_depth * 3 * fields * dim
    if teacher in ("cin", "xdeepfm"):
        previous = fields
        for hidden in model.t_cin:
            values += previous * fields * dim + hidden * dim
            previous = hidden
    if teacher == "autoint":
        per_layer = model.t_attention_heads * fields * fields
        per_layer += 4 * fields * model.t_attention_dim
        values += model.t_attention_layers * per_layer
    if teacher in ("dcnv2", "xdeepfm", "autoint"):
        values += 2 * sum(model.t_mlp)
    return values


def estimate_worker_memory(config: RunConfig, schema: FeatureSchema) -> MemoryEstimate:
    """Estimate the memory of one worker pod (one training rank)."""
    deploy = config.deploy
    dim = config.model.embedding_size
    workers = config.distributed.num_workers
    factor = optimizer_factor(config.train.embedding_optimizer, dim)

    rows = [f.num_embeddings for f in schema.sparse_features]
    table_bytes = math.ceil(sum(rows) * dim * BYTES_PER_VALUE * factor)
    largest_bytes = math.ceil(max(rows, default=0) * dim * BYTES_PER_VALUE * factor)
    share_bytes = _share_bytes(
        config.distributed.sharding, table_bytes, largest_bytes, workers
    )

    activation_bytes = activation_values(config, schema) * BYTES_PER_VALUE
    per_rank_batch = math.ceil(config.train.train_batch_size / workers)
    prefetch_bytes = (
        config.data.prefetch_batches
        * per_rank_batch
        * (schema.num_fields + 1)
        * PREFETCH_BYTES_PER_VALUE
    )
    object_store_bytes = math.ceil(deploy.object_store_gib * GIB)

    if config.distributed.gpus_per_worker > 0:
        # Tables and activations sit in GPU memory. The host stages one shard
        # of a checkpoint at a time when saving.
        gpu_bytes = math.ceil(deploy.memory_headroom * (share_bytes + activation_bytes))
        host_working = share_bytes + prefetch_bytes + RUNTIME_BYTES
    else:
        gpu_bytes = 0
        host_working = share_bytes + activation_bytes + prefetch_bytes + RUNTIME_BYTES
    host_bytes = _round_up_mib(math.ceil(deploy.memory_headroom * host_working))

    return MemoryEstimate(
        embedding_rows=sum(rows),
        embedding_dim=dim,
        optimizer_factor=factor,
        table_bytes=table_bytes,
        share_bytes=share_bytes,
        activation_bytes=activation_bytes,
        prefetch_bytes=prefetch_bytes,
        runtime_bytes=RUNTIME_BYTES,
        object_store_bytes=object_store_bytes,
        headroom=deploy.memory_headroom,
        host_bytes=host_bytes,
        gpu_bytes=gpu_bytes,
        override_bytes=_round_up_mib(math.ceil(deploy.worker_memory_gib * GIB)),
    )


def head_memory_bytes(config: RunConfig) -> int:
    """Return the Ray head pod's memory: the configured GiB plus its object store."""
    deploy = config.deploy
    return _round_up_mib(
        math.ceil((deploy.head_memory_gib + deploy.object_store_gib) * GIB)
    )


def quantity(num_bytes: int) -> str:
    """Format bytes as a Kubernetes memory quantity in whole MiB ("6144Mi")."""
    return f"{_round_up_mib(num_bytes) // MIB}Mi"


def _share_bytes(sharding: str, total: int, largest: int, workers: int) -> int:
    if sharding == "data_parallel":
        return total
    even = math.ceil(total / workers)
    if sharding in ("table_wise", "auto"):
        return max(even, largest)
    return even


def _round_up_mib(num_bytes: int) -> int:
    return math.ceil(num_bytes / MIB) * MIB


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / GIB:.2f}GiB"
