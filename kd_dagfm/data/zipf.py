"""A synthetic click log with one huge, Zipf-distributed id field, written in chunks.

Real id features (users, items, ads) are heavy-tailed: a few ids take most of
the traffic and most ids are seen rarely. Each example here has

- ``item_id``: a raw id of popularity rank ``k`` with probability
  proportional to ``k ** -exponent`` over ``num_raw_ids`` ranks (a bounded
  Zipf law), hashed to one of ``item_rows`` rows with
  :func:`kd_dagfm.hashing.hash_to_rows`, so hot ids land anywhere in the
  table, as after a real converter;
- ``context_1 .. context_F``: uniform ids of small fields.

The click logit is a bias, an effect per raw item id (drawn from the id's
hash, so no per-id table is held in memory), first-order effects of the
context fields and one planted three-way cross of context fields. A model
learns the item effect only for ids it has seen often, as on real data.

Rows are generated and written ``chunk_rows`` at a time, so memory stays
bounded whatever ``rows`` and ``item_rows`` are.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pyarrow as pa

from kd_dagfm.data.writer import DatasetWriter
from kd_dagfm.errors import ConfigError
from kd_dagfm.hashing import hash_to_rows, xxh64
from kd_dagfm.schema import FeatureSchema, make_schema

logger = logging.getLogger(__name__)

LABEL = "label"
ITEM = "item_id"


@dataclasses.dataclass(frozen=True)
class ZipfDatasetSpec:
    """Sizes and distribution of the synthetic log.

    Attributes:
        rows: examples in all splits together (split 80/10/10).
        item_rows: rows of the item table (the hash size).
        num_raw_ids: distinct raw item ids the Zipf law draws from.
        exponent: Zipf exponent s (popularity of rank k ~ k ** -s); 1.05 is
            typical of item and ad ids.
        context_fields: number of small fields.
        context_vocab_size: ids per small field.
        seed: seed of the draws and of the id hash.
    """

    rows: int
    item_rows: int
    num_raw_ids: int
    exponent: float = 1.05
    context_fields: int = 7
    context_vocab_size: int = 1000
    seed: int = 2022

    def __post_init__(self) -> None:
        for name in ("rows", "item_rows", "num_raw_ids", "context_vocab_size"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"invalid {name} {getattr(self, name)}: expected >= 1"
                )
        if self.context_fields < 3:
            raise ConfigError(
                f"invalid context_fields {self.context_fields}: the planted cross "
                "needs at least 3"
            )
        if not self.exponent > 0:
            raise ConfigError(f"invalid exponent {self.exponent}: expected > 0")


def zipf_schema(spec: ZipfDatasetSpec) -> FeatureSchema:
    sparse = {ITEM: spec.item_rows}
    sparse.update(
        {
            f"context_{i}": spec.context_vocab_size
            for i in range(1, spec.context_fields + 1)
        }
    )
    return make_schema(LABEL, sparse)


def sample_zipf_ranks(
    rng: np.random.Generator, size: int, num_ranks: int, exponent: float
) -> np.ndarray:
    """(size,) int64 ranks in [1, num_ranks] with P(k) roughly ~ k ** -exponent.

    Inverse-CDF of the continuous power law on [1, num_ranks + 1), floored;
    no table of num_ranks probabilities is built.
    """
    u = rng.random(size)
    top = float(num_ranks + 1)
    if abs(exponent - 1.0) < 1e-9:
        ranks = np.exp(u * np.log(top))
    else:
        power = 1.0 - exponent
        ranks = (1.0 + u * (top**power - 1.0)) ** (1.0 / power)
    return np.clip(np.floor(ranks), 1, num_ranks).astype(np.int64)


def _unit_from_hash(ids: np.ndarray, seed: int) -> np.ndarray:
    """(N,) floats in [-1, 1), a fixed pseudo-random value per id."""
    return (xxh64(ids, seed) >> np.uint64(11)).astype(np.float64) / 2.0**52 - 1.0


def generate_chunk(
    spec: ZipfDatasetSpec, rng: np.random.Generator, rows: int
) -> pa.Table:
    """``rows`` examples with the columns of :func:`zipf_schema`."""
    raw = sample_zipf_ranks(rng, rows, spec.num_raw_ids, spec.exponent)
    items = hash_to_rows(raw, spec.item_rows, seed=spec.seed)
    context = rng.integers(
        0, spec.context_vocab_size, size=(rows, spec.context_fields), dtype=np.int64
    )  # (B, F_context)

    logits = -1.0 + 1.2 * _unit_from_hash(raw, spec.seed + 1)
    for field in range(spec.context_fields):
        logits += 0.3 * _unit_from_hash(
            context[:, field] + (field << 32), spec.seed + 2
        )
    cross = context[:, 0] * spec.context_vocab_size**2
    cross = cross + context[:, 1] * spec.context_vocab_size + context[:, 2]
    logits += 0.8 * _unit_from_hash(cross, spec.seed + 3)
    labels = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logits))).astype(np.int8)

    columns: dict[str, pa.Array] = {LABEL: pa.array(labels), ITEM: pa.array(items)}
    for field in range(spec.context_fields):
        columns[f"context_{field + 1}"] = pa.array(context[:, field])
    return pa.table(columns)


def write_zipf_dataset(
    root: str,
    spec: ZipfDatasetSpec,
    chunk_rows: int = 1 << 18,
    row_group_rows: int = 1 << 16,
    overwrite: bool = False,
) -> FeatureSchema:
    """Generate and write the dataset to ``root``; return its schema."""
    schema = zipf_schema(spec)
    rng = np.random.default_rng(spec.seed)
    train_end, valid_end = int(spec.rows * 0.8), int(spec.rows * 0.9)
    with DatasetWriter(
        root,
        schema,
        rows_per_shard=max(row_group_rows, 1 << 21),
        row_group_rows=row_group_rows,
        overwrite=overwrite,
    ) as writer:
        start = 0
        while start < spec.rows:
            count = min(chunk_rows, spec.rows - start)
            table = generate_chunk(spec, rng, count)
            # Cut the chunk at the split boundaries it crosses.
            for split, begin, end in (
                ("train", 0, train_end),
                ("valid", train_end, valid_end),
                ("test", valid_end, spec.rows),
            ):
                low, high = max(begin, start), min(end, start + count)
                if low < high:
                    writer.write(split, table.slice(low - start, high - low))
            start += count
    logger.info(
        "wrote %d Zipf examples (%d item rows) to %s", spec.rows, spec.item_rows, root
    )
    return schema
