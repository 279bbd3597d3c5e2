"""Stream one split of a Parquet dataset as equal-sized batches per rank.

Epoch order. The unit of I/O is a row group. For epoch e the reader permutes
the shards with a generator seeded by (seed, e) and the row groups of each
shard with one seeded by (seed, e, shard). Within a row group it permutes
blocks of ``shuffle_block_rows`` rows, seeded by (seed, e, shard, row group). Blocks of 1 row give an exact permutation of
the row group; longer blocks are copied as slices and cost less (see
docs/BENCHMARKS.md). The order depends on the seed and the epoch only, not
on the rank or the world size.

Ranks. The T rows of the epoch order are cut into W contiguous ranges of
floor(T / W) or ceil(T / W) rows; rank r reads range r. Ranks therefore
read disjoint rows and, except for the row groups at range boundaries,
disjoint row groups and shards.

Remainder. With ``remainder="drop"`` (training) every rank yields
``floor(floor(T / W) / batch_size)`` full batches, as TorchRec's row-wise
sharding on gloo requires; each rank leaves the rest of its range for the
epoch (fewer than ``batch_size + 1`` rows), and the left-over rows change
from epoch to epoch with the order. When ``bad_rows="skip"`` or
``bad_shards="skip"`` removed rows and a rank's range runs short, the rank
starts over at the beginning of its range until it has its batches, so the
counts stay equal; the repeated rows are logged. ``"keep"`` yields every
row of the range and a smaller last batch; evaluation uses it.

Resume. :class:`ReaderState` points at the next unseen row of a rank's
range. A reader restored from it continues with exactly the rows an
uninterrupted reader would have yielded next, in the same order.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import posixpath
import queue
import threading
import zlib
from collections.abc import Iterator
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kd_dagfm.config import BAD_ROW_POLICIES, BAD_SHARD_POLICIES, REMAINDER_POLICIES
from kd_dagfm.data.batch import Batch, BatchAssembler, RowGroupArrays
from kd_dagfm.data.validation import check_shard_schema, find_invalid_rows
from kd_dagfm.errors import ConfigError, DataError, SchemaError
from kd_dagfm.schema import SCHEMA_FILE, FeatureSchema
from kd_dagfm.storage import filesystem, is_remote, join, storage_error, transport_cause

logger = logging.getLogger(__name__)

# Parallel footer reads when listing a split on an object store.
_FOOTER_THREADS = 16
# Open shards kept by one reader; a rank reads its row groups mostly shard
# by shard, so two cover a shard boundary.
_OPEN_SHARDS = 2
# Row groups read ahead from object stores by default: one request each.
_REMOTE_READAHEAD = 2


def load_schema(dataset: str) -> FeatureSchema:
    """Read ``schema.json`` of a dataset directory or URL."""
    fs, path = filesystem(dataset)
    schema_path = join(path, SCHEMA_FILE)
    try:
        with fs.open(schema_path, "r") as f:
            text = f.read()
    except FileNotFoundError:
        raise SchemaError(
            f"no {SCHEMA_FILE} in dataset {dataset!r}: convert the data first "
            "(kd-dagfm convert ...) or check the path"
        ) from None
    except Exception as e:
        if transport_cause(e) is None:
            raise
        raise storage_error(join(dataset, SCHEMA_FILE), "read", e) from None
    return FeatureSchema.from_json(text, source=join(dataset, SCHEMA_FILE))


@dataclasses.dataclass(frozen=True)
class RowGroupUnit:
    """One non-empty row group of one shard.

    Attributes:
        shard: path of the shard within its filesystem.
        row_group: row group index in the shard.
        num_rows: rows in the row group (from the footer).
    """

    shard: str
    row_group: int
    num_rows: int

    @property
    def shard_name(self) -> str:
        """The shard's file name, stable when a dataset is copied elsewhere."""
        return posixpath.basename(self.shard)


@dataclasses.dataclass(frozen=True)
class RankPiece:
    """Rows ``[begin, end)`` of a row group's epoch order, read by one rank."""

    unit: RowGroupUnit
    begin: int
    end: int


@dataclasses.dataclass(frozen=True)
class ReaderState:
    """Position of the next unseen training example of one rank.

    Attributes:
        epoch: epoch number, from 0.
        seed: seed of the shard, row group and row order.
        unit: index into this rank's list of row-group pieces for ``epoch``.
            An index past the list's end means that the rank has started
            over to fill its last batches (see the module docstring).
        row: offset into that piece's rows in epoch order.
        batches: batches already yielded in ``epoch``.
        world_size, rank, batch_size, shuffle, shuffle_block_rows: the
            layout the cursor was made with; a cursor only maps to the same
            layout.
        shard, row_group: where ``unit`` pointed, checked on restore.
    """

    epoch: int = 0
    seed: int = 0
    unit: int = 0
    row: int = 0
    batches: int = 0
    world_size: int = 1
    rank: int = 0
    batch_size: int = 0
    shuffle: bool = True
    shuffle_block_rows: int = 1
    shard: str = ""
    row_group: int = -1

    @property
    def at_epoch_start(self) -> bool:
        return self.unit == 0 and self.row == 0 and self.batches == 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReaderState:
        return cls(
            **{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        )


@dataclasses.dataclass(frozen=True)
class SkippedShard:
    """A shard left out of a split under ``bad_shards="skip"``."""

    shard: str
    reason: str


class ParquetSplit:
    """The shards and row groups of one split, listed from Parquet footers.

    Args:
        dataset: dataset directory or URL (contains ``schema.json``).
        split: ``train``, ``valid`` or ``test``.
        schema: expected features; each shard is checked against it.
        bad_shards: what to do with a shard that is not readable Parquet
            (corrupt, truncated) or does not match the schema: ``error``
            stops with a DataError; ``skip`` leaves it out, logs it and
            lists it in :attr:`skipped_shards`. The same applies to a row
            group that fails to decode while reading. Shards without rows
            are always left out (and listed in :attr:`empty_shards`).
    """

    def __init__(
        self,
        dataset: str,
        split: str,
        schema: FeatureSchema,
        bad_shards: str = "error",
    ) -> None:
        _check_choice("bad_shards", bad_shards, BAD_SHARD_POLICIES)
        self.dataset = dataset
        self.split = split
        self.schema = schema
        self.bad_shards = bad_shards
        self.fs, root = filesystem(dataset)
        self.remote = is_remote(dataset)
        self.directory = join(root, split)
        self.url = join(dataset, split)
        self.skipped_shards: list[SkippedShard] = []
        self.empty_shards: list[str] = []
        self._footers: dict[str, pq.FileMetaData] = {}

        shards = self._list_shards()
        if not shards:
            raise DataError(
                f"no Parquet shards in split {split!r} of dataset {dataset!r} "
                f"(looked for {self.url}/*.parquet); check the path or convert "
                "the data (kd-dagfm convert ...)"
            )
        self.shards = shards
        self.units: list[RowGroupUnit] = []
        for shard, footer in zip(shards, self._read_footers(shards)):
            if isinstance(footer, SkippedShard):
                self._skip_shard(footer)
                continue
            self._footers[shard] = footer
            if footer.num_rows == 0:
                self.empty_shards.append(shard)
                logger.info("shard %s has no rows; leaving it out", shard)
                continue
            for index in range(footer.num_row_groups):
                rows = footer.row_group(index).num_rows
                if rows:
                    self.units.append(RowGroupUnit(shard, index, rows))
        self.num_rows = sum(u.num_rows for u in self.units)
        if self.num_rows == 0:
            detail = "".join(
                f"; {s.shard}: {s.reason}" for s in self.skipped_shards[:3]
            )
            raise DataError(
                f"split {split!r} of dataset {dataset!r} has no rows: "
                f"{len(shards)} shard(s), {len(self.empty_shards)} empty, "
                f"{len(self.skipped_shards)} skipped as unreadable or mismatched"
                f"{detail}. An empty split cannot be trained or evaluated on"
            )

    def _list_shards(self) -> list[str]:
        try:
            self.fs.invalidate_cache(self.directory)
            entries = self.fs.ls(self.directory, detail=True)
        except FileNotFoundError:
            return []
        except Exception as e:
            if transport_cause(e) is None:
                raise
            raise storage_error(self.url, "list", e) from None
        names = []
        for entry in entries:
            name = entry["name"]
            base = posixpath.basename(name)
            if (
                entry.get("type") == "file"
                and base.endswith(".parquet")
                and not base.startswith((".", "_"))
            ):
                names.append(name)
        return sorted(names)

    def _read_footers(self, shards: list[str]) -> list[pq.FileMetaData | SkippedShard]:
        if not self.remote or len(shards) == 1:
            return [self._read_footer(s) for s in shards]
        with concurrent.futures.ThreadPoolExecutor(
            max_workers=min(_FOOTER_THREADS, len(shards)),
            thread_name_prefix="parquet-footer",
        ) as pool:
            return list(pool.map(self._read_footer, shards))

    def _read_footer(self, shard: str) -> pq.FileMetaData | SkippedShard:
        """Read the footer, or describe why the shard is unusable."""
        try:
            with self._open(shard) as f:
                parquet_file = pq.ParquetFile(f)
                metadata = parquet_file.metadata
                arrow_schema = parquet_file.schema_arrow
        except FileNotFoundError:
            raise DataError(
                f"shard {shard} disappeared while listing split {self.split!r}; "
                "another process is changing the dataset: wait for it to finish"
            ) from None
        except Exception as e:
            if transport_cause(e) is not None:
                raise storage_error(self._url(shard), "read", e) from None
            if not isinstance(e, (pa.ArrowException, OSError)):
                raise
            return SkippedShard(
                shard,
                f"shard {shard} is not a readable Parquet file ({_one_line(e)}); it "
                "may be truncated or corrupt",
            )
        try:
            check_shard_schema(arrow_schema, self.schema, shard)
        except DataError as e:
            return SkippedShard(shard, str(e))
        return metadata

    def _skip_shard(self, skipped: SkippedShard) -> None:
        if self.bad_shards == "error":
            raise DataError(
                f"{skipped.reason}. Re-copy or re-convert the shard, remove it from "
                "the split, or set bad_shards=skip to leave such shards out"
            )
        self.skipped_shards.append(skipped)
        logger.warning(
            "leaving out shard %s of split %s (%d skipped so far): %s",
            skipped.shard,
            self.split,
            len(self.skipped_shards),
            skipped.reason,
        )

    def _open(self, shard: str) -> Any:
        """Open ``shard`` for reading: with pyarrow for local paths, which
        reads without holding the GIL, else with fsspec."""
        if not self.remote:
            return pa.OSFile(shard, "r")
        # No fsspec read-ahead: the reader visits row groups out of file
        # order, and pyarrow's pre-buffering already merges the column chunks
        # of a row group into a few large range requests.
        # NOTE: measured only against a loopback moto server, where these
        # per-row-group requests run at a third of a sequential scan.
        return self.fs.open(shard, "rb", cache_type="none")

    def _url(self, shard: str) -> str:
        return join(self.url, posixpath.basename(shard))

    def epoch_units(self, epoch: int, seed: int, shuffle: bool) -> list[RowGroupUnit]:
        """Return all row groups in the order of ``epoch``."""
        by_shard: dict[str, list[RowGroupUnit]] = collections.defaultdict(list)
        for unit in self.units:
            by_shard[unit.shard].append(unit)
        shards = list(by_shard)
        if not shuffle:
            return [u for s in shards for u in by_shard[s]]
        order: list[RowGroupUnit] = []
        for index in np.random.default_rng([seed, epoch]).permutation(len(shards)):
            units = by_shard[shards[index]]
            key = _name_key(units[0].shard_name)
            rng = np.random.default_rng([seed, epoch, key])
            order.extend(units[i] for i in rng.permutation(len(units)))
        return order

    def rank_pieces(
        self, epoch: int, seed: int, shuffle: bool, rank: int, world_size: int
    ) -> list[RankPiece]:
        """Rank ``rank``'s contiguous range of the epoch order, as pieces."""
        begin = rank * self.num_rows // world_size
        end = (rank + 1) * self.num_rows // world_size
        pieces: list[RankPiece] = []
        position = 0
        for unit in self.epoch_units(epoch, seed, shuffle):
            low, high = max(begin, position), min(end, position + unit.num_rows)
            if low < high:
                pieces.append(RankPiece(unit, low - position, high - position))
            position += unit.num_rows
            if position >= end:
                break
        return pieces

    def batches_per_epoch(self, world_size: int, batch_size: int) -> int:
        """Full batches every rank yields per epoch under the drop policy."""
        return (self.num_rows // world_size) // batch_size

    def open_shard(self, shard: str) -> tuple[IO[bytes], pq.ParquetFile]:
        """Open a shard for reading row groups; the footer read at listing is reused."""
        try:
            handle = self._open(shard)
        except FileNotFoundError:
            raise DataError(
                f"shard {shard} of split {self.split!r} was deleted after the split "
                "was listed; restore it or restart the run"
            ) from None
        except Exception as e:
            if transport_cause(e) is None:
                raise
            raise storage_error(self._url(shard), "open", e) from None
        return handle, pq.ParquetFile(
            handle, metadata=self._footers[shard], pre_buffer=self.remote
        )

    def read_unit(self, unit: RowGroupUnit) -> pa.Table | None:
        """Read one row group through a handle of its own (safe in any thread)."""
        handle, parquet_file = self.open_shard(unit.shard)
        try:
            return self.read_row_group(parquet_file, unit)
        finally:
            handle.close()

    def read_row_group(
        self, parquet_file: pq.ParquetFile, unit: RowGroupUnit
    ) -> pa.Table | None:
        """Read the schema's columns of one row group.

        Returns None for a row group that fails to decode when
        ``bad_shards="skip"`` (logged by the caller).

        Raises:
            DataError: a row group that fails to decode (``bad_shards="error"``).
            StorageError: the storage failed after retries.
        """
        try:
            table = parquet_file.read_row_group(
                unit.row_group, columns=list(self.schema.columns)
            )
        except Exception as e:
            if transport_cause(e) is not None:
                raise storage_error(self._url(unit.shard), "read", e) from None
            if not isinstance(e, (pa.ArrowException, OSError)):
                raise
            reason = f"failed to decode ({_one_line(e)})"
        else:
            if table.num_rows == unit.num_rows:
                return table
            reason = (
                f"decoded {table.num_rows} rows but its footer declares {unit.num_rows}"
            )
        if self.bad_shards == "error":
            raise DataError(
                f"row group {unit.row_group} of shard {unit.shard} {reason}; the "
                "shard is corrupt: re-copy or re-convert it, or set bad_shards=skip "
                "to skip such row groups"
            )
        logger.warning(
            "skipping row group %d of shard %s: %s", unit.row_group, unit.shard, reason
        )
        return None

    def attach_columns(
        self, unit: RowGroupUnit, arrays: RowGroupArrays
    ) -> RowGroupArrays:
        """Add per-row columns stored outside the shards; none in this class.

        A subclass returns ``arrays`` with extra columns in the row group's
        file order, for example cached teacher logits
        (:class:`kd_dagfm.teacher_cache.CachedLogitsSplit`), so they follow
        every row through shuffling, skipping and resume.
        """
        return arrays

    def row_order(
        self, unit: RowGroupUnit, epoch: int, seed: int, shuffle: bool, block_rows: int
    ) -> np.ndarray:
        """(N,) int64 row indices of ``unit`` in the order of ``epoch``."""
        rows = unit.num_rows
        if not shuffle or rows == 1 or block_rows >= rows:
            return np.arange(rows, dtype=np.int64)
        rng = np.random.default_rng(
            [seed, epoch, _name_key(unit.shard_name), unit.row_group]
        )
        if block_rows == 1:
            return rng.permutation(rows).astype(np.int64, copy=False)
        num_blocks = -(-rows // block_rows)
        starts = rng.permutation(num_blocks).astype(np.int64) * block_rows
        order = (starts[:, None] + np.arange(block_rows, dtype=np.int64)).ravel()
        if rows % block_rows:
            order = order[order < rows]  # the last block is shorter
        return order


class SplitReader:
    """Iterates the batches of one rank, with an exact resume cursor.

    ``for batch in reader.epoch(): ...`` yields the batches of the current
    epoch from the cursor on; :meth:`state` is the cursor after the last
    batch handed out, ready for a checkpoint; :meth:`load_state` restores it.

    Args:
        split: the split to read.
        batch_size: rows per batch on this rank.
        rank, world_size: this process's place among the readers.
        seed: seed of the shard, row group and row order.
        shuffle: shuffle (training); off for evaluation.
        remainder: ``drop`` or ``keep`` (see the module docstring).
        bad_rows: ``error`` (stop at the first row group with invalid rows) or
            ``skip`` (drop and count them; see :func:`find_invalid_rows`).
        prefetch_batches: batches a background thread prepares ahead; 0
            reads in the calling thread.
        shuffle_block_rows: rows that stay together when a row group is
            shuffled; 1 permutes single rows.
        readahead_row_groups: row groups read by I/O threads ahead of the one
            being converted, so network time overlaps decoding; None picks 2
            for object stores and 0 (no I/O threads) for local disk.
    """

    def __init__(
        self,
        split: ParquetSplit,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        remainder: str = "drop",
        bad_rows: str = "error",
        prefetch_batches: int = 4,
        shuffle_block_rows: int = 1,
        readahead_row_groups: int | None = None,
    ) -> None:
        check_reader_layout(rank, world_size, batch_size, remainder)
        if shuffle_block_rows < 1:
            raise ConfigError(
                f"invalid shuffle_block_rows {shuffle_block_rows}: expected >= 1"
            )
        if prefetch_batches < 0:
            raise ConfigError(
                f"invalid prefetch_batches {prefetch_batches}: expected >= 0"
            )
        _check_choice("bad_rows", bad_rows, BAD_ROW_POLICIES)
        self.split = split
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.shuffle_block_rows = shuffle_block_rows
        self.remainder = remainder
        self.bad_rows = bad_rows
        self.prefetch_batches = prefetch_batches
        if readahead_row_groups is None:
            readahead_row_groups = _REMOTE_READAHEAD if split.remote else 0
        if readahead_row_groups < 0:
            raise ConfigError(
                f"invalid readahead_row_groups {readahead_row_groups}: expected >= 0"
            )
        self.readahead_row_groups = readahead_row_groups
        self.rows_skipped = 0
        self.row_groups_skipped = 0
        self.rows_repeated = 0
        self._state = self._start_of(0, seed)

    def state(self) -> ReaderState:
        return self._state

    def load_state(self, state: ReaderState) -> None:
        """Continue from ``state``, a cursor saved by a reader of this split.

        A cursor made with another world size, batch size or shuffle
        setting does not map to this reader's ranges: the reader then starts
        the epoch after the interrupted one and logs a warning.

        Raises:
            DataError: on a cursor with another seed or one that points at a
                row group the split no longer has there.
        """
        if state.seed != self._state.seed:
            raise DataError(
                f"reader cursor was saved with seed {state.seed}, this run uses seed "
                f"{self._state.seed}; resume with the same seed"
            )
        if state.at_epoch_start:
            self._state = self._start_of(state.epoch, state.seed)
            return
        layout = self._start_of(state.epoch, state.seed)
        saved = (
            state.world_size,
            state.rank,
            state.batch_size,
            state.shuffle,
            state.shuffle_block_rows,
        )
        current = (
            layout.world_size,
            layout.rank,
            layout.batch_size,
            layout.shuffle,
            layout.shuffle_block_rows,
        )
        if saved != current:
            logger.warning(
                "reader cursor was saved with (world_size, rank, batch_size, shuffle, "
                "shuffle_block_rows) = %s, this reader has %s: the rest of epoch %d "
                "is skipped and reading continues at the start of epoch %d",
                saved,
                current,
                state.epoch,
                state.epoch + 1,
            )
            self._state = self._start_of(state.epoch + 1, state.seed)
            return
        pieces = self._pieces(state.epoch)
        if pieces and state.shard:
            unit = pieces[state.unit % len(pieces)].unit
            if (unit.shard_name, unit.row_group) != (state.shard, state.row_group):
                raise DataError(
                    f"reader cursor points at {state.shard} row group "
                    f"{state.row_group}, but rank {self.rank} of split "
                    f"{self.split.split!r} now has {unit.shard_name} row group "
                    f"{unit.row_group} there: the shards changed since the "
                    "checkpoint. Restore the dataset it was made with, or start "
                    "the phase again"
                )
        self._state = state

    def batches_in_epoch(self, epoch: int | None = None) -> int | None:
        """Batches of an epoch under ``drop``; None under ``keep``."""
        if self.remainder != "drop":
            return None
        return self.split.batches_per_epoch(self.world_size, self.batch_size)

    def epoch(self) -> Iterator[Batch]:
        """Yield the rest of the current epoch; the cursor then moves to the next."""
        start = self._state
        producer = self._produce(start)
        if self.prefetch_batches > 0:
            producer = _prefetch(producer, self.prefetch_batches)
        for batch, state in producer:
            self._state = state
            yield batch
        self._state = self._start_of(start.epoch + 1, start.seed)

    def _start_of(self, epoch: int, seed: int) -> ReaderState:
        return ReaderState(
            epoch=epoch,
            seed=seed,
            world_size=self.world_size,
            rank=self.rank,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            shuffle_block_rows=self.shuffle_block_rows,
        )

    def _pieces(self, epoch: int) -> list[RankPiece]:
        return self.split.rank_pieces(
            epoch, self._state.seed, self.shuffle, self.rank, self.world_size
        )

    def _produce(self, start: ReaderState) -> Iterator[tuple[Batch, ReaderState]]:
        pieces = self._pieces(start.epoch)
        limit = self.batches_in_epoch(start.epoch)
        if limit is not None:
            check_full_batches(
                self.split.split,
                self.split.num_rows,
                self.world_size,
                self.batch_size,
                limit,
            )
        tables = _RowGroupSource(self.split, pieces, self.readahead_row_groups)
        assembler = BatchAssembler(self.split.schema)
        batches, unit_index, offset = start.batches, start.unit, start.row
        # Rows yielded since the start of a pass over the rank's pieces. A
        # whole pass without rows means that no row of the range is valid.
        pass_rows: int | None = 0 if unit_index == 0 and offset == 0 else None
        try:
            while limit is None or batches < limit:
                if unit_index >= len(pieces) and limit is None:
                    break
                if unit_index % len(pieces) == 0 and offset == 0 and unit_index > 0:
                    self._start_over(start.epoch, unit_index, pass_rows)
                    pass_rows = 0
                piece = pieces[unit_index % len(pieces)]
                table = tables.get(unit_index)
                positions, arrays, valid = self._load(piece, start.epoch, table)
                while offset < len(positions) and (limit is None or batches < limit):
                    need = self.batch_size - assembler.num_rows
                    rows, consumed = _take_valid(positions, offset, need, valid)
                    if arrays is not None:
                        assembler.add(arrays, rows)
                    offset += consumed
                    if pass_rows is not None:
                        pass_rows += len(rows)
                    if unit_index >= len(pieces):
                        self.rows_repeated += len(rows)
                    if assembler.num_rows == self.batch_size:
                        batches += 1
                        at_end = offset >= len(positions)
                        yield (
                            assembler.build(),
                            self._cursor(
                                start,
                                pieces,
                                unit_index + 1 if at_end else unit_index,
                                0 if at_end else offset,
                                batches,
                            ),
                        )
                unit_index, offset = unit_index + 1, 0
            if assembler.num_rows and self.remainder == "keep":
                batches += 1
                yield (
                    assembler.build(),
                    self._cursor(start, pieces, len(pieces), 0, batches),
                )
        finally:
            tables.close()

    def _start_over(self, epoch: int, unit_index: int, pass_rows: int | None) -> None:
        if pass_rows == 0:
            raise DataError(
                f"rank {self.rank} found no valid row in its part of split "
                f"{self.split.split!r} in epoch {epoch} ({self.rows_skipped} rows "
                f"and {self.row_groups_skipped} row groups skipped); fix the data "
                "or set bad_rows=error to see the first problem"
            )
        logger.warning(
            "rank %d ran short of valid rows in epoch %d of split %s (%d rows and "
            "%d row groups skipped): starting its range over (pass %d) so every "
            "rank yields %s batches",
            self.rank,
            epoch,
            self.split.split,
            self.rows_skipped,
            self.row_groups_skipped,
            unit_index // max(1, len(self._pieces(epoch))) + 1,
            self.batches_in_epoch(epoch),
        )

    def _load(
        self, piece: RankPiece, epoch: int, table: pa.Table | None
    ) -> tuple[np.ndarray, RowGroupArrays | None, np.ndarray | None]:
        """(row positions of the piece in epoch order, the row group's arrays,
        a (N,) bool mask of valid rows or None when all are valid).

        ``table`` is the row group as read, or None when it failed to decode
        under ``bad_shards="skip"``.
        """
        unit = piece.unit
        order = self.split.row_order(
            unit, epoch, self._state.seed, self.shuffle, self.shuffle_block_rows
        )
        positions = order[piece.begin : piece.end]
        if table is None:
            self.row_groups_skipped += 1
            return positions, None, np.zeros(unit.num_rows, dtype=bool)
        source = f"{unit.shard} row group {unit.row_group}"
        invalid = find_invalid_rows(table, self.split.schema, source, self.bad_rows)
        arrays = self.split.attach_columns(
            unit, RowGroupArrays.from_table(table, self.split.schema)
        )
        if invalid is None:
            return positions, arrays, None
        skipped = int(invalid[positions].sum())
        self.rows_skipped += skipped
        logger.warning(
            "skipped %d invalid rows of %s (%d skipped so far)",
            skipped,
            source,
            self.rows_skipped,
        )
        return positions, arrays, ~invalid

    def _cursor(
        self,
        start: ReaderState,
        pieces: list[RankPiece],
        unit_index: int,
        row: int,
        batches: int,
    ) -> ReaderState:
        shard, row_group = "", -1
        if unit_index < len(pieces) or (self.remainder == "drop" and pieces):
            unit = pieces[unit_index % len(pieces)].unit
            shard, row_group = unit.shard_name, unit.row_group
        return ReaderState(
            epoch=start.epoch,
            seed=start.seed,
            unit=unit_index,
            row=row,
            batches=batches,
            world_size=self.world_size,
            rank=self.rank,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            shuffle_block_rows=self.shuffle_block_rows,
            shard=shard,
            row_group=row_group,
        )


def _take_valid(
    positions: np.ndarray, offset: int, need: int, valid: np.ndarray | None
) -> tuple[np.ndarray, int]:
    """Up to ``need`` valid rows from ``positions[offset:]``.

    Returns:
        (row indices, positions consumed, valid or not).
    """
    if valid is None:
        rows = positions[offset : offset + need]
        return rows, len(rows)
    window = positions[offset:]
    keep = valid[window]
    taken = np.cumsum(keep)
    if not len(taken) or taken[-1] <= need:
        return window[keep], len(window)
    consumed = int(np.searchsorted(taken, need)) + 1
    return window[:consumed][keep[:consumed]], consumed


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _name_key(name: str) -> int:
    """Hash a shard name to a stable 32-bit key for seeding."""
    return zlib.crc32(name.encode())


def check_reader_layout(
    rank: int, world_size: int, batch_size: int, remainder: str
) -> None:
    """Raise ConfigError for a rank outside the world, a batch size below 1
    or an unknown remainder policy; shared by the streaming and in-memory readers."""
    if not 0 <= rank < world_size:
        raise ConfigError(
            f"rank {rank} is outside world size {world_size}: expected "
            f"0 <= rank < {world_size}"
        )
    if batch_size < 1:
        raise ConfigError(f"invalid batch_size {batch_size}: expected >= 1")
    _check_choice("remainder", remainder, REMAINDER_POLICIES)


def check_full_batches(
    split: str, num_rows: int, world_size: int, batch_size: int, batches: int
) -> None:
    """Raise DataError when the drop policy leaves no rank a full batch."""
    if batches == 0:
        raise DataError(
            f"split {split!r} has {num_rows} rows: with {world_size} rank(s) of "
            f"{batch_size} rows per batch no rank gets a full batch; lower the "
            "batch size or use more data"
        )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"invalid {name} {value!r}: expected one of {', '.join(choices)}"
        )


class _OpenShards:
    """The shards a reader has open, newest last, at most ``_OPEN_SHARDS``."""

    def __init__(self, split: ParquetSplit) -> None:
        self.split = split
        self._open: collections.OrderedDict[str, tuple[IO[bytes], pq.ParquetFile]] = (
            collections.OrderedDict()
        )

    def get(self, shard: str) -> pq.ParquetFile:
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard][1]
        while len(self._open) >= _OPEN_SHARDS:
            _, (handle, _) = self._open.popitem(last=False)
            handle.close()
        handle, parquet_file = self.split.open_shard(shard)
        self._open[shard] = (handle, parquet_file)
        return parquet_file

    def close(self) -> None:
        while self._open:
            _, (handle, _) = self._open.popitem()
            handle.close()


class _RowGroupSource:
    """The row groups of a rank's pieces, in order, optionally read ahead.

    With ``readahead`` > 0, I/O threads read the next ``readahead`` row
    groups of the first pass over ``pieces`` while the caller converts the
    current one; each read uses its own file handle. Errors surface from
    :meth:`get` in order, as without read-ahead.
    """

    def __init__(
        self, split: ParquetSplit, pieces: list[RankPiece], readahead: int
    ) -> None:
        self.split = split
        self.pieces = pieces
        self.readahead = readahead
        self._files = _OpenShards(split)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: dict[int, concurrent.futures.Future[pa.Table | None]] = {}
        if readahead:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=readahead, thread_name_prefix="parquet-readahead"
            )

    def get(self, index: int) -> pa.Table | None:
        """The row group of piece ``index`` (past the end: wrapped around)."""
        unit = self.pieces[index % len(self.pieces)].unit
        if self._pool is None:
            return self.split.read_row_group(self._files.get(unit.shard), unit)
        for ahead in range(index, min(index + self.readahead + 1, len(self.pieces))):
            if ahead not in self._pending:
                self._pending[ahead] = self._pool.submit(
                    self.split.read_unit, self.pieces[ahead].unit
                )
        future = self._pending.pop(index, None)
        if future is None:  # a repeated pass: read in this thread
            return self.split.read_unit(unit)
        return future.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._files.close()


_DONE = object()


def _prefetch(
    source: Iterator[tuple[Batch, ReaderState]], depth: int
) -> Iterator[tuple[Batch, ReaderState]]:
    """Run ``source`` in a thread, ``depth`` items ahead; re-raise its errors here.

    When the consumer stops early, the thread closes ``source`` (which
    closes its files) before it exits.
    """
    items: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in source:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # handed to the consumer, which re-raises
            put(e)
        finally:
            source.close()  # type: ignore[attr-defined]

    thread = threading.Thread(target=run, name="parquet-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
