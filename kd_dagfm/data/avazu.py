"""Convert the Avazu click-through logs to a dataset.

Input: Avazu's ``train`` CSV with its header line (``id, click, hour, C1,
banner_pos, site_id, site_domain, site_category, app_id, app_domain,
app_category, device_id, device_ip, device_model, device_type,
device_conn_type, C14 .. C21``), plain or compressed, local or an fsspec URL.

Output features, all sparse (23 fields): ``weekday`` and ``hour_of_day``
from ``hour`` (YYMMDDHH), then the 21 categorical columns from C1 to C21,
hashed or mapped to a vocabulary (see :mod:`kd_dagfm.data.convert`). The
label is ``click``; ``id`` identifies an impression and is dropped.
``weekday`` ids are 1 (Monday) to 7 (Sunday), ``hour_of_day`` ids are 1
(00:00) to 24 (23:00); id 0 is a missing or unparseable ``hour``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kd_dagfm.data.convert import (
    MISSING_ID,
    CategoricalEncoder,
    ConversionSummary,
    ConvertOptions,
    CsvLayout,
    convert_delimited,
)
from kd_dagfm.schema import Feature, FeatureKind

LABEL = "click"
CATEGORICAL_COLUMNS = (
    "C1",
    "banner_pos",
    "site_id",
    "site_domain",
    "site_category",
    "app_id",
    "app_domain",
    "app_category",
    "device_id",
    "device_ip",
    "device_model",
    "device_type",
    "device_conn_type",
    "C14",
    "C15",
    "C16",
    "C17",
    "C18",
    "C19",
    "C20",
    "C21",
)
COLUMNS = ("id", LABEL, "hour", *CATEGORICAL_COLUMNS)
WEEKDAY = "weekday"
HOUR_OF_DAY = "hour_of_day"
TIME_FEATURES = (
    Feature(WEEKDAY, FeatureKind.SPARSE, 1 + 7),
    Feature(HOUR_OF_DAY, FeatureKind.SPARSE, 1 + 24),
)


def split_hour(hour: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(weekday ids, hour-of-day ids) of ``YYMMDDHH`` strings; 0 when unparseable."""
    stamps = pc.strptime(hour, format="%y%m%d%H", unit="s", error_is_null=True)
    weekday = pc.add(pc.day_of_week(stamps), 1)  # Monday = 0 in Arrow
    hour_of_day = pc.add(pc.hour(stamps), 1)
    return (
        np.asarray(
            weekday.fill_null(MISSING_ID).to_numpy(zero_copy_only=False), np.int64
        ),
        np.asarray(
            hour_of_day.fill_null(MISSING_ID).to_numpy(zero_copy_only=False), np.int64
        ),
    )


def convert_avazu(
    input_path: str, output: str, options: ConvertOptions | None = None
) -> ConversionSummary:
    """Stream an Avazu CSV (with its header line) into a dataset.

    Args:
        input_path: the input file, local or an fsspec URL.
        output: dataset directory or URL.
        options: encoding, split, shard layout and bad-line policy.
    """
    types: dict[str, pa.DataType] = {LABEL: pa.float64(), "hour": pa.string()}
    types.update({c: pa.string() for c in CATEGORICAL_COLUMNS})

    def transform(
        batch: pa.RecordBatch, encoder: CategoricalEncoder
    ) -> dict[str, pa.Array]:
        weekday, hour_of_day = split_hour(batch.column("hour"))
        columns: dict[str, pa.Array] = {
            WEEKDAY: pa.array(weekday),
            HOUR_OF_DAY: pa.array(hour_of_day),
        }
        for name in CATEGORICAL_COLUMNS:
            columns[name] = pa.array(encoder.encode(name, batch.column(name)))
        return columns

    return convert_delimited(
        "avazu",
        input_path,
        output,
        CsvLayout(COLUMNS, types, ",", header=True),
        LABEL,
        CATEGORICAL_COLUMNS,
        TIME_FEATURES,
        transform,
        options or ConvertOptions(),
    )
