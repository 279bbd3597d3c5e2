"""Stream one split of a Parquet dataset as equal-sized batches per rank.

The unit of work is a row group. For epoch e the reader orders the shards by
a permutation seeded with (seed, e), lists their row groups in that order and
deals them round-robin to the ranks, so ranks read disjoint rows. Rows of a
row group are permuted with a generator seeded by (seed, e, shard, row group).

Remainder policy for training (``remainder="drop"``): every rank yields
``min over ranks of floor(rows on rank / batch_size)`` full batches, which
TorchRec's row-wise sharding on gloo requires; the rows left over differ
from epoch to epoch because of the shuffle. ``"keep"`` also yields the last
partial batch and is for single-process runs. Evaluation yields every row.

The cursor (:class:`ReaderState`) points at the next unseen row; restoring it
repeats nothing and skips nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kd_dagfm.data.batch import Batch, table_to_batch
from kd_dagfm.data.validation import check_shard_schema, validate_table
from kd_dagfm.errors import DataError, SchemaError
from kd_dagfm.schema import SCHEMA_FILE, FeatureSchema
from kd_dagfm.storage import filesystem, join

logger = logging.getLogger(__name__)


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
    return FeatureSchema.from_json(text, source=f"{dataset}/{SCHEMA_FILE}")


@dataclasses.dataclass(frozen=True)
class RowGroupUnit:
    """One row group of one shard."""

    shard: str
    row_group: int
    num_rows: int


@dataclasses.dataclass(frozen=True)
class ReaderState:
    """Position of the next unseen training example of one rank.

    Attributes:
        epoch: epoch number, from 0.
        seed: seed of the shard order and row permutations.
        unit: index into this rank's row-group list for ``epoch``.
        row: offset into the (permuted, validated) rows of that row group.
        batches: batches already yielded in ``epoch``.
        world_size: the world size the cursor was made with.
        shard, row_group: where ``unit`` pointed, checked on restore.
    """

    epoch: int = 0
    seed: int = 0
    unit: int = 0
    row: int = 0
    batches: int = 0
    world_size: int = 1
    shard: str = ""
    row_group: int = -1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReaderState:
        return cls(
            **{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        )


class ParquetSplit:
    """The shards and row groups of one split, listed from Parquet footers.

    Args:
        dataset: dataset directory or URL (holds ``schema.json``).
        split: ``train``, ``valid`` or ``test``.
        schema: expected features; each shard is checked against it.
    """

    def __init__(self, dataset: str, split: str, schema: FeatureSchema) -> None:
        self.dataset = dataset
        self.split = split
        self.schema = schema
        self.fs, root = filesystem(dataset)
        self.directory = join(root, split)
        try:
            shards = sorted(
                p
                for p in self.fs.ls(self.directory, detail=False)
                if p.endswith(".parquet")
            )
        except FileNotFoundError:
            shards = []
        if not shards:
            raise DataError(
                f"no Parquet shards in split {split!r} of dataset {dataset!r} "
                f"(looked for {self.directory}/*.parquet); check the path or convert the data"
            )
        self.shards = shards
        self.units: list[RowGroupUnit] = []
        for shard in shards:
            metadata = self._footer(shard)
            for index in range(metadata.num_row_groups):
                rows = metadata.row_group(index).num_rows
                if rows:
                    self.units.append(RowGroupUnit(shard, index, rows))
        self.num_rows = sum(u.num_rows for u in self.units)
        if self.num_rows == 0:
            raise DataError(
                f"split {split!r} of dataset {dataset!r} has {len(shards)} shard(s) "
                "but no rows; an empty split cannot be trained or evaluated on"
            )

    def _footer(self, shard: str) -> pq.FileMetaData:
        try:
            with self.fs.open(shard, "rb") as f:
                parquet_file = pq.ParquetFile(f)
                check_shard_schema(parquet_file.schema_arrow, self.schema, shard)
                return parquet_file.metadata
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(
                f"shard {shard} is not a readable Parquet file ({e}); it may be "
                "truncated or corrupt: re-copy or re-convert it, or remove it from the split"
            ) from None

    def epoch_units(self, epoch: int, seed: int, shuffle: bool) -> list[RowGroupUnit]:
        """All row groups in the order of ``epoch``."""
        order = list(range(len(self.shards)))
        if shuffle:
            order = (
                np.random.default_rng([seed, epoch])
                .permutation(len(self.shards))
                .tolist()
            )
        rank = {self.shards[i]: position for position, i in enumerate(order)}
        return sorted(self.units, key=lambda u: (rank[u.shard], u.row_group))

    def rank_units(
        self, epoch: int, seed: int, shuffle: bool, rank: int, world_size: int
    ) -> list[RowGroupUnit]:
        return self.epoch_units(epoch, seed, shuffle)[rank::world_size]

    def batches_per_epoch(
        self, epoch: int, seed: int, shuffle: bool, world_size: int, batch_size: int
    ) -> int:
        """Full batches every rank yields in ``epoch`` under the drop policy
        (before rows that validation skips)."""
        units = self.epoch_units(epoch, seed, shuffle)
        rows = [
            sum(u.num_rows for u in units[r::world_size]) for r in range(world_size)
        ]
        return min(rows) // batch_size

    def read_unit(self, unit: RowGroupUnit, bad_rows: str) -> tuple[pa.Table, int]:
        """Read and validate one row group; returns (rows, rows skipped)."""
        try:
            with self.fs.open(unit.shard, "rb") as f:
                table = pq.ParquetFile(f).read_row_group(
                    unit.row_group, columns=list(self.schema.columns)
                )
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(
                f"failed to read row group {unit.row_group} of shard {unit.shard} ({e}); "
                "the shard may be corrupt: re-copy or re-convert it"
            ) from None
        return validate_table(
            table, self.schema, f"{unit.shard} row group {unit.row_group}", bad_rows
        )


class SplitReader:
    """Iterates batches of one rank, with an exact resume cursor.

    ``for batch in reader.epoch(): ...`` yields the batches of the current
    epoch from the cursor on; :meth:`state` is the cursor after the last
    batch handed out, ready for a checkpoint; :meth:`load_state` restores it.

    Args:
        split: the split to read.
        batch_size: rows per batch on this rank.
        rank, world_size: this process's place among the readers.
        seed: seed of shard order and row permutations.
        shuffle: permute shards and rows (training); off for evaluation.
        remainder: ``drop`` or ``keep`` (see module docstring).
        bad_rows: ``error`` or ``skip`` (count and drop invalid rows).
        prefetch_batches: batches a background thread prepares ahead; 0 reads
            in the calling thread.
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
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.split = split
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.remainder = remainder
        self.bad_rows = bad_rows
        self.prefetch_batches = prefetch_batches
        self.rows_skipped = 0
        self._state = ReaderState(seed=seed, world_size=world_size)

    def state(self) -> ReaderState:
        return self._state

    def load_state(self, state: ReaderState) -> None:
        if state.seed != self._state.seed:
            raise DataError(
                f"reader cursor was saved with seed {state.seed}, this run uses seed "
                f"{self._state.seed}; resume with the same seed"
            )
        if state.world_size != self.world_size:
            # The row-group deal depends on the world size, so the old cursor
            # does not map to this rank: start the interrupted epoch's
            # successor instead of repeating or skipping unknown rows.
            logger.warning(
                "reader cursor was saved with world size %d, now %d: continuing "
                "at the start of epoch %d",
                state.world_size,
                self.world_size,
                state.epoch + 1,
            )
            state = ReaderState(
                epoch=state.epoch + 1, seed=state.seed, world_size=self.world_size
            )
        elif state.unit > 0 or state.row > 0:
            units = self._units(state.epoch)
            if state.unit < len(units):
                unit = units[state.unit]
                if (unit.shard, unit.row_group) != (state.shard, state.row_group):
                    raise DataError(
                        f"reader cursor points at {state.shard} row group {state.row_group} "
                        f"but the dataset now has {unit.shard} row group {unit.row_group} "
                        "there; the shards changed since the checkpoint"
                    )
        self._state = state

    def batches_in_epoch(self, epoch: int | None = None) -> int | None:
        """Batches of a training epoch under ``drop``; None when not fixed."""
        if self.remainder != "drop":
            return None
        epoch = self._state.epoch if epoch is None else epoch
        return self.split.batches_per_epoch(
            epoch, self._state.seed, self.shuffle, self.world_size, self.batch_size
        )

    def _units(self, epoch: int) -> list[RowGroupUnit]:
        return self.split.rank_units(
            epoch, self._state.seed, self.shuffle, self.rank, self.world_size
        )

    def epoch(self) -> Iterator[Batch]:
        """Yield the rest of the current epoch; the cursor then moves to the next."""
        start = self._state
        producer = self._produce(start)
        if self.prefetch_batches > 0:
            producer = _prefetch(producer, self.prefetch_batches)
        for batch, state in producer:
            self._state = state
            yield batch
        self._state = ReaderState(
            epoch=start.epoch + 1, seed=start.seed, world_size=self.world_size
        )

    def _produce(self, start: ReaderState) -> Iterator[tuple[Batch, ReaderState]]:
        units = self._units(start.epoch)
        limit = self.batches_in_epoch(start.epoch)
        batches = start.batches
        pending: list[pa.Table] = []
        pending_rows = 0
        unit_index, row = start.unit, start.row
        while unit_index < len(units) and (limit is None or batches < limit):
            unit = units[unit_index]
            table = self._read_permuted(unit, start.epoch)
            while row < table.num_rows and (limit is None or batches < limit):
                take = min(self.batch_size - pending_rows, table.num_rows - row)
                pending.append(table.slice(row, take))
                pending_rows += take
                row += take
                if pending_rows == self.batch_size:
                    batches += 1
                    next_unit, next_row = (
                        (unit_index + 1, 0)
                        if row >= table.num_rows
                        else (unit_index, row)
                    )
                    yield (
                        self._batch(pending),
                        self._cursor(start, units, next_unit, next_row, batches),
                    )
                    pending, pending_rows = [], 0
            unit_index, row = unit_index + 1, 0
        if pending_rows and self.remainder == "keep":
            batches += 1
            yield (
                self._batch(pending),
                self._cursor(start, units, len(units), 0, batches),
            )

    def _read_permuted(self, unit: RowGroupUnit, epoch: int) -> pa.Table:
        table, skipped = self.split.read_unit(unit, self.bad_rows)
        if skipped:
            self.rows_skipped += skipped
            logger.warning(
                "skipped %d invalid rows in %s row group %d (%d skipped so far)",
                skipped,
                unit.shard,
                unit.row_group,
                self.rows_skipped,
            )
        if self.shuffle and table.num_rows > 1:
            shard_index = self.split.shards.index(unit.shard)
            rng = np.random.default_rng(
                [self._state.seed, epoch, shard_index, unit.row_group]
            )
            table = table.take(rng.permutation(table.num_rows))
        return table

    def _batch(self, parts: list[pa.Table]) -> Batch:
        table = parts[0] if len(parts) == 1 else pa.concat_tables(parts)
        return table_to_batch(table, self.split.schema)

    def _cursor(
        self,
        start: ReaderState,
        units: list[RowGroupUnit],
        unit: int,
        row: int,
        batches: int,
    ) -> ReaderState:
        shard, row_group = ("", -1)
        if unit < len(units):
            shard, row_group = units[unit].shard, units[unit].row_group
        return ReaderState(
            epoch=start.epoch,
            seed=start.seed,
            unit=unit,
            row=row,
            batches=batches,
            world_size=self.world_size,
            shard=shard,
            row_group=row_group,
        )


_DONE = object()


def _prefetch(
    source: Iterator[tuple[Batch, ReaderState]], depth: int
) -> Iterator[tuple[Batch, ReaderState]]:
    """Run ``source`` in a thread, ``depth`` items ahead; re-raise its errors here."""
    items: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def run() -> None:
        try:
            for item in source:
                while not stop.is_set():
                    try:
                        items.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put(_DONE)
        except BaseException as e:  # handed to the consumer, which re-raises
            items.put(e)

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
