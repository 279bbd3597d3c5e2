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
        teacher_logits: (B,) float32 cached teacher logits aligned with the
            rows, or None when the split has no cache attached.
    """

    sparse_features: KeyedJaggedTensor
    dense_features: torch.Tensor
    labels: torch.Tensor
    teacher_logits: torch.Tensor | None = None

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
            teacher_logits=None
            if self.teacher_logits is None
            else self.teacher_logits.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        self.sparse_features.record_stream(stream)
        self.dense_features.record_stream(stream)
        self.labels.record_stream(stream)
        if self.teacher_logits is not None:
            self.teacher_logits.record_stream(stream)

    def pin_memory(self) -> Batch:
        return Batch(
            sparse_features=self.sparse_features.pin_memory(),
            dense_features=self.dense_features.pin_memory(),
            labels=self.labels.pin_memory(),
            teacher_logits=None
            if self.teacher_logits is None
            else self.teacher_logits.pin_memory(),
        )


def table_to_batch(table: pa.Table, schema: FeatureSchema) -> Batch:
    """Convert validated Arrow columns to a Batch without per-row Python work.

    Single-id columns become length-1 jagged rows; list columns keep their
    Arrow offsets as KJT lengths.
    """
    arrays = RowGroupArrays.from_table(table, schema)
    assembler = BatchAssembler(schema)
    assembler.add(arrays, np.arange(table.num_rows, dtype=np.int64))
    return assembler.build()


def list_column_arrays(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Return (flat ids as int64, per-row lengths as int32) of a list column."""
    values, offsets = _list_values_offsets(column)
    return values[offsets[0] : offsets[-1]], np.diff(offsets).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class RowGroupArrays:
    """The columns of one row group as NumPy arrays, in file row order.

    Single-id and dense columns of the usual types are zero-copy views of
    the Arrow buffers. Rows that validation rejected keep a placeholder
    (nulls read as 0) and must not be selected.

    Attributes:
        num_rows: N.
        single: one (N,) int64 array per ``sparse`` feature, in schema order.
        lists: (values int64, offsets (N + 1,) int64) per ``sparse_list``
            feature, in schema order; row i contains values[offsets[i]:offsets[i + 1]].
        dense: one (N,) float32 array per dense feature, in schema order.
        labels: (N,) label column as stored (integer or float).
        teacher_logits: (N,) float32 cached teacher logits in file row order,
            attached by :meth:`ParquetSplit.attach_columns`, or None.
    """

    num_rows: int
    single: tuple[np.ndarray, ...]
    lists: tuple[tuple[np.ndarray, np.ndarray], ...]
    dense: tuple[np.ndarray, ...]
    labels: np.ndarray
    teacher_logits: np.ndarray | None = None

    @classmethod
    def from_table(cls, table: pa.Table, schema: FeatureSchema) -> RowGroupArrays:
        single, lists = [], []
        for feature in schema.sparse_features:
            column = _one_chunk(table.column(feature.name))
            if feature.kind is FeatureKind.SPARSE_LIST:
                lists.append(_list_values_offsets(column))
            else:
                single.append(_numpy(column, np.int64))
        dense = [
            _numpy(_one_chunk(table.column(f.name)), np.float32)
            for f in schema.dense_features
        ]
        labels = _one_chunk(table.column(schema.label))
        return cls(
            num_rows=table.num_rows,
            single=tuple(single),
            lists=tuple(lists),
            dense=tuple(dense),
            labels=_numpy(labels, labels.type.to_pandas_dtype()),
        )


# Below this mean run length (rows), gathering row by row is cheaper than
# copying runs slice by slice.
_MIN_MEAN_RUN_ROWS = 32


class BatchAssembler:
    """Collector of rows of row groups that builds one Batch from them.

    Rows are added as (N_i,) arrays of row indices into a
    :class:`RowGroupArrays`. Runs of consecutive indices are copied as
    slices, so rows in file order or in long shuffled blocks cost one copy
    per column and run. Scattered indices are gathered with ``np.take``.

    The KJT is built key-major, as TorchRec lays it out: all rows of the
    first feature, then all rows of the next.
    """

    def __init__(self, schema: FeatureSchema) -> None:
        self.schema = schema
        self.keys = [f.name for f in schema.sparse_features]
        self._num_dense = len(schema.dense_features)
        self._is_list = [
            f.kind is FeatureKind.SPARSE_LIST for f in schema.sparse_features
        ]
        self._parts: list[tuple[RowGroupArrays, _Rows]] = []
        self.num_rows = 0

    def add(self, arrays: RowGroupArrays, rows: np.ndarray) -> None:
        """Append the rows ``rows`` (indices into ``arrays``) to the batch."""
        if len(rows):
            self._parts.append((arrays, _Rows.of(rows)))
            self.num_rows += len(rows)

    def build(self) -> Batch:
        """Build the batch of every row added so far and empty the assembler."""
        parts, num_rows = self._parts, self.num_rows
        self._parts, self.num_rows = [], 0

        values: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        length_per_key: list[int] = []
        # TODO: copy int32 ids (num_embeddings < 2**31) once the model accepts
        # int32 KJT values; this copy is most of the reader's cost over a raw
        # Parquet scan (docs/BENCHMARKS.md).
        if not any(self._is_list):
            values = _take_single(parts) if self.keys else []
            lengths = [np.ones(num_rows * len(self.keys), dtype=np.int32)]
            length_per_key = [num_rows] * len(self.keys)
        else:
            single_index = list_index = 0
            for is_list in self._is_list:
                if is_list:
                    ids, row_lengths = _take_lists(parts, list_index)
                    list_index += 1
                    values.append(ids)
                    lengths.append(row_lengths)
                    length_per_key.append(len(ids))
                else:
                    values.extend(_take_pieces(parts, "single", single_index))
                    single_index += 1
                    length_per_key.append(num_rows)
            ones = np.ones(num_rows, dtype=np.int32)
            lengths = [lengths.pop(0) if is_list else ones for is_list in self._is_list]
        offset_per_key = [0]
        for length in length_per_key:
            offset_per_key.append(offset_per_key[-1] + length)
        sparse = KeyedJaggedTensor(
            keys=self.keys,
            values=torch.from_numpy(
                np.concatenate(values) if values else np.zeros(0, np.int64)
            ),
            lengths=torch.from_numpy(
                np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
            ),
            stride=num_rows,
            length_per_key=length_per_key,
            offset_per_key=offset_per_key,
        )

        num_dense = self._num_dense
        dense = np.empty((num_rows, num_dense), dtype=np.float32)  # (B, num_dense)
        for index in range(num_dense):
            dense[:, index] = _concat(_take_pieces(parts, "dense", index))
        labels = _concat(_take_pieces(parts, "labels", 0)).astype(np.float32)
        teacher_logits = None
        if parts and all(arrays.teacher_logits is not None for arrays, _ in parts):
            teacher_logits = torch.from_numpy(
                np.ascontiguousarray(
                    _concat(_take_pieces(parts, "teacher_logits", 0)), np.float32
                )
            )
        return Batch(
            sparse, torch.from_numpy(dense), torch.from_numpy(labels), teacher_logits
        )


@dataclasses.dataclass(frozen=True)
class _Rows:
    """Row indices, with their (start, stop) runs when runs are long."""

    indices: np.ndarray
    runs: list[tuple[int, int]] | None

    @classmethod
    def of(cls, rows: np.ndarray) -> _Rows:
        first, last = int(rows[0]), int(rows[-1])
        if last - first == len(rows) - 1 and (
            len(rows) < 3 or np.array_equal(rows[1:-1], rows[:-2] + 1)
        ):
            return cls(rows, [(first, last + 1)])  # one run (rows in file order)
        breaks = np.flatnonzero(rows[1:] != rows[:-1] + 1) + 1
        if len(rows) < _MIN_MEAN_RUN_ROWS * (len(breaks) + 1):
            return cls(rows, None)
        starts = rows[np.concatenate([[0], breaks])]
        stops = rows[np.concatenate([breaks, [len(rows)]]) - 1] + 1
        return cls(rows, list(zip(starts.tolist(), stops.tolist())))


def _column(arrays: RowGroupArrays, group: str, index: int) -> np.ndarray:
    if group == "single":
        return arrays.single[index]
    if group == "dense":
        return arrays.dense[index]
    if group == "teacher_logits":
        assert arrays.teacher_logits is not None
        return arrays.teacher_logits
    return arrays.labels


def _take_pieces(
    parts: list[tuple[RowGroupArrays, _Rows]], group: str, index: int
) -> list[np.ndarray]:
    """Take the selected rows of one column, as one piece per run or part."""
    pieces: list[np.ndarray] = []
    for arrays, rows in parts:
        column = _column(arrays, group, index)
        if rows.runs is None:
            pieces.append(np.take(column, rows.indices))
        else:
            pieces.extend([column[start:stop] for start, stop in rows.runs])
    return pieces


def _take_single(parts: list[tuple[RowGroupArrays, _Rows]]) -> list[np.ndarray]:
    """Take the selected rows of every single-id column, key-major, as pieces."""
    runs = parts[0][1].runs
    if len(parts) == 1 and runs is not None:
        arrays = parts[0][0]
        return [column[start:stop] for column in arrays.single for start, stop in runs]
    num_single = len(parts[0][0].single)
    return [
        piece
        for index in range(num_single)
        for piece in _take_pieces(parts, "single", index)
    ]


def _take_lists(
    parts: list[tuple[RowGroupArrays, _Rows]], index: int
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, per-row lengths int32) of the selected rows of one list feature."""
    ids: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    for arrays, rows in parts:
        values, offsets = arrays.lists[index]
        starts, stops = offsets[rows.indices], offsets[rows.indices + 1]
        row_lengths = stops - starts
        # Positions of the selected rows' ids in ``values``, row after row.
        total = int(row_lengths.sum())
        first = np.repeat(starts - np.cumsum(row_lengths) + row_lengths, row_lengths)
        ids.append(values[first + np.arange(total)])
        lengths.append(row_lengths.astype(np.int32))
    return _concat(ids, np.int64), _concat(lengths, np.int32)


def _concat(pieces: list[np.ndarray], dtype: type | None = None) -> np.ndarray:
    if len(pieces) == 1:
        return pieces[0]
    if not pieces:
        return np.zeros(0, dtype=dtype or np.float32)
    return np.concatenate(pieces)


def _one_chunk(column: pa.ChunkedArray) -> pa.Array:
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _numpy(array: pa.Array, dtype: type) -> np.ndarray:
    """``array`` as a NumPy array of ``dtype``; nulls read as 0."""
    if array.null_count:
        array = array.fill_null(0)
    return np.asarray(array.to_numpy(zero_copy_only=False), dtype=dtype)


def _list_values_offsets(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values as int64, offsets (N + 1,) as int64) of a list column; a null
    list is empty and null ids read as 0."""
    if isinstance(column, pa.ChunkedArray):
        column = _one_chunk(column)
    offsets = np.asarray(column.offsets.to_numpy(), dtype=np.int64)
    values = _numpy(column.values, np.int64)
    return values, offsets
