"""Benchmark: distillation with the live teacher vs. from cached teacher logits.

For each teacher the job trains it for one epoch on a synthetic dataset and
times writing its logit cache. It then alternates distillation runs with the
live teacher and from the cache, ``--repeats`` times each. The Markdown table
it prints has medians of training examples per second and of the phase's
wall time, the speed-up, the cache build time, and the distillation epochs
after which the cache has paid for itself. The last column is the largest
difference between the students of the last live and cached runs.

Usage::

    python -m jobs.bench_cached_logits --output_dir /tmp/bench-cache
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from kd_dagfm.config import RunConfig, build_config
from kd_dagfm.phases import Phase
from kd_dagfm.pipeline import prepare_dataset, run_phase
from kd_dagfm.teacher_cache import write_teacher_logits
from kd_dagfm.train.checkpoint import read_model_file
from kd_dagfm.train.trainer import PhaseResult

logger = logging.getLogger("jobs.bench_cached_logits")

# Teacher settings benchmarked by default: RecBole's two teachers.
TEACHERS = {
    "cin": {"teacher": "cin", "t_cin": [100, 100]},
    "crossnet": {"teacher": "crossnet", "t_depth": 3},
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.bench_cached_logits", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--output_dir", required=True, help="scratch directory")
    parser.add_argument("--teachers", default="cin,crossnet", help="comma-separated")
    parser.add_argument("--rows", type=int, default=50_000, help="synthetic rows")
    parser.add_argument("--epochs", type=int, default=1, help="distillation epochs")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode")
    parser.add_argument("--batch_size", type=int, default=2048)
    return parser


def base_config(args: argparse.Namespace, teacher: str) -> RunConfig:
    return build_config(
        {
            "dataset": "synthetic",
            "synthetic_rows": args.rows,
            "embedding_size": 16,
            "depth": 3,
            "train_batch_size": args.batch_size,
            "eval_batch_size": 8192,
            "epochs": 1,
            "early_stopping_patience": 0,
            "log_every_steps": 0,
            "output_dir": str(Path(args.output_dir) / teacher),
            **TEACHERS[teacher],
        }
    )


def bench_teacher(args: argparse.Namespace, teacher: str) -> dict[str, float]:
    config = base_config(args, teacher)
    dataset, _ = prepare_dataset(config)
    config = config.replace(dataset=dataset)
    root = Path(config.train.output_dir)
    run_phase(config, Phase.TEACHER_TRAINING)
    teacher_dir = str(root / Phase.TEACHER_TRAINING.value)

    started = time.perf_counter()
    cache_dir = str(root / "teacher_logits")
    write_teacher_logits(
        teacher_dir, dataset, cache_dir, batch_size=8192, overwrite=True
    )
    cache_s = time.perf_counter() - started

    results: dict[str, list[PhaseResult]] = {"live": [], "cached": []}
    for repeat in range(args.repeats):
        for mode in ("live", "cached") if repeat % 2 == 0 else ("cached", "live"):
            run = config.replace(
                output_dir=str(root / f"{mode}-{repeat}"),
                warm_up=teacher_dir,
                epochs=args.epochs,
                teacher_logits=cache_dir if mode == "cached" else None,
            )
            results[mode].append(run_phase(run, Phase.DISTILLATION))
            logger.info(
                "%s %s run %d: %.0f examples/s",
                teacher,
                mode,
                repeat,
                results[mode][-1].train_examples_per_s,
            )

    last = args.repeats - 1
    live_state = read_model_file(str(root / f"live-{last}/distillation/model.pt"))
    cached_state = read_model_file(str(root / f"cached-{last}/distillation/model.pt"))
    max_difference = max(
        float((live_state["model"][k] - cached_state["model"][k]).abs().max())
        for k in live_state["model"]
        if k.startswith("student.")
    )
    live_rate = statistics.median(r.train_examples_per_s for r in results["live"])
    cached_rate = statistics.median(r.train_examples_per_s for r in results["cached"])
    # Seconds of training saved per epoch over the 80% training split.
    epoch_rows = 0.8 * args.rows
    saved_per_epoch_s = epoch_rows / live_rate - epoch_rows / cached_rate
    return {
        "live_rate": live_rate,
        "cached_rate": cached_rate,
        "live_wall_s": statistics.median(r.wall_time_s for r in results["live"]),
        "cached_wall_s": statistics.median(r.wall_time_s for r in results["cached"]),
        "cache_s": cache_s,
        "break_even_epochs": cache_s / saved_per_epoch_s
        if saved_per_epoch_s > 0
        else float("inf"),
        "max_student_difference": max_difference,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True
    )
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    rows = []
    for teacher in [t.strip() for t in args.teachers.split(",") if t.strip()]:
        if teacher not in TEACHERS:
            print(f"error: unknown teacher {teacher!r}; choose from {list(TEACHERS)}")
            return 2
        figures = bench_teacher(args, teacher)
        rows.append(
            f"| {teacher} {TEACHERS[teacher]} | {figures['live_rate']:,.0f} | "
            f"{figures['cached_rate']:,.0f} | "
            f"{figures['cached_rate'] / figures['live_rate']:.2f}x | "
            f"{figures['live_wall_s']:.1f} | {figures['cached_wall_s']:.1f} | "
            f"{figures['cache_s']:.1f} | {figures['break_even_epochs']:.2f} | "
            f"{figures['max_student_difference']:.1e} |"
        )
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, threads {torch.get_num_threads()}; rows {args.rows} "
        f"(80% train), batch {args.batch_size}, {args.epochs} distillation epochs, "
        f"{args.repeats} runs per mode\n"
    )
    print(
        "| teacher | live examples/s | cached examples/s | speed-up | live phase s "
        "| cached phase s | cache build s | break-even epochs | max student diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
