"""Sharded training under ``torchrun``, without Ray.

Every rank runs this module; ``torchrun`` sets the process-group environment::

    python -m torch.distributed.run --nproc-per-node 2 \\
        -m kd_dagfm.distributed.launch pipeline --sharding row_wise --epochs 5

``pipeline`` runs the three phases and ``train`` the phase named by
``--phase``; both take every ``kd-dagfm`` config flag. Rank 0 prepares the
dataset (generating or converting it on first use) while the other ranks
wait, and rank 0 alone prints the results table and writes results.json and
results.txt to ``output_dir``. Run it inside ``scripts/loopback.sh`` on a
machine whose network it must not reach: gloo resolves host names.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

import torch.distributed as dist

from kd_dagfm.cli import _add_config_flags, _setup_logging, config_from_args
from kd_dagfm.errors import KDDAGFMError

logger = logging.getLogger("kd_dagfm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kd_dagfm.distributed.launch",
        description="Sharded kd-dagfm training on the ranks torchrun started.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    pipeline = commands.add_parser(
        "pipeline", help="teacher_training, distillation and finetuning, sharded"
    )
    _add_config_flags(pipeline)
    train = commands.add_parser("train", help="the one phase named by --phase")
    _add_config_flags(train)
    return parser


def run(args: argparse.Namespace) -> int:
    """Train on this rank; returns the process exit code."""
    from kd_dagfm.cli import write_results
    from kd_dagfm.distributed import dmp_engine_factory, init_process_group
    from kd_dagfm.pipeline import (
        default_threads,
        format_results,
        prepare_dataset,
        run_phase,
        run_pipeline,
    )

    default_threads()
    config = config_from_args(args)
    rank, world_size = init_process_group()
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    else:
        logger.info(
            "%s on %d ranks, config: %s",
            args.command,
            world_size,
            json.dumps(config.to_dict(), sort_keys=True),
        )

    make_engine = dmp_engine_factory(config)  # Rejects bad settings first.

    # One writer for a generated or converted dataset; the others then
    # find it complete.
    if rank == 0:
        prepare_dataset(config)
    dist.barrier()

    if args.command == "pipeline":
        results = run_pipeline(config, make_engine=make_engine)
    else:
        results = [run_phase(config, make_engine=make_engine)]
    if rank == 0:
        table = format_results(results)
        if args.command == "pipeline":
            write_results(config, results, table)
        print(table, flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return run(args)
    except KDDAGFMError as e:
        rank = dist.get_rank() if dist.is_initialized() else 0
        logger.error("rank %d: %s", rank, e)
        print(f"error (rank {rank}): {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
