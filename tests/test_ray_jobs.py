"""A real loopback-only Ray head running ``ray job submit`` of the pipeline.

One head serves the module. The reference job trains all three phases on 2
workers with row-wise sharded tables on MovieLens-100K. The interrupted run
repeats it with a killed worker and a stopped job, and must end with the
same parameters.

The test asserts bitwise equality. The seed fixes initialisation and data
order, and a resumed phase reloads model, fused and dense optimizer state and
the exact reader cursor. Gloo's all-reduce on 2 ranks sums in a fixed order,
so an interrupted run repeats the uninterrupted run's arithmetic.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from cluster.local import LocalClusterConfig, LocalRayHead, session_processes
from cluster.ray_train import worker_starts
from kd_dagfm.phases import PIPELINE, Phase
from kd_dagfm.pipeline import format_results
from kd_dagfm.train.checkpoint import CheckpointInfo, CheckpointManager

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 240.0


@pytest.fixture(scope="module")
def ray_head() -> Iterator[LocalRayHead]:
    head = LocalRayHead(
        LocalClusterConfig(
            num_cpus=2,
            object_store_memory_bytes=128 * 1024**2,
            start_timeout_s=120.0,
            stop_timeout_s=60.0,
        )
    )
    # The head (and so every process it forks) gets 2 threads, so the workers'
    # single thread can only come from the trainer's worker_runtime_env.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "2")
        head.start()
    try:
        yield head
    finally:
        session = head.pid
        head.stop()
        assert session is not None
        assert session_processes(session) == []


@pytest.fixture(scope="module")
def job_client(ray_head: LocalRayHead) -> Iterator[Any]:
    from ray.job_submission import JobSubmissionClient

    with ray_head.client_environment():
        yield JobSubmissionClient(ray_head.dashboard_url)


@pytest.fixture(scope="module")
def working_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three packages a job imports, without the checkout's other files."""
    root = tmp_path_factory.mktemp("working_dir")
    for package in ("kd_dagfm", "cluster", "jobs"):
        shutil.copytree(
            REPO / package,
            root / package,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
    return root


def job_flags(dataset: str, output_dir: Path) -> list[str]:
    values = {
        "dataset": dataset,
        "output_dir": str(output_dir),
        "num_workers": 2,
        "sharding": "row_wise",
        "embedding_optimizer": "rowwise_adagrad",
        "embedding_size": 4,
        "depth": 1,
        "t_depth": 1,
        "train_batch_size": 512,
        "eval_batch_size": 8192,
        "epochs": 2,
        "max_steps_per_epoch": 12,
        "early_stopping_patience": 0,
        "learning_rate": 0.01,
        "checkpoint_every_steps": 4,
        "keep_last_checkpoints": 2,
        "log_every_steps": 0,
        "prefetch_batches": 0,
        "max_failures": 2,
        "seed": 2022,
    }
    flags: list[str] = []
    for key, value in values.items():
        flags += [f"--{key}", str(value)]
    return flags


def submit(
    head: LocalRayHead,
    working_dir: Path,
    submission_id: str,
    flags: list[str],
    wait: bool,
) -> subprocess.CompletedProcess[str]:
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    command = [
        ray,
        "job",
        "submit",
        "--address",
        head.dashboard_url,
        "--working-dir",
        str(working_dir),
        "--submission-id",
        submission_id,
        *([] if wait else ["--no-wait"]),
        "--",
        "python",
        "-m",
        "jobs.pipeline",
        *flags,
    ]
    return subprocess.run(
        command,
        env={**os.environ, **head.client_env()},
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )


def wait_for_status(client: Any, submission_id: str, wanted: set[str]) -> str:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    status = ""
    while time.monotonic() < deadline:
        status = str(client.get_job_status(submission_id).value)
        if status in wanted:
            return status
        if status in {"SUCCEEDED", "FAILED", "STOPPED"}:
            break
        time.sleep(1.0)
    logs = client.get_job_logs(submission_id)
    pytest.fail(
        f"job {submission_id} is {status}, expected {sorted(wanted)}; "
        f"end of its log:\n{logs[-4000:]}"
    )


def first_checkpoint(
    output_dir: Path, phase: Phase, timeout_s: float
) -> CheckpointInfo:
    """Poll until ``phase`` has a complete checkpoint; return it."""
    manager = CheckpointManager(str(output_dir / phase.value / "checkpoints"))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        latest = manager.latest()
        if latest is not None:
            return latest
        time.sleep(0.05)
    pytest.fail(f"no {phase.value} checkpoint in {output_dir} after {timeout_s} s")


def final_parameters(output_dir: Path, phase: Phase, scratch: Path) -> dict[str, Any]:
    """The phase's final model state as full (unsharded) tensors."""
    latest = CheckpointManager(str(output_dir / phase.value / "checkpoints")).latest()
    assert latest is not None, f"{phase.value} has no checkpoint in {output_dir}"
    assert latest.kind == "final", f"{latest.path} is a {latest.kind} checkpoint"
    target = scratch / f"{output_dir.name}-{phase.value}.pt"
    dcp_to_torch_save(latest.path, str(target))
    state = torch.load(target, weights_only=False)
    return dict(state["model"])


def assert_same_parameters(reference: Path, candidate: Path, scratch: Path) -> None:
    for phase in PIPELINE:
        expected = final_parameters(reference, phase, scratch)
        actual = final_parameters(candidate, phase, scratch)
        assert sorted(actual) == sorted(expected), phase.value
        for key, value in expected.items():
            if not isinstance(value, torch.Tensor):
                continue
            difference = (actual[key].double() - value.double()).abs().max()
            assert torch.equal(actual[key], value), (
                f"{phase.value} {key} differs by up to {float(difference):.3g}"
            )


def table_rows(output: str) -> dict[str, list[str]]:
    rows = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if cells and cells[0] in {p.value for p in PIPELINE}:
            rows[cells[0]] = cells
    return rows


@pytest.fixture(scope="module")
def reference_run(
    ray_head: LocalRayHead,
    working_dir: Path,
    ml100k_dataset: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """The uninterrupted pipeline, submitted with `ray job submit`."""
    output_dir = tmp_path_factory.mktemp("reference") / "run"
    completed = submit(
        ray_head,
        working_dir,
        "kd-dagfm-reference",
        job_flags(ml100k_dataset, output_dir),
        wait=True,
    )
    return output_dir, completed


@pytest.mark.timeout(300)
def test_job_submit_pipeline_two_workers(
    reference_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    output_dir, completed = reference_run
    assert completed.returncode == 0, (
        completed.stdout[-4000:] + completed.stderr[-4000:]
    )

    header = [cell.strip() for cell in format_results([]).splitlines()[0].split("|")]
    printed = [
        [cell.strip() for cell in line.split("|")]
        for line in completed.stdout.splitlines()
    ]
    assert header in printed
    rows = table_rows(completed.stdout)
    assert list(rows) == [p.value for p in PIPELINE]
    assert rows["teacher_training"][1] == "CrossNet"
    assert rows["distillation"][1] == "DAGFM-outer"
    assert rows["finetuning"][1] == "DAGFM-outer"

    results = json.loads((output_dir / "results.json").read_text())
    assert [r["phase"] for r in results] == [p.value for p in PIPELINE]
    for result in results:
        row = rows[result["phase"]]
        assert row[5] == f"{result['valid']['auc']:.4f}"
        assert row[7] == f"{result['test']['auc']:.4f}"
        assert 0.55 < result["test"]["auc"] < 1.0, result
    assert (output_dir / "results.txt").read_text().strip() in completed.stdout

    for rank in (0, 1):
        starts = worker_starts(str(output_dir), rank)
        assert len(starts) == 1
        assert starts[0].world_size == 2
        assert starts[0].torch_threads == 1
    for phase in PIPELINE:
        final = CheckpointManager(
            str(output_dir / phase.value / "checkpoints")
        ).latest()
        assert final is not None
        assert final.kind == "final"
        assert final.meta["world_size"] == 2
        assert final.meta["engine"]["sharding"] == "row_wise"


@pytest.mark.timeout(300)
def test_head_listens_on_loopback_only(
    ray_head: LocalRayHead,
    reference_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    sockets = ray_head.listening_sockets()
    assert len(sockets) >= 6
    exposed = [s for s in sockets if not s.is_loopback]
    assert exposed == []


def test_head_rejects_requests_without_token(ray_head: LocalRayHead) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        opener.open(f"{ray_head.dashboard_url}/api/jobs/", timeout=5.0)
    assert excinfo.value.code == 401


@pytest.mark.timeout(480)
def test_killed_then_stopped_run_resumes(
    ray_head: LocalRayHead,
    job_client: Any,
    working_dir: Path,
    ml100k_dataset: str,
    reference_run: tuple[Path, subprocess.CompletedProcess[str]],
    tmp_path: Path,
) -> None:
    """SIGKILL rank 1 in teacher_training (Ray Train restarts the workers),
    stop the job in distillation, submit it again: the run must end with
    the reference run's parameters."""
    reference, _ = reference_run
    output_dir = tmp_path / "interrupted"
    flags = job_flags(ml100k_dataset, output_dir)
    submitted = submit(
        ray_head, working_dir, "kd-dagfm-interrupted-1", flags, wait=False
    )
    assert submitted.returncode == 0, submitted.stderr[-4000:]

    first_checkpoint(output_dir, Phase.TEACHER_TRAINING, timeout_s=JOB_TIMEOUT_S)
    victim = worker_starts(str(output_dir), 1)[-1]
    os.kill(victim.pid, signal.SIGKILL)

    first_checkpoint(output_dir, Phase.DISTILLATION, timeout_s=JOB_TIMEOUT_S)
    restarted = worker_starts(str(output_dir), 1)
    assert len(restarted) == 2, "Ray Train did not restart the killed worker"
    assert restarted[1].pid != victim.pid
    assert restarted[1].resume_phase == Phase.TEACHER_TRAINING.value
    assert restarted[1].resume_checkpoint is not None, "restart began from scratch"

    assert job_client.stop_job("kd-dagfm-interrupted-1")
    wait_for_status(job_client, "kd-dagfm-interrupted-1", {"STOPPED"})
    finetuning = CheckpointManager(str(output_dir / "finetuning" / "checkpoints"))
    assert finetuning.latest() is None, "the job finished before it was stopped"
    # The stop lands a moment after the first distillation checkpoint; on a
    # fast machine distillation may already have finished by then, and the
    # resubmission then starts finetuning from distillation's final weights.
    distillation = CheckpointManager(str(output_dir / "distillation" / "checkpoints"))
    newest = distillation.latest()
    assert newest is not None
    stopped_in = Phase.FINETUNING if newest.kind == "final" else Phase.DISTILLATION

    completed = submit(
        ray_head, working_dir, "kd-dagfm-interrupted-2", flags, wait=True
    )
    assert completed.returncode == 0, completed.stdout[-4000:]
    assert list(table_rows(completed.stdout)) == [p.value for p in PIPELINE]
    resubmitted = worker_starts(str(output_dir), 0)[-1]
    assert resubmitted.start == 3
    assert resubmitted.resume_phase == stopped_in.value
    if stopped_in is Phase.DISTILLATION:
        assert resubmitted.resume_checkpoint is not None, (
            "resubmission began from scratch"
        )
    assert_same_parameters(reference, output_dir, tmp_path)


@pytest.mark.timeout(120)
def test_job_submit_reports_config_error(
    ray_head: LocalRayHead,
    working_dir: Path,
    ml100k_dataset: str,
    tmp_path: Path,
) -> None:
    flags = job_flags(ml100k_dataset, tmp_path / "adam") + [
        "--embedding_optimizer",
        "adam",
    ]
    completed = submit(ray_head, working_dir, "kd-dagfm-adam", flags, wait=True)
    assert completed.returncode != 0
    output = completed.stdout + completed.stderr
    assert "error: embedding_optimizer 'adam' has no fused CPU kernel" in output
    assert "rowwise_adagrad" in output
