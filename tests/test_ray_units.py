"""Ray integration pieces that need no running cluster: configs, paths, parsing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cluster.local import (
    ListeningSocket,
    LocalClusterConfig,
    LocalRayHead,
    _proc_net_address,
)
from cluster.ray_train import (
    WORKER_ENV,
    build_trainer,
    check_config,
    default_run_name,
    resolve_paths,
    resume_point,
)
from jobs._main import main as job_main
from kd_dagfm.config import build_config
from kd_dagfm.errors import ConfigError
from kd_dagfm.phases import PIPELINE, Phase
from kd_dagfm.train.checkpoint import CheckpointManager


def test_local_cluster_config_rejects_auth_mode() -> None:
    with pytest.raises(ValueError) as excinfo:
        LocalClusterConfig(auth_mode="k8s")
    assert "invalid auth_mode 'k8s'" in str(excinfo.value)
    assert "token, disabled" in str(excinfo.value)


def test_client_env_without_token() -> None:
    head = LocalRayHead(LocalClusterConfig(auth_mode="disabled"))
    env = head.client_env()
    assert env["RAY_AUTH_MODE"] == "disabled"
    assert "RAY_AUTH_TOKEN_PATH" not in env
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"


@pytest.mark.parametrize(
    ("hex_address", "expected"),
    [
        ("0100007F", "127.0.0.1"),
        ("00000000", "0.0.0.0"),
        ("0000000000000000FFFF00000100007F", "::ffff:127.0.0.1"),
        ("00000000000000000000000001000000", "::1"),
        ("00000000000000000000000000000000", "::"),
    ],
)
def test_proc_net_address_decoding(hex_address: str, expected: str) -> None:
    assert _proc_net_address(hex_address) == expected


def test_listening_socket_loopback() -> None:
    assert ListeningSocket(1, "127.0.0.1", 80).is_loopback
    assert ListeningSocket(1, "::ffff:127.0.0.1", 80).is_loopback
    assert not ListeningSocket(1, "0.0.0.0", 80).is_loopback
    assert not ListeningSocket(1, "::", 80).is_loopback


def test_trainer_follows_distributed_config(tmp_path: Path) -> None:
    config = build_config(
        {
            "num_workers": 3,
            "cpus_per_worker": 2,
            "max_failures": 5,
            "embedding_optimizer": "rowwise_adagrad",
            "output_dir": str(tmp_path / "run"),
        }
    )
    trainer = build_trainer(config, PIPELINE)

    scaling = trainer.scaling_config
    assert scaling.num_workers == 3
    assert scaling.use_gpu is False
    assert scaling.resources_per_worker == {"CPU": 2.0}
    assert trainer.backend_config.backend == "gloo"
    assert trainer.backend_config.timeout_s == 600
    run = trainer.run_config
    assert run.name == "kd-dagfm-pipeline"
    assert run.storage_path == str(tmp_path / "run")
    assert run.failure_config.max_failures == 5
    assert run.worker_runtime_env["env_vars"]["OMP_NUM_THREADS"] == "1"
    assert run.worker_runtime_env["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"
    assert trainer.train_loop_config["phases"] == [p.value for p in PIPELINE]
    assert trainer.train_loop_config["config"] == config.to_dict()


def test_trainer_uses_nccl_with_gpus(tmp_path: Path) -> None:
    config = build_config(
        {
            "num_workers": 2,
            "gpus_per_worker": 1,
            "storage_path": "s3://bucket/ray",
            "output_dir": str(tmp_path),
        }
    )
    trainer = build_trainer(config, [Phase.DISTILLATION], name="nightly")

    assert trainer.backend_config.backend == "nccl"
    assert trainer.scaling_config.use_gpu is True
    assert trainer.scaling_config.resources_per_worker == {"CPU": 1.0, "GPU": 1.0}
    assert trainer.run_config.name == "nightly"
    assert trainer.run_config.storage_path == "s3://bucket/ray"


def test_worker_env_is_single_threaded() -> None:
    assert WORKER_ENV == {"OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def test_run_names_are_stable() -> None:
    assert default_run_name(PIPELINE) == "kd-dagfm-pipeline"
    assert default_run_name([Phase.FINETUNING]) == "kd-dagfm-finetuning"


def test_resolve_paths_makes_local_paths_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = build_config(
        {"output_dir": "runs/a", "dataset": "data/ml", "warm_up": "runs/old"}
    )
    resolved = resolve_paths(config)
    assert resolved.train.output_dir == str(tmp_path / "runs" / "a")
    assert resolved.data.dataset == str(tmp_path / "data" / "ml")
    assert resolved.train.warm_up == str(tmp_path / "runs" / "old")

    remote = build_config({"output_dir": "s3://bucket/run", "dataset": "synthetic"})
    assert resolve_paths(remote) == remote


def test_resolve_paths_rejects_relative_storage_path(tmp_path: Path) -> None:
    config = build_config({"storage_path": "ray-results", "output_dir": str(tmp_path)})
    with pytest.raises(ConfigError) as excinfo:
        resolve_paths(config)
    message = str(excinfo.value)
    assert "invalid storage_path 'ray-results'" in message
    assert "absolute path or a URL" in message
    assert os.path.abspath("ray-results") in message


def test_check_config_rejects_uneven_batches() -> None:
    config = build_config(
        {
            "num_workers": 3,
            "train_batch_size": 512,
            "embedding_optimizer": "rowwise_adagrad",
        }
    )
    with pytest.raises(ConfigError) as excinfo:
        check_config(config)
    assert "train_batch_size 512 is not divisible by num_workers 3" in str(
        excinfo.value
    )
    assert "such as 510" in str(excinfo.value)


def test_check_config_rejects_adam_on_cpu() -> None:
    config = build_config({"num_workers": 2, "embedding_optimizer": "adam"})
    with pytest.raises(ConfigError) as excinfo:
        check_config(config)
    assert "'adam' has no fused CPU kernel" in str(excinfo.value)
    assert "rowwise_adagrad" in str(excinfo.value)


def test_check_config_rejects_kept_remainder() -> None:
    config = build_config(
        {
            "num_workers": 2,
            "remainder": "keep",
            "embedding_optimizer": "sgd",
        }
    )
    with pytest.raises(ConfigError) as excinfo:
        check_config(config)
    assert "remainder 'keep'" in str(excinfo.value)


def _save(manager: CheckpointManager, kind: str, phase: Phase) -> str:
    info = manager.save(
        {"model": {"w": torch.zeros(2)}}, {"kind": kind, "phase": phase.value}
    )
    return info.path


def test_resume_point_finds_first_unfinished_phase(tmp_path: Path) -> None:
    config = build_config({"output_dir": str(tmp_path)})

    def manager(phase: Phase) -> CheckpointManager:
        return CheckpointManager(str(tmp_path / phase.value / "checkpoints"))

    assert resume_point(config, PIPELINE) == (Phase.TEACHER_TRAINING, None)

    _save(manager(Phase.TEACHER_TRAINING), "final", Phase.TEACHER_TRAINING)
    assert resume_point(config, PIPELINE) == (Phase.DISTILLATION, None)

    step = _save(manager(Phase.DISTILLATION), "step", Phase.DISTILLATION)
    assert resume_point(config, PIPELINE) == (Phase.DISTILLATION, step)

    _save(manager(Phase.DISTILLATION), "final", Phase.DISTILLATION)
    _save(manager(Phase.FINETUNING), "final", Phase.FINETUNING)
    assert resume_point(config, PIPELINE) == (None, None)


def test_phase_job_rejects_other_phase(capsys: pytest.CaptureFixture[str]) -> None:
    code = job_main([Phase.DISTILLATION], ["--phase", "finetuning"])
    assert code == 2
    error = capsys.readouterr().err
    assert "--phase finetuning conflicts with this job" in error
    assert "python -m jobs.finetuning" in error


def test_trainer_requires_train_v2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_TRAIN_V2_ENABLED", "0")
    config = build_config({"output_dir": str(tmp_path)})
    with pytest.raises(ConfigError) as excinfo:
        build_trainer(config, PIPELINE)
    assert "RAY_TRAIN_V2_ENABLED=0" in str(excinfo.value)


def test_worker_config_error_reaches_driver() -> None:
    from ray.train import WorkerGroupError

    from cluster.ray_train import _raise_worker_error

    cause = ConfigError("distillation needs warm_up")
    error = WorkerGroupError(
        "two workers failed", {1: RuntimeError("gloo connection reset"), 0: cause}
    )
    with pytest.raises(ConfigError) as excinfo:
        _raise_worker_error(error)
    assert excinfo.value is cause
    assert excinfo.value.__cause__ is error


def test_other_worker_errors_pass_through() -> None:
    from ray.train import WorkerGroupError

    from cluster.ray_train import _raise_worker_error

    error = WorkerGroupError("one worker failed", {0: RuntimeError("out of memory")})
    # Neither call may raise: the caller re-raises the original error itself.
    _raise_worker_error(error)
    _raise_worker_error(ValueError("not from Ray Train"))
