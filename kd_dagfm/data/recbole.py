"""Convert RecBole atomic files (``.inter``, ``.user``, ``.item``) to a dataset.

Follows RecBole 1.2.1's protocol for context-aware models on MovieLens-100K:
label 1 when ``rating >= 4``; a random 80/10/10 split with a fixed seed;
token fields remapped to ids ``1 .. n`` in order of first appearance, with
0 for padding and for users or items missing from the side files; a
``token_seq`` field (``class``, the genres) becomes a list of ids.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from kd_dagfm.data.writer import write_dataset
from kd_dagfm.errors import DataError
from kd_dagfm.schema import Feature, FeatureKind, FeatureSchema

logger = logging.getLogger(__name__)

ML100K_FIELDS = (
    "user_id",
    "item_id",
    "age",
    "gender",
    "occupation",
    "release_year",
    "class",
)
PADDING_ID = 0


def read_atomic(path: str) -> tuple[pa.Table, dict[str, str]]:
    """Read an atomic file as strings; returns (table, {column: RecBole type})."""
    if not os.path.exists(path):
        raise DataError(f"atomic file {path!r} not found")
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
    types: dict[str, str] = {}
    names = []
    for item in header:
        if ":" not in item:
            raise DataError(
                f"{path}: header column {item!r} lacks a type; RecBole atomic files "
                "name columns as name:type (token, token_seq, float, float_seq)"
            )
        name, kind = item.split(":", 1)
        names.append(name)
        types[name] = kind
    table = pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=names, skip_rows=1),
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pacsv.ConvertOptions(
            column_types={n: pa.string() for n in names}, strings_can_be_null=False
        ),
    )
    return table, types


class Vocabulary:
    """Token -> id, ids from 1 in order of first appearance; 0 is padding."""

    def __init__(self, tokens: pa.Array) -> None:
        unique = pc.unique(tokens.filter(pc.not_equal(tokens, "")))
        self.tokens = unique

    def __len__(self) -> int:
        return len(self.tokens) + 1

    def lookup(self, tokens: pa.Array) -> np.ndarray:
        index = pc.index_in(tokens, value_set=self.tokens)
        return (
            np.asarray(index.fill_null(-1).to_numpy(zero_copy_only=False), np.int64) + 1
        )


def convert_recbole(
    data_dir: str,
    output: str,
    dataset_name: str | None = None,
    fields: Sequence[str] = ML100K_FIELDS,
    label_field: str = "rating",
    label_threshold: float = 4.0,
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 2020,
    rows_per_shard: int = 50_000,
    row_group_rows: int = 8_192,
    overwrite: bool = False,
) -> tuple[FeatureSchema, dict[str, int]]:
    """Convert ``<data_dir>/<name>.inter`` (+ ``.user``, ``.item``) to Parquet.

    Returns:
        (schema, rows per split).
    """
    name = dataset_name or os.path.basename(os.path.normpath(data_dir))
    inter, inter_types = read_atomic(os.path.join(data_dir, f"{name}.inter"))
    if label_field not in inter_types:
        raise DataError(
            f"{name}.inter has no column {label_field!r} to derive the label from "
            f"(columns: {list(inter_types)})"
        )
    sides: list[tuple[str, pa.Table, dict[str, str]]] = []
    for suffix, key in (("user", "user_id"), ("item", "item_id")):
        path = os.path.join(data_dir, f"{name}.{suffix}")
        if os.path.exists(path):
            table, types = read_atomic(path)
            sides.append((key, table, types))

    known = dict(inter_types)
    for _, _, types in sides:
        known.update(types)
    unknown = [f for f in fields if f not in known]
    if unknown:
        raise DataError(
            f"fields {unknown} are in none of {name}.inter/.user/.item "
            f"(available: {sorted(known)})"
        )

    ratings = np.asarray(
        pc.cast(inter.column(label_field), pa.float64()).to_numpy(), np.float64
    )
    columns: dict[str, pa.Array] = {
        "label": pa.array((ratings >= label_threshold).astype(np.int8))
    }
    features: list[Feature] = []
    for field in fields:
        kind = known[field]
        if field in inter_types:
            values = inter.column(field).combine_chunks()
        else:
            key, side, _ = next(s for s in sides if field in s[2])
            side_keys = side.column(key).combine_chunks()
            position = pc.index_in(
                inter.column(key).combine_chunks(), value_set=side_keys
            )
            values = side.column(field).combine_chunks().take(position)
            values = values.fill_null("")
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        if kind == "token":
            vocabulary = Vocabulary(values)
            columns[field] = pa.array(vocabulary.lookup(values))
            features.append(Feature(field, FeatureKind.SPARSE, len(vocabulary)))
        elif kind == "token_seq":
            tokens = pc.split_pattern(values, " ")
            flat = pc.list_flatten(tokens)
            vocabulary = Vocabulary(flat)
            ids = vocabulary.lookup(flat)
            offsets = np.asarray(tokens.offsets.to_numpy(), dtype=np.int32)
            keep = ids != PADDING_ID
            # Drop empty tokens (missing values) from each row's list.
            kept_before = np.concatenate([[0], np.cumsum(keep)])
            columns[field] = pa.ListArray.from_arrays(
                pa.array(kept_before[offsets - offsets[0]].astype(np.int32)),
                pa.array(ids[keep]),
            )
            features.append(Feature(field, FeatureKind.SPARSE_LIST, len(vocabulary)))
        else:
            raise DataError(
                f"field {field!r} has RecBole type {kind!r}; only token and token_seq "
                "fields are converted (declare float fields as dense features instead)"
            )
    schema = FeatureSchema(label="label", features=tuple(features))
    table = pa.table(columns)

    permutation = np.random.default_rng(seed).permutation(table.num_rows)
    table = table.take(permutation)
    if not np.isclose(sum(split_ratios), 1.0):
        raise DataError(f"split ratios {split_ratios} must sum to 1")
    train_end = int(round(table.num_rows * split_ratios[0]))
    valid_end = train_end + int(round(table.num_rows * split_ratios[1]))
    splits = {
        "train": table.slice(0, train_end),
        "valid": table.slice(train_end, valid_end - train_end),
        "test": table.slice(valid_end),
    }
    rows = write_dataset(
        output, schema, splits, rows_per_shard, row_group_rows, overwrite
    )
    logger.info("converted %s to %s: %s", data_dir, output, rows)
    return schema, rows
