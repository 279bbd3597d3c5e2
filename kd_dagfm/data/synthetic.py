"""Synthetic Criteo-like data whose labels depend on crosses of three fields.

Each field has ``vocab_size`` ids. The click logit is a bias, a small
first-order effect per (field, id), and a few planted third-order crosses
``T(a, b, c) = sum_r u_r[a] v_r[b] w_r[c]`` (rank 4) over fields chosen at
random. No sum of pairwise terms reproduces a random rank-4 three-way
tensor, so a model of order >= 3 (CrossNet, CIN, DAGFM with depth >= 2) can
beat a second-order one on it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from kd_dagfm.schema import FeatureSchema, make_schema

LABEL = "label"
CROSS_RANK = 4
NUM_CROSSES = 3


def synthetic_schema(num_fields: int, vocab_size: int) -> FeatureSchema:
    return make_schema(LABEL, {f"C{i + 1}": vocab_size for i in range(num_fields)})


def generate_synthetic(
    rows: int, num_fields: int, vocab_size: int, seed: int
) -> tuple[FeatureSchema, dict[str, pa.Table]]:
    """Draw ``rows`` examples and split them 80/10/10 into train/valid/test."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(rows, num_fields), dtype=np.int64)  # (B, F)

    logits = np.full(rows, -0.5)
    first_order = rng.normal(0.0, 0.3, size=(num_fields, vocab_size))
    logits += first_order[np.arange(num_fields), ids].sum(axis=1)
    for _ in range(NUM_CROSSES):
        a, b, c = rng.choice(num_fields, size=3, replace=False)
        factors = rng.normal(0.0, 1.0, size=(3, vocab_size, CROSS_RANK))
        cross = (
            factors[0][ids[:, a]] * factors[1][ids[:, b]] * factors[2][ids[:, c]]
        ).sum(1)
        logits += 0.8 * cross
    labels = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logits))).astype(np.int8)

    schema = synthetic_schema(num_fields, vocab_size)
    columns = {LABEL: pa.array(labels)}
    columns.update({f"C{i + 1}": pa.array(ids[:, i]) for i in range(num_fields)})
    table = pa.table(columns)
    train_end, valid_end = int(rows * 0.8), int(rows * 0.9)
    splits = {
        "train": table.slice(0, train_end),
        "valid": table.slice(train_end, valid_end - train_end),
        "test": table.slice(valid_end),
    }
    return schema, splits
