"""Sharded checkpoints: resume on another world size and plan, and the cases
that cannot work (column-wise row-wise-Adagrad state, data-parallel versus
sharded optimizer state, an unreachable store).

One story, three launches: 2 ranks (row_wise) train an epoch of
teacher_training; 1 rank (table_wise) resumes it and trains another; 2 ranks
(row_wise) resume that. Before each resume the final checkpoint is removed,
as if the run had stopped after its epoch checkpoint. Each launch also loads
the checkpoint into a bare engine, and the test compares every rank's
shards with the checkpoint read back whole (``dcp_to_torch_save``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from kd_dagfm.config import RunConfig
from kd_dagfm.data.reader import load_schema
from kd_dagfm.distributed import check_resumable, dmp_engine_factory
from kd_dagfm.distributed.spawn import free_port, run_local_ranks
from kd_dagfm.errors import CheckpointError
from kd_dagfm.model import KDDAGFM
from kd_dagfm.phases import Phase
from kd_dagfm.pipeline import run_phase
from kd_dagfm.train.checkpoint import CheckpointInfo, CheckpointManager
from tests.test_distributed import small_config, small_dataset

pytestmark = pytest.mark.distributed

TABLES = "sparse_arch.embedding_bag_collection"
Shards = list[tuple[tuple[int, ...], torch.Tensor]]


def flatten_state(state: Any, prefix: str = "") -> dict[str, Shards]:
    """Every tensor of a (nested, possibly sharded) state dict as
    ``{dotted key: [(offsets, local tensor), ...]}``."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    flat: dict[str, Shards] = {}
    if isinstance(state, dict):
        for key, value in state.items():
            flat.update(flatten_state(value, f"{prefix}{key}."))
    elif isinstance(state, ShardedTensor):
        flat[prefix[:-1]] = [
            (tuple(s.metadata.shard_offsets), s.tensor.detach().clone())
            for s in state.local_shards()
        ]
    elif isinstance(state, torch.Tensor):
        flat[prefix[:-1]] = [((0,) * state.dim(), state.detach().clone())]
    return flat


def read_whole(path: str, scratch: Path) -> dict[str, torch.Tensor]:
    """A DCP checkpoint as full tensors, keyed like :func:`flatten_state`."""
    target = scratch / f"{Path(path).name}-{abs(hash(path))}.pt"
    dcp_to_torch_save(path, str(target))
    whole = flatten_state(torch.load(target, weights_only=False))
    return {key: shards[0][1] for key, shards in whole.items()}


def assert_matches_checkpoint(
    loaded: dict[str, Shards], whole: dict[str, torch.Tensor], context: str
) -> None:
    """Each loaded shard equals its slice of the checkpoint, bit for bit."""
    tables = [k for k in loaded if TABLES in k]
    assert tables, f"{context}: no table state loaded"
    assert any(".momentum1" in k for k in tables), f"{context}: no table optimizer"
    for key, shards in loaded.items():
        assert key in whole, f"{context}: {key} is not in the checkpoint"
        for offsets, tensor in shards:
            index = tuple(
                slice(o, o + n) for o, n in zip(offsets, tensor.shape, strict=True)
            )
            assert torch.equal(tensor, whole[key][index]), f"{context}: {key}"


# ---------------------------------------------------------------- rank bodies


def _load_into_engine(config: RunConfig, checkpoint: str) -> dict[str, Shards]:
    """Restore ``checkpoint`` the way a resume does, into a fresh engine."""
    from kd_dagfm.distributed import DMPEngine
    from kd_dagfm.train.checkpoint import load_state, read_meta

    schema = load_schema(config.data.dataset)
    torch.manual_seed(0)  # Other weights than the checkpoint's.
    engine = DMPEngine(KDDAGFM(schema, config.model), config, Phase.TEACHER_TRAINING)
    engine.check_resume(read_meta(checkpoint))
    optimizer = engine.optimizer_state()
    load_state(checkpoint, {"model": engine.model_state(), "optimizer": optimizer})
    engine.load_optimizer_state(optimizer)
    return flatten_state(
        {"model": engine.model_state(), "optimizer": engine.optimizer_state()}
    )


def _save_engine_checkpoint(config: RunConfig, sharding: str) -> str:
    """One step of an engine with ``sharding``, saved as a teacher_training
    epoch checkpoint under ``config``'s output_dir."""
    from kd_dagfm.data.batch import table_to_batch
    from kd_dagfm.data.synthetic import generate_synthetic
    from kd_dagfm.distributed import DMPEngine
    from kd_dagfm.objective import KDObjective

    config = config.replace(sharding=sharding)
    schema = load_schema(config.data.dataset)
    torch.manual_seed(config.train.seed)
    engine = DMPEngine(KDDAGFM(schema, config.model), config, Phase.TEACHER_TRAINING)
    rows = generate_synthetic(64, 5, 12, seed=1)[1]["train"]
    batch = table_to_batch(rows.slice(engine.rank * 16, 16), schema)
    output = engine.model(
        batch.sparse_features, batch.dense_features, Phase.TEACHER_TRAINING
    )
    loss, _ = KDObjective(1.0, 1.0)(output, batch.labels, Phase.TEACHER_TRAINING)
    engine.optimize(loss)
    manager = CheckpointManager(
        f"{config.train.output_dir}/teacher_training/checkpoints"
    )
    info = manager.save(
        {"model": engine.model_state(), "optimizer": engine.optimizer_state()},
        {
            "kind": "epoch",
            "phase": "teacher_training",
            "config": config.to_dict(),
            "schema": schema.to_dict(),
            "world_size": engine.world_size,
            "engine": engine.describe(),
        },
    )
    return info.path


def _expect_checkpoint_error(config: RunConfig) -> str:
    try:
        run_phase(config, Phase.TEACHER_TRAINING, dmp_engine_factory(config))
    except CheckpointError as e:
        return str(e)
    raise AssertionError(f"run in {config.train.output_dir} did not fail")


def first_launch(rank: int, world_size: int, config_dict: dict[str, Any]) -> Any:
    """2 ranks: an epoch of row_wise training, and engine checkpoints of a
    column_wise and a data_parallel plan for the bad cases."""
    from kd_dagfm.distributed import init_process_group

    init_process_group()
    config = RunConfig.from_dict(config_dict)
    result = run_phase(config, Phase.TEACHER_TRAINING, dmp_engine_factory(config))
    column_wise = _save_engine_checkpoint(
        config.replace(output_dir=config.train.output_dir + "-cw"), "column_wise"
    )
    data_parallel = _save_engine_checkpoint(
        config.replace(output_dir=config.train.output_dir + "-dp"), "data_parallel"
    )
    column_wise_adagrad = _save_engine_checkpoint(
        config.replace(
            output_dir=config.train.output_dir + "-cw-adagrad",
            embedding_optimizer="adagrad",
        ),
        "column_wise",
    )
    return result.to_dict(), column_wise, data_parallel, column_wise_adagrad


def second_launch(
    rank: int,
    world_size: int,
    config_dict: dict[str, Any],
    checkpoint: str,
    column_wise_adagrad: str,
) -> Any:
    """1 rank, table_wise: load, reshard elementwise column-wise state, reject
    row-wise column-wise state, resume."""
    from kd_dagfm.distributed import init_process_group

    init_process_group()
    config = RunConfig.from_dict(config_dict)
    loaded = _load_into_engine(config, checkpoint)
    loaded_adagrad = _load_into_engine(
        config.replace(sharding="column_wise", embedding_optimizer="adagrad"),
        column_wise_adagrad,
    )
    column_wise = _expect_checkpoint_error(
        config.replace(
            output_dir=config.train.output_dir + "-cw", sharding="column_wise"
        )
    )
    result = run_phase(config, Phase.TEACHER_TRAINING, dmp_engine_factory(config))
    return loaded, column_wise, result.to_dict(), loaded_adagrad


def third_launch(
    rank: int,
    world_size: int,
    config_dict: dict[str, Any],
    checkpoint: str,
    model_file: str,
    dead_endpoint: str,
) -> Any:
    """2 ranks, row_wise: load, resume, warm-start from a single-process
    model file, reject data-parallel state and an unreachable store."""
    import os

    from kd_dagfm.distributed import DMPEngine, init_process_group
    from kd_dagfm.train.checkpoint import load_model_weights, resolve_warm_up

    init_process_group()
    config = RunConfig.from_dict(config_dict)
    loaded = _load_into_engine(config, checkpoint)
    result = run_phase(config, Phase.TEACHER_TRAINING, dmp_engine_factory(config))

    schema = load_schema(config.data.dataset)
    torch.manual_seed(0)
    distill = DMPEngine(KDDAGFM(schema, config.model), config, Phase.DISTILLATION)
    info: CheckpointInfo = resolve_warm_up(model_file, Phase.TEACHER_TRAINING)
    load_model_weights(info, distill.model_state())
    warm = flatten_state(distill.model_state())

    data_parallel = _expect_checkpoint_error(
        config.replace(output_dir=config.train.output_dir + "-dp")
    )
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "kd-dagfm-test-key",
            "AWS_SECRET_ACCESS_KEY": "kd-dagfm-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": dead_endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    unreachable = _expect_checkpoint_error(
        config.replace(output_dir="s3://kd-dagfm-unreachable/run")
    )
    return loaded, result.to_dict(), warm, data_parallel, unreachable


# ---------------------------------------------------------------- the story


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("dist-ckpt")
    dataset = small_dataset(root / "data")
    run = root / "run"
    checkpoints = run / "teacher_training" / "checkpoints"
    base = small_config(
        run, dataset, embedding_optimizer="rowwise_adagrad", keep_last_checkpoints=5
    )
    found: dict[str, Any] = {"root": root}

    first, column_wise, data_parallel, column_wise_adagrad = run_local_ranks(
        first_launch, 2, base.replace(sharding="row_wise").to_dict(), timeout_s=240
    )[0]
    found["column_wise_adagrad"] = read_whole(column_wise_adagrad, root)
    found["first"] = first
    found["column_wise_checkpoint"] = column_wise
    found["data_parallel_checkpoint"] = data_parallel
    epoch_1 = _drop_final(checkpoints)
    found["epoch_1"] = read_whole(epoch_1.path, root)
    found["epoch_1_meta"] = epoch_1.meta

    found["second"] = run_local_ranks(
        second_launch,
        1,
        base.replace(sharding="table_wise", epochs=2).to_dict(),
        epoch_1.path,
        column_wise_adagrad,
        timeout_s=240,
    )[0]
    epoch_2 = _drop_final(checkpoints)
    found["epoch_2"] = read_whole(epoch_2.path, root)
    found["epoch_2_meta"] = epoch_2.meta

    local = base.replace(output_dir=str(root / "local"), embedding_optimizer="sgd")
    run_phase(local, Phase.TEACHER_TRAINING)
    model_file = str(root / "local" / "teacher_training" / "model.pt")
    found["model_file"] = torch.load(model_file, weights_only=True)["model"]

    found["third"] = run_local_ranks(
        third_launch,
        2,
        base.replace(sharding="row_wise", epochs=3).to_dict(),
        epoch_2.path,
        model_file,
        f"http://127.0.0.1:{free_port()}",
        timeout_s=300,
    )
    found["final"] = CheckpointManager(str(checkpoints)).latest()
    return found


def _drop_final(checkpoints: Path) -> CheckpointInfo:
    """Delete the final checkpoint; return the epoch checkpoint before it."""
    listed = CheckpointManager(str(checkpoints)).list()
    assert listed[-1].kind == "final"
    shutil.rmtree(listed[-1].path)
    assert listed[-2].kind == "epoch"
    return listed[-2]


def test_restore_two_ranks_into_one(story: dict[str, Any]) -> None:
    loaded = story["second"][0]
    assert_matches_checkpoint(loaded, story["epoch_1"], "row_wise x2 -> table_wise x1")
    # On one rank every table is whole.
    table = f"model.{TABLES}.embedding_bags.t_C1.weight"
    assert loaded[table][0][1].shape == story["epoch_1"][table].shape


def test_column_wise_adagrad_state_reshards(story: dict[str, Any]) -> None:
    """Per-element Adagrad state of column shards loads into one whole table."""
    loaded = story["second"][3]
    assert_matches_checkpoint(
        loaded, story["column_wise_adagrad"], "column_wise x2 -> column_wise x1"
    )
    momentum = next(k for k in loaded if k.endswith("t_C1.momentum1"))
    assert loaded[momentum][0][1].shape == (12, 8)


def test_restore_one_rank_into_two(story: dict[str, Any]) -> None:
    for rank, launch in enumerate(story["third"]):
        assert_matches_checkpoint(
            launch[0], story["epoch_2"], f"table_wise x1 -> row_wise x2, rank {rank}"
        )
    # Row-wise: each rank has part of the rows, and together they have all.
    table = f"model.{TABLES}.embedding_bags.t_C1.weight"
    rows = sum(launch[0][table][0][1].shape[0] for launch in story["third"])
    assert rows == story["epoch_2"][table].shape[0]


def test_resumed_runs_continue_the_phase(story: dict[str, Any]) -> None:
    first, second = story["first"], story["second"][2]
    third = story["third"][0][1]
    for key in ("valid", "test", "epochs", "best_epoch"):
        assert story["third"][1][1][key] == third[key], key
    assert (first["epochs"], second["epochs"], third["epochs"]) == (1, 2, 3)
    epoch_1, epoch_2, final = (
        story["epoch_1_meta"],
        story["epoch_2_meta"],
        story["final"],
    )
    assert (epoch_1["world_size"], epoch_2["world_size"]) == (2, 1)
    assert epoch_2["engine"]["sharding"] == "table_wise"
    assert len(epoch_2["trainer"]["reader"]) == 1
    assert final.kind == "final"
    assert final.meta["world_size"] == 2
    steps = [m["trainer"]["step"] for m in (epoch_1, epoch_2, final.meta)]
    assert 0 < steps[0] < steps[1] < steps[2], steps
    for result in (first, second, third):
        assert result["valid"]["examples"] == 300


def test_warm_up_from_single_process_file(story: dict[str, Any]) -> None:
    weights = story["model_file"]
    for rank, launch in enumerate(story["third"]):
        warm = launch[2]
        for key, shards in warm.items():
            for offsets, tensor in shards:
                index = tuple(slice(o, o + n) for o, n in zip(offsets, tensor.shape))
                assert torch.equal(tensor, weights[key][index]), f"rank {rank}: {key}"


def test_column_wise_state_reshard_rejected(story: dict[str, Any]) -> None:
    message = story["second"][1]
    assert "cannot reshard column-wise optimizer state" in message
    assert "table 't_C1' was column_wise with column shards [[0, 4], [4, 4]]" in message
    assert "on 2 ranks, this run has it column_wise with [[0, 8]] on 1 ranks" in message
    assert "Resume with sharding=column_wise and num_workers=2" in message


def test_data_parallel_state_into_sharded_rejected(story: dict[str, Any]) -> None:
    for launch in story["third"]:
        message = launch[3]
        assert "cannot restore the rowwise_adagrad state of table 't_C1'" in message
        assert "it was data_parallel on 2 ranks, this run has it row_wise" in message
        assert "Resume with sharding=data_parallel" in message


def test_unreachable_store_fails_on_every_rank(story: dict[str, Any]) -> None:
    for launch in story["third"]:
        message = launch[4]
        assert "s3://kd-dagfm-unreachable/run/teacher_training/checkpoints" in message
        assert "reachable" in message


# ---------------------------------------------------------------- unit checks


def _plan(sharding: str, shards: list[list[int]]) -> dict[str, Any]:
    return {"t_a": {"sharding_type": sharding, "shards": shards}}


def _engine(
    sharding: str, shards: list[list[int]], world_size: int, optimizer: str
) -> dict[str, Any]:
    return {
        "engine": "dmp",
        "world_size": world_size,
        "sharding": sharding,
        "embedding_optimizer": optimizer,
        "plan": _plan(sharding, shards),
    }


ROW_WISE_2 = [[5, 8, 0, 0, 0], [5, 8, 5, 0, 1]]
TABLE_WISE_1 = [[10, 8, 0, 0, 0]]
COLUMN_WISE_2 = [[10, 4, 0, 0, 0], [10, 4, 0, 4, 1]]


@pytest.mark.parametrize(
    ("saved", "current"),
    [
        (("row_wise", ROW_WISE_2, 2), ("table_wise", TABLE_WISE_1, 1)),
        (("table_wise", TABLE_WISE_1, 1), ("row_wise", ROW_WISE_2, 2)),
        (("column_wise", COLUMN_WISE_2, 2), ("column_wise", COLUMN_WISE_2, 2)),
    ],
)
def test_resumable_plan_changes(
    saved: tuple[str, list[list[int]], int], current: tuple[str, list[list[int]], int]
) -> None:
    check_resumable(
        _engine(*saved, "rowwise_adagrad"), _engine(*current, "rowwise_adagrad")
    )


def test_elementwise_state_reshards_column_wise() -> None:
    check_resumable(
        _engine("column_wise", COLUMN_WISE_2, 2, "adagrad"),
        _engine("row_wise", ROW_WISE_2, 2, "adagrad"),
    )


def test_sgd_resumes_across_data_parallel() -> None:
    check_resumable(
        _engine("data_parallel", [], 2, "sgd"),
        _engine("row_wise", ROW_WISE_2, 2, "sgd"),
    )


def test_other_optimizer_rejected() -> None:
    with pytest.raises(CheckpointError, match="embedding optimizer is 'adagrad'"):
        check_resumable(
            _engine("row_wise", ROW_WISE_2, 2, "adagrad"),
            _engine("row_wise", ROW_WISE_2, 2, "rowwise_adagrad"),
        )


def test_local_engine_state_rejected() -> None:
    with pytest.raises(CheckpointError, match="written by the 'local' engine"):
        check_resumable(
            {"engine": "local", "world_size": 1},
            _engine("row_wise", ROW_WISE_2, 2, "sgd"),
        )
