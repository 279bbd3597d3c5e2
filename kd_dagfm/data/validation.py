"""Checks of shard schemas and row values against the feature schema."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kd_dagfm.errors import DataError
from kd_dagfm.schema import FeatureKind, FeatureSchema


def check_shard_schema(arrow: pa.Schema, schema: FeatureSchema, source: str) -> None:
    """Raise DataError when a shard lacks a column or stores it with the wrong type."""
    if schema.label not in arrow.names:
        raise DataError(
            f"{source}: label column {schema.label!r} is missing (columns: {arrow.names}); "
            "the shard does not belong to this dataset or the label has another name"
        )
    label_type = arrow.field(schema.label).type
    if not (pa.types.is_integer(label_type) or pa.types.is_floating(label_type)):
        raise DataError(
            f"{source}: label column {schema.label!r} has type {label_type}, expected "
            "an integer or float column of 0/1 values"
        )
    for feature in schema.features:
        if feature.name not in arrow.names:
            raise DataError(
                f"{source}: feature column {feature.name!r} declared in schema.json is "
                f"missing (columns: {arrow.names}); the shard does not match the schema"
            )
        column_type = arrow.field(feature.name).type
        if feature.kind is FeatureKind.SPARSE:
            ok = pa.types.is_integer(column_type)
            expected = "an integer column"
        elif feature.kind is FeatureKind.SPARSE_LIST:
            ok = (
                pa.types.is_list(column_type) or pa.types.is_large_list(column_type)
            ) and pa.types.is_integer(column_type.value_type)
            expected = "a list<integer> column"
        else:
            ok = pa.types.is_integer(column_type) or pa.types.is_floating(column_type)
            expected = "a numeric column"
        if not ok:
            raise DataError(
                f"{source}: feature {feature.name!r} is {feature.kind.value} in schema.json "
                f"and needs {expected}, but the shard stores {column_type}"
            )


def validate_table(
    table: pa.Table, schema: FeatureSchema, source: str, bad_rows: str
) -> tuple[pa.Table, int]:
    """Find rows with invalid labels, ids or dense values.

    Invalid: a label that is null, NaN or not 0/1; an id that is null,
    negative or >= num_embeddings; a dense value that is null or not finite.
    With ``bad_rows="error"`` the first problem raises DataError naming the
    column, the value and its row; with ``"skip"`` those rows are dropped and
    counted.

    Returns:
        (the valid rows, number of rows dropped).
    """
    num_rows = table.num_rows
    bad = np.zeros(num_rows, dtype=bool)
    problems: list[str] = []

    def flag(mask: np.ndarray, column: str, values: np.ndarray, expected: str) -> None:
        if mask.any():
            first = int(np.flatnonzero(mask)[0])
            problems.append(
                f"column {column!r} has {int(mask.sum())} invalid row(s), first at row "
                f"{first} with value {values[first]!r}; expected {expected}"
            )
            bad[:] |= mask

    label = table.column(schema.label).combine_chunks()
    label_values = label.to_numpy(zero_copy_only=False).astype(np.float64)
    label_null = np.asarray(label.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    label_values = np.where(label_null, np.nan, label_values)
    flag(
        label_null | ~np.isin(label_values, (0.0, 1.0)),
        schema.label,
        label_values,
        "a label of 0 or 1",
    )

    for feature in schema.features:
        column = table.column(feature.name).combine_chunks()
        if feature.kind is FeatureKind.SPARSE:
            null = np.asarray(
                column.is_null().to_numpy(zero_copy_only=False), dtype=bool
            )
            ids = np.asarray(
                column.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64
            )
            mask = null | (ids < 0) | (ids >= feature.num_embeddings)
            flag(
                mask,
                feature.name,
                np.where(null, -1, ids),
                _id_range(feature.num_embeddings),
            )
        elif feature.kind is FeatureKind.SPARSE_LIST:
            values = column.flatten()
            parents = np.asarray(pc.list_parent_indices(column), dtype=np.int64)
            ids = np.asarray(
                values.fill_null(-1).to_numpy(zero_copy_only=False), np.int64
            )
            bad_value = (ids < 0) | (ids >= feature.num_embeddings)
            mask = np.zeros(num_rows, dtype=bool)
            mask[parents[bad_value]] = True
            row_first_id = np.full(num_rows, -1, dtype=np.int64)
            row_first_id[parents[bad_value][::-1]] = ids[bad_value][::-1]
            flag(mask, feature.name, row_first_id, _id_range(feature.num_embeddings))
        else:
            null = np.asarray(
                column.is_null().to_numpy(zero_copy_only=False), dtype=bool
            )
            dense = np.asarray(
                column.fill_null(0).to_numpy(zero_copy_only=False), np.float64
            )
            flag(
                null | ~np.isfinite(dense),
                feature.name,
                np.where(null, np.nan, dense),
                "a finite number",
            )

    if not bad.any():
        return table, 0
    if bad_rows == "error":
        raise DataError(
            f"{source}: "
            + "; ".join(problems)
            + ". Fix the data, or set bad_rows=skip "
            "to drop and count such rows"
        )
    return table.filter(pa.array(~bad)), int(bad.sum())


def _id_range(num_embeddings: int) -> str:
    return f"an id in [0, {num_embeddings - 1}] (num_embeddings={num_embeddings})"
