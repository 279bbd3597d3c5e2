"""Equal evaluation steps on every rank.

A sharded forward pass is collective: every rank must run the same number of
them, and row-wise sharding on gloo also needs the same batch size on every
rank. Evaluation reads every row of a split, so the ranks' last batches
differ in size and some ranks run out of row groups first.
:func:`aligned_batches` pads each step to the largest batch of that step
and gives a rank that has run out a batch of padding only; the caller
scores the first ``rows`` rows of each batch and ignores the rest.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torchrec import KeyedJaggedTensor

from kd_dagfm.data.batch import Batch
from kd_dagfm.schema import FeatureSchema


def aligned_batches(
    batches: Iterable[Batch], schema: FeatureSchema, device: torch.device
) -> Iterator[tuple[Batch, int]]:
    """Yield (batch, real rows) until every rank has run out of batches.

    Every rank of the default process group must call this with its own
    batches; each step runs one all-reduce of one integer on ``device``.
    """
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        rows = len(batch) if batch is not None else 0
        largest = torch.tensor([rows], dtype=torch.int64, device=device)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        size = int(largest.item())
        if size == 0:
            return
        if batch is None:
            batch = empty_batch(schema)
        yield pad_batch(batch, size), rows


def empty_batch(schema: FeatureSchema) -> Batch:
    """Build a batch of zero rows with the features of ``schema``."""
    keys = [f.name for f in schema.sparse_features]
    return Batch(
        sparse_features=KeyedJaggedTensor(
            keys=keys,
            values=torch.zeros(0, dtype=torch.int64),
            lengths=torch.zeros(0, dtype=torch.int32),
        ),
        dense_features=torch.zeros(0, len(schema.dense_features)),
        labels=torch.zeros(0),
    )


def pad_batch(batch: Batch, size: int) -> Batch:
    """Append rows to ``batch`` until it has ``size`` rows.

    Each added row has one id 0 per sparse feature (a valid row of every
    table), zero dense values, label 0 and, with cached teacher logits, a
    logit of 0.
    """
    rows = len(batch)
    missing = size - rows
    if missing < 0:
        raise ValueError(f"cannot pad a batch of {rows} rows to {size}")
    if missing == 0:
        return batch

    sparse = batch.sparse_features
    keys = sparse.keys()
    lengths = sparse.lengths().view(len(keys), rows)  # (K, B)
    per_key = torch.split(sparse.values(), lengths.sum(dim=1).tolist())
    values = torch.cat([torch.cat([v, v.new_zeros(missing)]) for v in per_key])
    padded_lengths = torch.cat(
        [lengths, lengths.new_ones(len(keys), missing)], dim=1
    )  # (K, size)
    dense = batch.dense_features
    teacher = batch.teacher_logits
    return Batch(
        sparse_features=KeyedJaggedTensor(
            keys=keys, values=values, lengths=padded_lengths.reshape(-1)
        ),
        dense_features=torch.cat([dense, dense.new_zeros(missing, dense.shape[1])]),
        labels=torch.cat([batch.labels, batch.labels.new_zeros(missing)]),
        teacher_logits=None
        if teacher is None
        else torch.cat([teacher, teacher.new_zeros(missing)]),
    )
