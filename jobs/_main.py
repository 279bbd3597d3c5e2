"""Shared command line of the ``jobs`` entrypoints."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from kd_dagfm.cli import _add_config_flags, _setup_logging, config_from_args
from kd_dagfm.errors import ConfigError, KDDAGFMError
from kd_dagfm.phases import PIPELINE, Phase

logger = logging.getLogger("jobs")


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--run_name",
        default=None,
        help="Ray Train run name under storage_path (default: kd-dagfm-<job>); "
        "submit again with the same name and output_dir to resume",
    )
    _add_config_flags(parser)
    return parser


def run_job(args: argparse.Namespace, phases: Sequence[Phase]) -> int:
    """Run ``phases`` on Ray with the config from ``args``; print the results table."""
    from cluster.driver import run_driver
    from kd_dagfm.cli import write_results
    from kd_dagfm.pipeline import format_results

    config = config_from_args(args)
    requested = getattr(args, "cfg__phase", None)
    if (
        len(phases) == 1
        and requested is not None
        and Phase.parse(requested) is not phases[0]
    ):
        raise ConfigError(
            f"--phase {requested} conflicts with this job, which runs "
            f"{phases[0].value}; drop --phase or use python -m jobs.{requested}"
        )
    logger.info("config: %s", json.dumps(config.to_dict(), sort_keys=True))
    results = run_driver(config, phases, name=args.run_name)
    table = format_results(results)
    if tuple(phases) == PIPELINE:
        write_results(config, results, table)
    print(table)
    return 0


def main(phases: Sequence[Phase], argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run; kd-dagfm errors print ``error: ...`` and return 2."""
    job = "pipeline" if tuple(phases) == PIPELINE else phases[0].value
    parser = build_parser(
        prog=f"python -m jobs.{job}",
        description=f"Run {job} on Ray Train workers with sharded embedding tables.",
    )
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        return run_job(args, phases)
    except KDDAGFMError as e:
        logger.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 2
