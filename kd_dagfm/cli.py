"""The ``kd-dagfm`` command line.

Every config key is also a flag (``--epochs 5``, ``--teacher cin``,
``--alpha 0.1``); ``--config FILE`` loads a YAML file first and
``--set key=value`` sets any key. Later sources win: defaults, then the
embedded ``configs/default.yaml`` (only when no ``--config``), then the
file, then flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from importlib import resources
from typing import Any

import yaml

from kd_dagfm.config import ALIASES, SECTIONS, RunConfig, config_from_yaml
from kd_dagfm.errors import KDDAGFMError

logger = logging.getLogger("kd_dagfm")


def default_config_path() -> str:
    return str(resources.files("kd_dagfm") / "configs" / "default.yaml")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (flat or nested keys)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any config key",
    )
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} config")
        for field in dataclasses.fields(cls):
            group.add_argument(
                f"--{field.name}",
                dest=f"cfg__{field.name}",
                default=None,
                metavar="VALUE",
                help=field.metadata.get("help", ""),
            )
    aliases = parser.add_argument_group("RecBole aliases")
    for alias, target in ALIASES.items():
        aliases.add_argument(
            f"--{alias}",
            dest=f"cfg__{alias}",
            default=None,
            metavar="VALUE",
            help=f"same as --{target}",
        )


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Build the run config from ``--config``, flags and ``--set`` (in that order)."""
    overrides: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key.startswith("cfg__") and value is not None:
            overrides[key[len("cfg__") :]] = _parse_value(value)
    for item in args.set:
        if "=" not in item:
            raise KDDAGFMError(
                f"--set {item!r}: expected KEY=VALUE, for example --set epochs=5"
            )
        key, value = item.split("=", 1)
        overrides[key.strip()] = _parse_value(value)
    path = args.config or default_config_path()
    return config_from_yaml(path, overrides)


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        # Importing fbgemm logs through the root logger, which installs a
        # default handler before this runs.
        force=True,
    )
    # fbgemm logs one INFO line per loaded library.
    logging.getLogger().handlers[0].addFilter(
        lambda r: r.name != "root" or r.levelno > logging.INFO
    )


def cmd_pipeline(args: argparse.Namespace) -> int:
    from kd_dagfm.pipeline import default_threads, format_results, run_pipeline

    default_threads()
    config = config_from_args(args)
    logger.info("config: %s", json.dumps(config.to_dict(), sort_keys=True))
    results = run_pipeline(config)
    table = format_results(results)
    write_results(config, results, table)
    print(table)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from kd_dagfm.pipeline import default_threads, format_results, run_phase

    default_threads()
    config = config_from_args(args)
    result = run_phase(config)
    print(format_results([result]))
    return 0


def cmd_ray_pipeline(args: argparse.Namespace) -> int:
    from jobs._main import run_job
    from kd_dagfm.phases import PIPELINE

    return run_job(args, PIPELINE)


def write_results(config: RunConfig, results: Sequence[Any], table: str) -> None:
    from kd_dagfm.storage import filesystem, join

    fs, root = filesystem(config.train.output_dir)
    fs.makedirs(root, exist_ok=True)
    with fs.open(join(root, "results.json"), "w") as f:
        json.dump([r.to_dict() for r in results], f, indent=2)
    with fs.open(join(root, "results.txt"), "w") as f:
        f.write(table + "\n")
    logger.info("results written to %s", join(config.train.output_dir, "results.json"))


def cmd_convert(args: argparse.Namespace) -> int:
    if args.format == "recbole":
        from kd_dagfm.data.recbole import convert_recbole

        schema, rows = convert_recbole(
            args.input, args.output, seed=args.seed, overwrite=args.overwrite
        )
        print(
            json.dumps(
                {
                    "output": args.output,
                    "rows": rows,
                    "fields": list(schema.field_names),
                }
            )
        )
        return 0
    if args.format in ("criteo", "avazu"):
        return _convert_click_log(args)
    raise KDDAGFMError(f"unknown format {args.format!r}")


def _convert_click_log(args: argparse.Namespace) -> int:
    from kd_dagfm.data.avazu import convert_avazu
    from kd_dagfm.data.convert import CategoricalEncoding, ConvertOptions
    from kd_dagfm.data.criteo import convert_criteo

    options = ConvertOptions(
        encoding=CategoricalEncoding(
            method=args.encoding,
            hash_num_embeddings=args.hash_num_embeddings,
            min_count=args.min_count,
        ),
        seed=args.seed,
        rows_per_shard=args.rows_per_shard,
        row_group_rows=args.row_group_rows,
        shuffle_buffer_rows=args.shuffle_buffer_rows,
        bad_lines=args.bad_lines,
        overwrite=args.overwrite,
    )
    if args.format == "criteo":
        summary = convert_criteo(
            args.input, args.output, options, args.integer_bucketing
        )
    else:
        summary = convert_avazu(args.input, args.output, options)
    print(json.dumps({"output": args.output, **summary.to_dict()}))
    return 0


def cmd_render_k8s(args: argparse.Namespace) -> int:
    from cluster.k8s.command import render_k8s

    config = config_from_args(args)
    report = render_k8s(
        config,
        out_dir=args.out,
        schema_path=args.schema,
        validate=args.validate,
        crd_paths=args.kuberay_crd,
    )
    print(report)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from kd_dagfm.planning import plan_command

    return plan_command(config_from_args(args), args)


def cmd_tune(args: argparse.Namespace) -> int:
    from cluster.tune import tune_command
    from kd_dagfm.pipeline import default_threads

    default_threads()
    tune_command(config_from_args(args), args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kd-dagfm", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    pipeline = commands.add_parser(
        "pipeline",
        help="run teacher_training, distillation and finetuning, print a table",
    )
    _add_config_flags(pipeline)
    pipeline.set_defaults(func=cmd_pipeline)

    train = commands.add_parser("train", help="run the one phase named by --phase")
    _add_config_flags(train)
    train.set_defaults(func=cmd_train)

    ray_pipeline = commands.add_parser(
        "ray-pipeline",
        help="run the three phases on num_workers Ray Train workers with sharded "
        "tables (on ray_address or RAY_ADDRESS, else a local loopback-only head), "
        "print a table",
    )
    _add_config_flags(ray_pipeline)
    ray_pipeline.add_argument(
        "--run_name",
        default=None,
        help="Ray Train run name under storage_path (default: kd-dagfm-pipeline)",
    )
    ray_pipeline.set_defaults(func=cmd_ray_pipeline)

    convert = commands.add_parser(
        "convert", help="convert raw data to a Parquet dataset"
    )
    convert.add_argument(
        "format", choices=["recbole", "criteo", "avazu"], help="input format"
    )
    convert.add_argument("--input", required=True, help="input directory or file")
    convert.add_argument(
        "--output", required=True, help="dataset directory or URL to write"
    )
    convert.add_argument(
        "--seed", type=int, default=2020, help="seed of the random split"
    )
    convert.add_argument(
        "--overwrite", action="store_true", help="replace an existing dataset"
    )
    logs = convert.add_argument_group("criteo and avazu")
    logs.add_argument(
        "--encoding",
        choices=["hash", "vocab"],
        default="hash",
        help="categorical tokens to ids: hash (one pass) or vocab (two passes)",
    )
    logs.add_argument(
        "--hash-num-embeddings",
        type=int,
        default=1 << 20,
        help="hash: embedding rows per categorical feature, id 0 (missing) included",
    )
    logs.add_argument(
        "--min-count",
        type=int,
        default=10,
        help="vocab: occurrences a token needs for its own id (rarer ones share id 1)",
    )
    logs.add_argument(
        "--integer-bucketing",
        choices=["log2", "log_squared"],
        default="log2",
        help="criteo: buckets of the I1-I13 counts",
    )
    logs.add_argument(
        "--rows-per-shard", type=int, default=1_000_000, help="rows per Parquet file"
    )
    logs.add_argument(
        "--row-group-rows", type=int, default=65_536, help="rows per row group"
    )
    logs.add_argument(
        "--shuffle-buffer-rows",
        type=int,
        default=1_000_000,
        help="training rows shuffled together before they are written",
    )
    logs.add_argument(
        "--bad-lines",
        choices=["error", "skip"],
        default="error",
        help="malformed lines and non-0/1 labels: error (stop) or skip (count)",
    )
    convert.set_defaults(func=cmd_convert)

    render_k8s = commands.add_parser(
        "render-k8s",
        help="write Kubernetes manifests (RayJob, RayCluster, indexed Job) for a run",
    )
    _add_config_flags(render_k8s)
    render_k8s.add_argument(
        "--out", required=True, help="directory to write the manifests to"
    )
    render_k8s.add_argument(
        "--schema",
        help="local copy of the dataset's schema.json, for memory sizing when "
        "the dataset URL is not readable from here (default: read it from --dataset)",
    )
    render_k8s.add_argument(
        "--validate",
        action="store_true",
        help="validate the manifests offline (needs requirements-dev.txt)",
    )
    render_k8s.add_argument(
        "--kuberay-crd",
        action="append",
        default=[],
        metavar="FILE",
        help="also validate against a KubeRay CRD from your cluster "
        "(kubectl get crd rayjobs.ray.io -o yaml > FILE); repeatable",
    )
    render_k8s.set_defaults(func=cmd_render_k8s)

    plan = commands.add_parser(
        "plan",
        help="plan the embedding tables on GPU or CPU clusters without allocating "
        "them; print memory per rank, or why they do not fit",
    )
    _add_config_flags(plan)
    from kd_dagfm.planning import add_plan_arguments

    add_plan_arguments(plan)
    plan.set_defaults(func=cmd_plan)

    tune = commands.add_parser(
        "tune",
        help="search hyper-parameters of the phase named by --phase with Ray Tune "
        "(RecBole hyper.test or YAML space, ASHA early stopping)",
    )
    _add_config_flags(tune)
    from cluster.tune import add_tune_arguments

    add_tune_arguments(tune)
    tune.set_defaults(func=cmd_tune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        return int(args.func(args))
    except KDDAGFMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # A path that is a file, read-only or missing: name it, no traceback.
        print(
            f"error: {e.strerror or e} ({e.filename or 'no path'}); check that "
            "output_dir and dataset are writable directories",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
