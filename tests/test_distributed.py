"""Sharded training on 2 gloo ranks against the single-process reference.

Every rank builds the model from the same seed, so a rank can run the
unsharded reference itself and compare its own shards with the matching
slices of the reference tables.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from kd_dagfm.config import RunConfig
from kd_dagfm.data.batch import Batch, table_to_batch
from kd_dagfm.data.reader import load_schema
from kd_dagfm.data.synthetic import generate_synthetic
from kd_dagfm.data.writer import write_dataset
from kd_dagfm.distributed import MANUAL_SHARDING_TYPES, dmp_engine_factory
from kd_dagfm.distributed.spawn import run_local_ranks
from kd_dagfm.errors import ConfigError
from kd_dagfm.model import KDDAGFM
from kd_dagfm.phases import Phase
from kd_dagfm.pipeline import local_engine_factory
from kd_dagfm.train.checkpoint import CheckpointManager
from kd_dagfm.train.trainer import PhaseTrainer
from tests.conftest import tiny_config

pytestmark = pytest.mark.distributed

WORLD_SIZE = 2
SHARDINGS = (*MANUAL_SHARDING_TYPES, "auto")
# Sharded and unsharded forward passes run the same float32 operations
# except for the order of the pooled sums; 1e-6 is a few float32 ulps at the
# logits' magnitude (< 10).
FORWARD_ATOL = 1e-6
# A training step sums gradients in another order (all-reduce over ranks
# versus one process over the batch). The largest difference measured after
# one step (sgd tables, Adam towers at lr 0.05) is 6.5e-7.
STEP_ATOL = 1e-6


def small_dataset(root: Path, rows: int = 3000, seed: int = 7) -> str:
    """Synthetic data with 200-row row groups, so 2 ranks get unequal eval parts."""
    schema, splits = generate_synthetic(rows, 5, 12, seed)
    write_dataset(str(root), schema, splits, rows_per_shard=1000, row_group_rows=200)
    return str(root)


def small_config(output_dir: Path, dataset: str, **overrides: Any) -> RunConfig:
    values: dict[str, Any] = {
        "dataset": dataset,
        "embedding_size": 8,
        "train_batch_size": 128,
        "eval_batch_size": 64,
        "epochs": 1,
        "learning_rate": 0.05,
        "seed": 11,
    }
    values.update(overrides)
    return tiny_config(output_dir, **values)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    return small_dataset(tmp_path_factory.mktemp("dist-data") / "synthetic")


# ---------------------------------------------------------------- rank bodies


def _max_shard_difference(state: dict[str, Any], reference: dict[str, Any]) -> float:
    """Largest |sharded - reference| over this rank's part of every entry."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    worst = 0.0
    for key, value in state.items():
        full = reference[key]
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                index = tuple(
                    slice(offset, offset + size)
                    for offset, size in zip(
                        shard.metadata.shard_offsets, shard.metadata.shard_sizes
                    )
                )
                if shard.tensor.numel():
                    difference = (shard.tensor - full[index]).abs().max()
                    worst = max(worst, float(difference))
        else:
            worst = max(worst, float((value - full).abs().max()))
    return worst


def _local_table_shards(state: dict[str, Any]) -> list[torch.Tensor]:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    shards = []
    for key, value in sorted(state.items()):
        if "embedding_bag_collection" not in key:
            continue
        if isinstance(value, ShardedTensor):
            shards += [s.tensor.detach().clone() for s in value.local_shards()]
        else:
            shards.append(value.detach().clone())
    return shards


def _logits(model: torch.nn.Module, batch: Batch, phase: Phase) -> torch.Tensor:
    output = model(batch.sparse_features, batch.dense_features, phase)
    logits = output.teacher_logits if phase is Phase.TEACHER_TRAINING else None
    logits = output.student_logits if logits is None else logits
    assert logits is not None
    return logits


def compare_with_unsharded(
    rank: int, world_size: int, output_dir: str, dataset: str
) -> dict[str, Any]:
    """For each sharding: forward outputs and one training step against the
    unsharded model, frozen tables in a distillation step, and the valid
    metrics of PhaseTrainer.evaluate on the whole split."""
    from kd_dagfm.distributed import DMPEngine, init_process_group
    from kd_dagfm.objective import KDObjective
    from kd_dagfm.train.engine import LocalEngine

    init_process_group()
    schema = load_schema(dataset)
    base = small_config(Path(output_dir), dataset, embedding_optimizer="sgd")
    train = generate_synthetic(400, 5, 12, seed=3)[1]["train"]
    objective = KDObjective(1.0, 1.0)
    per_rank = 16
    global_batch = table_to_batch(train.slice(0, per_rank * world_size), schema)
    local_batch = table_to_batch(train.slice(rank * per_rank, per_rank), schema)

    def seeded_model() -> KDDAGFM:
        torch.manual_seed(base.train.seed)
        return KDDAGFM(schema, base.model)

    results: dict[str, Any] = {}
    for sharding in SHARDINGS:
        config = base.replace(sharding=sharding)
        found: dict[str, Any] = {}

        # Forward passes in every phase, before any update.
        reference = seeded_model().eval()
        engine = DMPEngine(seeded_model(), config, Phase.TEACHER_TRAINING)
        engine.model.eval()
        found["plan"] = {t: e["sharding_type"] for t, e in engine.plan.items()}
        with torch.no_grad():
            found["forward"] = max(
                float(
                    (
                        _logits(engine.model, local_batch, phase)
                        - _logits(reference, local_batch, phase)
                    )
                    .abs()
                    .max()
                )
                for phase in Phase
            )

        # One step: each rank on its half versus one process on the whole.
        engine.model.train()
        reference.train()
        local = LocalEngine(
            reference, config.train, Phase.TEACHER_TRAINING, torch.device("cpu")
        )
        loss, _ = objective(
            engine.model(
                local_batch.sparse_features,
                local_batch.dense_features,
                Phase.TEACHER_TRAINING,
            ),
            local_batch.labels,
            Phase.TEACHER_TRAINING,
        )
        engine.optimize(loss)
        reference_loss, _ = objective(
            reference(
                global_batch.sparse_features,
                global_batch.dense_features,
                Phase.TEACHER_TRAINING,
            ),
            global_batch.labels,
            Phase.TEACHER_TRAINING,
        )
        local.optimize(reference_loss)
        found["step"] = _max_shard_difference(
            engine.model_state(), reference.state_dict()
        )

        # Distillation: the student moves, the (frozen) tables do not.
        distill = DMPEngine(
            seeded_model(),
            config.replace(embedding_optimizer="rowwise_adagrad"),
            Phase.DISTILLATION,
        )
        tables_before = _local_table_shards(distill.model_state())
        student_before = distill.unwrapped.student.readout.weight.detach().clone()
        loss, _ = objective(
            distill.model(
                local_batch.sparse_features,
                local_batch.dense_features,
                Phase.DISTILLATION,
            ),
            local_batch.labels,
            Phase.DISTILLATION,
        )
        distill.optimize(loss)
        tables_after = _local_table_shards(distill.model_state())
        found["tables_unchanged"] = len(tables_before) == len(tables_after) and all(
            torch.equal(a, b) for a, b in zip(tables_before, tables_after)
        )
        found["table_elements"] = sum(t.numel() for t in tables_before)
        found["student_moved"] = float(
            (distill.unwrapped.student.readout.weight - student_before).abs().max()
        )
        results[sharding] = found

    # Evaluation over the whole valid split, padded to equal steps.
    config = base.replace(sharding="row_wise")
    trainer = PhaseTrainer(
        config,
        Phase.TEACHER_TRAINING,
        schema,
        dataset,
        dmp_engine_factory(config),
    )
    trainer.engine = trainer.make_engine(seeded_model(), Phase.TEACHER_TRAINING)
    valid = trainer.evaluate("valid")
    results["valid"] = (valid.auc, valid.log_loss, valid.examples)
    return results


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def compared(
    tmp_path_factory: pytest.TempPathFactory, dataset: str
) -> list[dict[str, Any]]:
    output = tmp_path_factory.mktemp("compare")
    return run_local_ranks(
        compare_with_unsharded, WORLD_SIZE, str(output), dataset, timeout_s=240
    )


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_forward_matches_unsharded(
    compared: list[dict[str, Any]], sharding: str
) -> None:
    for rank, results in enumerate(compared):
        assert results[sharding]["forward"] <= FORWARD_ATOL, (
            f"rank {rank}, {sharding}: logits differ by {results[sharding]['forward']}"
        )
    if sharding != "auto":
        assert set(compared[0][sharding]["plan"].values()) == {sharding}


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_step_matches_global_batch(
    compared: list[dict[str, Any]], sharding: str
) -> None:
    """A step on 2 ranks of 16 rows equals one process's step on all 32."""
    for rank, results in enumerate(compared):
        assert results[sharding]["step"] <= STEP_ATOL, (
            f"rank {rank}, {sharding}: weights differ by {results[sharding]['step']} "
            "after one step"
        )


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_distillation_keeps_tables(
    compared: list[dict[str, Any]], sharding: str
) -> None:
    for rank, results in enumerate(compared):
        assert results[sharding]["tables_unchanged"], f"rank {rank}, {sharding}"
        assert results[sharding]["student_moved"] > 0.0
    # Between them the ranks hold every table element at least once.
    elements = sum(r[sharding]["table_elements"] for r in compared)
    assert elements >= 5 * 12 * 8


def test_evaluation_covers_whole_split(
    compared: list[dict[str, Any]], tmp_path: Path, dataset: str
) -> None:
    """2-rank AUC and log loss equal one process's on the same valid split,
    although the ranks hold 200 and 100 of its 300 rows."""
    schema = load_schema(dataset)
    config = small_config(tmp_path, dataset, embedding_optimizer="sgd")
    trainer = PhaseTrainer(
        config, Phase.TEACHER_TRAINING, schema, dataset, local_engine_factory(config)
    )
    torch.manual_seed(config.train.seed)
    trainer.engine = trainer.make_engine(
        KDDAGFM(schema, config.model), Phase.TEACHER_TRAINING
    )
    single = trainer.evaluate("valid")
    assert single.examples == 300
    for rank, results in enumerate(compared):
        auc, log_loss, examples = results["valid"]
        assert examples == 300, f"rank {rank}"
        assert auc == pytest.approx(single.auc, abs=1e-6), f"rank {rank}"
        assert log_loss == pytest.approx(single.log_loss, abs=1e-6), f"rank {rank}"


def test_adam_tables_rejected_on_cpu(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, embedding_optimizer="adam")
    with pytest.raises(ConfigError, match="sgd, adagrad, rowwise_adagrad"):
        dmp_engine_factory(config)


# ---------------------------------------------------------------- ml-100k


def ml100k_pipeline(
    rank: int, world_size: int, config_dict: dict[str, Any]
) -> list[dict[str, Any]]:
    from kd_dagfm.distributed import init_process_group
    from kd_dagfm.pipeline import run_pipeline

    init_process_group()
    config = RunConfig.from_dict(config_dict)
    results = run_pipeline(config, make_engine=dmp_engine_factory(config))
    return [r.to_dict() for r in results]


def _checkpoint_tensors(path: str, scratch: Path) -> dict[str, torch.Tensor]:
    target = scratch / (Path(path).name + ".pt")
    dcp_to_torch_save(path, str(target))
    return dict(torch.load(target, weights_only=False)["model"])


def test_ml100k_pipeline_on_two_ranks(tmp_path: Path, ml100k_dataset: str) -> None:
    """All three phases with row-wise tables on 2 ranks, 4 steps per epoch."""
    config = tiny_config(
        tmp_path / "run",
        dataset=ml100k_dataset,
        sharding="row_wise",
        embedding_optimizer="rowwise_adagrad",
        embedding_size=8,
        train_batch_size=512,
        eval_batch_size=4096,
        epochs=1,
        max_steps_per_epoch=4,
        learning_rate=0.01,
    )
    results = run_local_ranks(
        ml100k_pipeline, WORLD_SIZE, config.to_dict(), timeout_s=300
    )
    for mine, other in zip(results[0], results[1]):
        assert mine["valid"] == other["valid"]
        assert mine["test"] == other["test"]
    phases = [r["phase"] for r in results[0]]
    assert phases == [p.value for p in Phase]
    schema = load_schema(ml100k_dataset)
    rows = sum(f.num_embeddings for f in schema.sparse_features)
    rows += len(schema.dense_features)
    for result in results[0]:
        assert 0.5 < result["test"]["auc"] < 1.0, result
        assert math.isfinite(result["test"]["log_loss"])
        assert result["valid"]["examples"] == 10_000
        assert result["embedding_parameters"] == 8 * rows

    finals: dict[str, dict[str, torch.Tensor]] = {}
    for phase in Phase:
        latest = CheckpointManager(
            str(tmp_path / "run" / phase.value / "checkpoints")
        ).latest()
        assert latest is not None and latest.kind == "final"
        plan = latest.meta["engine"]["plan"]
        assert {e["sharding_type"] for e in plan.values()} == {"row_wise"}
        assert latest.meta["world_size"] == WORLD_SIZE
        finals[phase.value] = _checkpoint_tensors(latest.path, tmp_path)

    tables = [k for k in finals["teacher_training"] if "embedding_bags" in k]
    assert len(tables) == len(schema.sparse_features)
    for key in tables:
        # Distillation froze the tables; fine-tuning trained them again.
        assert torch.equal(finals["teacher_training"][key], finals["distillation"][key])
        assert not torch.equal(finals["distillation"][key], finals["finetuning"][key])
