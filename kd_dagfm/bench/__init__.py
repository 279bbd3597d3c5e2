"""Benchmark helpers: model cost, roofline, reports and plots.

``jobs/benchmark.py`` assembles them into the benchmark job.
"""

from kd_dagfm.bench.cost import Latency, ModelCost, measure_latency, model_cost
from kd_dagfm.bench.report import (
    load_average,
    machine_description,
    markdown_table,
    mean_std,
    median,
    replace_section,
    write_sections,
)
from kd_dagfm.bench.roofline import (
    ByteCounterMode,
    MachinePeak,
    StepCost,
    count_step,
    measure_peak,
)

__all__ = [
    "ByteCounterMode",
    "Latency",
    "MachinePeak",
    "ModelCost",
    "StepCost",
    "count_step",
    "load_average",
    "machine_description",
    "markdown_table",
    "mean_std",
    "measure_latency",
    "measure_peak",
    "median",
    "model_cost",
    "replace_section",
    "write_sections",
]
