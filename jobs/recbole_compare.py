"""kd-dagfm against RecBole 1.2.1's KD_DAGFM: training examples/s per phase.

Both systems train the same three phases on the same MovieLens-100K files:
RecBole reads its own ``dataset_example/ml-100k``, which the job checks is
byte for byte the copy kd-dagfm converts. Both use the same seven fields,
model sizes (CrossNet teacher, outer DAGFM student, embedding 16, depths
3), batch size, Adam learning rate and thread count. RecBole runs in its own virtual environment
(``scripts/setup_recbole_venv.sh``), as a subprocess
(``jobs/_recbole_worker.py``); kd-dagfm runs in this process with the
in-memory reader. Each repeat runs both, alternating which goes first, and
the figures are medians over all epochs of all repeats.

Examples/s is measured on the training loop only (data loading, forward,
backward, optimizer step; no evaluation or checkpointing), per wall-clock
second and per CPU second of the process. On a machine shared with other
work the CPU-second figure moves less with the load.

Usage:
    python -m jobs.recbole_compare --epochs 3 --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kd_dagfm.bench.report import median
from kd_dagfm.config import RunConfig, build_config
from kd_dagfm.pipeline import run_pipeline

logger = logging.getLogger("jobs.recbole_compare")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VENV = REPO / ".venv-recbole"
DEFAULT_ML100K = REPO.parent / "shared" / "data" / "ml-100k"
WORKER = REPO / "jobs" / "_recbole_worker.py"
SETUP_SCRIPT = REPO / "scripts" / "setup_recbole_venv.sh"


@dataclasses.dataclass(frozen=True)
class PhaseSpeed:
    """Training speed of one phase of one system, over all timed epochs.

    Attributes:
        system: ``kd-dagfm`` or ``RecBole 1.2.1``.
        phase: the phase.
        examples_per_epoch: training rows per epoch.
        epoch_wall_s, epoch_cpu_s: wall and CPU seconds of each timed epoch.
        test_auc, test_log_loss: of the phase's best epoch, per repeat.
        tower_parameters: parameters of the phase's tower.
    """

    system: str
    phase: str
    examples_per_epoch: int
    epoch_wall_s: tuple[float, ...]
    epoch_cpu_s: tuple[float, ...]
    test_auc: tuple[float, ...]
    test_log_loss: tuple[float, ...]
    tower_parameters: int

    @property
    def examples_per_s(self) -> float:
        """Median over epochs of examples per wall-clock second."""
        return self.examples_per_epoch / median(self.epoch_wall_s)

    @property
    def examples_per_cpu_s(self) -> float:
        """Median over epochs of examples per CPU second."""
        return self.examples_per_epoch / median(self.epoch_cpu_s)

    def merged(self, other: PhaseSpeed) -> PhaseSpeed:
        return dataclasses.replace(
            self,
            epoch_wall_s=self.epoch_wall_s + other.epoch_wall_s,
            epoch_cpu_s=self.epoch_cpu_s + other.epoch_cpu_s,
            test_auc=self.test_auc + other.test_auc,
            test_log_loss=self.test_log_loss + other.test_log_loss,
        )


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The side-by-side result.

    Attributes:
        ours, recbole: one entry per phase, in pipeline order; ``recbole``
            is empty when RecBole did not run.
        skipped_reason: why RecBole did not run, or empty.
        settings: the shared settings (epochs, repeats, threads, batch size).
        data_identical: whether RecBole's ml-100k files equal ours byte for byte.
        load_before, load_after: load averages around the comparison.
    """

    ours: tuple[PhaseSpeed, ...]
    recbole: tuple[PhaseSpeed, ...]
    skipped_reason: str
    settings: dict[str, Any]
    data_identical: bool | None
    load_before: str
    load_after: str

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("ours", "recbole"):
            for entry, speed in zip(data[key], getattr(self, key)):
                entry["examples_per_s"] = speed.examples_per_s
                entry["examples_per_cpu_s"] = speed.examples_per_cpu_s
        return data


def recbole_python(venv: Path) -> Path | None:
    """Return the RecBole environment's interpreter, or None when it is not set up."""
    python = venv / "bin" / "python"
    return python if python.exists() else None


def setup_recbole(venv: Path) -> Path:
    """Create the RecBole environment with scripts/setup_recbole_venv.sh."""
    logger.info("setting up RecBole 1.2.1 in %s", venv)
    subprocess.run(["bash", str(SETUP_SCRIPT), str(venv)], check=True)
    python = recbole_python(venv)
    if python is None:
        raise RuntimeError(
            f"{SETUP_SCRIPT} finished but {venv}/bin/python is missing; run it by "
            "hand to see the pip output"
        )
    return python


def files_identical(ours: Path, python: Path) -> bool:
    """Check whether RecBole's bundled ml-100k files equal ours byte for byte."""
    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import os, recbole; print(os.path.join(os.path.dirname("
            "recbole.__file__), 'dataset_example', 'ml-100k'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    theirs = Path(probe.stdout.strip())
    for suffix in ("inter", "user", "item"):
        digests = {
            hashlib.sha256((folder / f"ml-100k.{suffix}").read_bytes()).hexdigest()
            for folder in (ours, theirs)
        }
        if len(digests) != 1:
            return False
    return True


def ours_config(
    ml100k: Path, output_dir: Path, epochs: int, batch_size: int, seed: int
) -> RunConfig:
    """Build kd-dagfm's run with RecBole's KD_DAGFM defaults on ml-100k."""
    return build_config(
        {
            "dataset": str(ml100k),
            "teacher": "crossnet",
            "student_type": "outer",
            "embedding_size": 16,
            "depth": 3,
            "t_depth": 3,
            "learning_rate": 1e-3,
            "train_batch_size": batch_size,
            "eval_batch_size": 8192,
            "epochs": epochs,
            "early_stopping_patience": 0,
            "cache_in_memory": True,
            "log_every_steps": 0,
            "keep_last_checkpoints": 1,
            "seed": seed,
            "output_dir": str(output_dir),
        }
    )


def run_ours(config: RunConfig) -> list[PhaseSpeed]:
    """Run the three phases in this process and read their epoch histories."""
    speeds = []
    for result in run_pipeline(config):
        history = result.history
        speeds.append(
            PhaseSpeed(
                system="kd-dagfm",
                phase=result.phase.value,
                examples_per_epoch=round(
                    history[0]["examples_per_s"] * history[0]["train_time_s"]
                ),
                epoch_wall_s=tuple(h["train_time_s"] for h in history),
                epoch_cpu_s=tuple(h["train_cpu_s"] for h in history),
                test_auc=(result.test.auc,),
                test_log_loss=(result.test.log_loss,),
                tower_parameters=result.tower_parameters,
            )
        )
    return speeds


def run_recbole(
    python: Path,
    workdir: Path,
    epochs: int,
    threads: int,
    batch_size: int,
    seed: int,
) -> list[PhaseSpeed]:
    """Run the RecBole worker in its environment and read its JSON."""
    workdir.mkdir(parents=True, exist_ok=True)

    output = workdir / "recbole.json"
    env = dict(os.environ)
    # RecBole 1.2.1 pickles its Config into checkpoints, which PyTorch >= 2.6
    # refuses to load by default.
    env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    env["OMP_NUM_THREADS"] = str(threads)
    command = [
        str(python),
        str(WORKER),
        "--output",
        str(output),
        "--workdir",
        str(workdir),
        "--epochs",
        str(epochs),
        "--threads",
        str(threads),
        "--batch_size",
        str(batch_size),
        "--seed",
        str(seed),
    ]

    completed = subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"the RecBole worker failed with exit code {completed.returncode}: "
            f"{completed.stderr[-3000:]}"
        )

    data = json.loads(output.read_text())
    speeds = []
    for phase in data["phases"]:
        tower = (
            "teacher_parameters"
            if phase["phase"] == "teacher_training"
            else "student_parameters"
        )
        speeds.append(
            PhaseSpeed(
                system=f"RecBole {data['recbole_version']}",
                phase=phase["phase"],
                examples_per_epoch=phase["examples_per_epoch"],
                epoch_wall_s=tuple(phase["epoch_wall_s"]),
                epoch_cpu_s=tuple(phase["epoch_cpu_s"]),
                test_auc=(phase["test_auc"],),
                test_log_loss=(phase["test_log_loss"],),
                tower_parameters=phase[tower],
            )
        )
    return speeds


def compare(
    output_dir: Path,
    epochs: int = 3,
    repeats: int = 3,
    threads: int = 1,
    batch_size: int = 2048,
    seed: int = 2022,
    ml100k: Path = DEFAULT_ML100K,
    venv: Path = DEFAULT_VENV,
    install: bool = False,
) -> Comparison:
    """Run kd-dagfm and RecBole side by side, ``repeats`` times each.

    Without the RecBole environment the comparison runs kd-dagfm only and
    logs why; with ``install`` it sets the environment up first.
    """
    torch.set_num_threads(threads)
    python = recbole_python(venv)
    skipped = ""
    if python is None and install:
        python = setup_recbole(venv)
    if python is None:
        skipped = (
            f"RecBole's environment {venv} does not exist; create it with "
            "bash scripts/setup_recbole_venv.sh (the full benchmark does this)"
        )
        logger.warning("RecBole comparison skipped: %s", skipped)
    identical = files_identical(ml100k, python) if python is not None else None
    if identical is False:
        raise RuntimeError(
            f"RecBole's bundled ml-100k differs from {ml100k}; the comparison needs "
            "the same data on both sides"
        )

    load_before = _load()
    ours: list[PhaseSpeed] = []
    theirs: list[PhaseSpeed] = []
    for repeat in range(repeats):
        order = ["ours", "recbole"] if repeat % 2 == 0 else ["recbole", "ours"]
        for system in order:
            started = time.perf_counter()
            if system == "ours":
                config = ours_config(
                    ml100k, output_dir / f"ours-{repeat}", epochs, batch_size, seed
                )
                ours = _merge(ours, run_ours(config))
            elif python is not None:
                theirs = _merge(
                    theirs,
                    run_recbole(
                        python,
                        output_dir / f"recbole-{repeat}",
                        epochs,
                        threads,
                        batch_size,
                        seed,
                    ),
                )
            else:
                continue
            logger.info(
                "repeat %d: %s took %.1f s",
                repeat,
                system,
                time.perf_counter() - started,
            )
    return Comparison(
        ours=tuple(ours),
        recbole=tuple(theirs),
        skipped_reason=skipped,
        settings={
            "epochs": epochs,
            "repeats": repeats,
            "threads": threads,
            "batch_size": batch_size,
            "seed": seed,
            "dataset": str(ml100k),
        },
        data_identical=identical,
        load_before=load_before,
        load_after=_load(),
    )


def _merge(total: list[PhaseSpeed], new: list[PhaseSpeed]) -> list[PhaseSpeed]:
    if not total:
        return list(new)
    return [a.merged(b) for a, b in zip(total, new)]


def _load() -> str:
    from kd_dagfm.bench.report import load_average

    return load_average()


def format_comparison(comparison: Comparison) -> str:
    """A plain-text table: examples/s per phase of both systems and the ratio."""
    lines = [
        f"{'phase':<17} {'kd-dagfm ex/s':>14} {'RecBole ex/s':>13} {'ratio':>6} "
        f"{'kd-dagfm ex/cpu-s':>18} {'RecBole ex/cpu-s':>17} {'ratio':>6}"
    ]
    theirs = {s.phase: s for s in comparison.recbole}
    for speed in comparison.ours:
        other = theirs.get(speed.phase)
        if other is None:
            lines.append(
                f"{speed.phase:<17} {speed.examples_per_s:>14,.0f} {'-':>13} {'-':>6} "
                f"{speed.examples_per_cpu_s:>18,.0f} {'-':>17} {'-':>6}"
            )
            continue
        lines.append(
            f"{speed.phase:<17} {speed.examples_per_s:>14,.0f} "
            f"{other.examples_per_s:>13,.0f} "
            f"{speed.examples_per_s / other.examples_per_s:>6.2f} "
            f"{speed.examples_per_cpu_s:>18,.0f} {other.examples_per_cpu_s:>17,.0f} "
            f"{speed.examples_per_cpu_s / other.examples_per_cpu_s:>6.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.recbole_compare", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--output_dir", default="runs/recbole_compare")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per phase")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each system")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--batch_size", type=int, default=2048)
    parser.add_argument("--ml100k", default=str(DEFAULT_ML100K))
    parser.add_argument("--venv", default=str(DEFAULT_VENV))
    parser.add_argument(
        "--install",
        action="store_true",
        help="create the RecBole environment when it is missing",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    comparison = compare(
        Path(args.output_dir),
        epochs=args.epochs,
        repeats=args.repeats,
        threads=args.threads,
        batch_size=args.batch_size,
        ml100k=Path(args.ml100k),
        venv=Path(args.venv),
        install=args.install,
    )
    output = Path(args.output_dir) / "comparison.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(comparison.to_dict(), indent=2))
    print(format_comparison(comparison))
    return 0


if __name__ == "__main__":
    sys.exit(main())
