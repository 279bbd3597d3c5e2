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


SKIP_HINT = "Fix the data, or set bad_rows=skip to drop and count such rows"


def find_invalid_rows(
    table: pa.Table,
    schema: FeatureSchema,
    source: str,
    bad_rows: str,
    hint: str = SKIP_HINT,
) -> np.ndarray | None:
    """Find rows with invalid labels, ids or dense values.

    Invalid: a label that is null, NaN or not 0/1; an id that is null,
    negative or >= num_embeddings; a dense value that is null or not finite.
    A null list in a ``sparse_list`` column counts as an empty list.

    One vectorised pass per column (null counts and min/max) clears a valid
    table; only a table that fails it is checked row by row.

    Returns:
        None when every row is valid, else a (N,) bool mask of invalid rows
        (with ``bad_rows="skip"``).

    Raises:
        DataError: with ``bad_rows="error"``, naming each bad column, the
            count, the first bad row and its value.
    """
    if _all_valid(table, schema):
        return None
    bad, problems = _invalid_rows(table, schema)
    if not bad.any():
        return None
    if bad_rows == "error":
        raise DataError(f"{source}: {'; '.join(problems)}. {hint}")
    return bad


def validate_table(
    table: pa.Table, schema: FeatureSchema, source: str, bad_rows: str
) -> tuple[pa.Table, int]:
    """Check every row (see :func:`find_invalid_rows`).

    Returns:
        (the valid rows, number of rows dropped).
    """
    bad = find_invalid_rows(table, schema, source, bad_rows)
    if bad is None:
        return table, 0
    return table.filter(pa.array(~bad)), int(bad.sum())


def _all_valid(table: pa.Table, schema: FeatureSchema) -> bool:
    label = table.column(schema.label)
    if label.null_count:
        return False
    if pa.types.is_integer(label.type):
        if not _below(label, 2):
            return False
    elif not pc.all(pc.is_in(label, pa.array([0.0, 1.0], label.type))).as_py():
        return False

    for feature in schema.features:
        column = table.column(feature.name)
        if feature.kind is FeatureKind.SPARSE:
            if not _below(column, feature.num_embeddings):
                return False
        elif feature.kind is FeatureKind.SPARSE_LIST:
            if not _below(pc.list_flatten(column), feature.num_embeddings):
                return False
        elif column.null_count or not pc.all(pc.is_finite(column)).as_py():
            return False
    return True


def _below(values: pa.Array | pa.ChunkedArray, limit: int) -> bool:
    """True when ``values`` (integers) has no null and every value is in [0, limit).

    Viewing signed integers as unsigned maps negative values above every
    valid id, so one max reduction checks both bounds.
    """
    if values.null_count:
        return False
    chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        array = np.asarray(chunk.to_numpy(zero_copy_only=False))
        if array.dtype.kind == "i":
            array = array.view(f"u{array.dtype.itemsize}")
        if int(array.max()) >= limit:
            return False
    return True


def _invalid_rows(
    table: pa.Table, schema: FeatureSchema
) -> tuple[np.ndarray, list[str]]:
    """(N,) mask of invalid rows and one message per column with invalid rows."""
    num_rows = table.num_rows
    bad = np.zeros(num_rows, dtype=bool)
    problems: list[str] = []

    def flag(
        mask: np.ndarray,
        column: str,
        values: np.ndarray,
        expected: str,
        null: np.ndarray | None = None,
    ) -> None:
        if mask.any():
            first = int(np.flatnonzero(mask)[0])
            shown = (
                "null"
                if null is not None and null[first]
                else repr(values[first].item())
            )
            problems.append(
                f"column {column!r} has {int(mask.sum())} invalid row(s), first at row "
                f"{first} with value {shown}; expected {expected}"
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
        label_null,
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
            flag(mask, feature.name, ids, _id_range(feature.num_embeddings), null)
        elif feature.kind is FeatureKind.SPARSE_LIST:
            values = column.flatten()
            parents = np.asarray(pc.list_parent_indices(column), dtype=np.int64)
            ids = np.asarray(
                values.fill_null(-1).to_numpy(zero_copy_only=False), np.int64
            )
            bad_value = (ids < 0) | (ids >= feature.num_embeddings)
            mask = np.zeros(num_rows, dtype=bool)
            mask[parents[bad_value]] = True
            # The first invalid id of each row, shown in the message; a null
            # id inside a list is shown as -1.
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
                null | ~np.isfinite(dense), feature.name, dense, "a finite number", null
            )

    return bad, problems


def _id_range(num_embeddings: int) -> str:
    return f"an id in [0, {num_embeddings - 1}] (num_embeddings={num_embeddings})"
