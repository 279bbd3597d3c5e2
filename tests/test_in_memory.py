"""The in-memory split reader: same rows as the streaming reader, exact resume."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from kd_dagfm.data.batch import Batch
from kd_dagfm.data.memory import IN_MEMORY_LAYOUT, InMemorySplit, InMemorySplitReader
from kd_dagfm.data.reader import ParquetSplit, ReaderState, SplitReader, load_schema
from kd_dagfm.errors import DataError


def rows_of(batch: Batch) -> list[tuple[object, ...]]:
    """One hashable tuple per row: every feature's ids, then the label."""
    jagged = batch.sparse_features.to_dict()
    columns = []
    for key in batch.sparse_features.keys():  # noqa: SIM118 (a KJT is not a dict)
        values = jagged[key].values().tolist()
        lengths = jagged[key].lengths().tolist()
        rows, start = [], 0
        for length in lengths:
            rows.append(tuple(values[start : start + length]))
            start += length
        columns.append(rows)
    labels = batch.labels.tolist()
    return [
        tuple(column[i] for column in columns) + (labels[i],) for i in range(len(batch))
    ]


@pytest.fixture(scope="module")
def ml100k_split(ml100k_dataset: str) -> ParquetSplit:
    return ParquetSplit(ml100k_dataset, "valid", load_schema(ml100k_dataset))


@pytest.fixture(scope="module")
def memory(ml100k_split: ParquetSplit) -> InMemorySplit:
    return InMemorySplit.load(ml100k_split)


def test_unshuffled_batches_equal_streaming(
    ml100k_split: ParquetSplit, memory: InMemorySplit
) -> None:
    streaming = SplitReader(
        ml100k_split, 1000, shuffle=False, remainder="keep", prefetch_batches=0
    )
    in_memory = InMemorySplitReader(memory, 1000, shuffle=False, remainder="keep")
    expected = [rows_of(b) for b in streaming.epoch()]
    got = [rows_of(b) for b in in_memory.epoch()]
    assert len(got) == len(expected) == 10
    assert got == expected
    # The genre feature is a list: some rows have several ids.
    assert any(len(row[-2]) > 1 for batch in got for row in batch)


def test_shuffled_epoch_covers_rows_once(memory: InMemorySplit) -> None:
    reader = InMemorySplitReader(memory, 768, seed=7)
    all_rows = rows_of(memory.batch(0, memory.num_rows))
    first = [row for b in reader.epoch() for row in rows_of(b)]
    second = [row for b in reader.epoch() for row in rows_of(b)]
    assert reader.batches_in_epoch() == memory.num_rows // 768
    assert len(first) == (memory.num_rows // 768) * 768
    assert sorted(first) != sorted(second)  # another shuffle drops other rows
    assert first != second
    pool = sorted(all_rows)
    # Every yielded row is a row of the split, and rows repeat only as
    # often as the split itself repeats them.
    for epoch_rows in (first, second):
        remaining = list(pool)
        for row in sorted(epoch_rows):
            remaining.remove(row)


def test_same_seed_same_order(memory: InMemorySplit) -> None:
    a = [rows_of(b) for b in InMemorySplitReader(memory, 512, seed=3).epoch()]
    b = [rows_of(b) for b in InMemorySplitReader(memory, 512, seed=3).epoch()]
    c = [rows_of(b) for b in InMemorySplitReader(memory, 512, seed=4).epoch()]
    assert a == b
    assert a != c


def test_resume_continues_exactly(memory: InMemorySplit) -> None:
    full = InMemorySplitReader(memory, 500, seed=11)
    expected = [rows_of(b) for b in full.epoch()]

    first = InMemorySplitReader(memory, 500, seed=11)
    iterator = first.epoch()
    seen = [rows_of(next(iterator)) for _ in range(7)]
    cursor = ReaderState.from_dict(first.state().to_dict())
    assert cursor.batches == 7
    assert cursor.shuffle_block_rows == IN_MEMORY_LAYOUT

    resumed = InMemorySplitReader(memory, 500, seed=11)
    resumed.load_state(cursor)
    rest = [rows_of(b) for b in resumed.epoch()]
    assert seen + rest == expected
    assert resumed.state().epoch == 1
    assert resumed.state().batches == 0


def test_ranks_are_disjoint_and_equal(memory: InMemorySplit) -> None:
    readers = [
        InMemorySplitReader(memory, 300, rank=r, world_size=3, seed=5) for r in range(3)
    ]
    per_rank = [[row for b in r.epoch() for row in rows_of(b)] for r in readers]
    counts = {len(rows) for rows in per_rank}
    assert counts == {(memory.num_rows // 3 // 300) * 300}
    everything = sorted(row for rows in per_rank for row in rows)
    remaining = sorted(rows_of(memory.batch(0, memory.num_rows)))
    for row in everything:
        remaining.remove(row)


def test_streaming_cursor_skips_to_next_epoch(
    memory: InMemorySplit, caplog: pytest.LogCaptureFixture
) -> None:
    reader = InMemorySplitReader(memory, 500, seed=11)
    streaming_cursor = ReaderState(
        epoch=2,
        seed=11,
        unit=1,
        row=40,
        batches=3,
        batch_size=500,
        shuffle_block_rows=256,
    )
    with caplog.at_level(logging.WARNING, logger="kd_dagfm.data.memory"):
        reader.load_state(streaming_cursor)
    assert reader.state().epoch == 3
    assert reader.state().batches == 0
    assert "the rest of epoch 2 is skipped" in caplog.text


def test_cursor_with_other_seed_is_rejected(memory: InMemorySplit) -> None:
    reader = InMemorySplitReader(memory, 500, seed=11)
    with pytest.raises(DataError, match="saved with seed 12, this run uses seed 11"):
        reader.load_state(ReaderState(epoch=0, seed=12, batches=2))


def test_take_keeps_list_rows(memory: InMemorySplit) -> None:
    rows = torch.tensor([5, 0, 9999, 5])
    taken = memory.take(rows)
    assert taken.num_rows == 4
    everything = rows_of(memory.batch(0, memory.num_rows))
    assert rows_of(taken.batch(0, 4)) == [everything[i] for i in rows.tolist()]


def test_trainer_uses_memory_reader(tmp_path: Path) -> None:
    from kd_dagfm.pipeline import run_phase
    from tests.conftest import tiny_config

    config = tiny_config(tmp_path, cache_in_memory=True, epochs=2)
    result = run_phase(config)
    assert result.epochs == 2
    assert len(result.history) == 2
    assert 0.0 <= result.test.auc <= 1.0
    streaming = run_phase(tiny_config(tmp_path / "streaming", epochs=2))
    # Same data and model, other row order: both learn the planted crosses
    # to a similar degree.
    assert abs(result.test.auc - streaming.test.auc) < 0.1
