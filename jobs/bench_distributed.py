"""Training examples/s of the sharded engine per sharding type, on 1 and 2 ranks.

The model is KD-DAGFM in teacher_training, the phase that updates the
tables, with a CrossNet teacher. The data is Criteo-shaped and synthetic:
39 sparse fields, 13 like the log2-bucketed counts (66 ids each) and 26 with
the Criteo Kaggle cardinalities capped at ``--max_table_rows``. Ids follow a
Zipf law (exponent 1.1), so a few ids take most of the traffic. Every configuration
trains with the same global batch, embedding size and optimizers (Adagrad
for the tables, Adam for the towers):

- ``single process``: :class:`~kd_dagfm.train.engine.LocalEngine`, one
  process, plain PyTorch tables, no DistributedModelParallel;
- ``dmp`` on 1 and 2 gloo ranks for each sharding type (manual plans and
  TorchRec's planner), FBGEMM's fused Adagrad for sharded tables.

Each rank draws its batches in memory before timing (no reader in the
loop), runs ``--warmup_steps``, then ``--windows`` windows of
``--window_steps`` steps. A window's rate is the global examples of its
steps over the slowest rank's time; the table gives the median window and
the ratio to the single process. Each configuration runs in fresh
processes, one intra-op thread per rank.

Run it in the loopback-only namespace (gloo resolves host names)::

    bash scripts/loopback.sh .venv/bin/python -m jobs.bench_distributed \\
        --markdown docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from kd_dagfm.config import RunConfig, build_config
from kd_dagfm.schema import FeatureSchema, make_schema

logger = logging.getLogger("jobs.bench_distributed")

SECTION_BEGIN = "<!-- bench_distributed:begin -->"
SECTION_END = "<!-- bench_distributed:end -->"
# Distinct values of C1-C26 in the Criteo Kaggle (Display Advertising
# Challenge) training set, the per-field counts DLRM benchmarks use.
CRITEO_KAGGLE_CARDINALITIES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593,
    3194, 27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105,
    142572,
)  # fmt: skip
COUNT_IDS = 66  # log2 buckets of I1-I13 (kd_dagfm.data.criteo)
ZIPF_EXPONENT = 1.1
SHARDINGS = ("table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel", "auto")  # fmt: skip


def criteo_shaped_schema(max_table_rows: int) -> FeatureSchema:
    sizes = {f"I{i}": COUNT_IDS for i in range(1, 14)}
    for i, rows in enumerate(CRITEO_KAGGLE_CARDINALITIES, start=1):
        sizes[f"C{i}"] = min(rows, max_table_rows)
    return make_schema("label", sizes)


def draw_table(schema: FeatureSchema, rows: int, seed: int) -> pa.Table:
    """``rows`` examples with Zipf-distributed ids and a 25 % click rate."""
    rng = np.random.default_rng(seed)
    columns: dict[str, pa.Array] = {
        "label": pa.array((rng.random(rows) < 0.25).astype(np.int8))
    }
    for feature in schema.sparse_features:
        ranks = rng.zipf(ZIPF_EXPONENT, rows) - 1  # 0 is the most frequent id
        columns[feature.name] = pa.array(ranks % feature.num_embeddings)
    return pa.table(columns)


def bench_config(args: argparse.Namespace, sharding: str) -> RunConfig:
    return build_config(
        {
            "teacher": "crossnet",
            "t_depth": 3,
            "embedding_size": args.embedding_size,
            "train_batch_size": args.batch_size,
            "embedding_optimizer": "adagrad",
            "learning_rate": 0.001,
            "sharding": sharding if sharding != "none" else "auto",
            "seed": 2022,
        }
    )


def measure_rank(
    rank: int, world_size: int, options: dict[str, Any], engine_kind: str
) -> dict[str, Any]:
    """Train on this rank and time the windows (runs in a fresh process)."""
    import torch.distributed as dist

    from kd_dagfm.data.batch import table_to_batch
    from kd_dagfm.model import KDDAGFM
    from kd_dagfm.objective import KDObjective
    from kd_dagfm.phases import Phase
    from kd_dagfm.train.engine import Engine, LocalEngine

    args = argparse.Namespace(**options)
    config = bench_config(args, engine_kind)
    schema = criteo_shaped_schema(args.max_table_rows)
    phase = Phase.TEACHER_TRAINING
    torch.manual_seed(config.train.seed)
    model = KDDAGFM(schema, config.model)

    engine: Engine
    plan_bytes: list[int] = []
    plan_types: dict[str, int] = {}
    if engine_kind == "none":
        engine = LocalEngine(model, config.train, phase, torch.device("cpu"))
    else:
        from kd_dagfm.distributed import DMPEngine, init_process_group
        from kd_dagfm.distributed.planning import embedding_bytes_per_rank

        init_process_group()
        dmp = DMPEngine(model, config, phase)
        shapes = {f"t_{f.name}": (f.num_embeddings, args.embedding_size) for f in schema.sparse_features}  # fmt: skip
        plan_bytes = embedding_bytes_per_rank(dmp.plan, shapes, world_size, "adagrad")
        for entry in dmp.plan.values():
            kind = entry["sharding_type"]
            plan_types[kind] = plan_types.get(kind, 0) + 1
        engine = dmp

    per_rank = args.batch_size // world_size
    batches = [
        table_to_batch(draw_table(schema, per_rank, seed=1000 * rank + i), schema)
        for i in range(args.distinct_batches)
    ]
    objective = KDObjective(config.train.ctr_loss_weight, config.train.kd_loss_weight)

    def step(index: int) -> None:
        batch = batches[index % len(batches)]
        output = engine.model(batch.sparse_features, batch.dense_features, phase)
        loss, _ = objective(output, batch.labels, phase)
        engine.optimize(loss)

    engine.model.train()
    for index in range(args.warmup_steps):
        step(index)
    rates = []
    for window in range(args.windows):
        if dist.is_initialized():
            dist.barrier()
        started = time.perf_counter()
        for index in range(args.window_steps):
            step(window * args.window_steps + index)
        elapsed = torch.tensor([time.perf_counter() - started], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        rates.append(args.window_steps * args.batch_size / float(elapsed))
    return {"rates": rates, "plan_bytes": plan_bytes, "plan_types": plan_types}


def run_config(
    args: argparse.Namespace, engine_kind: str, world_size: int
) -> dict[str, Any]:
    """One configuration in fresh processes; returns rank 0's measurements."""
    from kd_dagfm.distributed.spawn import run_local_ranks

    results = run_local_ranks(
        measure_rank,
        world_size,
        vars(args),
        engine_kind,
        timeout_s=args.timeout_s,
    )
    return results[0]


def format_section(args: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    baseline = next(r for r in rows if r["engine"] == "single process")
    summary = (
        "Training examples/s of teacher_training under TorchRec's "
        "DistributedModelParallel, per sharding type on 1 and 2 gloo ranks, next "
        "to one process without it. The module docstring of "
        "`jobs/bench_distributed.py` describes the data and the timing. Global "
        f"batch {args.batch_size}, embedding size {args.embedding_size}, 39 fields "
        f"(26 with Criteo Kaggle cardinalities capped at {args.max_table_rows:,} "
        "rows), CrossNet teacher of depth 3, Adagrad tables and Adam towers; "
        f"{args.windows} windows of {args.window_steps} steps after "
        f"{args.warmup_steps} warm-up steps, medians."
    )
    machine = (
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__}, one intra-op thread per rank, "
        f"{time.strftime('%Y-%m-%d')}."
    )
    lines = [
        SECTION_BEGIN,
        "## Sharded training throughput",
        "",
        textwrap.fill(summary, 76),
        "",
        "Command:",
        "",
        "```",
        "bash scripts/loopback.sh .venv/bin/python -m jobs.bench_distributed "
        + " ".join(args.argv),
        "```",
        "",
        textwrap.fill(machine, 76),
        "",
        "| engine | ranks | sharding | tables per type | examples/s (median) | min | max | vs single process | table bytes per rank (max) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        rates = row["rates"]
        lines.append(
            f"| {row['engine']} | {row['ranks']} | {row['sharding']} | "
            f"{_plan_types(row['plan_types'])} | "
            f"{statistics.median(rates):,.0f} | {min(rates):,.0f} | {max(rates):,.0f} | "
            f"{statistics.median(rates) / statistics.median(baseline['rates']):.2f}x | "
            f"{_mib(max(row['plan_bytes'])) if row['plan_bytes'] else '-'} |"
        )
    lines += ["", "NOTES_PLACEHOLDER", SECTION_END, ""]
    return "\n".join(lines)


def _plan_types(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items())) or "-"


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def write_section(path: str, section: str, notes: str) -> None:
    """Replace the job's section of ``path`` (between its markers) or append it."""
    section = section.replace("NOTES_PLACEHOLDER", notes.strip())
    text = Path(path).read_text(encoding="utf-8") if Path(path).exists() else ""
    if SECTION_BEGIN in text and SECTION_END in text:
        head = text.split(SECTION_BEGIN, 1)[0]
        tail = text.split(SECTION_END, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "# Benchmarks\n\n") + section
    Path(path).write_text(text, encoding="utf-8")


def existing_notes(path: str) -> str:
    """Return the hand-written notes after the table in the current section, if any."""
    if not Path(path).exists():
        return ""
    text = Path(path).read_text(encoding="utf-8")
    if SECTION_BEGIN not in text or SECTION_END not in text:
        return ""
    section = text.split(SECTION_BEGIN, 1)[1].split(SECTION_END, 1)[0]
    table_end = section.rfind("|")
    return section[section.find("\n", table_end) :].strip()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=2048, help="global batch")
    parser.add_argument("--embedding_size", type=int, default=16, help="D")
    parser.add_argument(
        "--max_table_rows", type=int, default=100_000, help="cap on a table's rows"
    )
    parser.add_argument("--distinct_batches", type=int, default=8)
    parser.add_argument("--warmup_steps", type=int, default=3)
    parser.add_argument("--window_steps", type=int, default=8)
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument(
        "--shardings", nargs="+", default=list(SHARDINGS), choices=SHARDINGS
    )
    parser.add_argument(
        "--world_sizes", type=int, nargs="+", default=[1, 2], help="ranks to measure"
    )
    parser.add_argument(
        "--timeout_s", type=float, default=600.0, help="limit per configuration"
    )
    parser.add_argument("--output", help="also write the measurements as JSON here")
    parser.add_argument(
        "--markdown", help="update this file's section with the results"
    )
    args = parser.parse_args(argv)
    args.argv = argv
    # Importing fbgemm installs a root handler first, hence force=True.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True
    )
    if args.batch_size % max(args.world_sizes):
        parser.error(f"--batch_size must be divisible by {max(args.world_sizes)}")

    plan: list[tuple[str, int, str]] = [("none", 1, "-")]
    for world_size in args.world_sizes:
        plan += [(sharding, world_size, sharding) for sharding in args.shardings]
    rows = []
    for engine_kind, world_size, sharding in plan:
        name = "single process" if engine_kind == "none" else "dmp"
        logger.info("measuring %s, %d ranks, sharding %s", name, world_size, sharding)
        measured = run_config(args, engine_kind, world_size)
        rows.append(
            {"engine": name, "ranks": world_size, "sharding": sharding, **measured}
        )
        logger.info(
            "%s x%d %s: median %.0f examples/s",
            name,
            world_size,
            sharding,
            statistics.median(measured["rates"]),
        )

    section = format_section(args, rows)
    print(section.replace("NOTES_PLACEHOLDER", ""))
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    if args.markdown:
        write_section(args.markdown, section, existing_notes(args.markdown))
        logger.info("updated %s", args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
