"""The main job: the three phases in sequence, then a results table."""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Sequence

import torch

from kd_dagfm.config import RunConfig
from kd_dagfm.data.reader import load_schema
from kd_dagfm.data.recbole import convert_recbole
from kd_dagfm.data.synthetic import generate_synthetic
from kd_dagfm.data.writer import write_dataset
from kd_dagfm.errors import ConfigError
from kd_dagfm.model import KDDAGFM
from kd_dagfm.phases import PIPELINE, Phase
from kd_dagfm.schema import SCHEMA_FILE, FeatureSchema
from kd_dagfm.storage import filesystem, join
from kd_dagfm.train.engine import Engine, LocalEngine
from kd_dagfm.train.trainer import (
    EngineFactory,
    EpochCallback,
    PhaseResult,
    PhaseTrainer,
    phase_directory,
)

logger = logging.getLogger(__name__)


def prepare_dataset(config: RunConfig) -> tuple[str, FeatureSchema]:
    """Return (dataset URL, schema); generates the synthetic dataset on first use.

    The synthetic dataset is written once to
    ``<output_dir>/data/synthetic-<rows>-<fields>-<vocab>-<seed>`` and reused.
    """
    data = config.data
    if data.dataset != "synthetic":
        atomic = recbole_atomic_name(data.dataset)
        if atomic is None:
            return data.dataset, load_schema(data.dataset)
        root = join(config.train.output_dir, "data", f"{atomic}-parquet")
        fs, path = filesystem(root)
        if not fs.exists(join(path, SCHEMA_FILE)):
            logger.info(
                "converting RecBole atomic files in %s to %s", data.dataset, root
            )
            convert_recbole(data.dataset, root, dataset_name=atomic, overwrite=True)
        return root, load_schema(root)
    name = (
        f"synthetic-{data.synthetic_rows}-{data.synthetic_fields}-"
        f"{data.synthetic_vocab_size}-{config.train.seed}"
    )
    root = join(config.train.output_dir, "data", name)
    fs, path = filesystem(root)
    if not fs.exists(join(path, SCHEMA_FILE)):
        logger.info("generating synthetic dataset %s", root)
        schema, splits = generate_synthetic(
            data.synthetic_rows,
            data.synthetic_fields,
            data.synthetic_vocab_size,
            config.train.seed,
        )
        write_dataset(
            root,
            schema,
            splits,
            rows_per_shard=50_000,
            row_group_rows=8_192,
            overwrite=True,
        )
    return root, load_schema(root)


def recbole_atomic_name(directory: str) -> str | None:
    """Return the dataset name when ``directory`` contains RecBole atomic files
    (``<name>.inter``) rather than a Parquet dataset, else None."""
    if "://" in directory or not os.path.isdir(directory):
        return None
    if os.path.exists(os.path.join(directory, SCHEMA_FILE)):
        return None
    names = [f[: -len(".inter")] for f in os.listdir(directory) if f.endswith(".inter")]
    return names[0] if len(names) == 1 else None


def local_engine_factory(config: RunConfig) -> EngineFactory:
    if config.distributed.table_init == "sharded":
        raise ConfigError(
            "table_init=sharded leaves the embedding tables for a sharded engine "
            "to allocate, but this run uses the single-process engine; use "
            "table_init=full, or run with the sharded engine (num_workers >= 1 "
            "through the distributed runner)"
        )

    def make(model: KDDAGFM, phase: Phase) -> Engine:
        return LocalEngine(model, config.train, phase, torch.device("cpu"))

    return make


def run_phase(
    config: RunConfig,
    phase: Phase | None = None,
    make_engine: EngineFactory | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> PhaseResult:
    """Run one phase (``config.train.phase`` unless given) in this process.

    ``on_epoch_end`` is called with (epoch, valid metrics) after each epoch.
    """
    dataset, schema = prepare_dataset(config)
    phase = phase or config.train.phase
    trainer = PhaseTrainer(
        config,
        phase,
        schema,
        dataset,
        make_engine or local_engine_factory(config),
        on_epoch_end=on_epoch_end,
    )
    return trainer.run()


def run_pipeline(
    config: RunConfig,
    phases: Sequence[Phase] = PIPELINE,
    make_engine: EngineFactory | None = None,
    on_phase_end: Callable[[PhaseResult], None] | None = None,
) -> list[PhaseResult]:
    """Run the phases in order; each later phase warm-starts from the one before.

    ``warm_up`` in ``config`` applies to the first phase only; later phases
    use the previous phase's directory under ``output_dir``. ``on_phase_end``
    is called with each phase's result as soon as that phase finishes (the
    Ray runner reports it to Ray Train).
    """
    dataset, schema = prepare_dataset(config)
    make_engine = make_engine or local_engine_factory(config)
    results: list[PhaseResult] = []
    for index, phase in enumerate(phases):
        phase_config = config
        if index > 0:
            phase_config = config.replace(
                warm_up=phase_directory(config, phases[index - 1])
            )
        results.append(
            PhaseTrainer(phase_config, phase, schema, dataset, make_engine).run()
        )
        # The finished phase's engine (sharded tables, optimizer hooks) is kept
        # alive by reference cycles; collect it before the next phase allocates
        # its own tables, or every phase adds a full copy of them.
        gc.collect()
        if on_phase_end is not None:
            on_phase_end(results[-1])
    return results


def format_results(results: Sequence[PhaseResult]) -> str:
    """Format the results as a plain-text table with one row per phase."""
    header = (
        "phase",
        "model",
        "tower params",
        "emb params",
        "FLOPs/ex",
        "valid AUC",
        "valid logloss",
        "test AUC",
        "test logloss",
        "examples/s",
        "wall s",
    )
    rows = [
        (
            r.phase.value,
            r.model_name,
            f"{r.tower_parameters:,}",
            f"{r.embedding_parameters:,}",
            f"{r.flops_per_example:,.0f}",
            f"{r.valid.auc:.4f}",
            f"{r.valid.log_loss:.4f}",
            f"{r.test.auc:.4f}",
            f"{r.test.log_loss:.4f}",
            f"{r.train_examples_per_s:,.0f}",
            f"{r.wall_time_s:.1f}",
        )
        for r in results
    ]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines = [" | ".join(str(x).ljust(w) for x, w in zip(header, widths))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def default_threads() -> None:
    """Use one intra-op thread unless OMP_NUM_THREADS is set."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
