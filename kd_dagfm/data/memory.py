"""Serve a split from memory: decode it once, then gather batches from tensors.

For datasets that fit in RAM (MovieLens, samples, most validation splits)
re-reading Parquet every epoch costs more than the model's step. Like
RecBole, which keeps a dataset as tensors, :class:`InMemorySplit` decodes a
split once through the streaming reader (same validation, bad-row policy
and attached teacher logits). Each epoch :class:`InMemorySplitReader`
copies the rank's rows into epoch order with one gather per column, and
every batch is then a slice of that copy.

Order: for epoch e every row of the split is permuted with a generator
seeded by (seed, e), and rank r of W takes positions r, r + W, r + 2W, ...
of that order. Under ``remainder="drop"`` every rank yields
``floor(floor(N / W) / batch_size)`` full batches, as TorchRec's row-wise
sharding on gloo requires; ``"keep"`` also yields each rank's last partial
batch. The streaming reader shuffles within row groups instead, so the two
readers visit rows in different orders.

The cursor is a :class:`~kd_dagfm.data.reader.ReaderState` whose
``batches`` counts the batches handed out in the epoch. It carries
``shuffle_block_rows=0``, a value the streaming reader never uses, so
each reader treats the other's cursor as one of another layout: it skips
the rest of the interrupted epoch with a warning instead of misreading it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from kd_dagfm.data.batch import Batch
from kd_dagfm.data.reader import (
    ParquetSplit,
    ReaderState,
    SplitReader,
    check_full_batches,
    check_reader_layout,
)
from kd_dagfm.errors import DataError
from kd_dagfm.schema import FeatureKind, FeatureSchema

logger = logging.getLogger(__name__)

# shuffle_block_rows of an in-memory cursor (see the module docstring).
IN_MEMORY_LAYOUT = 0
# Rows per batch while decoding a split into memory.
DECODE_BATCH_ROWS = 65_536


@dataclasses.dataclass(frozen=True)
class InMemorySplit:
    """All rows of one split as tensors, in the split's file order.

    Attributes:
        schema: the features; fixes the key order of the KJTs.
        name: the split's name (train, valid or test), for messages.
        num_rows: N.
        single: (F_single X N) int64 ids of the ``sparse`` features, in
            schema order. Each feature's ids are contiguous, so a batch's
            ids of one feature are one slice.
        lists: (values int64, offsets (N + 1,) int64) per ``sparse_list``
            feature, in schema order.
        dense: (N X num_dense) float32.
        labels: (N,) float32.
        teacher_logits: (N,) float32 cached teacher logits, or None.
        rows_skipped: invalid rows dropped while decoding (``bad_rows=skip``).
    """

    schema: FeatureSchema
    name: str
    num_rows: int
    single: torch.Tensor
    lists: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    dense: torch.Tensor
    labels: torch.Tensor
    teacher_logits: torch.Tensor | None
    rows_skipped: int = 0

    @classmethod
    def load(cls, split: ParquetSplit, bad_rows: str = "error") -> InMemorySplit:
        """Decode every row of ``split`` with the streaming reader, in file order."""
        reader = SplitReader(
            split,
            batch_size=DECODE_BATCH_ROWS,
            shuffle=False,
            remainder="keep",
            bad_rows=bad_rows,
            prefetch_batches=0,
        )
        schema = split.schema
        keys = [f.name for f in schema.sparse_features]
        ids: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
        lengths: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
        dense: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        logits: list[torch.Tensor | None] = []
        for batch in reader.epoch():
            jagged = batch.sparse_features.to_dict()
            for key in keys:
                ids[key].append(jagged[key].values().to(torch.int64))
                lengths[key].append(jagged[key].lengths().to(torch.int64))
            dense.append(batch.dense_features)
            labels.append(batch.labels)
            logits.append(batch.teacher_logits)
        if not labels:
            raise DataError(
                f"split {split.split!r} of dataset {split.dataset!r} has no valid "
                "rows to keep in memory"
            )

        single: list[torch.Tensor] = []
        lists: list[tuple[torch.Tensor, torch.Tensor]] = []
        for feature in schema.sparse_features:
            values = torch.cat(ids[feature.name])
            if feature.kind is FeatureKind.SPARSE_LIST:
                row_lengths = torch.cat(lengths[feature.name])
                offsets = torch.zeros(len(row_lengths) + 1, dtype=torch.int64)
                torch.cumsum(row_lengths, dim=0, out=offsets[1:])
                lists.append((values, offsets))
            else:
                single.append(values)
        num_rows = sum(len(x) for x in labels)
        teacher_logits = None
        if all(x is not None for x in logits):
            teacher_logits = torch.cat([x for x in logits if x is not None])
        return cls(
            schema=schema,
            name=split.split,
            num_rows=num_rows,
            single=(
                torch.stack(single)
                if single
                else torch.zeros(0, num_rows, dtype=torch.int64)
            ),
            lists=tuple(lists),
            dense=torch.cat(dense),
            labels=torch.cat(labels),
            teacher_logits=teacher_logits,
            rows_skipped=reader.rows_skipped,
        )

    @property
    def nbytes(self) -> int:
        tensors = [self.single, self.dense, self.labels]
        tensors += [t for pair in self.lists for t in pair]
        if self.teacher_logits is not None:
            tensors.append(self.teacher_logits)
        return sum(t.numel() * t.element_size() for t in tensors)

    def take(self, rows: torch.Tensor) -> InMemorySplit:
        """Return the split of rows ``rows`` ((N',) int64 indices), in that order.

        Each column is gathered in one pass, which costs far less than
        gathering the same rows batch by batch.
        """
        lists = []
        for ids, offsets in self.lists:
            starts = offsets.index_select(0, rows)
            row_lengths = offsets.index_select(0, rows + 1) - starts
            new_offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
            torch.cumsum(row_lengths, dim=0, out=new_offsets[1:])
            total = int(new_offsets[-1])
            # Position of each selected id in ``ids``: its row's start plus
            # its place within the row.
            shift = torch.repeat_interleave(
                starts - new_offsets[:-1], row_lengths, output_size=total
            )
            lists.append(
                (ids.index_select(0, shift + torch.arange(total)), new_offsets)
            )
        return dataclasses.replace(
            self,
            num_rows=len(rows),
            single=self.single.index_select(1, rows),
            lists=tuple(lists),
            dense=self.dense.index_select(0, rows),
            labels=self.labels.index_select(0, rows),
            teacher_logits=None
            if self.teacher_logits is None
            else self.teacher_logits.index_select(0, rows),
        )

    def batch(self, begin: int, end: int) -> Batch:
        """Slice the batch of rows ``begin .. end - 1`` (no gather)."""
        batch_size = end - begin
        single = self.single[:, begin:end]  # (F_single, B)
        list_index = single_index = 0
        values: list[torch.Tensor] = []
        lengths: list[torch.Tensor] = []
        length_per_key: list[int] = []
        ones = torch.ones(batch_size, dtype=torch.int32)
        for feature in self.schema.sparse_features:
            if feature.kind is not FeatureKind.SPARSE_LIST:
                values.append(single[single_index])
                lengths.append(ones)
                length_per_key.append(batch_size)
                single_index += 1
                continue
            ids, offsets = self.lists[list_index]
            list_index += 1
            first, last = int(offsets[begin]), int(offsets[end])
            values.append(ids[first:last])
            lengths.append(torch.diff(offsets[begin : end + 1]).to(torch.int32))
            length_per_key.append(last - first)
        offset_per_key = [0]
        for length in length_per_key:
            offset_per_key.append(offset_per_key[-1] + length)
        sparse = KeyedJaggedTensor(
            keys=[f.name for f in self.schema.sparse_features],
            # Key-major, as a KJT lays out its values: all rows of a feature,
            # then all rows of the next.
            values=torch.cat(values) if values else torch.zeros(0, dtype=torch.int64),
            lengths=torch.cat(lengths)
            if lengths
            else torch.zeros(0, dtype=torch.int32),
            stride=batch_size,
            length_per_key=length_per_key,
            offset_per_key=offset_per_key,
        )
        return Batch(
            sparse_features=sparse,
            dense_features=self.dense[begin:end],
            labels=self.labels[begin:end],
            teacher_logits=None
            if self.teacher_logits is None
            else self.teacher_logits[begin:end],
        )


class InMemorySplitReader:
    """Iterates the batches of one rank from an :class:`InMemorySplit`.

    Same interface and cursor semantics as
    :class:`~kd_dagfm.data.reader.SplitReader`: ``epoch()`` yields the rest
    of the current epoch, :meth:`state` is the cursor after the last batch
    handed out and :meth:`load_state` restores it.

    Args:
        split: the decoded split.
        batch_size: rows per batch on this rank.
        rank, world_size: this process's place among the readers.
        seed: seed of the per-epoch permutation.
        shuffle: permute the rows each epoch (training); off for evaluation.
        remainder: ``drop`` or ``keep`` (see the module docstring).
    """

    def __init__(
        self,
        split: InMemorySplit,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        remainder: str = "drop",
    ) -> None:
        check_reader_layout(rank, world_size, batch_size, remainder)
        self.split = split
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.remainder = remainder
        self.rows_skipped = split.rows_skipped
        self._state = self._start_of(0, seed)
        if remainder == "drop":
            check_full_batches(
                split.name,
                split.num_rows,
                world_size,
                batch_size,
                (split.num_rows // world_size) // batch_size,
            )

    def state(self) -> ReaderState:
        return self._state

    def load_state(self, state: ReaderState) -> None:
        """Continue from ``state``, a cursor saved by a reader of this split.

        A cursor of another layout (world size, rank, batch size, shuffle, or
        one made by the streaming reader) does not map to this reader's order:
        the reader then starts the epoch after the interrupted one and logs a
        warning.

        Raises:
            DataError: on a cursor with another seed.
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
        saved = _layout(state)
        if saved != _layout(layout):
            logger.warning(
                "reader cursor was saved with (world_size, rank, batch_size, shuffle, "
                "shuffle_block_rows) = %s, this in-memory reader of split %r has %s: "
                "the rest of epoch %d is skipped and reading continues at the start "
                "of epoch %d",
                saved,
                self.split.name,
                _layout(layout),
                state.epoch,
                state.epoch + 1,
            )
            self._state = self._start_of(state.epoch + 1, state.seed)
            return
        self._state = state

    def batches_in_epoch(self, epoch: int | None = None) -> int | None:
        """Batches of an epoch under ``drop``; None under ``keep``."""
        if self.remainder != "drop":
            return None
        return (self.split.num_rows // self.world_size) // self.batch_size

    def epoch(self) -> Iterator[Batch]:
        """Yield the rest of the current epoch; the cursor then moves to the next."""
        start = self._state
        rows = self._rank_rows(start.epoch, start.seed)
        limit = self.batches_in_epoch()
        if limit is None:
            limit = -(-len(rows) // self.batch_size)
        # This rank's rows of the epoch, copied once in epoch order, so each
        # batch is a slice.
        ordered = self.split.take(rows[start.batches * self.batch_size :])
        for index in range(start.batches, limit):
            begin = (index - start.batches) * self.batch_size
            end = min(begin + self.batch_size, ordered.num_rows)
            batch = ordered.batch(begin, end)
            self._state = dataclasses.replace(
                start, row=index * self.batch_size + len(batch), batches=index + 1
            )
            yield batch
        self._state = self._start_of(start.epoch + 1, start.seed)

    def _rank_rows(self, epoch: int, seed: int) -> torch.Tensor:
        """(rows of this rank,) int64 indices into the split, in epoch order."""
        num_rows = self.split.num_rows
        if self.shuffle:
            order = torch.from_numpy(
                np.random.default_rng([seed, epoch]).permutation(num_rows)
            )
        else:
            order = torch.arange(num_rows)
        if self.remainder == "drop":
            order = order[: (num_rows // self.world_size) * self.world_size]
        return order[self.rank :: self.world_size].contiguous()

    def _start_of(self, epoch: int, seed: int) -> ReaderState:
        return ReaderState(
            epoch=epoch,
            seed=seed,
            world_size=self.world_size,
            rank=self.rank,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            shuffle_block_rows=IN_MEMORY_LAYOUT,
        )


def _layout(state: ReaderState) -> tuple[int, int, int, bool, int]:
    return (
        state.world_size,
        state.rank,
        state.batch_size,
        state.shuffle,
        state.shuffle_block_rows,
    )
