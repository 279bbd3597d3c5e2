"""Rows per second from Parquet to training-ready Batches, local and from S3.

The job writes a Criteo-shaped dataset with the default shard layout: a
label and 39 int64 id fields, 13 like log2-bucketed counts (66 ids) and 26
skewed categorical fields (10 to 1,000,000 ids). It then measures these
cases in one run, interleaved and repeated:

- ``raw scan``: pyarrow reading every row group (the label and 39 feature
  columns) into Arrow tables and nothing else;
- ``reader``: :class:`~kd_dagfm.data.reader.SplitReader` yielding
  :class:`~kd_dagfm.data.batch.Batch` objects (KJT + dense + labels) of
  ``--batch-size`` rows, validated and shuffled, for several
  ``shuffle_block_rows``.

Local cases run on one core: pyarrow's CPU and I/O pools set to one thread,
``OMP_NUM_THREADS=1``, no prefetch thread. The job reports rows per second
of wall time and rows per CPU second (process CPU time, all threads), which
is the per-core figure and the steadier one on a shared machine. A last
local case runs the reader as training does (prefetch thread, default
pyarrow pools) and reports wall time.

S3 cases read the same shards from a moto S3 server on 127.0.0.1, through
s3fs (what the reader uses) and through pyarrow's own S3FileSystem. Run it
in the loopback-only network namespace::

    bash scripts/loopback.sh .venv/bin/python -m jobs.bench_reader \\
        --markdown docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from kd_dagfm.data.reader import ParquetSplit, SplitReader, load_schema
from kd_dagfm.data.writer import DatasetWriter
from kd_dagfm.schema import FeatureSchema, make_schema
from kd_dagfm.storage import filesystem

logger = logging.getLogger("jobs.bench_reader")

BUCKET = "bench-reader"
SECTION_BEGIN = "<!-- bench_reader:begin -->"
SECTION_END = "<!-- bench_reader:end -->"
CATEGORICAL_SIZES = (10, 100, 1_000, 10_000, 100_000, 1_000_000)


@dataclasses.dataclass
class Case:
    """One measured configuration and its repeats."""

    name: str
    run: Callable[[], int]
    wall_rows_per_s: list[float] = dataclasses.field(default_factory=list)
    cpu_rows_per_s: list[float] = dataclasses.field(default_factory=list)

    def measure(self) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        rows = self.run()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        self.wall_rows_per_s.append(rows / wall)
        self.cpu_rows_per_s.append(rows / max(cpu, 1e-9))

    @property
    def wall(self) -> float:
        return statistics.median(self.wall_rows_per_s)

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpu_rows_per_s)


def criteo_shaped_schema() -> FeatureSchema:
    sizes = {f"I{i}": 66 for i in range(1, 14)}
    for i in range(1, 27):
        sizes[f"C{i}"] = CATEGORICAL_SIZES[i % len(CATEGORICAL_SIZES)]
    return make_schema("label", sizes)


def write_criteo_shaped(root: str, rows: int, seed: int) -> FeatureSchema:
    """Skewed ids like real logs: id = floor(size * u ** 3), so small ids dominate."""
    schema = criteo_shaped_schema()
    rng = np.random.default_rng(seed)
    chunk = 250_000
    with DatasetWriter(root, schema, overwrite=True) as writer:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            columns = {"label": pa.array((rng.random(n) < 0.25).astype(np.int8))}
            for feature in schema.features:
                u = rng.random(n)
                columns[feature.name] = pa.array(
                    np.floor(feature.num_embeddings * u**3).astype(np.int64)
                )
            writer.write("train", pa.table(columns))
    return schema


def raw_scan(files: list[tuple[Any, str]], columns: list[str]) -> int:
    """Read every row group of ``files`` ((filesystem or None, path)) into Arrow."""
    rows = 0
    for fs, path in files:
        if fs is None:
            parquet_file = pq.ParquetFile(path)
            handle = None
        elif isinstance(fs, pafs.FileSystem):
            handle = fs.open_input_file(path)
            parquet_file = pq.ParquetFile(handle, pre_buffer=True)
        else:
            handle = fs.open(path, "rb")
            parquet_file = pq.ParquetFile(handle, pre_buffer=True)
        for index in range(parquet_file.num_row_groups):
            rows += parquet_file.read_row_group(index, columns=columns).num_rows
        if handle is not None:
            handle.close()
    return rows


def read_batches(
    dataset: str, schema: FeatureSchema, batch_size: int, **kwargs: Any
) -> int:
    split = ParquetSplit(dataset, "train", schema)
    reader = SplitReader(split, batch_size, seed=1, **kwargs)
    return sum(len(batch) for batch in reader.epoch())


def measure(cases: list[Case], repeats: int) -> None:
    for case in cases:  # warm-up: imports, page cache, first connections
        case.run()
    for repeat in range(repeats):
        for case in cases:
            case.measure()
        logger.info("repeat %d/%d done", repeat + 1, repeats)


def local_cases(
    dataset: str, schema: FeatureSchema, batch_size: int, block_rows: list[int]
) -> list[Case]:
    fs, root = filesystem(dataset)
    files = [(None, p) for p in sorted(fs.glob(f"{root}/train/*.parquet"))]
    columns = list(schema.columns)
    cases = [Case("raw scan (pyarrow)", lambda: raw_scan(files, columns))]
    for rows in block_rows:
        cases.append(
            Case(
                f"reader, shuffle_block_rows={rows}",
                lambda rows=rows: read_batches(
                    dataset,
                    schema,
                    batch_size,
                    shuffle_block_rows=rows,
                    prefetch_batches=0,
                ),
            )
        )
    cases.append(
        Case(
            "reader, no shuffle",
            lambda: read_batches(
                dataset, schema, batch_size, shuffle=False, prefetch_batches=0
            ),
        )
    )
    return cases


def s3_cases(
    dataset: str, schema: FeatureSchema, batch_size: int, endpoint: str
) -> list[Case]:
    fs, root = filesystem(dataset)
    paths = sorted(fs.glob(f"{root}/train/*.parquet"))
    native = pafs.S3FileSystem(
        endpoint_override=endpoint,
        scheme="http",
        region="us-east-1",
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    )
    columns = list(schema.columns)
    return [
        Case("raw scan, s3fs", lambda: raw_scan([(fs, p) for p in paths], columns)),
        Case(
            "raw scan, pyarrow S3FileSystem",
            lambda: raw_scan([(native, p) for p in paths], columns),
        ),
        Case(
            "reader (s3fs), shuffle_block_rows=256",
            lambda: read_batches(
                dataset, schema, batch_size, shuffle_block_rows=256, prefetch_batches=0
            ),
        ),
    ]


def start_moto() -> tuple[Any, str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # Fake credentials for the local server only; real runs use the usual
    # AWS sources.
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
        AWS_EC2_METADATA_DISABLED="true",
    )
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    return server, endpoint


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [
                line.split(":", 1)[1].strip() for line in f if "model name" in line
            ]
        model = names[0] if names else model
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{model}, {os.cpu_count()} CPUs, load average {load} at the start; "
        f"Python {platform.python_version()}, pyarrow {pa.__version__}, "
        f"numpy {np.__version__}"
    )


def table(cases: list[Case], baseline: Case, per_core: bool) -> list[str]:
    """Markdown rows; the ratio column compares CPU rates (``per_core``) or wall rates."""
    basis = "CPU" if per_core else "wall"
    lines = [
        f"| case | rows/s (wall) | rows per CPU second | vs first row ({basis}) |",
        "|---|---:|---:|---:|",
    ]
    for case in cases:
        ratio = case.cpu / baseline.cpu if per_core else case.wall / baseline.wall
        lines.append(
            f"| {case.name} | {case.wall:,.0f} | {case.cpu:,.0f} | {ratio:.2f} |"
        )
    return lines


def report(
    args: argparse.Namespace,
    local: list[Case],
    prefetched: Case,
    remote: list[Case],
    bytes_on_disk: int,
    setup: str,
) -> str:
    command = " ".join(["python -m jobs.bench_reader", *sys.argv[1:]])
    lines = [
        SECTION_BEGIN,
        "## Reader: Parquet to training batches",
        "",
        f"Command: `bash scripts/loopback.sh .venv/bin/{command}`",
        "",
        f"Machine: {setup}",
        "",
        f"Data: {args.rows:,} Criteo-shaped rows (label + 39 int64 id fields), "
        f"{bytes_on_disk / 2**20:,.1f} MiB of zstd Parquet in shards of "
        f"1,000,000 rows and row groups of 65,536; batches of {args.batch_size} "
        f"rows; medians of {args.repeats} interleaved repeats.",
        "",
        "Local disk, one core (pyarrow pools of one thread, no prefetch thread):",
        "",
        *table(local, local[0], per_core=True),
        "",
        f"As training runs it (prefetch thread, default pyarrow pools), "
        f"shuffle_block_rows=256: {prefetched.wall:,.0f} rows/s wall, "
        f"{prefetched.cpu:,.0f} rows per CPU second.",
        "",
        "Loopback moto S3 server (default pools). The server runs in this process, "
        "so CPU seconds include its work; compare wall rates:",
        "",
        *table(remote, remote[0], per_core=False),
        SECTION_END,
    ]
    return "\n".join(lines) + "\n"


def write_section(path: str, section: str) -> None:
    """Replace the job's section of ``path`` (between its markers) or append it."""
    text = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    if SECTION_BEGIN in text and SECTION_END in text:
        head = text.split(SECTION_BEGIN, 1)[0]
        tail = text.split(SECTION_END, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "# Benchmarks\n\n") + section
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows to generate")
    parser.add_argument("--batch-size", type=int, default=2048, help="rows per batch")
    parser.add_argument("--repeats", type=int, default=5, help="repeats per case")
    parser.add_argument(
        "--block-rows",
        type=int,
        nargs="+",
        default=[1, 256, 1024],
        help="shuffle_block_rows values to measure",
    )
    parser.add_argument("--skip-s3", action="store_true", help="local cases only")
    parser.add_argument(
        "--markdown", help="update this file's reader section with the results"
    )
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    setup = machine()

    workdir = tempfile.mkdtemp(prefix="bench-reader-")
    try:
        dataset = os.path.join(workdir, "criteo-shaped")
        logger.info("writing %d rows to %s", args.rows, dataset)
        schema = write_criteo_shaped(dataset, args.rows, args.seed)
        schema = load_schema(dataset)
        bytes_on_disk = sum(
            os.path.getsize(os.path.join(dataset, "train", name))
            for name in os.listdir(os.path.join(dataset, "train"))
        )

        pa.set_cpu_count(1)
        pa.set_io_thread_count(1)
        local = local_cases(dataset, schema, args.batch_size, args.block_rows)
        measure(local, args.repeats)
        pa.set_cpu_count(os.cpu_count() or 1)
        pa.set_io_thread_count(8)
        prefetched = Case(
            "reader, prefetch thread",
            lambda: read_batches(
                dataset, schema, args.batch_size, shuffle_block_rows=256
            ),
        )
        measure([prefetched], args.repeats)

        remote: list[Case] = []
        if not args.skip_s3:
            server, endpoint = start_moto()
            try:
                url = f"s3://{BUCKET}/criteo-shaped"
                fs, _ = filesystem(url)
                fs.put(dataset, f"{BUCKET}/criteo-shaped", recursive=True)
                remote = s3_cases(url, schema, args.batch_size, endpoint)
                measure(remote, max(1, args.repeats // 2))
            finally:
                server.stop()

        section = report(args, local, prefetched, remote, bytes_on_disk, setup)
        print(section)
        if args.markdown:
            write_section(args.markdown, section)
            logger.info("updated %s", args.markdown)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
