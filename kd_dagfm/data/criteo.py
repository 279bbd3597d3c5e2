"""Convert Criteo display-advertising logs to a dataset.

Input: the raw Kaggle/Terabyte files (tab-separated, no header: label,
I1-I13, C1-C26) or the comma-separated variant with a header line, as in
DeepCTR's ``criteo_sample.txt``. The first line tells which. Files may be
plain or compressed (``.gz``, ``.zst``, ...), local or any fsspec URL.

Output features, all sparse (39 fields, I1-I13 then C1-C26):

- I1-I13 are counts, bucketised (:data:`INTEGER_BUCKETINGS`).
  ``log2``: id 0 missing, 1 for a negative value, 2 for 0, and
  ``3 + floor(log2(v))`` for v >= 1 (66 ids).
  ``log_squared``: the transform of the Kaggle competition's winners, which
  FuxiCTR's Criteo_x4 uses: v itself for v <= 2 and ``floor(ln(v) ** 2)``
  above, shifted so that id 0 stays the missing value.
  Fractional values are floored first.
- C1-C26 are hashed or mapped to a vocabulary (see
  :mod:`kd_dagfm.data.convert`); id 0 is a missing value.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from kd_dagfm.data.convert import (
    CategoricalEncoder,
    ConversionSummary,
    ConvertOptions,
    CsvLayout,
    convert_delimited,
    detect_format,
)
from kd_dagfm.errors import ConfigError
from kd_dagfm.schema import Feature, FeatureKind

LABEL = "label"
INTEGER_COLUMNS = tuple(f"I{i}" for i in range(1, 14))
CATEGORICAL_COLUMNS = tuple(f"C{i}" for i in range(1, 27))
COLUMNS = (LABEL, *INTEGER_COLUMNS, *CATEGORICAL_COLUMNS)
INTEGER_BUCKETINGS = ("log2", "log_squared")
# Counts are capped here, so floor(log2) <= 62 and floor(ln ** 2) <= 1,847.
_MAX_COUNT = float(2**62)
# log2: missing, negative, zero, then floor(log2(v)) = 0 .. 62.
LOG2_NUM_EMBEDDINGS = 3 + 63
# log_squared: missing, v in -3 .. 2 (lower values join -3), then
# floor(ln(v) ** 2) = 1 .. 1,847 for 3 <= v <= 2 ** 62.
_LOG_SQUARED_SMALL = 6
LOG_SQUARED_NUM_EMBEDDINGS = 1 + _LOG_SQUARED_SMALL + int(np.log(_MAX_COUNT) ** 2)


def bucketize_log2(values: np.ndarray) -> np.ndarray:
    """(N,) float counts (NaN: missing) to int64 ids in [0, 66)."""
    ids = np.zeros(len(values), dtype=np.int64)
    present = ~np.isnan(values)
    counts = np.floor(np.minimum(values, _MAX_COUNT))
    ids[present & (counts < 0)] = 1
    ids[present & (counts == 0)] = 2
    positive = present & (counts >= 1)
    # frexp(v) = (m, e) with v = m * 2**e and 0.5 <= m < 1, so floor(log2(v))
    # is e - 1 exactly, with no rounding of a float logarithm.
    _, exponent = np.frexp(counts[positive])
    ids[positive] = 3 + exponent.astype(np.int64) - 1
    return ids


def bucketize_log_squared(values: np.ndarray) -> np.ndarray:
    """(N,) float counts (NaN: missing) to int64 ids in [0, 1,854)."""
    ids = np.zeros(len(values), dtype=np.int64)
    present = ~np.isnan(values)
    counts = np.floor(np.minimum(values, _MAX_COUNT))
    small = present & (counts <= 2)
    ids[small] = 1 + (np.maximum(counts[small], -3) + 3).astype(np.int64)
    large = present & (counts > 2)
    # ln(3) ** 2 = 1.2, so large counts start at id 7, after the small ones.
    ids[large] = _LOG_SQUARED_SMALL + np.floor(np.log(counts[large]) ** 2).astype(
        np.int64
    )
    return ids


_NAN = pa.scalar(float("nan"), pa.float64())
_BUCKETINGS = {
    "log2": (bucketize_log2, LOG2_NUM_EMBEDDINGS),
    "log_squared": (bucketize_log_squared, LOG_SQUARED_NUM_EMBEDDINGS),
}


def convert_criteo(
    input_path: str,
    output: str,
    options: ConvertOptions | None = None,
    integer_bucketing: str = "log2",
) -> ConversionSummary:
    """Stream a Criteo file (TSV without header or CSV with header) into a dataset.

    Args:
        input_path: the input file, local or an fsspec URL.
        output: dataset directory or URL.
        options: encoding, split, shard layout and bad-line policy.
        integer_bucketing: ``log2`` or ``log_squared``.
    """
    if integer_bucketing not in _BUCKETINGS:
        raise ConfigError(
            f"invalid integer_bucketing {integer_bucketing!r}: expected one of "
            f"{', '.join(INTEGER_BUCKETINGS)}"
        )
    bucketize, num_integer_ids = _BUCKETINGS[integer_bucketing]
    delimiter, header = detect_format(input_path, LABEL)
    types: dict[str, pa.DataType] = {LABEL: pa.float64()}
    types.update({c: pa.float64() for c in INTEGER_COLUMNS})
    types.update({c: pa.string() for c in CATEGORICAL_COLUMNS})

    def transform(
        batch: pa.RecordBatch, encoder: CategoricalEncoder
    ) -> dict[str, pa.Array]:
        columns: dict[str, pa.Array] = {}
        for name in INTEGER_COLUMNS:
            values = batch.column(name).fill_null(_NAN)
            columns[name] = pa.array(bucketize(values.to_numpy(zero_copy_only=False)))
        for name in CATEGORICAL_COLUMNS:
            columns[name] = pa.array(encoder.encode(name, batch.column(name)))
        return columns

    return convert_delimited(
        "criteo",
        input_path,
        output,
        CsvLayout(COLUMNS, types, delimiter, header),
        LABEL,
        CATEGORICAL_COLUMNS,
        [Feature(c, FeatureKind.SPARSE, num_integer_ids) for c in INTEGER_COLUMNS],
        transform,
        options or ConvertOptions(),
    )
