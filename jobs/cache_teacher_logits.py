"""Run a trained teacher over a dataset once and cache its logits beside the shards.

Usage::

    python -m jobs.cache_teacher_logits --dataset DATA --output_dir RUN \\
        [--teacher_checkpoint RUN/teacher_training] [--cache_dir DATA/teacher_logits]
    kd-dagfm train --phase distillation --dataset DATA --output_dir RUN \\
        --warm_up RUN/teacher_training --teacher_logits DATA/teacher_logits

The config flags (``--dataset``, ``--eval_batch_size``, ``--bad_rows``,
``--output_dir``, ...) are those of ``kd-dagfm``; the teacher's architecture
comes from its checkpoint. A synthetic or RecBole-atomic ``--dataset`` is
prepared as ``kd-dagfm pipeline`` would prepare it. The job runs in one
process, on the GPU when one is visible.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

import torch

from kd_dagfm.cli import _add_config_flags, _setup_logging, config_from_args
from kd_dagfm.errors import KDDAGFMError
from kd_dagfm.phases import Phase
from kd_dagfm.storage import join
from kd_dagfm.teacher_cache import DEFAULT_SPLITS, write_teacher_logits

logger = logging.getLogger("jobs.cache_teacher_logits")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.cache_teacher_logits",
        description="Cache a trained teacher's logits for distillation.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--teacher_checkpoint",
        default=None,
        help="teacher_training checkpoint: model.pt, a checkpoint or phase "
        "directory, or a run's output_dir (default: <output_dir>/teacher_training)",
    )
    parser.add_argument(
        "--cache_dir",
        default=None,
        help="where to write the cache (default: <dataset>/teacher_logits)",
    )
    parser.add_argument(
        "--splits",
        default=",".join(DEFAULT_SPLITS),
        help="comma-separated splits to cache (distillation trains on train; "
        "cached valid/test splits also spare the teacher during evaluation)",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device the teacher runs on",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing cache"
    )
    _add_config_flags(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from kd_dagfm.pipeline import default_threads, prepare_dataset

    default_threads()
    config = config_from_args(args)
    dataset, _ = prepare_dataset(config)
    checkpoint = args.teacher_checkpoint or join(
        config.train.output_dir, Phase.TEACHER_TRAINING.value
    )
    cache_dir = args.cache_dir or join(dataset, "teacher_logits")
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    summary = write_teacher_logits(
        checkpoint,
        dataset,
        cache_dir,
        splits=splits,
        batch_size=config.train.eval_batch_size,
        bad_rows=config.data.bad_rows,
        device=args.device,
        overwrite=args.overwrite,
    )
    print(
        json.dumps(
            {
                "teacher_logits": summary.root,
                "rows": summary.rows,
                "rows_invalid": summary.rows_invalid,
                "wall_time_s": round(summary.wall_time_s, 3),
            }
        )
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        return run(args)
    except KDDAGFMError as e:
        logger.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
