"""Streaming conversion of delimited CTR logs (Criteo, Avazu) to a dataset.

The input is read block by block with ``pyarrow.csv.open_csv``, so memory
stays bounded by the block size, the shuffle buffer and the writer's open
row groups, whatever the file size (the 45 GB Criteo Kaggle file included).
Plain and compressed files (``.gz``, ``.bz2``, ``.zst``, ``.lz4``) are read
as streams; a local path or any fsspec URL works.

Categorical tokens become ids in one of two ways (:class:`CategoricalEncoding`):

- ``hash``: ``1 + XXH64(token) mod (num_embeddings - 1)``, one pass, no
  state; the same token gets the same id in every file and at serving time
  (see :mod:`kd_dagfm.hashing`).
- ``vocab``: a first pass counts tokens. Tokens seen at least
  ``min_count`` times get ids ``2 ..`` in order of decreasing count (ties
  by token), and the rarer ones share id 1. The input is read twice.

Id 0 is a missing value (an empty field) in every categorical feature.

Rows go to train/valid/test by a hash of (seed, row number), so the split
does not depend on block boundaries. Training rows are shuffled in a buffer
of ``shuffle_buffer_rows`` before they are written: the reader shuffles
blocks of rows (``shuffle_block_rows``), not single rows, and relies on
rows within a block being in random order.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from kd_dagfm.data.writer import SPLITS, DatasetWriter
from kd_dagfm.errors import ConfigError, DataError
from kd_dagfm.hashing import hash_to_rows
from kd_dagfm.schema import Feature, FeatureKind, FeatureSchema
from kd_dagfm.storage import filesystem

logger = logging.getLogger(__name__)

MISSING_ID = 0
RARE_ID = 1
ENCODINGS = ("hash", "vocab")
BAD_LINE_POLICIES = ("error", "skip")
# Tables of token counts merged at once while counting a vocabulary.
_MERGE_EVERY = 16


@dataclasses.dataclass(frozen=True)
class CategoricalEncoding:
    """Encoding of categorical tokens as embedding ids.

    Attributes:
        method: ``hash`` or ``vocab`` (see the module docstring).
        hash_num_embeddings: rows per hashed feature, id 0 included.
        min_count: ``vocab``: occurrences a token needs for its own id.
        seed: ``hash``: XXH64 seed.
    """

    method: str = "hash"
    hash_num_embeddings: int = 1 << 20
    min_count: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ENCODINGS:
            raise ConfigError(
                f"invalid categorical encoding {self.method!r}: expected one of "
                f"{', '.join(ENCODINGS)}"
            )
        if self.hash_num_embeddings < 2:
            raise ConfigError(
                f"invalid hash_num_embeddings {self.hash_num_embeddings}: expected "
                ">= 2 (id 0 is the missing value)"
            )
        if self.min_count < 1:
            raise ConfigError(f"invalid min_count {self.min_count}: expected >= 1")


@dataclasses.dataclass(frozen=True)
class ConversionSummary:
    """Counts of a finished conversion.

    Attributes:
        schema: the dataset's schema.
        rows: rows written per split.
        rows_read: data lines parsed.
        bad_lines: malformed lines skipped (``bad_lines="skip"``).
        bad_labels: rows skipped for a missing or non-0/1 label.
        blocks: input blocks read; more than one shows that the input was
            streamed.
        seconds: wall time.
    """

    schema: FeatureSchema
    rows: dict[str, int]
    rows_read: int
    bad_lines: int
    bad_labels: int
    blocks: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "rows_read": self.rows_read,
            "bad_lines": self.bad_lines,
            "bad_labels": self.bad_labels,
            "blocks": self.blocks,
            "seconds": round(self.seconds, 3),
            "fields": list(self.schema.field_names),
        }


@dataclasses.dataclass(frozen=True)
class CsvLayout:
    """Where the columns of a delimited file are and how to parse them.

    Attributes:
        names: column names in file order.
        types: Arrow type per column read; columns not listed are skipped.
        delimiter: field separator.
        header: whether the first line contains column names (checked
            against ``names``).
    """

    names: tuple[str, ...]
    types: dict[str, pa.DataType]
    delimiter: str
    header: bool


class Progress:
    """Reports rows and bytes read: a tqdm bar on a terminal, else log lines.

    Args:
        description: what is being read.
        total_bytes: input size, or None when unknown (compressed input).
        interval_s: seconds between log lines when stderr is not a terminal.
    """

    def __init__(
        self, description: str, total_bytes: int | None, interval_s: float
    ) -> None:
        self.description = description
        self.total_bytes = total_bytes
        self.interval_s = interval_s
        self.rows = 0
        self.bytes = 0
        self.started = time.perf_counter()
        self._last_log = self.started
        self._bar: Any = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_bytes, unit="B", unit_scale=True, desc=description
            )

    def update(self, rows: int, bytes_read: int) -> None:
        self.rows += rows
        if self._bar is not None:
            self._bar.update(max(0, bytes_read - self.bytes))
            self._bar.set_postfix(rows=f"{self.rows:,}")
        self.bytes = max(self.bytes, bytes_read)
        now = time.perf_counter()
        if self._bar is None and now - self._last_log >= self.interval_s:
            self._last_log = now
            logger.info("%s: %s", self.description, self.describe())

    def describe(self) -> str:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        done = f"{self.bytes / 2**20:,.1f} MiB"
        if self.total_bytes:
            done += (
                f" of {self.total_bytes / 2**20:,.1f} MiB "
                f"({100 * self.bytes / self.total_bytes:.1f} %)"
            )
        return f"{self.rows:,} rows, {done}, {self.rows / elapsed:,.0f} rows/s"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        logger.info("%s: done, %s", self.description, self.describe())


def read_blocks(
    path: str,
    layout: CsvLayout,
    block_size_bytes: int,
    bad_lines: str,
    progress: Progress | None,
    on_bad_line: Callable[[str], None],
) -> Iterator[pa.RecordBatch]:
    """Stream ``path`` as record batches of the layout's typed columns.

    Raises:
        DataError: on a malformed line under ``bad_lines="error"``, or a
            header that does not match the layout.
    """
    if bad_lines not in BAD_LINE_POLICIES:
        raise ConfigError(
            f"invalid bad_lines {bad_lines!r}: expected one of "
            f"{', '.join(BAD_LINE_POLICIES)}"
        )
    fs, local = filesystem(path)
    with fs.open(local, "rb") as raw:
        stream = pa.input_stream(raw, compression=_compression(path))
        if layout.header:
            _check_header(stream, layout, path)

        def invalid_row(row: pacsv.InvalidRow) -> str:
            if bad_lines == "error":
                return "error"
            on_bad_line(row.text or "")
            return "skip"

        try:
            reader = pacsv.open_csv(
                stream,
                read_options=pacsv.ReadOptions(
                    column_names=list(layout.names), block_size=block_size_bytes
                ),
                parse_options=pacsv.ParseOptions(
                    delimiter=layout.delimiter,
                    quote_char=False,
                    invalid_row_handler=invalid_row,
                ),
                convert_options=pacsv.ConvertOptions(
                    column_types=layout.types,
                    include_columns=list(layout.types),
                    null_values=[""],
                    strings_can_be_null=True,
                    quoted_strings_can_be_null=True,
                ),
            )
            for batch in reader:
                if progress is not None:
                    progress.update(batch.num_rows, raw.tell())
                yield batch
        except pa.ArrowInvalid as e:
            raise DataError(
                f"{path}: malformed input ({e}); fix the file, or set "
                "bad_lines=skip (--bad-lines skip) to skip and count such lines"
            ) from None


def _compression(path: str) -> str | None:
    for suffix, codec in ((".gz", "gzip"), (".bz2", "bz2"), (".zst", "zstd")):
        if path.endswith(suffix):
            return codec
    return "lz4" if path.endswith(".lz4") else None


def _check_header(stream: pa.NativeFile, layout: CsvLayout, path: str) -> None:
    """Consume the header line and check it names the layout's columns."""
    line = bytearray()
    while not line.endswith(b"\n"):
        chunk = stream.read(1)
        if not chunk:
            break
        line += chunk
    names = tuple(line.decode().rstrip("\r\n").split(layout.delimiter))
    if names != layout.names:
        raise DataError(
            f"{path}: the header names columns {list(names)}, expected "
            f"{list(layout.names)}; check the file's format and delimiter"
        )


def detect_format(path: str, first_column: str) -> tuple[str, bool]:
    """(delimiter, has header) of a Criteo-like file from its first line."""
    fs, local = filesystem(path)
    with fs.open(local, "rb") as raw:
        stream = pa.input_stream(raw, compression=_compression(path))
        first = stream.read(1 << 16).split(b"\n", 1)[0].decode(errors="replace")
    if not first:
        raise DataError(f"{path} is empty: expected a header or a data line")
    delimiter = "\t" if "\t" in first else ","
    return delimiter, first.split(delimiter)[0] == first_column


class CategoricalEncoder:
    """Token -> id for every categorical column of one conversion.

    With ``vocab`` encoding, :meth:`count` is called on every block of a
    first pass and :meth:`finish_counting` before encoding.
    """

    def __init__(self, columns: Sequence[str], encoding: CategoricalEncoding) -> None:
        self.columns = tuple(columns)
        self.encoding = encoding
        self._counts: dict[str, list[pa.Table]] = {c: [] for c in self.columns}
        self.vocabularies: dict[str, pa.Array] = {}

    def count(self, batch: pa.RecordBatch) -> None:
        for column in self.columns:
            counts = pc.value_counts(batch.column(column).drop_null())
            pending = self._counts[column]
            pending.append(
                pa.table(
                    {"token": counts.field("values"), "count": counts.field("counts")}
                )
            )
            if len(pending) >= _MERGE_EVERY:
                self._counts[column] = [_merge_counts(pending)]

    def finish_counting(self) -> None:
        for column in self.columns:
            merged = _merge_counts(self._counts[column])
            kept = merged.filter(
                pc.greater_equal(merged.column("count"), self.encoding.min_count)
            )
            kept = kept.sort_by([("count", "descending"), ("token", "ascending")])
            self.vocabularies[column] = kept.column("token").combine_chunks()
            self._counts[column] = []

    def num_embeddings(self, column: str) -> int:
        if self.encoding.method == "hash":
            return self.encoding.hash_num_embeddings
        return len(self.vocabularies[column]) + 2

    def encode(self, column: str, tokens: pa.Array) -> np.ndarray:
        """(N,) int64 ids; a null token (missing value) is MISSING_ID."""
        missing = np.asarray(tokens.is_null().to_numpy(zero_copy_only=False), bool)
        if self.encoding.method == "hash":
            ids = 1 + hash_to_rows(
                tokens.fill_null(""),
                self.encoding.hash_num_embeddings - 1,
                self.encoding.seed,
            )
        else:
            index = pc.index_in(tokens, value_set=self.vocabularies[column])
            ids = (
                np.asarray(index.fill_null(-1).to_numpy(zero_copy_only=False), np.int64)
                + 2
            )
            ids[ids == 1] = RARE_ID  # a token outside the vocabulary
        ids[missing] = MISSING_ID
        return ids


def _merge_counts(tables: list[pa.Table]) -> pa.Table:
    if not tables:
        return pa.table(
            {"token": pa.array([], pa.string()), "count": pa.array([], pa.int64())}
        )
    merged = pa.concat_tables(tables).group_by("token").aggregate([("count", "sum")])
    return merged.rename_columns(["token", "count"])


def split_of_rows(seed: int, first_row: int, num_rows: int) -> np.ndarray:
    """(N,) uniform floats in [0, 1) from a hash of (seed, row number)."""
    rows = np.arange(first_row, first_row + num_rows, dtype=np.uint64)
    x = rows + np.uint64((seed * 0x9E3779B97F4A7C15) & ((1 << 64) - 1))
    # splitmix64's finaliser (Steele, Lea and Flood 2014).
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class SplitWriter:
    """Routes converted rows to splits; shuffles training rows in a buffer.

    Args:
        writer: the dataset writer.
        ratios: fractions of rows for train, valid and test.
        seed: seed of the split assignment and of the shuffle.
        shuffle_buffer_rows: training rows permuted together before writing.
    """

    def __init__(
        self,
        writer: DatasetWriter,
        ratios: tuple[float, float, float],
        seed: int,
        shuffle_buffer_rows: int,
    ) -> None:
        if len(ratios) != 3 or min(ratios) < 0 or not np.isclose(sum(ratios), 1.0):
            raise ConfigError(
                f"invalid split ratios {ratios}: expected three non-negative "
                "fractions for train, valid and test that sum to 1"
            )
        if shuffle_buffer_rows < 1:
            raise ConfigError(
                f"invalid shuffle_buffer_rows {shuffle_buffer_rows}: expected >= 1"
            )
        self.writer = writer
        self.bounds = np.cumsum(ratios)[:2]
        self.seed = seed
        self.shuffle_buffer_rows = shuffle_buffer_rows
        self.rows_seen = 0
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._flushes = 0

    def write(self, table: pa.Table) -> None:
        draws = split_of_rows(self.seed, self.rows_seen, table.num_rows)
        self.rows_seen += table.num_rows
        split_index = np.searchsorted(self.bounds, draws, side="right")
        for index, split in enumerate(SPLITS):
            rows = table.filter(pa.array(split_index == index))
            if not rows.num_rows:
                continue
            if split != "train":
                self.writer.write(split, rows)
                continue
            self._buffer.append(rows)
            self._buffered += rows.num_rows
            if self._buffered >= self.shuffle_buffer_rows:
                self._flush()

    def close(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if not self._buffered:
            return
        table = pa.concat_tables(self._buffer)
        rng = np.random.default_rng([self.seed, self._flushes])
        self.writer.write("train", table.take(rng.permutation(table.num_rows)))
        self._buffer, self._buffered = [], 0
        self._flushes += 1


def binary_labels(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(int8 labels, (N,) bool mask of rows whose label is missing or not 0/1)."""
    values = np.asarray(
        column.cast(pa.float64())
        .fill_null(pa.scalar(float("nan"), pa.float64()))
        .to_numpy(zero_copy_only=False)
    )
    bad = ~np.isin(values, (0.0, 1.0))
    return np.where(bad, 0, values).astype(np.int8), bad


# Builds the feature columns (not the label) of one block.
Transform = Callable[[pa.RecordBatch, CategoricalEncoder], dict[str, pa.Array]]


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    """Options shared by the Criteo and Avazu converters.

    Attributes:
        encoding: categorical encoding.
        split_ratios: train, valid and test fractions (random, by row hash).
        seed: seed of the split and of the training-row shuffle.
        rows_per_shard, row_group_rows: shard layout (see DatasetWriter).
        shuffle_buffer_rows: training rows shuffled together before writing.
        block_size_bytes: input read per block.
        bad_lines: ``error`` or ``skip`` (and count) for lines with the wrong
            number of fields and rows whose label is missing or not 0/1.
        overwrite: replace an existing dataset at the output.
        progress_interval_s: seconds between progress log lines.
    """

    encoding: CategoricalEncoding = CategoricalEncoding()
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 2022
    rows_per_shard: int = 1_000_000
    row_group_rows: int = 65_536
    shuffle_buffer_rows: int = 1_000_000
    block_size_bytes: int = 16 << 20
    bad_lines: str = "error"
    overwrite: bool = False
    progress_interval_s: float = 30.0


def convert_delimited(
    name: str,
    input_path: str,
    output: str,
    layout: CsvLayout,
    label: str,
    categorical_columns: Sequence[str],
    other_features: Sequence[Feature],
    transform: Transform,
    options: ConvertOptions,
) -> ConversionSummary:
    """Stream ``input_path`` through ``transform`` into a dataset at ``output``.

    The label column must parse as a number; the schema lists
    ``other_features`` first, then the categorical columns.
    """
    started = time.perf_counter()
    encoder = CategoricalEncoder(categorical_columns, options.encoding)
    bad_line_texts: list[str] = []

    def blocks(description: str) -> Iterator[pa.RecordBatch]:
        progress = Progress(description, _size(input_path), options.progress_interval_s)
        yield from read_blocks(
            input_path,
            layout,
            options.block_size_bytes,
            options.bad_lines,
            progress,
            bad_line_texts.append,
        )
        progress.close()

    if options.encoding.method == "vocab":
        for batch in blocks(f"{name}: counting tokens in {input_path}"):
            encoder.count(batch)
        encoder.finish_counting()
        bad_line_texts.clear()

    features = list(other_features) + [
        Feature(c, FeatureKind.SPARSE, encoder.num_embeddings(c))
        for c in categorical_columns
    ]
    schema = FeatureSchema(label=label, features=tuple(features))
    bad_labels = rows_read = num_blocks = 0
    with DatasetWriter(
        output,
        schema,
        options.rows_per_shard,
        options.row_group_rows,
        options.overwrite,
    ) as writer:
        splits = SplitWriter(
            writer, options.split_ratios, options.seed, options.shuffle_buffer_rows
        )
        for batch in blocks(f"{name}: converting {input_path}"):
            num_blocks += 1
            rows_read += batch.num_rows
            labels, bad = binary_labels(batch.column(label))
            if bad.any():
                _reject_labels(batch.column(label), bad, options, input_path, rows_read)
                bad_labels += int(bad.sum())
            columns = {label: pa.array(labels), **transform(batch, encoder)}
            table = pa.table(columns)
            if bad.any():
                table = table.filter(pa.array(~bad))
            splits.write(table)
        splits.close()

    summary = ConversionSummary(
        schema=schema,
        rows=dict(writer.rows_written),
        rows_read=rows_read,
        bad_lines=len(bad_line_texts),
        bad_labels=bad_labels,
        blocks=num_blocks,
        seconds=time.perf_counter() - started,
    )
    logger.info(
        "%s: converted %s to %s: %s rows written, %d read, %d malformed lines and "
        "%d bad labels skipped, %.1f s",
        name,
        input_path,
        output,
        summary.rows,
        summary.rows_read,
        summary.bad_lines,
        summary.bad_labels,
        summary.seconds,
    )
    for text in bad_line_texts[:3]:
        logger.warning("%s: skipped malformed line: %.200s", name, text)
    return summary


def _size(path: str) -> int | None:
    """Return the input's size in bytes, or None for compressed input."""
    if _compression(path) is not None:
        return None
    fs, local = filesystem(path)
    return int(fs.size(local))


def _reject_labels(
    column: pa.Array,
    bad: np.ndarray,
    options: ConvertOptions,
    path: str,
    rows_read: int,
) -> None:
    if options.bad_lines == "skip":
        return
    first = int(np.flatnonzero(bad)[0])
    line = rows_read - len(column) + first + 1
    raise DataError(
        f"{path}: data row {line} has label {column[first].as_py()!r}, expected 0 "
        f"or 1 ({int(bad.sum())} such rows in this block); fix the file, or set "
        "bad_lines=skip (--bad-lines skip) to skip and count such rows"
    )
