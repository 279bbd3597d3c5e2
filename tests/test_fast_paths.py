"""Single-process speed paths give TorchRec's and the reference's results."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kd_dagfm.config import ModelConfig
from kd_dagfm.data.memory import InMemorySplit
from kd_dagfm.data.reader import ParquetSplit, load_schema
from kd_dagfm.errors import ConfigError
from kd_dagfm.modules import SparseArch
from kd_dagfm.phases import Phase
from kd_dagfm.pipeline import run_phase, run_pipeline
from kd_dagfm.train.engine import LocalEngine
from kd_dagfm.train.trainer import PhaseResult
from tests.conftest import tiny_config


def test_sparse_lookup_matches_collection(ml100k_dataset: str) -> None:
    schema = load_schema(ml100k_dataset)
    memory = InMemorySplit.load(ParquetSplit(ml100k_dataset, "test", schema))
    batch = memory.take(torch.arange(0, 600, 3)).batch(0, 200)
    torch.manual_seed(0)
    arch = SparseArch(schema, embedding_dim=8)
    collection = arch.embedding_bag_collection

    fast = arch(batch.sparse_features, batch.dense_features)  # (B, F, D)
    pooled = collection(batch.sparse_features).to_dict()
    reference = torch.stack([pooled[name] for name in arch.sparse_names], dim=1)
    torch.testing.assert_close(fast, reference, rtol=0, atol=0)

    weights = torch.randn_like(fast)
    fast_grads = torch.autograd.grad((fast * weights).sum(), list(arch.parameters()))
    reference_grads = torch.autograd.grad(
        (reference * weights).sum(), list(arch.parameters())
    )
    for got, expected in zip(fast_grads, reference_grads):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_local_engine_fuses_adam(tmp_path: Path) -> None:
    from kd_dagfm.model import KDDAGFM
    from kd_dagfm.schema import make_schema

    schema = make_schema("label", {"a": 5, "b": 7})
    model = KDDAGFM(schema, ModelConfig(embedding_size=4, depth=1, t_depth=1))
    config = tiny_config(tmp_path)
    engine = LocalEngine(
        model, config.train, Phase.TEACHER_TRAINING, torch.device("cpu")
    )
    assert len(engine.optimizers) == 2
    for optimizer in engine.optimizers:
        assert optimizer.defaults["fused"] is True


def test_from_scratch_trains_without_warm_up(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, from_scratch=True, epochs=2)
    result = run_phase(config, Phase.FINETUNING)
    assert result.phase is Phase.FINETUNING
    assert result.model_name == "DAGFM-outer"
    assert len(result.history) == 2
    assert 0.0 <= result.test.auc <= 1.0


def test_from_scratch_rejects_other_phases(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, from_scratch=True)
    with pytest.raises(ConfigError, match="it applies to finetuning only"):
        run_phase(config, Phase.DISTILLATION)


def test_from_scratch_rejects_warm_up(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, from_scratch=True, warm_up=str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="unset one of them"):
        run_phase(config, Phase.FINETUNING)


def test_history_records_every_epoch(tmp_path: Path) -> None:
    results = run_pipeline(tiny_config(tmp_path, epochs=2, cache_in_memory=True))
    for result in results:
        assert [h["epoch"] for h in result.history] == [0, 1]
        for entry in result.history:
            assert entry["train_loss"] > 0
            assert entry["train_time_s"] > 0
            assert entry["train_cpu_s"] > 0
            assert entry["examples_per_s"] > 0
            assert 0.0 <= entry["valid_auc"] <= 1.0
        best = max(result.history, key=lambda h: h["valid_auc"])
        assert best["valid_auc"] == pytest.approx(result.valid.auc)
        restored = PhaseResult.from_dict(result.to_dict())
        assert restored.history == result.history
    # Distillation's loss is dominated by the logit MSE term, far from BCE's scale.
    assert results[1].history[0]["train_loss"] != pytest.approx(
        results[2].history[0]["train_loss"], rel=1e-3
    )
