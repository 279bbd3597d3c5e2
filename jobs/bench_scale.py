"""Train one huge row-wise sharded table through all three phases on 2 CPU ranks.

The table is built on the meta device (``table_init=sharded``), so no
process ever allocates all of it. Each rank allocates and initialises its
own rows, and the fused row-wise Adagrad keeps one fp32 value per row
beside them. Data is a Zipf-distributed synthetic click log written in chunks
(:mod:`kd_dagfm.data.zipf`). Each rank samples its resident memory (VmRSS)
every 0.2 s; the job reports the peak per rank and phase, examples/s and
AUC, and removes its checkpoints at the end unless ``--keep_checkpoints``.

Run it in the loopback-only namespace, after checking free memory::

    free -g
    bash scripts/loopback.sh .venv/bin/python -m jobs.bench_scale \\
        --item_rows 100000000 --rows 2000000 --timeout_s 3000

Before starting, the job compares MemAvailable with its estimate of what
the two ranks need and stops with the numbers if it does not fit; while it
runs, it stops the ranks when MemAvailable falls below ``--min_free_gib``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from kd_dagfm.config import RunConfig, build_config
from kd_dagfm.data.zipf import ZipfDatasetSpec, write_zipf_dataset
from kd_dagfm.errors import ConfigError
from kd_dagfm.planning import row_bytes
from kd_dagfm.schema import SCHEMA_FILE

logger = logging.getLogger("jobs.bench_scale")

GiB = 2**30
# Resident memory of one rank besides its table shard (Python, torch,
# TorchRec, FBGEMM, the reader and the dense towers): 0.48-0.55 GiB measured
# by this job on 2 CPU ranks, rounded up.
RANK_BASE_BYTES = int(0.6 * GiB)


def meminfo_bytes(field: str) -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/meminfo")


def _vm_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class RssSampler:
    """Samples this process's VmRSS in a thread; tracks the peak per label."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.label = "setup"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def mark(self, label: str) -> None:
        self.sample()
        self.label = label

    def sample(self) -> None:
        rss = _vm_kib("VmRSS") * 1024
        self.peaks[self.label] = max(self.peaks.get(self.label, 0), rss)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_main(
    rank: int, world_size: int, port: int, config_data: dict[str, Any], out: str
) -> None:
    """Run one training rank: the three phases with the sharded engine."""
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
    )
    torch.set_num_threads(1)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    sampler = RssSampler().start()
    from kd_dagfm.distributed import dmp_engine_factory, init_process_group
    from kd_dagfm.phases import PIPELINE
    from kd_dagfm.pipeline import run_pipeline
    from kd_dagfm.train.trainer import PhaseResult

    config = RunConfig.from_dict(config_data)
    init_process_group(backend="gloo")
    phases = iter(PIPELINE)
    sampler.mark(next(phases).value)
    results: list[dict[str, Any]] = []
    started = time.perf_counter()

    def on_phase_end(result: PhaseResult) -> None:
        # run_pipeline has collected the phase's engine by now.
        results.append(
            {
                **result.to_dict(),
                "peak_rss_bytes": sampler.peaks.get(result.phase.value, 0),
                "rss_at_end_bytes": _vm_kib("VmRSS") * 1024,
                "phase_end_s": time.perf_counter() - started,
            }
        )
        logging.getLogger("jobs.bench_scale").info(
            "%s ended: VmRSS %.2f GiB",
            result.phase.value,
            results[-1]["rss_at_end_bytes"] / GiB,
        )
        sampler.mark(next(phases, result.phase).value)
        if rank == 0:
            _remove_step_checkpoints(config, result)

    run_pipeline(
        config, make_engine=dmp_engine_factory(config), on_phase_end=on_phase_end
    )
    sampler.stop()
    for entry in results:
        entry["peak_rss_bytes"] = sampler.peaks.get(entry["phase"], 0)
    report = {
        "rank": rank,
        "phases": results,
        "peak_rss_bytes": max(sampler.peaks.values()),
        "vm_hwm_bytes": _vm_kib("VmHWM") * 1024,
        "setup_peak_rss_bytes": sampler.peaks.get("setup", 0),
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(report, indent=2))
    torch.distributed.destroy_process_group()


def _remove_step_checkpoints(config: RunConfig, result: Any) -> None:
    """Delete a finished phase's epoch checkpoints; the final one (best
    weights) is what the next phase warm-starts from."""
    directory = Path(result.checkpoint, "checkpoints")
    checkpoints = sorted(p for p in directory.glob("ckpt-*") if p.is_dir())
    for path in checkpoints[:-1]:
        shutil.rmtree(path, ignore_errors=True)


def estimate_bytes(spec: ZipfDatasetSpec, world_size: int, embedding_dim: int) -> int:
    """Peak of all ranks together: table shards, row-wise Adagrad state, one
    more copy of the weights while a checkpoint is saved or loaded (measured:
    peak RSS = base + 2 x shard weights + state), and the base per rank."""
    per_row = row_bytes(embedding_dim, "fp32", "rowwise_adagrad")
    table = spec.item_rows * per_row.total
    loading = spec.item_rows * per_row.weights
    return table + loading + world_size * RANK_BASE_BYTES


def run_scale(
    spec: ZipfDatasetSpec,
    work_dir: str,
    world_size: int = 2,
    embedding_dim: int = 16,
    train_batch_size: int = 4096,
    timeout_s: float = 3000.0,
    min_free_gib: float = 1.5,
    keep_checkpoints: bool = False,
) -> dict[str, Any]:
    """Write the dataset (once), train the three phases on ``world_size``
    spawned ranks and return their reports."""
    needed = estimate_bytes(spec, world_size, embedding_dim)
    available = meminfo_bytes("MemAvailable")
    if needed + min_free_gib * GiB > available:
        raise ConfigError(
            f"a {spec.item_rows:,}-row table needs about {needed / GiB:.1f} GiB on "
            f"{world_size} ranks (shards, row-wise Adagrad state, a checkpoint "
            f"copy and {RANK_BASE_BYTES / GiB:.1f} GiB per rank) plus "
            f"{min_free_gib} GiB kept free, but MemAvailable is "
            f"{available / GiB:.1f} GiB; use fewer --item_rows or free memory"
        )

    work = Path(work_dir)
    dataset = work / (
        f"zipf-{spec.rows}-{spec.item_rows}-{spec.num_raw_ids}-"
        f"{spec.exponent}-{spec.seed}"
    )
    data_started = time.perf_counter()
    if not (dataset / SCHEMA_FILE).exists():
        write_zipf_dataset(str(dataset), spec, overwrite=True)
    data_s = time.perf_counter() - data_started

    output = work / "run"
    shutil.rmtree(output, ignore_errors=True)
    config = build_config(
        {
            "dataset": str(dataset),
            "output_dir": str(output),
            "embedding_size": embedding_dim,
            "embedding_optimizer": "rowwise_adagrad",
            "embedding_learning_rate": 0.05,
            "learning_rate": 0.002,
            "sharding": "row_wise",
            "table_init": "sharded",
            "num_workers": world_size,
            "train_batch_size": train_batch_size,
            "eval_batch_size": 16384,
            "epochs": 1,
            "early_stopping_patience": 0,
            "keep_last_checkpoints": 1,
            "log_every_steps": 100,
            "prefetch_batches": 2,
        }
    )
    reports_dir = work / "reports"
    shutil.rmtree(reports_dir, ignore_errors=True)
    reports_dir.mkdir(parents=True)

    context = mp.start_processes(
        rank_main,
        args=(world_size, _free_port(), config.to_dict(), str(reports_dir)),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    started = time.perf_counter()
    lowest_free = available
    stop_reason = None
    try:
        while not context.join(timeout=1.0):
            free = meminfo_bytes("MemAvailable")
            lowest_free = min(lowest_free, free)
            if free < min_free_gib * GiB:
                stop_reason = (
                    f"MemAvailable fell to {free / GiB:.2f} GiB, below "
                    f"--min_free_gib {min_free_gib}"
                )
            elif time.perf_counter() - started > timeout_s:
                stop_reason = f"the run exceeded --timeout_s {timeout_s:.0f}"
            if stop_reason:
                break
    finally:
        if stop_reason:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                process.join()
    wall_s = time.perf_counter() - started
    if not keep_checkpoints:
        shutil.rmtree(output, ignore_errors=True)
    if stop_reason:
        raise RuntimeError(f"stopped the ranks after {wall_s:.0f} s: {stop_reason}")

    ranks = [
        json.loads((reports_dir / f"rank{rank}.json").read_text())
        for rank in range(world_size)
    ]
    return {
        "spec": spec.__dict__,
        "world_size": world_size,
        "embedding_dim": embedding_dim,
        "train_batch_size": train_batch_size,
        "dataset_write_s": data_s,
        "wall_s": wall_s,
        "lowest_mem_available_bytes": lowest_free,
        "mem_available_at_start_bytes": available,
        "ranks": ranks,
    }


def format_summary(result: dict[str, Any]) -> str:
    """A Markdown table: one row per phase, peak RSS per rank side by side."""
    spec = result["spec"]
    ranks = result["ranks"]
    per_row = row_bytes(result["embedding_dim"], "fp32", "rowwise_adagrad")
    shard_bytes = spec["item_rows"] * per_row.total / result["world_size"]
    lines = [
        f"{spec['item_rows']:,} x {result['embedding_dim']} item table "
        f"({spec['item_rows'] * per_row.weights / GiB:.2f} GiB fp32 weights + "
        f"{spec['item_rows'] * per_row.optimizer_state / GiB:.2f} GiB row-wise "
        f"Adagrad state, {shard_bytes / GiB:.2f} GiB per rank), "
        f"{spec['rows']:,} examples, {result['world_size']} ranks, "
        f"wall {result['wall_s']:.0f} s, lowest MemAvailable "
        f"{result['lowest_mem_available_bytes'] / GiB:.1f} GiB",
        "",
        "| phase | examples/s | valid AUC | "
        + " | ".join(f"peak RSS rank {r['rank']} (GiB)" for r in ranks)
        + " |",
        "|---|---|---|" + "---|" * len(ranks),
    ]
    for index, phase in enumerate(ranks[0]["phases"]):
        peaks = " | ".join(
            f"{r['phases'][index]['peak_rss_bytes'] / GiB:.2f}" for r in ranks
        )
        lines.append(
            f"| {phase['phase']} | {phase['train_examples_per_s']:,.0f} | "
            f"{phase['valid']['auc']:.4f} | {peaks} |"
        )
    hwm = " | ".join(f"{r['vm_hwm_bytes'] / GiB:.2f}" for r in ranks)
    lines.append(f"| whole run (VmHWM) | | | {hwm} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench_scale", description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument(
        "--item_rows", type=int, default=100_000_000, help="rows of the item table"
    )
    parser.add_argument(
        "--rows", type=int, default=2_000_000, help="examples (80/10/10 split)"
    )
    parser.add_argument(
        "--num_raw_ids",
        type=int,
        default=0,
        help="distinct raw item ids (default: 2 x item_rows)",
    )
    parser.add_argument(
        "--exponent", type=float, default=1.05, help="Zipf exponent of item popularity"
    )
    parser.add_argument("--embedding_size", type=int, default=16, help="D")
    parser.add_argument(
        "--train_batch_size", type=int, default=4096, help="global examples per step"
    )
    parser.add_argument("--world_size", type=int, default=2, help="ranks")
    parser.add_argument(
        "--work_dir",
        default="/tmp/kd-dagfm-scale",
        help="dataset, checkpoints and reports",
    )
    parser.add_argument(
        "--timeout_s",
        type=float,
        default=3000.0,
        help="wall-clock limit of the training run",
    )
    parser.add_argument(
        "--min_free_gib",
        type=float,
        default=1.5,
        help="stop the ranks below this MemAvailable",
    )
    parser.add_argument(
        "--keep_checkpoints", action="store_true", help="keep the run's checkpoints"
    )
    args = parser.parse_args(argv)  # fmt: skip
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    spec = ZipfDatasetSpec(
        rows=args.rows,
        item_rows=args.item_rows,
        num_raw_ids=args.num_raw_ids or 2 * args.item_rows,
        exponent=args.exponent,
    )
    try:
        result = run_scale(
            spec,
            args.work_dir,
            world_size=args.world_size,
            embedding_dim=args.embedding_size,
            train_batch_size=args.train_batch_size,
            timeout_s=args.timeout_s,
            min_free_gib=args.min_free_gib,
            keep_checkpoints=args.keep_checkpoints,
        )
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    Path(args.work_dir, "result.json").write_text(json.dumps(result, indent=2))
    print(format_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
