"""Training batches and their conversion from Arrow tables."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import torch
from torchrec import KeyedJaggedTensor

from kd_dagfm.schema import FeatureKind, FeatureSchema


@dataclasses.dataclass
class Batch:
    """One batch in the form TorchRec's train pipelines expect.

    Attributes:
        sparse_features: ids keyed by sparse feature name; one id per row for
            ``sparse`` features, any number for ``sparse_list`` ones.
        dense_features: (B X num_dense) float32.
        labels: (B,) float32, 0 or 1.
    """

    sparse_features: KeyedJaggedTensor
    dense_features: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return Batch(
            sparse_features=self.sparse_features.to(
                device=device, non_blocking=non_blocking
            ),
            dense_features=self.dense_features.to(
                device=device, non_blocking=non_blocking
            ),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        self.sparse_features.record_stream(stream)
        self.dense_features.record_stream(stream)
        self.labels.record_stream(stream)

    def pin_memory(self) -> Batch:
        return Batch(
            sparse_features=self.sparse_features.pin_memory(),
            dense_features=self.dense_features.pin_memory(),
            labels=self.labels.pin_memory(),
        )


def table_to_batch(table: pa.Table, schema: FeatureSchema) -> Batch:
    """Convert validated Arrow columns to a Batch without per-row Python work.

    Single-id columns become length-1 jagged rows; list columns keep their
    Arrow offsets as KJT lengths.
    """
    num_rows = table.num_rows
    values: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    for feature in schema.sparse_features:
        column = table.column(feature.name).combine_chunks()
        if feature.kind is FeatureKind.SPARSE_LIST:
            ids, row_lengths = list_column_arrays(column)
            values.append(ids)
            lengths.append(row_lengths)
        else:
            values.append(
                np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.int64)
            )
            lengths.append(np.ones(num_rows, dtype=np.int32))

    sparse = KeyedJaggedTensor(
        keys=[f.name for f in schema.sparse_features],
        values=torch.from_numpy(
            np.concatenate(values) if values else np.zeros(0, np.int64)
        ),
        lengths=torch.from_numpy(
            np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
        ),
        stride=num_rows,
    )

    dense_columns = [
        np.asarray(
            table.column(f.name).to_numpy(zero_copy_only=False), dtype=np.float32
        )
        for f in schema.dense_features
    ]
    dense = (
        np.stack(dense_columns, axis=1)
        if dense_columns
        else np.zeros((num_rows, 0), dtype=np.float32)
    )
    labels = np.asarray(
        table.column(schema.label).to_numpy(zero_copy_only=False), np.float32
    )
    return Batch(sparse, torch.from_numpy(dense), torch.from_numpy(labels))


def list_column_arrays(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Return (flat ids as int64, per-row lengths as int32) of a list column."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    offsets = np.asarray(column.offsets.to_numpy(), dtype=np.int64)
    ids = column.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    return np.asarray(ids, dtype=np.int64), np.diff(offsets).astype(np.int32)
