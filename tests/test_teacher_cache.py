"""Cached teacher logits: the cache job, row alignment, checks and equivalence."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.cache_teacher_logits import main as cache_job
from kd_dagfm.config import RunConfig, build_config
from kd_dagfm.data.reader import ParquetSplit, ReaderState, SplitReader
from kd_dagfm.data.writer import arrow_schema
from kd_dagfm.errors import CheckpointError, DataError
from kd_dagfm.model import KDDAGFM
from kd_dagfm.phases import Phase
from kd_dagfm.pipeline import prepare_dataset, run_phase
from kd_dagfm.schema import SCHEMA_FILE, FeatureSchema, make_schema
from kd_dagfm.teacher_cache import (
    MANIFEST_FILE,
    CachedLogitsSplit,
    TeacherLogitCache,
    write_teacher_logits,
)
from kd_dagfm.train.checkpoint import export_model_file, read_model_file
from tests.conftest import tiny_config

# Rows per row group of the hand-made dataset: not a multiple of any batch
# size below, so batches span row groups and shards.
ROW_GROUP_ROWS = 37
BAD_ROWS = (3, 40, 41, 70)  # indices in shard 0 with an out-of-range id


def handmade_dataset(root: Path) -> FeatureSchema:
    """Two train shards of 2 and 3 row groups, some rows invalid."""
    schema = make_schema("label", {"a": 10, "b": 7, "g": 5}, lists=["g"], dense=["d"])
    (root / "train").mkdir(parents=True)
    (root / SCHEMA_FILE).write_text(schema.to_json())
    rng = np.random.default_rng(0)
    for shard, rows in enumerate((74, 111)):
        a = rng.integers(0, 10, rows)
        if shard == 0:
            a[list(BAD_ROWS)] = 99
        genres = [rng.integers(0, 5, rng.integers(0, 3)).tolist() for _ in range(rows)]
        table = pa.table(
            {
                "label": pa.array(rng.integers(0, 2, rows), pa.int8()),
                "a": pa.array(a, pa.int64()),
                "b": pa.array(rng.integers(0, 7, rows), pa.int64()),
                "g": pa.array(genres, pa.list_(pa.int64())),
                "d": pa.array(rng.normal(size=rows), pa.float32()),
            },
            schema=arrow_schema(schema),
        )
        pq.write_table(
            table,
            root / "train" / f"part-{shard:05d}.parquet",
            row_group_size=ROW_GROUP_ROWS,
        )
    return schema


def handmade_teacher(path: Path, schema: FeatureSchema, seed: int) -> KDDAGFM:
    """A randomly initialised CIN teacher saved as a teacher_training model.pt."""
    config = handmade_config(path.parent)
    torch.manual_seed(seed)
    model = KDDAGFM(schema, config.model).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "phase": "teacher_training",
        "kind": "final",
        "seq": seed,
        "created": "2026-01-01T00:00:00Z",
        "config": config.to_dict(),
        "schema": schema.to_dict(),
    }
    export_model_file(str(path), model.state_dict(), meta)
    return model


def handmade_config(output_dir: Path, **overrides: object) -> RunConfig:
    values: dict[str, object] = {
        "teacher": "cin",
        "t_cin": [3, 3],
        "embedding_size": 4,
        "depth": 2,
        "output_dir": str(output_dir),
    }
    values.update(overrides)
    return build_config(values)


@pytest.fixture(scope="module")
def handmade(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("handmade")
    schema = handmade_dataset(root / "data")
    model_file = root / "teacher" / "teacher_training" / "model.pt"
    model = handmade_teacher(model_file, schema, seed=7)
    write_teacher_logits(
        str(model_file),
        str(root / "data"),
        str(root / "cache"),
        splits=["train"],
        batch_size=16,
        bad_rows="skip",
    )
    return {
        "root": root,
        "dataset": str(root / "data"),
        "cache": str(root / "cache"),
        "schema": schema,
        "model": model,
        "model_file": model_file,
    }


def cached_reader(handmade: dict[str, object], **options: object) -> SplitReader:
    cache = TeacherLogitCache.open(str(handmade["cache"]))
    split = CachedLogitsSplit(
        str(handmade["dataset"]), "train", handmade["schema"], cache=cache
    )
    values: dict[str, object] = {
        "batch_size": 20,
        "seed": 3,
        "shuffle": True,
        "bad_rows": "skip",
        "prefetch_batches": 0,
    }
    values.update(options)
    return SplitReader(split, **values)


def live_logits(model: KDDAGFM, batch) -> torch.Tensor:
    with torch.no_grad():
        output = model(
            batch.sparse_features, batch.dense_features, Phase.TEACHER_TRAINING
        )
    assert output.teacher_logits is not None
    return output.teacher_logits


def test_cache_layout_mirrors_shards(handmade: dict[str, object]) -> None:
    cache = Path(str(handmade["cache"]))
    assert (cache / MANIFEST_FILE).exists()
    for shard, groups in (("part-00000", [37, 37]), ("part-00001", [37, 37, 37])):
        metadata = pq.ParquetFile(cache / "train" / f"{shard}.parquet").metadata
        rows = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        assert rows == groups
    logits = pq.read_table(cache / "train" / "part-00000.parquet").column(0)
    nan_rows = np.flatnonzero(np.isnan(logits.to_numpy()))
    assert nan_rows.tolist() == list(BAD_ROWS)
    manifest = TeacherLogitCache.open(str(cache)).manifest
    assert manifest["rows"] == {"train": 185}
    assert manifest["rows_invalid"] == {"train": len(BAD_ROWS)}
    assert manifest["teacher"]["seq"] == 7


@pytest.mark.parametrize("prefetch_batches", [0, 2])
def test_cached_logits_follow_shuffled_rows(
    handmade: dict[str, object], prefetch_batches: int
) -> None:
    model = handmade["model"]
    assert isinstance(model, KDDAGFM)
    reader = cached_reader(handmade, prefetch_batches=prefetch_batches)
    batches = list(reader.epoch())
    assert len(batches) == reader.batches_in_epoch()
    for batch in batches:
        assert batch.teacher_logits is not None
        assert not torch.isnan(batch.teacher_logits).any()
        torch.testing.assert_close(
            batch.teacher_logits, live_logits(model, batch), rtol=1e-5, atol=1e-5
        )


def test_cached_logits_resume_exactly(handmade: dict[str, object]) -> None:
    whole = cached_reader(handmade)
    whole.load_state(epoch_start(whole, 1))
    expected = torch.cat([b.teacher_logits for b in whole.epoch()])

    first = cached_reader(handmade)
    first.load_state(epoch_start(first, 1))
    head = []
    for batch in first.epoch():
        head.append(batch.teacher_logits)
        if len(head) == 3:
            break
    cursor = first.state()
    second = cached_reader(handmade)
    second.load_state(cursor)
    tail = [b.teacher_logits for b in second.epoch()]
    torch.testing.assert_close(torch.cat(head + tail), expected, rtol=0, atol=0)


def epoch_start(reader: SplitReader, epoch: int) -> ReaderState:
    """A cursor at the start of ``epoch`` (epoch 1 has another row order)."""
    return dataclasses.replace(reader.state(), epoch=epoch)


def test_plain_split_has_no_logits(handmade: dict[str, object]) -> None:
    split = ParquetSplit(str(handmade["dataset"]), "train", handmade["schema"])
    reader = SplitReader(split, batch_size=20, bad_rows="skip", prefetch_batches=0)
    assert next(iter(reader.epoch())).teacher_logits is None


def test_missing_manifest_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        TeacherLogitCache.open(str(tmp_path))
    assert "has no manifest.json" in str(error.value)
    assert "did not finish" in str(error.value)


def test_existing_cache_needs_overwrite(handmade: dict[str, object]) -> None:
    with pytest.raises(DataError) as error:
        write_teacher_logits(
            str(handmade["model_file"]),
            str(handmade["dataset"]),
            str(handmade["cache"]),
            splits=["train"],
            bad_rows="skip",
        )
    assert "already contains a teacher-logit cache" in str(error.value)


def test_changed_shard_is_rejected(handmade: dict[str, object], tmp_path: Path) -> None:
    copy = tmp_path / "data"
    shutil.copytree(str(handmade["dataset"]), copy)
    shard = copy / "train" / "part-00001.parquet"
    pq.write_table(pq.read_table(shard), shard, row_group_size=50)
    cache = TeacherLogitCache.open(str(handmade["cache"]))
    with pytest.raises(DataError) as error:
        CachedLogitsSplit(str(copy), "train", handmade["schema"], cache=cache)
    message = str(error.value)
    assert "shard part-00001.parquet of split 'train' changed" in message
    assert "[(0, 37), (1, 37), (2, 37)] -> [(0, 50), (1, 50), (2, 11)]" in message


def test_missing_shard_is_rejected(handmade: dict[str, object], tmp_path: Path) -> None:
    copy = tmp_path / "data"
    shutil.copytree(str(handmade["dataset"]), copy)
    (copy / "train" / "part-00000.parquet").unlink()
    cache = TeacherLogitCache.open(str(handmade["cache"]))
    with pytest.raises(DataError) as error:
        CachedLogitsSplit(str(copy), "train", handmade["schema"], cache=cache)
    assert "cached shards no longer in the split ['part-00000.parquet']" in str(
        error.value
    )


def test_other_teacher_weights_are_rejected(handmade: dict[str, object]) -> None:
    cache = TeacherLogitCache.open(str(handmade["cache"]))
    schema = handmade["schema"]
    assert isinstance(schema, FeatureSchema)
    config = handmade_config(Path("unused"))
    model = KDDAGFM(schema, config.model)
    saved = read_model_file(str(handmade["model_file"]))["model"]
    model.load_state_dict(saved)
    cache.check_teacher(model, config, schema)  # the same weights pass

    with torch.no_grad():
        model.teacher.head.weight.add_(1e-3)
    with pytest.raises(CheckpointError) as error:
        cache.check_teacher(model, config, schema)
    assert "this run's teacher weights differ" in str(error.value)

    model.load_state_dict(saved)
    with torch.no_grad():
        next(model.sparse_arch.parameters()).add_(1e-3)
    with pytest.raises(CheckpointError) as error:
        cache.check_teacher(model, config, schema)
    assert "this run's tables differ" in str(error.value)


def test_other_model_config_is_rejected(handmade: dict[str, object]) -> None:
    cache = TeacherLogitCache.open(str(handmade["cache"]))
    schema = handmade["schema"]
    assert isinstance(schema, FeatureSchema)
    config = handmade_config(Path("unused"), t_cin=[4, 4])
    model = KDDAGFM(schema, config.model)
    with pytest.raises(CheckpointError) as error:
        cache.check_teacher(model, config, schema)
    assert "t_cin=[3, 3] (this run: [4, 4])" in str(error.value)


def test_distillation_rejects_cache_of_other_teacher(
    handmade: dict[str, object], tmp_path: Path
) -> None:
    schema = handmade["schema"]
    assert isinstance(schema, FeatureSchema)
    other = tmp_path / "other" / "teacher_training" / "model.pt"
    handmade_teacher(other, schema, seed=8)
    config = handmade_config(
        tmp_path / "run",
        dataset=str(handmade["dataset"]),
        bad_rows="skip",
        warm_up=str(other),
        teacher_logits=str(handmade["cache"]),
        epochs=1,
        train_batch_size=20,
    )
    with pytest.raises(CheckpointError) as error:
        run_phase(config, Phase.DISTILLATION)
    assert "was written by the teacher of" in str(error.value)
    assert "teacher weights differ" in str(error.value)


# Largest difference allowed between students distilled from cached and from
# live teacher logits. The cache job runs the teacher on batches of another
# size and composition than training does. A BLAS may round float32 products
# differently per batch shape, although on the 2-core CPU this test was
# written on the two students came out bit-identical.
STUDENT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory: pytest.TempPathFactory) -> RunConfig:
    root = tmp_path_factory.mktemp("cached")
    dataset, _ = prepare_dataset(tiny_config(root / "prepare"))
    config = tiny_config(root / "teacher", dataset=dataset, epochs=2)
    run_phase(config, Phase.TEACHER_TRAINING)
    return config


def test_cached_distillation_matches_live(
    trained_teacher: RunConfig, tmp_path: Path
) -> None:
    config = trained_teacher
    dataset = config.data.dataset
    teacher_dir = str(Path(config.train.output_dir) / "teacher_training")
    cache_dir = str(tmp_path / "teacher_logits")
    code = cache_job(
        [
            "--dataset",
            dataset,
            "--output_dir",
            config.train.output_dir,
            "--cache_dir",
            cache_dir,
            "--eval_batch_size",
            "1000",
        ]
    )
    assert code == 0

    live_config = config.replace(output_dir=str(tmp_path / "live"), warm_up=teacher_dir)
    live = run_phase(live_config, Phase.DISTILLATION)
    cached_config = live_config.replace(
        output_dir=str(tmp_path / "cached"), teacher_logits=cache_dir
    )
    cached = run_phase(cached_config, Phase.DISTILLATION)

    live_state = read_model_file(str(tmp_path / "live/distillation/model.pt"))["model"]
    cached_state = read_model_file(str(tmp_path / "cached/distillation/model.pt"))[
        "model"
    ]
    assert live_state.keys() == cached_state.keys()
    for key, tensor in live_state.items():
        if key.startswith("student."):
            torch.testing.assert_close(
                cached_state[key], tensor, rtol=0, atol=STUDENT_TOLERANCE
            )
        else:  # the frozen teacher and tables are bit-identical
            assert torch.equal(cached_state[key], tensor), key
    assert abs(cached.test.auc - live.test.auc) < STUDENT_TOLERANCE
    assert abs(cached.valid.log_loss - live.valid.log_loss) < STUDENT_TOLERANCE
    assert cached.model_name == live.model_name == "DAGFM-outer"
