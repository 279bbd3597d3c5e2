"""The benchmark job: accuracy, cost, roofline and speed against RecBole.

One command measures what KD-DAGFM promises, a student that keeps the
teacher's accuracy at a fraction of its cost, on this system:

1. Accuracy: the datasets are synthetic data with planted three-field
   crosses, MovieLens-100K, and the 200-row Criteo sample as a smoke check.
   For each dataset and teacher (CrossNet, CIN) the job trains the teacher,
   the student right after distillation and the student after finetuning,
   and for each dataset the student from scratch without a teacher. It
   reports test AUC and log loss as mean and sample standard deviation
   over seeds.
2. Cost: parameters, counted FLOPs per example and inference latency
   (p50/p99 at batch 1 and 512) of each teacher and student, and the
   student's FLOPs as a fraction of each teacher's.
3. Speed: kd-dagfm against RecBole 1.2.1's KD_DAGFM on the same ml-100k
   data, model sizes and batch size, examples/s per phase and the ratio
   (``jobs/recbole_compare.py``).
4. Roofline: measured matmul GFLOP/s and copy bandwidth, FLOPs and bytes
   per example of each phase's training step, the bound on examples/s and
   the fraction of it the speed run reached.
5. Plots (PNG): test AUC against FLOPs per example, and valid AUC per epoch
   of each phase.

The full run writes its sections of docs/BENCHMARKS.md and the plots under
docs/benchmarks/. ``--quick`` runs tiny models for an epoch or two and
writes everything under ``--output_dir`` instead; it skips RecBole, with a
logged reason, when RecBole's environment is missing. The full run creates
that environment (scripts/setup_recbole_venv.sh) when it is missing.

Usage:
    python -m jobs.benchmark                 # full run, 10-20 minutes on 2 cores
    python -m jobs.benchmark --quick --output_dir /tmp/bench
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from jobs import recbole_compare
from kd_dagfm.bench.cost import ModelCost, model_cost
from kd_dagfm.bench.plots import (
    AccuracyPoint,
    Curve,
    plot_auc_vs_flops,
    plot_training_curves,
)
from kd_dagfm.bench.report import (
    load_average,
    machine_description,
    markdown_table,
    mean_std,
    write_sections,
)
from kd_dagfm.bench.roofline import MachinePeak, StepCost, count_step, measure_peak
from kd_dagfm.config import RunConfig, build_config
from kd_dagfm.data.memory import InMemorySplit
from kd_dagfm.data.reader import ParquetSplit
from kd_dagfm.data.recbole import convert_recbole
from kd_dagfm.data.synthetic import generate_synthetic
from kd_dagfm.data.writer import write_dataset
from kd_dagfm.model import KDDAGFM
from kd_dagfm.objective import KDObjective
from kd_dagfm.phases import Phase
from kd_dagfm.pipeline import prepare_dataset, run_phase, run_pipeline
from kd_dagfm.schema import FeatureSchema
from kd_dagfm.train.engine import LocalEngine
from kd_dagfm.train.trainer import PhaseResult

logger = logging.getLogger("jobs.benchmark")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(
    os.environ.get("KD_DAGFM_SHARED_DATA", REPO.parent / "shared" / "data")
)
TEACHERS = ("crossnet", "cin")
TEACHER_LABELS = {"crossnet": "CrossNet", "cin": "CIN"}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Settings of one benchmark run: what it trains and measures.

    Attributes:
        quick: tiny models and data (the test suite's mode).
        seeds: training seeds of every accuracy run.
        threads: torch intra-op threads for everything.
        model: model keys shared by all accuracy runs.
        cin_layers: CIN teacher layer sizes of the accuracy runs.
        synthetic: synthetic data keys.
        epochs: maximum epochs per phase, per dataset.
        patience: early-stopping patience of the accuracy runs.
        max_steps_per_epoch: cap on steps per epoch (0: none).
        latency_calls: timed inference passes per batch size.
        speed_epochs, speed_repeats: epochs per phase and runs per system of
            the comparison with RecBole.
        install_recbole: create RecBole's environment when it is missing.
    """

    quick: bool
    seeds: tuple[int, ...]
    threads: int
    model: dict[str, Any]
    cin_layers: tuple[int, ...]
    synthetic: dict[str, Any]
    epochs: dict[str, int]
    patience: int
    max_steps_per_epoch: int
    latency_calls: dict[int, int]
    speed_epochs: int
    speed_repeats: int
    install_recbole: bool


def settings_for(quick: bool, threads: int, seeds: int) -> Settings:
    if quick:
        return Settings(
            quick=True,
            seeds=tuple(range(seeds or 2)),
            threads=threads,
            model={"embedding_size": 4, "depth": 2, "t_depth": 2},
            cin_layers=(6, 6),
            synthetic={
                "synthetic_rows": 4000,
                "synthetic_fields": 5,
                "synthetic_vocab_size": 8,
            },
            epochs={"synthetic": 2, "ml-100k": 1, "criteo-sample": 1},
            patience=0,
            max_steps_per_epoch=4,
            latency_calls={1: 20, 512: 5},
            speed_epochs=1,
            speed_repeats=1,
            install_recbole=False,
        )
    return Settings(
        quick=False,
        seeds=tuple(range(seeds or 3)),
        threads=threads,
        model={"embedding_size": 16, "depth": 3, "t_depth": 3},
        # CIN's outer products make it ~100x the FLOPs of CrossNet at RecBole's
        # [200, 200, 200]; the accuracy runs use a small CIN to keep the job short.
        # TODO: add RecBole's CIN [200, 200, 200] to the accuracy runs once CIN
        # trains faster on CPU; CIN [32, 32, 32] on the 12-field synthetic data
        # trained at about 1,300 examples/s on the 2-core machine.
        cin_layers=(16, 16),
        synthetic={
            "synthetic_rows": 50_000,
            "synthetic_fields": 12,
            "synthetic_vocab_size": 20,
        },
        epochs={"synthetic": 20, "ml-100k": 20, "criteo-sample": 10},
        patience=3,
        max_steps_per_epoch=0,
        latency_calls={1: 300, 512: 30},
        speed_epochs=3,
        speed_repeats=3,
        install_recbole=True,
    )


# ---------------------------------------------------------------- datasets


# Seed of the synthetic data and of the Criteo sample's split, so every
# training seed uses the same dataset.
DATA_SEED = 2022


def dataset_keys(name: str, settings: Settings, work: Path) -> dict[str, Any]:
    """Config keys selecting dataset ``name``, written once under ``work/data``."""
    root = work / "data" / name
    if (root / "schema.json").exists():
        return {"dataset": str(root)}
    if name == "synthetic":
        schema, splits = generate_synthetic(
            settings.synthetic["synthetic_rows"],
            settings.synthetic["synthetic_fields"],
            settings.synthetic["synthetic_vocab_size"],
            DATA_SEED,
        )
        write_dataset(str(root), schema, splits, row_group_rows=8192, overwrite=True)
    elif name == "ml-100k":
        convert_recbole(str(SHARED_DATA / "ml-100k"), str(root), overwrite=True)
    elif name == "criteo-sample":
        convert_criteo_sample(root)
    else:
        raise ValueError(f"unknown dataset {name!r}")
    return {"dataset": str(root)}


def convert_criteo_sample(output: Path) -> None:
    """Convert the 200-row Criteo sample with kd-dagfm's Criteo converter.

    Every token gets its own id (a vocabulary with min_count 1): hashing into
    the converter's default 2^20 rows per feature would give 26 mostly empty
    tables of a million rows for 200 rows of data.
    """
    from kd_dagfm.data.convert import CategoricalEncoding, ConvertOptions
    from kd_dagfm.data.criteo import convert_criteo

    convert_criteo(
        str(SHARED_DATA / "criteo_sample.csv"),
        str(output),
        ConvertOptions(
            encoding=CategoricalEncoding(method="vocab", min_count=1),
            overwrite=True,
            row_group_rows=1024,
            seed=DATA_SEED,
        ),
    )


# ---------------------------------------------------------------- accuracy


@dataclasses.dataclass(frozen=True)
class AccuracyRun:
    """Results of one dataset, teacher (or none) and seed."""

    dataset: str
    teacher: str  # "" for the student trained from scratch
    seed: int
    results: tuple[PhaseResult, ...]


def accuracy_config(
    name: str, teacher: str, seed: int, settings: Settings, work: Path
) -> RunConfig:
    keys: dict[str, Any] = {
        **dataset_keys(name, settings, work),
        **settings.model,
        "teacher": teacher,
        "student_type": "outer",
        "t_cin": list(settings.cin_layers),
        "train_batch_size": 2048 if not settings.quick else 256,
        "eval_batch_size": 8192,
        "epochs": settings.epochs[name],
        "early_stopping_patience": settings.patience,
        "max_steps_per_epoch": settings.max_steps_per_epoch,
        "cache_in_memory": True,
        "remainder": "keep" if name == "criteo-sample" else "drop",
        "log_every_steps": 0,
        "keep_last_checkpoints": 1,
        "seed": seed,
        "output_dir": str(
            work / "accuracy" / name / (teacher or "scratch") / str(seed)
        ),
    }
    if name == "criteo-sample":
        keys["train_batch_size"] = 32
    return build_config(keys)


def run_accuracy(settings: Settings, work: Path) -> list[AccuracyRun]:
    runs = []
    for name in settings.epochs:
        for seed in settings.seeds:
            for teacher in TEACHERS:
                config = accuracy_config(name, teacher, seed, settings, work)
                started = time.perf_counter()
                results = run_pipeline(config)
                logger.info(
                    "%s %s seed %d: three phases in %.0f s",
                    name,
                    teacher,
                    seed,
                    time.perf_counter() - started,
                )
                runs.append(AccuracyRun(name, teacher, seed, tuple(results)))
            # The ablation: the student trained like finetuning, from fresh
            # weights and without any teacher.
            config = accuracy_config(name, "crossnet", seed, settings, work)
            config = config.replace(
                from_scratch=True,
                output_dir=str(work / "accuracy" / name / "scratch" / str(seed)),
            )
            result = run_phase(config, Phase.FINETUNING)
            runs.append(AccuracyRun(name, "", seed, (result,)))
    return runs


def accuracy_rows(runs: Sequence[AccuracyRun]) -> list[dict[str, Any]]:
    """Summarise the runs as one row per dataset and model (test AUC and
    log loss over seeds)."""
    rows = []
    datasets = list(dict.fromkeys(r.dataset for r in runs))
    for dataset in datasets:
        for teacher in (*TEACHERS, ""):
            chosen = [r for r in runs if r.dataset == dataset and r.teacher == teacher]
            if not chosen:
                continue
            for index, result in enumerate(chosen[0].results):
                label = _model_label(teacher, result.phase)
                per_seed = [r.results[index] for r in chosen]
                auc = mean_std([r.test.auc for r in per_seed])
                log_loss = mean_std([r.test.log_loss for r in per_seed])
                rows.append(
                    {
                        "dataset": dataset,
                        "model": label,
                        "phase": result.phase.value,
                        "teacher": teacher,
                        "flops_per_example": result.flops_per_example,
                        "auc_mean": auc[0],
                        "auc_std": auc[1],
                        "log_loss_mean": log_loss[0],
                        "log_loss_std": log_loss[1],
                        "seeds": len(per_seed),
                        "epochs": [r.epochs for r in per_seed],
                    }
                )
    return rows


def _model_label(teacher: str, phase: Phase) -> str:
    if not teacher:
        return "DAGFM from scratch (no teacher)"
    name = TEACHER_LABELS[teacher]
    if phase is Phase.TEACHER_TRAINING:
        return f"{name} (teacher)"
    if phase is Phase.DISTILLATION:
        return f"DAGFM distilled from {name}"
    return f"DAGFM distilled from {name}, finetuned"


# ---------------------------------------------------------------- cost


def cost_models(settings: Settings) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, role, model keys) of every model in the cost table."""
    base = dict(settings.model)
    models: list[tuple[str, str, dict[str, Any]]] = [
        (f"CrossNet (depth {base['t_depth']})", "teacher", {"teacher": "crossnet"}),
        (
            f"CIN {list(settings.cin_layers)} (accuracy runs)",
            "teacher",
            {"teacher": "cin", "t_cin": list(settings.cin_layers)},
        ),
        ("DAGFM-outer", "student", {"student_type": "outer"}),
        ("DAGFM-inner", "student", {"student_type": "inner"}),
    ]
    if not settings.quick:
        models.insert(
            2,
            (
                "CIN [200, 200, 200] (RecBole default)",
                "teacher",
                {"teacher": "cin", "t_cin": [200, 200, 200]},
            ),
        )
    return [(n, r, {**base, **k}) for n, r, k in models]


def run_cost(
    name: str, settings: Settings, work: Path
) -> tuple[FeatureSchema, list[ModelCost]]:
    """Cost of every model on dataset ``name``'s schema, timed on its test rows."""
    config = accuracy_config(name, "crossnet", 0, settings, work)
    dataset, schema = prepare_dataset(config)
    memory = InMemorySplit.load(ParquetSplit(dataset, "test", schema))
    batches = {
        size: memory.take(torch.arange(size) % memory.num_rows).batch(0, size)
        for size in settings.latency_calls
    }
    costs = []
    for label, role, keys in cost_models(settings):
        model_config = config.replace(**keys)
        torch.manual_seed(0)
        model = KDDAGFM(schema, model_config.model)
        costs.append(model_cost(model, role, label, batches, settings.latency_calls))
    return schema, costs


def cost_table(dataset: str, schema: FeatureSchema, costs: Sequence[ModelCost]) -> str:
    students = [c for c in costs if c.role == "student"]
    teachers = [c for c in costs if c.role == "teacher"]
    header = [
        "model",
        "tower params",
        "embedding params",
        "FLOPs/example",
        "batch 1 p50 / p99 ms (passes)",
        "batch 512 p50 / p99 ms (passes)",
    ]
    header += [f"{s.name} FLOPs / this" for s in students]
    rows = []
    for cost in costs:
        latency = {lat.batch_size: lat for lat in cost.latency}
        row = [
            cost.name,
            f"{cost.tower_parameters:,}",
            f"{cost.embedding_parameters:,}",
            f"{cost.flops_per_example:,.0f}",
        ]
        for size in (1, 512):
            lat = latency.get(size)
            row.append(
                f"{lat.p50_ms:.3f} / {lat.p99_ms:.3f} ({lat.calls})" if lat else "-"
            )
        for student in students:
            row.append(
                f"{100 * student.flops_per_example / cost.flops_per_example:.1f} %"
                if cost in teachers
                else "-"
            )
        rows.append(row)
    return f"**{dataset}** ({schema.num_fields} fields):\n\n" + markdown_table(
        header, rows
    )


# ---------------------------------------------------------------- roofline


def run_roofline(
    settings: Settings, work: Path
) -> tuple[MachinePeak, dict[str, StepCost]]:
    """Machine peaks and the step cost of each phase of the speed run's model."""
    peak = measure_peak(
        matmul_size=512 if settings.quick else 1024,
        copy_mib=32 if settings.quick else 256,
        repeats=3 if settings.quick else 10,
    )
    config = recbole_compare.ours_config(
        SHARED_DATA / "ml-100k", work / "roofline", 1, 2048, 2022
    )
    dataset, schema = prepare_dataset(config)
    memory = InMemorySplit.load(ParquetSplit(dataset, "train", schema))
    batch = memory.batch(0, config.train.train_batch_size)
    objective = KDObjective(config.train.ctr_loss_weight, config.train.kd_loss_weight)
    costs = {}
    for phase in Phase:
        model = KDDAGFM(schema, config.model)
        engine = LocalEngine(model, config.train, phase, torch.device("cpu"))
        model.train()

        def step(
            model: KDDAGFM = model, engine: LocalEngine = engine, phase: Phase = phase
        ) -> None:
            output = model(batch.sparse_features, batch.dense_features, phase)
            loss, _ = objective(output, batch.labels, phase)
            engine.optimize(loss)

        costs[phase.value] = count_step(step, len(batch))
    return peak, costs


# ---------------------------------------------------------------- report


def provenance(command: str) -> str:
    """Return the line that opens each section: command, time and load average."""
    return (
        f"*Produced by `{command}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
        f"(1/5/15 min) {load_average()}.*"
    )


def accuracy_section(
    rows: Sequence[dict[str, Any]], settings: Settings, command: str
) -> str:
    header = ["dataset", "model", "test AUC", "test log loss", "seeds"]
    table = [
        [
            r["dataset"],
            r["model"],
            f"{r['auc_mean']:.4f} ± {r['auc_std']:.4f}",
            f"{r['log_loss_mean']:.4f} ± {r['log_loss_std']:.4f}",
            str(r["seeds"]),
        ]
        for r in rows
    ]
    model = settings.model
    return "\n".join(
        [
            "## Accuracy: teachers, distilled and finetuned students, no-teacher baseline",
            "",
            provenance(command),
            "",
            f"Mean ± sample standard deviation of test AUC and log loss over "
            f"{len(settings.seeds)} seeds ({', '.join(map(str, settings.seeds))}). "
            f"Embedding {model['embedding_size']}, CrossNet depth {model['t_depth']}, "
            f"CIN {list(settings.cin_layers)}, DAGFM-outer depth {model['depth']}; "
            f"Adam at 1e-3, batch {256 if settings.quick else 2048} (32 on the "
            "Criteo sample), up to "
            + ", ".join(f"{v} epochs on {k}" for k, v in settings.epochs.items())
            + f" per phase with early stopping after {settings.patience} epochs "
            "without a valid AUC gain; each phase reports its best valid epoch. "
            "The distilled student is evaluated right after distillation, the "
            "finetuned one after finetuning. 'DAGFM from scratch' is finetuning "
            "from fresh weights (`--phase finetuning --from_scratch true`): the "
            "student without a teacher. The Criteo sample (200 rows, about 20 "
            "of them in the test split) is a smoke check only; its AUCs carry "
            "no signal.",
            "",
            markdown_table(header, table),
            "",
            "![test AUC against FLOPs per example](benchmarks/auc_vs_flops.png)",
        ]
    )


def cost_section(tables: Sequence[str], settings: Settings, command: str) -> str:
    calls = ", ".join(
        f"{n} passes at batch {b}" for b, n in settings.latency_calls.items()
    )
    return "\n".join(
        [
            "## Cost: parameters, FLOPs and inference latency",
            "",
            provenance(command),
            "",
            "FLOPs per example of the tower's forward pass, counted by "
            "`torch.utils.flop_counter` (matmuls, einsums, convolutions at 2 FLOPs "
            "per multiply-add; elementwise work and embedding lookups are not "
            "counted). Latency: the embedding lookup and the tower in eval mode "
            f"under `torch.inference_mode`, up to {calls} (a model slower than "
            "20 s per batch size gets fewer, at least 5), on rows of the test split, "
            f"{settings.threads} thread(s). The last columns give each student's "
            "FLOPs as a percentage of each teacher's; the KD-DAGFM paper reports "
            "its students at under 21.5 % of the state of the art's FLOPs.",
            "",
            *[t + "\n" for t in tables],
        ]
    )


def speed_section(
    comparison: recbole_compare.Comparison,
    peak: MachinePeak,
    steps: dict[str, StepCost],
    command: str,
) -> str:
    lines = [
        "## Speed against RecBole 1.2.1 and the roofline",
        "",
        provenance(command),
        "",
        f"MovieLens-100K, CrossNet teacher and DAGFM-outer student (embedding 16, "
        f"depths 3), batch {comparison.settings['batch_size']}, "
        f"{comparison.settings['threads']} thread(s), "
        f"{comparison.settings['epochs']} epochs per phase, "
        f"{comparison.settings['repeats']} repeats per system alternating which "
        "runs first; medians over all epochs of all repeats. Examples/s counts "
        "the training loop only (data, forward, backward, optimizer step), per "
        "wall-clock second and per CPU second of the process. kd-dagfm runs "
        "with `cache_in_memory: true`. Load average (1/5/15 min) "
        f"{comparison.load_before} before, {comparison.load_after} after.",
        "",
        "Both systems use the same number of intra-op threads. With two threads "
        "on this shared 2-core machine both ran several times slower than with "
        "one (OpenMP threads contending with other processes' work), so the "
        "recorded runs use one. The figure of about 170,000 examples/s for "
        "RecBole's distillation on an idle machine of this kind was taken "
        "without setting a thread count, that is with PyTorch's default of one "
        "thread per core (two here).",
        "",
    ]
    if comparison.skipped_reason:
        lines += [f"RecBole did not run: {comparison.skipped_reason}.", ""]
    elif comparison.data_identical:
        lines += [
            "RecBole read its bundled `dataset_example/ml-100k`, byte for byte "
            "the files kd-dagfm converted.",
            "",
        ]
    theirs = {s.phase: s for s in comparison.recbole}
    header = [
        "phase",
        "kd-dagfm ex/s",
        "RecBole ex/s",
        "ratio",
        "kd-dagfm ex/CPU-s",
        "RecBole ex/CPU-s",
        "ratio",
        "tower params (kd-dagfm / RecBole)",
    ]
    rows = []
    for ours in comparison.ours:
        other = theirs.get(ours.phase)
        if other is None:
            rows.append(
                [
                    ours.phase,
                    f"{ours.examples_per_s:,.0f}",
                    "-",
                    "-",
                    f"{ours.examples_per_cpu_s:,.0f}",
                    "-",
                    "-",
                    f"{ours.tower_parameters:,} / -",
                ]
            )
            continue
        rows.append(
            [
                ours.phase,
                f"{ours.examples_per_s:,.0f}",
                f"{other.examples_per_s:,.0f}",
                f"{ours.examples_per_s / other.examples_per_s:.2f}x",
                f"{ours.examples_per_cpu_s:,.0f}",
                f"{other.examples_per_cpu_s:,.0f}",
                f"{ours.examples_per_cpu_s / other.examples_per_cpu_s:.2f}x",
                f"{ours.tower_parameters:,} / {other.tower_parameters:,}",
            ]
        )
    lines += [markdown_table(header, rows), ""]
    if comparison.recbole:
        lines += [_target_verdict(comparison), ""]

    lines += [
        f"Roofline: fp32 matmul {peak.matmul_gflops:.1f} GFLOP/s (best "
        f"{peak.matmul_size}^3 matmul) and copy bandwidth {peak.bandwidth_gbs:.1f} "
        f"GB/s (read plus write, {peak.copy_mib} MiB), {peak.threads} thread(s). "
        "FLOPs per example: matmuls, einsums and convolutions of one training "
        "step (forward, backward), counted. Bytes per example: every tensor each "
        "ATen operator reads and writes in the step, as if nothing stayed in "
        "cache, so the memory term is pessimistic. Bound = 1 / max(FLOPs / "
        "matmul rate, bytes / bandwidth); the fraction uses the per-CPU-second "
        "throughput above.",
        "",
    ]
    ours_by_phase = {s.phase: s for s in comparison.ours}
    header = [
        "phase",
        "FLOPs/example",
        "bytes/example",
        "bound ex/s",
        "bound by",
        "kd-dagfm ex/CPU-s",
        "fraction of bound",
    ]
    rows = []
    for phase, step in steps.items():
        bound = step.bound_examples_per_s(peak)
        speed = ours_by_phase.get(phase)
        rows.append(
            [
                phase,
                f"{step.flops_per_example:,.0f}",
                f"{step.bytes_per_example:,.0f}",
                f"{bound:,.0f}",
                step.bound_kind(peak),
                f"{speed.examples_per_cpu_s:,.0f}" if speed else "-",
                f"{speed.examples_per_cpu_s / bound:.2f}" if speed else "-",
            ]
        )
    lines += [markdown_table(header, rows), ""]
    fractions = {
        phase: ours_by_phase[phase].examples_per_cpu_s / step.bound_examples_per_s(peak)
        for phase, step in steps.items()
        if phase in ours_by_phase
    }
    below = [f"{p} ({f:.2f})" for p, f in fractions.items() if f < 0.5]
    if not below:
        verdict = "Met in every phase."
    elif len(below) == len(fractions):
        verdict = f"Not met in any phase: {', '.join(below)}."
    else:
        verdict = f"Not met in {', '.join(below)}; met in the other phases."
    lines += [
        "Target: at least half of the bound in every phase. " + verdict,
        "",
        SPEED_NOTES,
    ]
    return "\n".join(lines)


SPEED_NOTES = """What makes the single-process path fast (each change keeps the math and \
the FLOPs counted above):

- DAGFM keeps its layer states as (F, D, B), the batch innermost, so each \
contraction is a batched matmul over B and each product runs on contiguous \
memory; the (B, F, D) einsums it replaced ran strided batched matmuls with \
an inner dimension of 7 or 16.
- An unsharded embedding collection looks up single-id features with \
`index_select`, whose backward pass is an `index_add`; `embedding_bag`'s \
backward sorts the ids of every table on every step.
- `cache_in_memory` decodes a split once; each epoch copies the rows into \
epoch order with one gather per column, and each batch is a slice.
- Adam runs its fused kernel; the loop sums the loss on the device instead \
of converting it to a Python float every step."""


def _target_verdict(comparison: recbole_compare.Comparison) -> str:
    """State, from the figures, where kd-dagfm reaches 2x RecBole's examples/s."""
    theirs = {s.phase: s for s in comparison.recbole}
    ratios = {
        s.phase: (
            s.examples_per_s / theirs[s.phase].examples_per_s,
            s.examples_per_cpu_s / theirs[s.phase].examples_per_cpu_s,
        )
        for s in comparison.ours
        if s.phase in theirs
    }
    below = [
        f"{phase} ({wall:.2f}x per wall second, {cpu:.2f}x per CPU second)"
        for phase, (wall, cpu) in ratios.items()
        if min(wall, cpu) < 2.0
    ]
    target = "Target: at least 2x RecBole's examples/s in every phase."
    if not below:
        return f"{target} Met."
    if len(below) == len(ratios):
        return f"{target} Not met in any phase: {', '.join(below)}."
    return f"{target} Not met in {', '.join(below)}; met in the other phases."


def curves_section(names: Sequence[str], command: str) -> str:
    lines = [
        "## Training curves",
        "",
        provenance(command),
        "",
        "Valid AUC after each epoch of each phase, seed 0.",
        "",
    ]
    lines += [f"![{n} training curves](benchmarks/curves_{n}.png)" for n in names]
    return "\n".join(lines)


def run_section(threads: int) -> str:
    return "\n".join(
        [
            "## How the benchmark figures were made",
            "",
            "`python -m jobs.benchmark` (the full run, 10 to 20 minutes on the "
            "2-core machine below) "
            "writes the sections below and the plots in `docs/benchmarks/`; "
            "`--skip_accuracy` repeats only cost, speed and roofline. Each section "
            "opens with the command that wrote it, when, and the machine's load "
            "average then. The raw figures are in `<output_dir>/benchmark.json`. "
            "`python -m jobs.benchmark --quick` runs the same code on tiny models "
            "in under a minute and writes to its output directory (the test suite "
            "runs it).",
            "",
            f"Machine: {machine_description()}; {threads} torch thread(s). The "
            "machine was shared with other work while these figures were taken.",
        ]
    )


# ---------------------------------------------------------------- main


def curves_for(runs: Sequence[AccuracyRun], dataset: str) -> list[Curve]:
    curves = []
    for run in runs:
        if run.dataset != dataset or run.seed != run_seed0(runs):
            continue
        source = f"from {TEACHER_LABELS[run.teacher]}" if run.teacher else "no teacher"
        for result in run.results:
            history = result.history
            label = result.model_name
            if result.phase is not Phase.TEACHER_TRAINING:
                label = f"{result.model_name} ({source})"
            curves.append(
                Curve(
                    label=label,
                    phase=result.phase.value,
                    epochs=tuple(int(h["epoch"]) for h in history),
                    valid_auc=tuple(h["valid_auc"] for h in history),
                )
            )
    # From-scratch training is finetuning-style; plot it beside finetuning.
    return [
        dataclasses.replace(
            c, phase=c.phase if "no teacher" not in c.label else "finetuning"
        )
        for c in curves
    ]


def run_seed0(runs: Sequence[AccuracyRun]) -> int:
    return min(r.seed for r in runs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.benchmark", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny models and data: under a minute instead of 10-20",
    )
    parser.add_argument(
        "--output_dir",
        default=None,
        help="work and results directory (default runs/benchmark, or "
        "runs/benchmark-quick with --quick)",
    )
    parser.add_argument(
        "--doc",
        default=None,
        help="Markdown file whose benchmark sections are written (default "
        "docs/BENCHMARKS.md, or <output_dir>/BENCHMARKS.md with --quick)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--seeds",
        type=int,
        default=0,
        help="seeds per accuracy run (default 3, quick 2)",
    )
    parser.add_argument(
        "--recbole_venv",
        default=str(recbole_compare.DEFAULT_VENV),
        help="RecBole 1.2.1's virtual environment",
    )
    parser.add_argument(
        "--skip_accuracy",
        action="store_true",
        help="measure cost, roofline and speed only",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    settings = settings_for(args.quick, args.threads, args.seeds)
    torch.set_num_threads(settings.threads)
    default_output = "runs/benchmark-quick" if args.quick else "runs/benchmark"
    work = Path(args.output_dir or default_output).resolve()
    # A run trains from scratch: the subdirectories a previous run left would
    # be resumed (or rejected when the settings differ).
    for stale in ("accuracy", "data", "speed", "roofline"):
        shutil.rmtree(work / stale, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    doc = (
        Path(args.doc)
        if args.doc
        else (work / "BENCHMARKS.md" if args.quick else REPO / "docs" / "BENCHMARKS.md")
    )
    images = doc.parent / "benchmarks"
    images.mkdir(parents=True, exist_ok=True)
    command = " ".join(
        ["python -m jobs.benchmark", *(argv if argv is not None else sys.argv[1:])]
    )
    logger.info("benchmark: %s, load average %s", settings, load_average())

    sections: dict[str, str] = {"run": ""}
    record: dict[str, Any] = {"settings": dataclasses.asdict(settings)}

    if not args.skip_accuracy:
        runs = run_accuracy(settings, work)
        rows = accuracy_rows(runs)
        record["accuracy"] = rows
        record["histories"] = [
            {
                "dataset": r.dataset,
                "teacher": r.teacher,
                "seed": r.seed,
                "phases": [res.to_dict() for res in r.results],
            }
            for r in runs
        ]
        plot_auc_vs_flops(
            [
                AccuracyPoint(
                    r["dataset"],
                    r["model"],
                    r["flops_per_example"],
                    r["auc_mean"],
                    r["auc_std"],
                )
                for r in rows
            ],
            str(images / "auc_vs_flops.png"),
        )
        names = list(settings.epochs)
        for name in names:
            plot_training_curves(
                curves_for(runs, name),
                str(images / f"curves_{name}.png"),
                f"{name}: valid AUC per epoch",
            )
        sections["accuracy"] = accuracy_section(rows, settings, command)
        sections["curves"] = curves_section(names, command)

    tables = []
    record["cost"] = {}
    for name in ("ml-100k", "criteo-sample"):
        schema, costs = run_cost(name, settings, work)
        record["cost"][name] = [dataclasses.asdict(c) for c in costs]
        tables.append(cost_table(name, schema, costs))
    sections["cost"] = cost_section(tables, settings, command)

    comparison = recbole_compare.compare(
        work / "speed",
        epochs=settings.speed_epochs,
        repeats=settings.speed_repeats,
        threads=settings.threads,
        venv=Path(args.recbole_venv),
        install=settings.install_recbole,
    )
    peak, steps = run_roofline(settings, work)
    record["speed"] = comparison.to_dict()
    record["roofline"] = {
        "peak": dataclasses.asdict(peak),
        "steps": {k: dataclasses.asdict(v) for k, v in steps.items()},
    }
    sections["speed"] = speed_section(comparison, peak, steps, command)
    print(recbole_compare.format_comparison(comparison))

    sections["run"] = run_section(settings.threads)
    write_sections(str(doc), sections, title="Benchmarks")
    (work / "benchmark.json").write_text(json.dumps(record, indent=2, default=str))
    logger.info("wrote %s and %s", doc, work / "benchmark.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
