"""Model cost: parameters, counted FLOPs and inference latency."""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from kd_dagfm.data.batch import Batch
from kd_dagfm.flops import count_parameters, flops_per_example
from kd_dagfm.model import KDDAGFM
from kd_dagfm.phases import Phase


@dataclasses.dataclass(frozen=True)
class Latency:
    """Inference latency of one batch size, in milliseconds.

    Attributes:
        batch_size: rows per forward pass.
        p50_ms, p99_ms: median and 99th percentile over ``calls`` passes.
        calls: forward passes timed.
    """

    batch_size: int
    p50_ms: float
    p99_ms: float
    calls: int


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """Size and cost of one model of a KD-DAGFM run (a teacher or the student).

    Attributes:
        name: the model, for example ``CrossNet`` or ``DAGFM-outer``.
        role: ``teacher`` or ``student``.
        tower_parameters: parameters of the tower (without embeddings).
        embedding_parameters: parameters of the shared embedding tables.
        flops_per_example: FLOPs of the tower's forward pass per example,
            counted by ``torch.utils.flop_counter`` (matmuls, einsums,
            convolutions; elementwise work is not counted).
        latency: inference latency (embedding lookup and tower) per batch size.
    """

    name: str
    role: str
    tower_parameters: int
    embedding_parameters: int
    flops_per_example: float
    latency: tuple[Latency, ...]


def model_cost(
    model: KDDAGFM,
    role: str,
    name: str,
    batches: dict[int, Batch],
    calls: dict[int, int],
) -> ModelCost:
    """Count ``model``'s teacher or student and time its inference.

    Args:
        model: the model; its sparse arch and the tower of ``role`` run.
        role: ``teacher`` or ``student``.
        name: the model's name in tables.
        batches: one batch per batch size to time.
        calls: forward passes to time per batch size.
    """
    tower = model.teacher if role == "teacher" else model.student
    num_fields = len(model.sparse_arch.sparse_names) + model.sparse_arch.num_dense
    embedding_dim = model.config.embedding_size
    latency = tuple(
        measure_latency(model, role, batch, calls[size])
        for size, batch in sorted(batches.items())
    )
    return ModelCost(
        name=name,
        role=role,
        tower_parameters=count_parameters(tower),
        embedding_parameters=count_parameters(model.sparse_arch),
        flops_per_example=flops_per_example(tower, num_fields, embedding_dim),
        latency=latency,
    )


def measure_latency(
    model: KDDAGFM, role: str, batch: Batch, calls: int, budget_s: float = 20.0
) -> Latency:
    """Time up to ``calls`` inference passes of the sparse arch and one tower.

    The model runs in eval mode under ``torch.inference_mode``, after two
    untimed passes. A model slower than ``budget_s / calls`` per pass gets
    fewer passes, but at least five.
    """
    # The teacher runs alone in teacher_training, the student in finetuning.
    phase = Phase.TEACHER_TRAINING if role == "teacher" else Phase.FINETUNING
    was_training = model.training
    model.eval()
    times_ms: list[float] = []
    with torch.inference_mode():
        for _ in range(2):
            started = time.perf_counter()
            model(batch.sparse_features, batch.dense_features, phase)
        warm_s = time.perf_counter() - started
        calls = max(5, min(calls, int(budget_s / max(warm_s, 1e-9))))
        for _ in range(calls):
            started = time.perf_counter()
            model(batch.sparse_features, batch.dense_features, phase)
            times_ms.append((time.perf_counter() - started) * 1e3)
    model.train(was_training)
    return Latency(
        batch_size=len(batch),
        p50_ms=statistics.median(times_ms),
        p99_ms=percentile(times_ms, 99.0),
        calls=calls,
    )


def percentile(values: list[float], q: float) -> float:
    """Return the ``q``-th percentile of ``values``, interpolated linearly."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)
