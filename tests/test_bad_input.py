"""Bad input: each case stops with a message naming it, or is skipped and counted.

Policies: ``bad_shards`` (error | skip) for unreadable, truncated or
mismatched shards and undecodable row groups; ``bad_rows`` (error | skip)
for invalid labels and ids; converters' ``bad_lines`` (error | skip) for
malformed lines. Empty shards are always left out; an empty split, a
prefix without shards and a failing storage endpoint always stop.
"""

from __future__ import annotations

import http.server
import logging
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kd_dagfm.data.convert import ConvertOptions
from kd_dagfm.data.criteo import convert_criteo
from kd_dagfm.data.reader import ParquetSplit, SplitReader, load_schema
from kd_dagfm.data.writer import DatasetWriter, arrow_schema, write_dataset
from kd_dagfm.errors import DataError, SchemaError, StorageError
from kd_dagfm.storage import S3_REQUEST_ATTEMPTS, S3FS_RETRIES
from tests.conftest import shared_path
from tests.test_reader import read_ids, rid_schema, rid_table
from tests.test_s3 import SECRET_KEY, aws_environment

ROWS = 1000


@pytest.fixture
def dataset(tmp_path: Path) -> str:
    """1,000 rows in 4 shards of 250 rows, row groups of 50."""
    root = str(tmp_path / "dataset")
    write_dataset(
        root,
        rid_schema(ROWS),
        {"train": rid_table(ROWS)},
        rows_per_shard=250,
        row_group_rows=50,
    )
    return root


def shard(root: str, index: int) -> Path:
    return Path(root) / "train" / f"part-{index:05d}.parquet"


def add_shard(root: str, name: str, table: pa.Table, row_group_rows: int = 50) -> Path:
    path = Path(root) / "train" / name
    pq.write_table(table, path, row_group_size=row_group_rows)
    return path


def open_split(root: str, bad_shards: str = "error") -> ParquetSplit:
    return ParquetSplit(root, "train", load_schema(root), bad_shards=bad_shards)


def all_rows(split: ParquetSplit, **kwargs: object) -> np.ndarray:
    reader = SplitReader(split, 50, shuffle=False, remainder="keep", **kwargs)  # type: ignore[arg-type]
    return np.concatenate(read_ids(reader))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_shard_stops_or_is_skipped(
    dataset: str, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = shard(dataset, 1)
    if damage == "garbage":
        path.write_bytes(b"this is not parquet" * 100)
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    with pytest.raises(DataError) as raised:
        open_split(dataset)
    message = str(raised.value)
    assert f"shard {path} is not a readable Parquet file" in message
    assert "it may be truncated or corrupt" in message
    assert "or set bad_shards=skip to leave such shards out" in message

    with caplog.at_level(logging.WARNING):
        split = open_split(dataset, bad_shards="skip")
    assert [s.shard for s in split.skipped_shards] == [str(path)]
    assert f"leaving out shard {path}" in caplog.text
    np.testing.assert_array_equal(
        all_rows(split), np.concatenate([np.arange(250), np.arange(500, 1000)])
    )


def corrupt_row_group(path: Path, row_group: int) -> None:
    """Overwrite the pages of one column chunk, leaving the footer intact."""
    column = pq.ParquetFile(path).metadata.row_group(row_group).column(1)
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    data[start + 2 : start + column.total_compressed_size - 2] = b"\xab" * (
        column.total_compressed_size - 4
    )
    path.write_bytes(bytes(data))


def test_undecodable_row_group_stops_or_is_skipped(dataset: str) -> None:
    path = shard(dataset, 2)
    corrupt_row_group(path, 3)
    with pytest.raises(DataError) as raised:
        all_rows(open_split(dataset))
    message = str(raised.value)
    assert f"row group 3 of shard {path} failed to decode" in message
    assert "set bad_shards=skip to skip such row groups" in message

    split = open_split(dataset, bad_shards="skip")
    reader = SplitReader(split, 50, shuffle=False, remainder="keep")
    rows = np.concatenate(read_ids(reader))
    assert reader.row_groups_skipped == 1
    lost = np.arange(500 + 3 * 50, 500 + 4 * 50)
    np.testing.assert_array_equal(rows, np.setdiff1d(np.arange(ROWS), lost))


def test_skipped_row_group_keeps_batch_counts_equal(
    dataset: str, caplog: pytest.LogCaptureFixture
) -> None:
    corrupt_row_group(shard(dataset, 0), 1)  # in rank 0's range (unshuffled)
    split = open_split(dataset, bad_shards="skip")
    counts, repeated = [], []
    with caplog.at_level(logging.WARNING):
        for rank in range(2):
            reader = SplitReader(split, 60, rank=rank, world_size=2, shuffle=False)
            batches = read_ids(reader)
            assert all(len(b) == 60 for b in batches)
            counts.append(len(batches))
            repeated.append(reader.rows_repeated)
    assert counts == [(ROWS // 2) // 60] * 2
    # Rank 0 lost 50 of its 500 rows; 8 batches need 480: it reads 30 again.
    assert repeated == [30, 0]
    assert "rank 0 ran short of valid rows in epoch 0" in caplog.text


def test_shard_with_other_schema_stops_or_is_skipped(dataset: str) -> None:
    table = rid_table(100).set_column(2, "a", pa.array([str(i) for i in range(100)]))
    path = add_shard(dataset, "part-00004.parquet", table)
    with pytest.raises(DataError) as raised:
        open_split(dataset)
    assert (
        f"{path}: feature 'a' is sparse in schema.json and needs an integer column, "
        "but the shard stores string" in str(raised.value)
    )
    split = open_split(dataset, bad_shards="skip")
    assert len(split.skipped_shards) == 1
    assert split.num_rows == ROWS


def test_shard_without_label_column_stops(dataset: str) -> None:
    path = add_shard(
        dataset, "part-00004.parquet", rid_table(100).drop_columns(["label"])
    )
    with pytest.raises(DataError) as raised:
        open_split(dataset)
    message = str(raised.value)
    assert f"{path}: label column 'label' is missing" in message
    assert "the shard does not belong to this dataset" in message


def rows_with(column: str, values: list[object], rows: int = 100) -> pa.Table:
    """rid 1000 .. 1099 (outside the fixture's ids) with ``column`` replaced."""
    table = rid_table(ROWS + rows).slice(ROWS)
    index = table.column_names.index(column)
    return table.set_column(index, column, pa.array(values))


@pytest.mark.parametrize(
    ("column", "values", "expected"),
    [
        (
            "label",
            [0.0, 1.0, 1.0, float("nan"), 2.0] * 20,
            "column 'label' has 40 invalid row(s), first at row 3 with value nan; "
            "expected a label of 0 or 1",
        ),
        (
            "label",
            [0, 1, None, 1] * 25,
            "column 'label' has 25 invalid row(s), first at row 2 with value null",
        ),
        (
            "a",
            [3, -1, 4, 5] * 25,
            "column 'a' has 25 invalid row(s), first at row 1 with value -1; expected "
            "an id in [0, 10] (num_embeddings=11)",
        ),
        (
            "a",
            [3, 4, 11, 5] * 25,
            "column 'a' has 25 invalid row(s), first at row 2 with value 11; expected "
            "an id in [0, 10] (num_embeddings=11)",
        ),
        (
            "genres",
            [[1], [2, 7], [], [-3]] * 25,
            "column 'genres' has 50 invalid row(s), first at row 1 with value 7",
        ),
        (
            "x",
            [0.5, float("inf"), 0.25, 0.0] * 25,
            "column 'x' has 25 invalid row(s), first at row 1 with value inf; "
            "expected a finite number",
        ),
    ],
)
def test_invalid_rows_stop_or_are_skipped(
    tmp_path: Path, column: str, values: list[object], expected: str
) -> None:
    root = str(tmp_path / "dataset")
    write_dataset(root, rid_schema(ROWS + 100), {"train": rid_table(ROWS)})
    table = rows_with(column, values)
    if column == "genres":
        table = table.set_column(3, "genres", pa.array(values, pa.list_(pa.int64())))
    add_shard(root, "part-00001.parquet", table, row_group_rows=100)

    with pytest.raises(DataError) as raised:
        all_rows(open_split(root))
    message = str(raised.value)
    assert f"part-00001.parquet row group 0: {expected}" in message
    assert "set bad_rows=skip to drop and count such rows" in message

    reader = SplitReader(
        open_split(root), 50, shuffle=False, remainder="keep", bad_rows="skip"
    )
    rows = np.concatenate(read_ids(reader))
    bad = int(expected.split(" has ")[1].split(" ")[0])
    assert reader.rows_skipped == bad
    assert len(rows) == ROWS + 100 - bad


def test_all_rows_invalid_on_a_rank_stops(tmp_path: Path) -> None:
    root = str(tmp_path / "dataset")
    write_dataset(root, rid_schema(200), {"train": rid_table(200)}, row_group_rows=50)
    add_shard(root, "part-00001.parquet", rows_with("a", [-1] * 200, rows=200))
    reader = SplitReader(
        open_split(root), 20, rank=1, world_size=2, shuffle=False, bad_rows="skip"
    )
    with pytest.raises(
        DataError, match="rank 1 found no valid row in its part of split 'train'"
    ):
        read_ids(reader)


def test_empty_shard_is_left_out(
    dataset: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = add_shard(dataset, "part-00004.parquet", rid_table(0))
    with caplog.at_level(logging.INFO):
        split = open_split(dataset)
    assert split.empty_shards == [str(path)]
    assert f"shard {path} has no rows; leaving it out" in caplog.text
    assert split.num_rows == ROWS


def test_empty_split_stops(tmp_path: Path) -> None:
    root = str(tmp_path / "dataset")
    write_dataset(root, rid_schema(10), {"train": rid_table(0), "valid": rid_table(10)})
    add_shard(root, "part-00000.parquet", rid_table(0))
    with pytest.raises(DataError) as raised:
        open_split(root)
    assert (
        f"split 'train' of dataset {root!r} has no rows: 1 shard(s), 1 empty, 0 skipped"
        in str(raised.value)
    )
    assert "An empty split cannot be trained or evaluated on" in str(raised.value)


def test_prefix_without_shards_stops(tmp_path: Path) -> None:
    root = str(tmp_path / "dataset")
    with pytest.raises(SchemaError, match=f"no schema.json in dataset {root!r}"):
        load_schema(root)
    write_dataset(root, rid_schema(10), {"valid": rid_table(10)})
    with pytest.raises(DataError) as raised:
        ParquetSplit(root, "train", load_schema(root))
    assert f"no Parquet shards in split 'train' of dataset {root!r}" in str(
        raised.value
    )
    assert f"looked for {root}/train/*.parquet" in str(raised.value)


def test_writer_rejects_leftovers_and_invalid_ids(tmp_path: Path) -> None:
    root = str(tmp_path / "dataset")
    write_dataset(root, rid_schema(10), {"train": rid_table(10)})
    (Path(root) / "schema.json").unlink()  # as after an interrupted conversion
    with pytest.raises(
        DataError, match="shards of an unfinished conversion already exist"
    ):
        DatasetWriter(root, rid_schema(10))
    with (
        DatasetWriter(root, rid_schema(10), overwrite=True) as writer,
        pytest.raises(DataError) as raised,
    ):
        writer.write("train", rid_table(20))
    assert "column 'rid' has 10 invalid row(s), first at row 10 with value 10" in str(
        raised.value
    )
    assert "The schema's vocabulary sizes must cover every id written" in str(
        raised.value
    )
    assert arrow_schema(rid_schema(10)).field("rid").type == pa.int64()


def test_converter_bad_lines_stop_or_are_counted(tmp_path: Path) -> None:
    lines = shared_path("criteo_sample.csv").read_text().splitlines()
    lines[5] = ",".join(lines[5].split(",")[:-3])  # three fields short
    lines[9] = "7" + lines[9][1:]  # label 7
    source = tmp_path / "criteo_bad.csv"
    source.write_text("\n".join(lines) + "\n")

    with pytest.raises(DataError) as raised:
        convert_criteo(str(source), str(tmp_path / "strict"))
    assert "malformed input" in str(raised.value)
    assert "Expected 40 columns, got 37" in str(raised.value)
    assert not (tmp_path / "strict" / "schema.json").exists()

    lines[5] = lines[6]
    source.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as raised:
        convert_criteo(str(source), str(tmp_path / "labels"))
    assert f"{source}: data row 9 has label 7.0, expected 0 or 1" in str(raised.value)

    lines[5] = ",".join(lines[5].split(",")[:-3])
    source.write_text("\n".join(lines) + "\n")
    summary = convert_criteo(
        str(source), str(tmp_path / "lenient"), ConvertOptions(bad_lines="skip")
    )
    assert summary.bad_lines == 1
    assert summary.bad_labels == 1
    assert summary.rows_read == 199
    assert sum(summary.rows.values()) == 198


class _FailingS3(http.server.BaseHTTPRequestHandler):
    """Answers every request with 503 Service Unavailable and counts them."""

    requests = 0

    def _fail(self) -> None:
        type(self).requests += 1
        body = b"<Error><Code>ServiceUnavailable</Code><Message>down</Message></Error>"
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = do_POST = _fail

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def failing_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FailingS3)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    aws_environment(monkeypatch, endpoint)
    _FailingS3.requests = 0
    yield endpoint
    server.shutdown()
    server.server_close()


def test_failing_s3_endpoint_retries_then_names_url(failing_endpoint: str) -> None:
    with pytest.raises(StorageError) as raised:
        load_schema("s3://kd-dagfm-test/criteo")
    message = str(raised.value)
    assert "failed to read s3://kd-dagfm-test/criteo/schema.json" in message
    assert f"S3 endpoint {failing_endpoint}" in message
    assert "ServiceUnavailable" in message or "503" in message
    assert SECRET_KEY not in message
    # botocore retries 503 responses; s3fs does not retry them again.
    assert _FailingS3.requests == S3_REQUEST_ATTEMPTS
    assert S3FS_RETRIES >= 1


def test_storage_error_when_dataset_vanishes(dataset: str) -> None:
    split = open_split(dataset)
    shutil.rmtree(Path(dataset) / "train")
    with pytest.raises(DataError, match="was deleted after the split was listed"):
        all_rows(split)
