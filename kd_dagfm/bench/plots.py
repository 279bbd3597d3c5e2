"""PNG plots of the benchmark job (matplotlib, a development dependency)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class AccuracyPoint:
    """One model of one dataset: counted FLOPs against test AUC.

    Attributes:
        dataset: dataset name.
        model: the row's label, for example ``CrossNet`` or ``DAGFM (distilled)``.
        flops_per_example: forward FLOPs of the model's tower per example.
        auc_mean, auc_std: test AUC over seeds.
    """

    dataset: str
    model: str
    flops_per_example: float
    auc_mean: float
    auc_std: float


@dataclasses.dataclass(frozen=True)
class Curve:
    """Valid AUC per epoch of one phase of one run.

    Attributes:
        label: legend entry.
        phase: the phase, one subplot each.
        epochs: epoch numbers, from 0.
        valid_auc: valid AUC after each epoch.
    """

    label: str
    phase: str
    epochs: tuple[int, ...]
    valid_auc: tuple[float, ...]


def _pyplot():  # type: ignore[no-untyped-def]
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "the benchmark plots need matplotlib; install the development "
            "requirements: .venv/bin/pip install -r requirements-dev.txt"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_auc_vs_flops(points: Sequence[AccuracyPoint], path: str) -> None:
    """Scatter test AUC (mean and spread over seeds) against FLOPs per example,
    one subplot per dataset, FLOPs on a log axis."""
    plt = _pyplot()
    datasets = sorted({p.dataset for p in points})
    figure, axes = plt.subplots(
        1, len(datasets), figsize=(5.5 * len(datasets), 4.2), squeeze=False
    )
    for axis, dataset in zip(axes[0], datasets):
        for point in (p for p in points if p.dataset == dataset):
            axis.errorbar(
                point.flops_per_example,
                point.auc_mean,
                yerr=point.auc_std,
                fmt="o",
                capsize=3,
                label=point.model,
            )
        axis.set_xscale("log")
        axis.set_xlabel("forward FLOPs per example (counted)")
        axis.set_ylabel("test AUC")
        axis.set_title(dataset)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_training_curves(curves: Sequence[Curve], path: str, title: str) -> None:
    """Valid AUC against epoch, one subplot per phase."""
    plt = _pyplot()
    phases = list(dict.fromkeys(c.phase for c in curves))
    figure, axes = plt.subplots(
        1, len(phases), figsize=(4.6 * len(phases), 3.8), squeeze=False
    )
    for axis, phase in zip(axes[0], phases):
        for curve in (c for c in curves if c.phase == phase):
            axis.plot(curve.epochs, curve.valid_auc, marker=".", label=curve.label)
        axis.set_title(phase)
        axis.set_xlabel("epoch")
        axis.set_ylabel("valid AUC")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
