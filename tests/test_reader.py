"""The Parquet reader: rank ranges, remainder policy, shuffling, exact resume."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from kd_dagfm.data.batch import Batch
from kd_dagfm.data.reader import ParquetSplit, ReaderState, SplitReader, load_schema
from kd_dagfm.data.writer import write_dataset
from kd_dagfm.errors import ConfigError, DataError
from kd_dagfm.model import KDDAGFM
from kd_dagfm.phases import Phase
from kd_dagfm.pipeline import run_phase
from kd_dagfm.schema import FeatureSchema, make_schema
from kd_dagfm.train.engine import Engine, LocalEngine
from tests.conftest import REPO, tiny_config

NUM_ROWS = 3000
GENRES = 7


def genre_lists(num_rows: int) -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [
        rng.integers(0, GENRES, rng.integers(0, 4)).tolist() for _ in range(num_rows)
    ]


def rid_schema(num_rows: int) -> FeatureSchema:
    """A schema whose ``rid`` feature is the row id, so batches name their rows."""
    return make_schema(
        "label",
        {"rid": num_rows, "a": 11, "genres": GENRES},
        lists=["genres"],
        dense=["x"],
    )


def rid_table(num_rows: int) -> pa.Table:
    """Row i: rid i, label i % 2, a = i % 11, genres[i], x = i / num_rows."""
    rows = np.arange(num_rows)
    return pa.table(
        {
            "label": pa.array((rows % 2).astype(np.int8)),
            "rid": pa.array(rows),
            "a": pa.array(rows % 11),
            "genres": pa.array(genre_lists(num_rows), pa.list_(pa.int64())),
            "x": pa.array((rows / num_rows).astype(np.float32)),
        }
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """3,000 rows in 5 shards of <= 700 rows and row groups of <= 128 rows."""
    root = str(tmp_path_factory.mktemp("reader") / "dataset")
    write_dataset(
        root,
        rid_schema(NUM_ROWS),
        {"train": rid_table(NUM_ROWS), "valid": rid_table(NUM_ROWS).slice(0, 300)},
        rows_per_shard=700,
        row_group_rows=128,
    )
    return root


def open_split(root: str, split: str = "train") -> ParquetSplit:
    return ParquetSplit(root, split, load_schema(root))


def row_ids(batch: Batch) -> np.ndarray:
    return batch.sparse_features["rid"].values().numpy()


def read_ids(reader: SplitReader, max_batches: int | None = None) -> list[np.ndarray]:
    """The row ids of each batch of the rest of the epoch (or its next batches)."""
    batches = []
    for batch in reader.epoch():
        batches.append(row_ids(batch))
        if max_batches is not None and len(batches) == max_batches:
            break
    return batches


def test_split_lists_shards_and_row_groups(dataset: str) -> None:
    split = open_split(dataset)
    assert len(split.shards) == 5
    assert split.num_rows == NUM_ROWS
    # 700 rows per shard -> row groups of 128 x 5 + 60; the last shard has 200.
    assert [u.num_rows for u in split.units[:6]] == [128, 128, 128, 128, 128, 60]
    assert len(split.units) == 4 * 6 + 2


def test_batches_carry_the_rows_they_name(dataset: str) -> None:
    genres = genre_lists(NUM_ROWS)
    reader = SplitReader(open_split(dataset), 100, seed=5, shuffle_block_rows=1)
    for batch in reader.epoch():
        rid = row_ids(batch)
        features = batch.sparse_features.to_dict()
        np.testing.assert_array_equal(features["a"].values().numpy(), rid % 11)
        expected_genres = [g for i in rid for g in genres[i]]
        np.testing.assert_array_equal(
            features["genres"].values().numpy(), expected_genres
        )
        np.testing.assert_array_equal(
            features["genres"].lengths().numpy(), [len(genres[i]) for i in rid]
        )
        torch.testing.assert_close(
            batch.dense_features[:, 0],
            torch.from_numpy((rid / NUM_ROWS).astype(np.float32)),
        )
        np.testing.assert_array_equal(
            batch.labels.numpy(), (rid % 2).astype(np.float32)
        )
        assert batch.dense_features.shape == (100, 1)
        assert batch.sparse_features.stride() == 100


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("block_rows", [1, 16, 1000])
def test_ranks_read_disjoint_equal_batches(
    dataset: str, world_size: int, block_rows: int
) -> None:
    batch_size = 64
    split = open_split(dataset)
    per_rank = []
    for rank in range(world_size):
        reader = SplitReader(
            split,
            batch_size,
            rank=rank,
            world_size=world_size,
            seed=7,
            shuffle_block_rows=block_rows,
            prefetch_batches=2,
        )
        batches = read_ids(reader)
        assert all(len(b) == batch_size for b in batches)
        per_rank.append(batches)

    # Remainder policy "drop": floor(floor(T / W) / B) batches on every rank.
    expected_batches = (NUM_ROWS // world_size) // batch_size
    assert [len(b) for b in per_rank] == [expected_batches] * world_size
    seen = np.concatenate([np.concatenate(b) for b in per_rank])
    assert (
        len(np.unique(seen)) == len(seen) == world_size * expected_batches * batch_size
    )


def test_remainder_drop_and_keep_counts(dataset: str) -> None:
    split = open_split(dataset)
    # T = 3000, W = 2: ranks own 1500 rows each; 23 batches of 64 use 1472 and
    # leave 28 per rank.
    for rank in range(2):
        reader = SplitReader(split, 64, rank=rank, world_size=2, seed=1)
        assert reader.batches_in_epoch() == 23
        assert sum(len(b) for b in read_ids(reader)) == 23 * 64

    keep = SplitReader(split, 64, seed=1, remainder="keep")
    sizes = [len(b) for b in read_ids(keep)]
    assert keep.batches_in_epoch() is None
    assert sizes == [64] * 46 + [3000 - 46 * 64]

    unshuffled = SplitReader(split, 64, shuffle=False, remainder="keep")
    np.testing.assert_array_equal(np.concatenate(read_ids(unshuffled)), np.arange(3000))


def test_drop_without_a_full_batch_raises(dataset: str) -> None:
    reader = SplitReader(open_split(dataset), 2000, rank=0, world_size=2)
    with pytest.raises(DataError, match="no rank gets a full batch"):
        read_ids(reader)


def test_shuffle_is_per_epoch_and_seeded(dataset: str) -> None:
    split = open_split(dataset)
    first = SplitReader(split, 100, seed=3, shuffle_block_rows=8)
    epoch0, epoch1 = np.concatenate(read_ids(first)), np.concatenate(read_ids(first))
    assert first.state().epoch == 2
    again = SplitReader(split, 100, seed=3, shuffle_block_rows=8)
    np.testing.assert_array_equal(np.concatenate(read_ids(again)), epoch0)
    other_seed = SplitReader(split, 100, seed=4, shuffle_block_rows=8)
    assert not np.array_equal(np.concatenate(read_ids(other_seed)), epoch0)
    assert not np.array_equal(epoch0, epoch1)
    # Blocks of 8 consecutive rows of a row group stay together, in order
    # (row groups hold 128 rows, or 60 at a shard's end; shards hold 700).
    offset = epoch0 % 700
    blocks = (epoch0 // 700) * 1000 + (offset // 128) * 100 + (offset % 128) // 8
    runs = np.flatnonzero(np.diff(blocks) != 0) + 1
    assert len(runs) + 1 == len(np.unique(blocks))
    for run in np.split(epoch0, runs):
        np.testing.assert_array_equal(run, np.arange(run[0], run[0] + len(run)))


def save_and_restore(reader: SplitReader, root: str, **kwargs: object) -> SplitReader:
    """A new split and reader (as after a restart) from a JSON round trip of the cursor."""
    cursor = json.loads(json.dumps(reader.state().to_dict()))
    restored = SplitReader(open_split(root), **kwargs)  # type: ignore[arg-type]
    restored.load_state(ReaderState.from_dict(cursor))
    return restored


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize(
    ("block_rows", "prefetch", "readahead", "stop_after"),
    [(1, 0, 0, 7), (16, 3, 2, 11), (1, 2, 1, 23)],
)
def test_resume_mid_epoch_sees_remaining_rows(
    dataset: str,
    world_size: int,
    block_rows: int,
    prefetch: int,
    readahead: int,
    stop_after: int,
) -> None:
    for rank in range(world_size):
        kwargs = dict(
            batch_size=50,
            rank=rank,
            world_size=world_size,
            seed=11,
            shuffle_block_rows=block_rows,
            prefetch_batches=prefetch,
            readahead_row_groups=readahead,
        )
        # Two uninterrupted epochs.
        uninterrupted = SplitReader(open_split(dataset), **kwargs)  # type: ignore[arg-type]
        expected = read_ids(uninterrupted) + read_ids(uninterrupted)

        # Stop after `stop_after` batches, restart, finish both epochs.
        first = SplitReader(open_split(dataset), **kwargs)  # type: ignore[arg-type]
        seen = read_ids(first, max_batches=stop_after)
        assert first.state().batches == stop_after
        resumed = save_and_restore(first, dataset, **kwargs)
        rest = read_ids(resumed) + read_ids(resumed)

        assert len(seen) + len(rest) == len(expected)
        for got, want in zip(seen + rest, expected):
            np.testing.assert_array_equal(got, want)


def test_resume_at_epoch_end_starts_next_epoch(dataset: str) -> None:
    kwargs = dict(batch_size=100, seed=2, prefetch_batches=0)
    reader = SplitReader(open_split(dataset), **kwargs)  # type: ignore[arg-type]
    epoch0 = read_ids(reader)
    epoch1 = read_ids(reader)

    stopped = SplitReader(open_split(dataset), **kwargs)  # type: ignore[arg-type]
    seen = read_ids(stopped, max_batches=len(epoch0))
    assert stopped.state().batches == len(epoch0)
    assert stopped.state().epoch == 0
    resumed = save_and_restore(stopped, dataset, **kwargs)
    assert read_ids(resumed) == []  # nothing is left of epoch 0
    rest = read_ids(resumed)
    for got, want in zip(seen + rest, epoch0 + epoch1, strict=True):
        np.testing.assert_array_equal(got, want)


def test_resume_with_new_world_size_skips_to_next_epoch(
    dataset: str, caplog: pytest.LogCaptureFixture
) -> None:
    reader = SplitReader(open_split(dataset), 50, rank=1, world_size=2, seed=3)
    read_ids(reader, max_batches=4)
    single = SplitReader(open_split(dataset), 100, seed=3)
    with caplog.at_level(logging.WARNING):
        single.load_state(reader.state())
    assert single.state() == ReaderState(
        epoch=1, seed=3, world_size=1, rank=0, batch_size=100, shuffle_block_rows=1
    )
    assert "continues at the start of epoch 1" in caplog.text


def test_resume_rejects_changed_shards(dataset: str, tmp_path: Path) -> None:
    reader = SplitReader(open_split(dataset), 50, seed=3, shuffle_block_rows=16)
    read_ids(reader, max_batches=5)
    state = reader.state()
    moved = dataclass_replace(state, shard="part-09999.parquet")
    fresh = SplitReader(open_split(dataset), 50, seed=3, shuffle_block_rows=16)
    with pytest.raises(DataError, match="the shards changed since the checkpoint"):
        fresh.load_state(moved)
    with pytest.raises(DataError, match="saved with seed 3, this run uses seed 4"):
        SplitReader(open_split(dataset), 50, seed=4).load_state(state)


def dataclass_replace(state: ReaderState, **changes: object) -> ReaderState:
    return ReaderState.from_dict({**state.to_dict(), **changes})


def test_reader_rejects_invalid_arguments(dataset: str) -> None:
    split = open_split(dataset)
    with pytest.raises(ConfigError, match="rank 2 is outside world size 2"):
        SplitReader(split, 10, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="invalid remainder 'pad'"):
        SplitReader(split, 10, remainder="pad")
    with pytest.raises(ConfigError, match="invalid shuffle_block_rows 0"):
        SplitReader(split, 10, shuffle_block_rows=0)


def test_abandoned_epoch_stops_prefetch_thread(dataset: str) -> None:
    reader = SplitReader(open_split(dataset), 10, prefetch_batches=2)
    epoch = reader.epoch()
    next(epoch)
    epoch.close()
    deadline = time.monotonic() + 5
    while any(t.name == "parquet-prefetch" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "prefetch thread still running"
        time.sleep(0.05)
    assert reader.state().batches == 1


# The trainer test: a run killed with SIGKILL mid-epoch, resumed by a new
# process from its step checkpoint, must train on exactly the rows an
# uninterrupted run trains on after that checkpoint.

TRAIN_ROWS = 1200
KILL_AT_STEP = 13
CHECKPOINT_EVERY = 5

_CHILD = """
import json, os, signal, sys
sys.path.insert(0, {repo!r})
from tests.test_reader import recording_engine_factory, trainer_config
from kd_dagfm.pipeline import run_phase
from kd_dagfm.phases import Phase
config = trainer_config({dataset!r}, {output!r})
log = open({log!r}, "a")
def on_step(step, ids):
    log.write(json.dumps(ids) + "\\n")
    log.flush()
    if step == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
run_phase(config, Phase.TEACHER_TRAINING, recording_engine_factory(config, on_step))
"""


def trainer_config(dataset: str, output_dir: str):  # type: ignore[no-untyped-def]
    return tiny_config(
        Path(output_dir),
        dataset=dataset,
        train_batch_size=64,
        eval_batch_size=512,
        epochs=2,
        checkpoint_every_steps=CHECKPOINT_EVERY,
        keep_last_checkpoints=3,
        prefetch_batches=2,
        shuffle_block_rows=8,
    )


def recording_engine_factory(config, on_step):  # type: ignore[no-untyped-def]
    """A LocalEngine factory that reports the row ids of every training step."""

    def make(model: KDDAGFM, phase: Phase) -> Engine:
        engine = LocalEngine(model, config.train, phase, torch.device("cpu"))
        pending: list[list[int]] = []
        steps = [0]

        def record(module: torch.nn.Module, args: tuple) -> None:  # type: ignore[type-arg]
            if module.training:
                pending.append(args[0]["rid"].values().tolist())

        model.register_forward_pre_hook(record)
        optimize = engine.optimize

        def optimize_and_report(loss: torch.Tensor) -> None:
            optimize(loss)
            steps[0] += 1
            on_step(steps[0], pending.pop())

        engine.optimize = optimize_and_report  # type: ignore[method-assign]
        return engine

    return make


@pytest.fixture(scope="module")
def trainer_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("trainer") / "dataset")
    table = rid_table(TRAIN_ROWS).drop_columns(["genres"])
    schema = make_schema("label", {"rid": TRAIN_ROWS, "a": 11}, dense=["x"])
    # Labels that depend on the features, so AUC is defined and training moves.
    write_dataset(
        root,
        schema,
        {"train": table, "valid": table.slice(0, 400), "test": table.slice(400, 400)},
        rows_per_shard=300,
        row_group_rows=64,
    )
    return root


@pytest.mark.slow
def test_trainer_killed_mid_epoch_resumes_exactly(
    trainer_dataset: str, tmp_path: Path
) -> None:
    # Uninterrupted reference run, in this process.
    reference: list[list[int]] = []
    config = trainer_config(trainer_dataset, str(tmp_path / "reference"))
    expected = run_phase(
        config,
        Phase.TEACHER_TRAINING,
        recording_engine_factory(config, lambda step, ids: reference.append(ids)),
    )
    steps_per_epoch = TRAIN_ROWS // 64
    assert len(reference) == 2 * steps_per_epoch
    assert steps_per_epoch > KILL_AT_STEP  # the kill lands mid-epoch

    # A run killed with SIGKILL right after step 13 (last checkpoint: step 10).
    output = tmp_path / "killed"
    log = tmp_path / "killed-steps.jsonl"
    script = _CHILD.format(
        repo=str(REPO),
        dataset=trainer_dataset,
        output=str(output),
        log=str(log),
        kill_at=KILL_AT_STEP,
    )
    child = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    killed = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(killed) == KILL_AT_STEP

    # A new trainer on the same output_dir resumes from the step-10 checkpoint.
    resumed: list[list[int]] = []
    config = trainer_config(trainer_dataset, str(output))
    result = run_phase(
        config,
        Phase.TEACHER_TRAINING,
        recording_engine_factory(config, lambda step, ids: resumed.append(ids)),
    )
    checkpoint_step = KILL_AT_STEP // CHECKPOINT_EVERY * CHECKPOINT_EVERY
    assert killed == reference[:KILL_AT_STEP]
    assert len(resumed) == len(reference) - checkpoint_step
    assert resumed == reference[checkpoint_step:]
    # Same rows in the same order from the same model and optimizer state.
    assert result.test.auc == pytest.approx(expected.test.auc, abs=1e-6)
    assert result.test.log_loss == pytest.approx(expected.test.log_loss, abs=1e-6)
