"""Criteo and Avazu converters on real files: values, formats, streaming, progress."""

from __future__ import annotations

import collections
import csv
import datetime
import gzip
import json
import logging
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kd_dagfm.cli import main
from kd_dagfm.data.avazu import CATEGORICAL_COLUMNS as AVAZU_CATEGORICAL
from kd_dagfm.data.avazu import COLUMNS as AVAZU_COLUMNS
from kd_dagfm.data.avazu import convert_avazu
from kd_dagfm.data.convert import (
    CategoricalEncoding,
    ConvertOptions,
    Progress,
    split_of_rows,
)
from kd_dagfm.data.criteo import (
    CATEGORICAL_COLUMNS,
    INTEGER_COLUMNS,
    LOG2_NUM_EMBEDDINGS,
    LOG_SQUARED_NUM_EMBEDDINGS,
    bucketize_log2,
    bucketize_log_squared,
    convert_criteo,
)
from kd_dagfm.data.reader import ParquetSplit, SplitReader, load_schema
from kd_dagfm.hashing import hash_to_rows
from tests.conftest import shared_path

HASH_ROWS = 1000


def criteo_rows() -> list[dict[str, str]]:
    with shared_path("criteo_sample.csv").open() as f:
        return list(csv.DictReader(f))


def read_split(root: str, split: str) -> pa.Table:
    files = sorted((Path(root) / split).glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def sorted_rows(table: pa.Table) -> list[tuple[int, ...]]:
    return sorted(zip(*(table.column(c).to_pylist() for c in table.column_names)))


def hash_options(**overrides: object) -> ConvertOptions:
    values: dict[str, object] = {
        "encoding": CategoricalEncoding("hash", hash_num_embeddings=HASH_ROWS),
        "rows_per_shard": 64,
        "row_group_rows": 16,
        "shuffle_buffer_rows": 50,
        "block_size_bytes": 8192,
    }
    values.update(overrides)
    return ConvertOptions(**values)  # type: ignore[arg-type]


def test_log2_buckets_golden() -> None:
    values = np.array(
        [np.nan, -3, -1, 0, 0.5, 1, 2, 3, 4, 7, 8, 260, 17668, 2**40, 1e300]
    )
    np.testing.assert_array_equal(
        bucketize_log2(values), [0, 1, 1, 2, 2, 3, 4, 4, 5, 5, 6, 11, 17, 43, 65]
    )
    assert LOG2_NUM_EMBEDDINGS == 66


def test_log_squared_buckets_golden() -> None:
    values = np.array([np.nan, -5, -3, -1, 0, 1, 2, 3, 260, 1e300])
    # v <= 2: 1 + (v + 3) with v >= -3; v > 2: 6 + floor(ln(v) ** 2).
    ln_max = math.floor(math.log(2.0**62) ** 2)
    expected = [0, 1, 1, 3, 4, 5, 6, 7, 6 + math.floor(math.log(260) ** 2), 6 + ln_max]
    np.testing.assert_array_equal(bucketize_log_squared(values), expected)
    assert 7 + ln_max == LOG_SQUARED_NUM_EMBEDDINGS


def hashed_ids(rows: list[dict[str, str]], columns: tuple[str, ...]) -> dict[str, int]:
    """Token -> hashed id (1 + XXH64 mod (HASH_ROWS - 1)) of every token in ``columns``."""
    tokens = sorted({r[c] for r in rows for c in columns if r[c] != ""})
    return dict(zip(tokens, (1 + hash_to_rows(tokens, HASH_ROWS - 1)).tolist()))


def expected_criteo_rows(rows: list[dict[str, str]]) -> list[tuple[int, ...]]:
    """The converter's output rows, computed one value at a time in Python."""
    ids = hashed_ids(rows, CATEGORICAL_COLUMNS)
    out = []
    for row in rows:
        values = [int(float(row["label"]))]
        for name in INTEGER_COLUMNS:
            text = row[name]
            if text == "":
                values.append(0)
                continue
            count = math.floor(float(text))
            if count < 0:
                values.append(1)
            elif count == 0:
                values.append(2)
            else:
                values.append(3 + int(math.floor(math.log2(count))))
        for name in CATEGORICAL_COLUMNS:
            values.append(0 if row[name] == "" else ids[row[name]])
        out.append(tuple(values))
    return out


@pytest.fixture(scope="module")
def criteo_csv_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    output = str(tmp_path_factory.mktemp("criteo-csv") / "dataset")
    convert_criteo(str(shared_path("criteo_sample.csv")), output, hash_options())
    return output


def test_criteo_csv_values_and_splits(criteo_csv_dataset: str) -> None:
    rows = criteo_rows()
    expected = expected_criteo_rows(rows)
    draws = split_of_rows(2022, 0, len(rows))
    assignment = np.searchsorted([0.8, 0.9], draws, side="right")
    for index, split in enumerate(("train", "valid", "test")):
        table = read_split(criteo_csv_dataset, split)
        wanted = [expected[i] for i in np.flatnonzero(assignment == index)]
        assert table.num_rows == len(wanted)
        assert sorted_rows(table) == sorted(wanted)

    schema = load_schema(criteo_csv_dataset)
    assert schema.label == "label"
    assert schema.field_names == (*INTEGER_COLUMNS, *CATEGORICAL_COLUMNS)
    assert {f.num_embeddings for f in schema.features[:13]} == {66}
    assert {f.num_embeddings for f in schema.features[13:]} == {HASH_ROWS}
    # C20 is empty in many sample rows: those are the missing id 0.
    train = read_split(criteo_csv_dataset, "train")
    assert 0 in train.column("C20").to_pylist()


def test_criteo_training_rows_are_shuffled(criteo_csv_dataset: str) -> None:
    expected = expected_criteo_rows(criteo_rows())
    train = read_split(criteo_csv_dataset, "train")
    written = list(zip(*(train.column(c).to_pylist() for c in train.column_names)))
    positions = [expected.index(row) for row in written]
    assert positions != sorted(positions)


def test_criteo_raw_tsv_and_gzip_match_csv(
    criteo_csv_dataset: str, tmp_path: Path
) -> None:
    # The Kaggle layout: tab-separated, no header, empty fields kept.
    lines = shared_path("criteo_sample.csv").read_text().splitlines()[1:]
    tsv = "\n".join(line.replace(",", "\t") for line in lines) + "\n"
    (tmp_path / "day_0").write_text(tsv)
    with gzip.open(tmp_path / "day_0.gz", "wt") as f:
        f.write(tsv)

    for name in ("day_0", "day_0.gz"):
        output = str(tmp_path / f"{name}-dataset")
        summary = convert_criteo(str(tmp_path / name), output, hash_options())
        assert summary.rows_read == 200
        for split in ("train", "valid", "test"):
            assert read_split(output, split).equals(
                read_split(criteo_csv_dataset, split)
            )


def test_criteo_vocabulary_with_min_count(tmp_path: Path) -> None:
    rows = criteo_rows()
    output = str(tmp_path / "vocab")
    options = hash_options(
        encoding=CategoricalEncoding("vocab", min_count=3), split_ratios=(1.0, 0.0, 0.0)
    )
    convert_criteo(str(shared_path("criteo_sample.csv")), output, options)
    schema = load_schema(output)
    train = read_split(output, "train")
    assert train.num_rows == 200

    for name in ("C1", "C6", "C20"):
        counts = collections.Counter(r[name] for r in rows if r[name] != "")
        kept = sorted(
            (token for token, n in counts.items() if n >= 3),
            key=lambda token: (-counts[token], token),
        )
        ids = {token: 2 + i for i, token in enumerate(kept)}
        expected = sorted(0 if r[name] == "" else ids.get(r[name], 1) for r in rows)
        assert sorted(train.column(name).to_pylist()) == expected
        assert schema.feature(name).num_embeddings == len(kept) + 2


def avazu_file(path: Path, num_rows: int) -> list[dict[str, str]]:
    """An Avazu-format CSV: the real header and value shapes, random values."""
    rng = np.random.default_rng(5)
    hexes = [f"{v:08x}" for v in rng.integers(0, 2**32, 40)]
    rows = []
    for i in range(num_rows):
        day, hour = int(rng.integers(21, 31)), int(rng.integers(0, 24))
        row = {
            "id": str(10**18 + i),
            "click": str(int(rng.random() < 0.2)),
            "hour": f"1410{day:02d}{hour:02d}",
            "C1": str(int(rng.choice([1005, 1002, 1010]))),
            "banner_pos": str(int(rng.integers(0, 3))),
        }
        for name in AVAZU_CATEGORICAL[2:]:
            row[name] = (
                str(rng.choice(hexes))
                if not name.startswith("C")
                else str(int(rng.integers(0, 500)))
            )
        if i % 17 == 0:
            row["device_id"] = ""
        if i % 29 == 0:
            row["hour"] = "bad-hour"
        rows.append(row)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(AVAZU_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def test_avazu_hours_and_categoricals(tmp_path: Path) -> None:
    rows = avazu_file(tmp_path / "train.csv", 500)
    output = str(tmp_path / "avazu")
    summary = convert_avazu(
        str(tmp_path / "train.csv"), output, hash_options(split_ratios=(1.0, 0.0, 0.0))
    )
    assert summary.rows == {"train": 500, "valid": 0, "test": 0}
    schema = load_schema(output)
    assert schema.label == "click"
    assert schema.field_names == ("weekday", "hour_of_day", *AVAZU_CATEGORICAL)

    ids = hashed_ids(rows, AVAZU_CATEGORICAL)
    expected = []
    for row in rows:
        if row["hour"] == "bad-hour":
            weekday = hour_of_day = 0
        else:
            stamp = datetime.datetime.strptime(row["hour"], "%y%m%d%H")
            weekday, hour_of_day = stamp.weekday() + 1, stamp.hour + 1
        categorical = [0 if row[c] == "" else ids[row[c]] for c in AVAZU_CATEGORICAL]
        expected.append((int(row["click"]), weekday, hour_of_day, *categorical))
    assert sorted_rows(read_split(output, "train")) == sorted(expected)


def test_converted_dataset_feeds_the_reader(criteo_csv_dataset: str) -> None:
    split = ParquetSplit(criteo_csv_dataset, "train", load_schema(criteo_csv_dataset))
    batches = list(SplitReader(split, 32, seed=1).epoch())
    assert len(batches) == split.num_rows // 32
    assert batches[0].sparse_features.keys() == [*INTEGER_COLUMNS, *CATEGORICAL_COLUMNS]


def test_cli_converts_criteo(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "cli"
    code = main(
        [
            "convert",
            "criteo",
            "--input",
            str(shared_path("criteo_sample.csv")),
            "--output",
            str(output),
            "--hash-num-embeddings",
            "500",
            "--integer-bucketing",
            "log_squared",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sum(report["rows"].values()) == 200
    schema = load_schema(str(output))
    assert schema.feature("I1").num_embeddings == LOG_SQUARED_NUM_EMBEDDINGS
    assert schema.feature("C1").num_embeddings == 500


def convert_copies(
    tmp_path: Path, copies: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[int, int, int, int]:
    """Convert ``copies`` copies of the sample, written as one TSV.

    Returns:
        (input bytes, rows read, blocks, the most bytes Arrow held at a block
        boundary beyond what it held before).
    """
    lines = shared_path("criteo_sample.csv").read_text().splitlines()[1:]
    tsv = [line.replace(",", "\t") for line in lines]
    source = tmp_path / f"copies-{copies}.tsv"
    with source.open("w") as f:
        for copy in range(copies):
            # A digit appended to C26 makes each copy's last tokens differ.
            f.writelines(line + f"{copy % 10}\n" for line in tsv)

    baseline = pa.total_allocated_bytes()
    held: list[int] = []
    update = Progress.update

    def update_and_sample(self: Progress, rows: int, bytes_read: int) -> None:
        update(self, rows, bytes_read)
        held.append(pa.total_allocated_bytes() - baseline)

    monkeypatch.setattr(Progress, "update", update_and_sample)
    summary = convert_criteo(
        str(source),
        str(tmp_path / f"{copies}"),
        ConvertOptions(
            encoding=CategoricalEncoding("hash", hash_num_embeddings=1 << 16),
            rows_per_shard=10_000,
            row_group_rows=1_024,
            shuffle_buffer_rows=2_048,
            block_size_bytes=1 << 18,
            progress_interval_s=0.0,
        ),
    )
    monkeypatch.undo()
    return source.stat().st_size, summary.rows_read, summary.blocks, max(held)


def test_criteo_conversion_streams_in_bounded_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    small_size, small_rows, _, small_held = convert_copies(tmp_path, 50, monkeypatch)
    with caplog.at_level(logging.INFO, logger="kd_dagfm.data.convert"):
        size, rows, blocks, held = convert_copies(tmp_path, 200, monkeypatch)
    assert (small_rows, rows) == (10_000, 40_000)
    assert blocks >= size // (1 << 18)
    # Four times the input, the same memory: it is bounded by the block,
    # shuffle buffer and row group sizes, not by the file.
    assert size > 3.9 * small_size
    assert held < 1.3 * small_held + (1 << 20), f"{held:,} B vs {small_held:,} B"
    assert held < size / 2
    progress = [r.getMessage() for r in caplog.records if "rows/s" in r.getMessage()]
    assert len(progress) >= blocks
    assert progress[0].startswith(f"criteo: converting {tmp_path}")
    assert "MiB of" in progress[0]
