"""Hyper-parameter search with Ray Tune: each trial runs one kd-dagfm phase.

The search space comes from RecBole's ``hyper.test`` format, one parameter
per line (RecBole 1.2.1, ``HyperTuning._build_space_from_file``)::

    learning_rate loguniform -8,0
    embedding_size choice [8,16,32]
    alpha uniform 0.05,0.5
    depth quniform 1,4,1

The types:

- ``choice [v1, v2, ...]``: a Python list literal of values.
- ``uniform a,b``: a float drawn from [a, b].
- ``quniform a,b,q``: a float drawn from [a, b], rounded to a multiple of q.
- ``loguniform a,b``: exp(x) for x drawn from [a, b]. The bounds are natural
  logarithms because RecBole passes them to hyperopt's ``hp.loguniform``, so
  ``-8,0`` covers [3.4e-4, 1].

As in RecBole, the words after the type are joined without spaces. Blank
lines and lines starting with ``#`` are skipped. Any other line that does not
parse is an error naming its line number and text, where RecBole silently
skips lines of fewer than three words.

The same space as YAML takes either RecBole's ``params_dict`` layout
(``{loguniform: {learning_rate: [-8, 0]}, choice: {embedding_size: [8, 16]}}``)
or one entry per parameter (``{learning_rate: {loguniform: [-8, 0]}}``).

Names are kd-dagfm config keys or their RecBole aliases (``alpha``,
``beta``, ``type``, ...). Trials run :func:`kd_dagfm.pipeline.run_phase` for
``config.train.phase`` in one process each and report validation AUC and log
loss after every epoch; ASHA stops trials that fall behind. With
``search="grid"`` every ``choice`` is crossed with every other (RecBole's
exhaustive search) and ``num_samples`` repeats the grid, drawing the
continuous parameters anew; ``search="random"`` samples every parameter.
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from kd_dagfm.config import ALIASES, KEY_SECTIONS, RunConfig, build_config
from kd_dagfm.errors import ConfigError
from kd_dagfm.phases import Phase
from kd_dagfm.storage import is_remote, join

logger = logging.getLogger(__name__)

SPACE_TYPES = ("choice", "uniform", "quniform", "loguniform")
SEARCHES = ("grid", "random")
# Metric name -> Tune mode.
METRICS = {"valid_auc": "max", "valid_log_loss": "min"}
# Config keys a trial sets itself.
RESERVED_KEYS = ("output_dir", "phase")


@dataclasses.dataclass(frozen=True)
class SearchParameter:
    """One dimension of the search space.

    Attributes:
        name: config key or RecBole alias.
        kind: ``choice``, ``uniform``, ``quniform`` or ``loguniform``.
        values: the choices (``choice``) or the bounds: (low, high) for
            uniform and loguniform (natural-log bounds), (low, high, q) for
            quniform.
        source: where it was defined, for messages (``hyper.test line 3``).
    """

    name: str
    kind: str
    values: tuple[Any, ...]
    source: str

    def domain(self, search: str) -> Any:
        """Return the Ray Tune search domain of this parameter."""
        from ray import tune

        if self.kind == "choice":
            values = list(self.values)
            return tune.grid_search(values) if search == "grid" else tune.choice(values)
        if self.kind == "uniform":
            return tune.uniform(self.values[0], self.values[1])
        if self.kind == "quniform":
            return tune.quniform(*self.values)
        return tune.loguniform(math.exp(self.values[0]), math.exp(self.values[1]))

    def extremes(self) -> list[Any]:
        """Values to validate against the config: every choice, or the bounds."""
        if self.kind == "choice":
            return list(self.values)
        low, high = self.values[0], self.values[1]
        if self.kind == "loguniform":
            return [math.exp(low), math.exp(high)]
        return [low, high]


def parse_hyper_test(text: str, source: str = "hyper.test") -> list[SearchParameter]:
    """Parse RecBole's ``hyper.test`` format.

    Raises:
        ConfigError: for a line that does not parse, an unknown config key,
            a value the config rejects or a parameter given twice; the
            message names the line number and its text.
    """
    parameters: list[SearchParameter] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source} line {number} ({line!r})"
        words = line.split()
        if len(words) < 3:
            raise ConfigError(
                f"{where}: expected 'name type values', for example "
                "'learning_rate loguniform -8,0' or 'embedding_size choice [8,16]'"
            )
        name, kind, value = words[0], words[1], "".join(words[2:])
        parameters.append(
            _parameter(name, kind, _parse_value(kind, value, where), where)
        )
    return _checked(parameters, source)


def parse_space_mapping(data: Any, source: str = "space.yaml") -> list[SearchParameter]:
    """Parse a search space given as YAML data (either layout, see the module
    docstring).

    Raises:
        ConfigError: naming the key whose entry is invalid.
    """
    if not isinstance(data, Mapping) or not data:
        raise ConfigError(
            f"{source}: expected a non-empty mapping, for example "
            "{learning_rate: {loguniform: [-8, 0]}}"
        )
    parameters: list[SearchParameter] = []
    if all(key in SPACE_TYPES for key in data):  # RecBole's params_dict layout
        for kind, entries in data.items():
            if not isinstance(entries, Mapping):
                raise ConfigError(
                    f"{source}: {kind!r} must map parameter names to values, got "
                    f"{entries!r}"
                )
            for name, value in entries.items():
                where = f"{source} key {kind}.{name}"
                parameters.append(
                    _parameter(
                        str(name), kind, _mapping_value(kind, value, where), where
                    )
                )
    else:
        for name, entry in data.items():
            where = f"{source} key {name}"
            if not isinstance(entry, Mapping) or len(entry) != 1:
                raise ConfigError(
                    f"{where}: expected one of {', '.join(SPACE_TYPES)} with its "
                    f"values, for example {{choice: [8, 16]}}; got {entry!r}"
                )
            ((kind, value),) = entry.items()
            parameters.append(
                _parameter(
                    str(name), str(kind), _mapping_value(str(kind), value, where), where
                )
            )
    return _checked(parameters, source)


def load_search_space(path: str) -> list[SearchParameter]:
    """Read a search space: YAML for ``.yaml``/``.yml``, else ``hyper.test``."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"search space file {path!r} not found") from None
    if path.endswith((".yaml", ".yml")):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        return parse_space_mapping(data, path)
    return parse_hyper_test(text, path)


def _parse_value(kind: str, value: str, where: str) -> tuple[Any, ...]:
    if kind == "choice":
        try:
            choices = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ConfigError(
                f"{where}: choice values must be a Python list literal such as "
                "[8,16] or ['inner','outer']"
            ) from None
        return _choices(choices, where)
    if kind in ("uniform", "quniform", "loguniform"):
        parts = value.split(",")
        try:
            numbers = tuple(float(p) for p in parts)
        except ValueError:
            numbers = ()
        return _bounds(kind, numbers, where)
    raise ConfigError(
        f"{where}: unknown type {kind!r}; expected one of {', '.join(SPACE_TYPES)}"
    )


def _mapping_value(kind: str, value: Any, where: str) -> tuple[Any, ...]:
    if kind == "choice":
        return _choices(value, where)
    if kind in ("uniform", "quniform", "loguniform"):
        numbers: tuple[float, ...] = ()
        if isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            numbers = tuple(float(v) for v in value)
        return _bounds(kind, numbers, where)
    raise ConfigError(
        f"{where}: unknown type {kind!r}; expected one of {', '.join(SPACE_TYPES)}"
    )


def _choices(value: Any, where: str) -> tuple[Any, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{where}: choice needs a non-empty list, got {value!r}")
    return tuple(value)


def _bounds(kind: str, numbers: tuple[float, ...], where: str) -> tuple[float, ...]:
    count = 3 if kind == "quniform" else 2
    shape = "low,high,q" if kind == "quniform" else "low,high"
    if len(numbers) != count or not all(math.isfinite(n) for n in numbers):
        raise ConfigError(f"{where}: {kind} needs {count} numbers {shape}")
    if not numbers[0] < numbers[1]:
        raise ConfigError(
            f"{where}: {kind} needs low < high, got {numbers[0]:g} and {numbers[1]:g}"
        )
    if kind == "quniform" and not numbers[2] > 0:
        raise ConfigError(f"{where}: quniform needs q > 0, got {numbers[2]:g}")
    return numbers


def _parameter(
    name: str, kind: str, values: tuple[Any, ...], where: str
) -> SearchParameter:
    canonical = ALIASES.get(name, name)
    if canonical not in KEY_SECTIONS:
        raise ConfigError(
            f"{where}: {name!r} is not a config key; see kd-dagfm train --help for "
            "the keys (RecBole aliases such as alpha, beta and type work too)"
        )
    if canonical in RESERVED_KEYS:
        raise ConfigError(
            f"{where}: {name!r} cannot be searched; each trial sets it (tune the "
            "phase given by --phase, in its own output directory)"
        )
    parameter = SearchParameter(name, kind, values, where)
    for value in parameter.extremes():
        try:
            build_config({name: value})
        except ConfigError as e:
            raise ConfigError(f"{where}: value {value!r} is invalid: {e}") from None
    return parameter


def _checked(parameters: list[SearchParameter], source: str) -> list[SearchParameter]:
    seen: dict[str, SearchParameter] = {}
    for parameter in parameters:
        canonical = ALIASES.get(parameter.name, parameter.name)
        if canonical in seen:
            raise ConfigError(
                f"{parameter.source}: {canonical!r} is already searched at "
                f"{seen[canonical].source}; keep one of them"
            )
        seen[canonical] = parameter
    if not parameters:
        raise ConfigError(f"{source} defines no parameters")
    return parameters


@dataclasses.dataclass(frozen=True)
class TuneOptions:
    """Search settings.

    Attributes:
        name: experiment name; results go to ``<output_dir>/tune/<name>``.
        num_samples: repeats of the grid (``grid``) or trials (``random``).
        search: ``grid`` or ``random`` (see the module docstring).
        metric: ``valid_auc`` (maximised) or ``valid_log_loss`` (minimised).
        cpus_per_trial: logical CPUs Ray reserves for each trial.
        max_concurrent_trials: trials running at once (0: as many as fit).
        grace_period_epochs: epochs every trial runs before ASHA may stop it.
        reduction_factor: ASHA keeps 1 / reduction_factor of the trials at
            each rung.
    """

    name: str = "tune"
    num_samples: int = 1
    search: str = "grid"
    metric: str = "valid_auc"
    cpus_per_trial: float = 1.0
    max_concurrent_trials: int = 0
    grace_period_epochs: int = 1
    reduction_factor: float = 2.0

    def __post_init__(self) -> None:
        if self.search not in SEARCHES:
            raise ConfigError(
                f"invalid search {self.search!r}: expected one of {', '.join(SEARCHES)}"
            )
        if self.metric not in METRICS:
            raise ConfigError(
                f"invalid metric {self.metric!r}: expected one of {', '.join(METRICS)}"
            )
        for name in ("num_samples", "grace_period_epochs"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(
                    f"invalid {name} {getattr(self, name)!r}: expected >= 1"
                )
        if self.max_concurrent_trials < 0:
            raise ConfigError(
                f"invalid max_concurrent_trials {self.max_concurrent_trials}: "
                "expected >= 0 (0: no limit)"
            )
        if not self.cpus_per_trial > 0:
            raise ConfigError(
                f"invalid cpus_per_trial {self.cpus_per_trial}: expected > 0"
            )
        if not self.reduction_factor > 1:
            raise ConfigError(
                f"invalid reduction_factor {self.reduction_factor}: expected > 1"
            )
        if not self.name or "/" in self.name:
            raise ConfigError(
                f"invalid name {self.name!r}: expected a non-empty name without '/'"
            )


@dataclasses.dataclass(frozen=True)
class TuneSummary:
    """The outcome of a search.

    Attributes:
        rows: one dict per trial (trial id, parameters, status, epochs,
            metrics), sorted best first.
        best_params: the parameters of the best trial.
        best_config: the base config with ``best_params`` applied.
        directory: where results.csv, results.txt and best_config.yaml are.
        table: the results as a text table.
    """

    rows: list[dict[str, Any]]
    best_params: dict[str, Any]
    best_config: RunConfig
    directory: str
    table: str


def run_tune(
    config: RunConfig, space: Sequence[SearchParameter], options: TuneOptions
) -> TuneSummary:
    """Search ``space`` around ``config`` with Ray Tune and ASHA.

    Ray must be initialised (``ray.init``) by the caller. Every trial runs
    ``config.train.phase`` in one process with the trial's values and its
    own ``output_dir`` under ``<output_dir>/tune/<name>/trials``.

    Raises:
        ConfigError: a config that cannot run as trials (several workers
            per trial), or when no trial reported a result.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from kd_dagfm.pipeline import prepare_dataset

    if config.distributed.num_workers != 1:
        # TODO: run multi-worker trials as Ray Train jobs (cluster.ray_train)
        # inside each Tune trial, reporting through the same epoch callback.
        raise ConfigError(
            f"num_workers={config.distributed.num_workers}: tune runs each trial in "
            "one process; set num_workers=1 (use cpus_per_trial for more threads)"
        )
    base = _absolute_paths(config)
    # Prepare (or generate) the dataset once, not once per trial.
    dataset, _ = prepare_dataset(base)
    base = base.replace(dataset=dataset)
    directory = join(base.train.output_dir, "tune", options.name)
    phase = base.train.phase
    mode = METRICS[options.metric]
    logger.info(
        "tuning %s over %s (%s search, %d sample(s), ASHA on %s), results in %s",
        phase.value,
        ", ".join(f"{p.name} {p.kind}" for p in space),
        options.search,
        options.num_samples,
        options.metric,
        directory,
    )

    trainable = tune.with_parameters(
        _run_trial,
        base=base.to_dict(),
        phase=phase.value,
        trials_directory=join(directory, "trials"),
    )
    scheduler = ASHAScheduler(
        time_attr="training_iteration",
        # One report per epoch plus one when the phase ends: trials that
        # survive every rung finish their phase and report test metrics.
        max_t=base.train.epochs + 1,
        grace_period=options.grace_period_epochs,
        reduction_factor=options.reduction_factor,
    )
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": options.cpus_per_trial}),
        param_space={p.name: p.domain(options.search) for p in space},
        tune_config=tune.TuneConfig(
            metric=options.metric,
            mode=mode,
            scheduler=scheduler,
            num_samples=options.num_samples,
            max_concurrent_trials=options.max_concurrent_trials or None,
        ),
        run_config=tune.RunConfig(
            name=options.name,
            storage_path=join(base.train.output_dir, "tune"),
            verbose=0,
        ),
    )
    grid = tuner.fit()
    results = [grid[index] for index in range(len(grid))]

    names = [p.name for p in space]
    rows = [_result_row(result, names, options.metric) for result in results]
    reported = [r for r in rows if r[options.metric] is not None]
    if not reported:
        errors = [str(r.error) for r in results if r.error is not None][:3]
        raise ConfigError(
            f"no trial of {directory} reported a result; first errors: {errors}"
        )
    rows = _sorted(reported, options.metric, mode) + [
        r for r in rows if r[options.metric] is None
    ]
    best_params = {name: rows[0][name] for name in names}
    best_config = config.replace(**best_params)
    table = format_table(rows, names, options.metric)
    _write_outputs(directory, rows, names, table, best_config)
    logger.info(
        "best trial %s: %s = %.4f with %s",
        rows[0]["trial"],
        options.metric,
        rows[0][options.metric],
        best_params,
    )
    return TuneSummary(rows, best_params, best_config, directory, table)


def _run_trial(
    params: dict[str, Any],
    base: dict[str, Any],
    phase: str,
    trials_directory: str,
) -> None:
    """One trial: run the phase and report after each epoch (Ray Tune function API)."""
    from ray import tune

    from kd_dagfm.pipeline import run_phase
    from kd_dagfm.train.metrics import EvalResult

    trial_id = tune.get_context().get_trial_id()
    config = build_config(base).replace(
        **params, output_dir=join(trials_directory, trial_id)
    )

    def report(epoch: int, valid: EvalResult) -> None:
        tune.report(
            {
                "epoch": epoch + 1,
                "valid_auc": valid.auc,
                "valid_log_loss": valid.log_loss,
                "phase_done": False,
            }
        )

    result = run_phase(config, Phase.parse(phase), on_epoch_end=report)
    tune.report(
        {
            "epoch": result.epochs,
            "valid_auc": result.valid.auc,
            "valid_log_loss": result.valid.log_loss,
            "test_auc": result.test.auc,
            "test_log_loss": result.test.log_loss,
            "phase_done": True,
        }
    )


def _result_row(result: Any, names: list[str], metric: str) -> dict[str, Any]:
    """Build one table row from a Ray Tune Result."""
    params = {name: result.config.get(name) for name in names}
    history = result.metrics_dataframe
    last = result.metrics or {}
    row: dict[str, Any] = {
        "trial": last.get("trial_id") or os.path.basename(str(result.path)),
        **params,
        "status": "error" if result.error is not None else "",
        "epochs": None,
        "valid_auc": None,
        "valid_log_loss": None,
        "test_auc": last.get("test_auc"),
        "test_log_loss": last.get("test_log_loss"),
    }
    if history is not None and len(history):
        best = (
            history[metric].idxmax()
            if METRICS[metric] == "max"
            else history[metric].idxmin()
        )
        row["valid_auc"] = float(history["valid_auc"][best])
        row["valid_log_loss"] = float(history["valid_log_loss"][best])
        row["epochs"] = int(history["epoch"].max())
    if not row["status"]:
        row["status"] = "finished" if last.get("phase_done") else "stopped by ASHA"
    return row


def _sorted(rows: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: r[metric], reverse=mode == "max")


def format_table(rows: list[dict[str, Any]], names: list[str], metric: str) -> str:
    """Format the rows as a plain-text table, best trial first."""
    columns = ["trial", *names, "status", "epochs", "valid_auc", "valid_log_loss"]
    columns += ["test_auc", "test_log_loss"]

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1e-3 else f"{value:.4f}"
        return str(value)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(x) for x in column) for column in zip(columns, *cells)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _write_outputs(
    directory: str,
    rows: list[dict[str, Any]],
    names: list[str],
    table: str,
    best_config: RunConfig,
) -> None:
    from kd_dagfm.storage import filesystem

    fs, root = filesystem(directory)
    fs.makedirs(root, exist_ok=True)
    fields = list(rows[0])
    with fs.open(join(root, "results.csv"), "w") as f:
        writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _plain(v) for k, v in row.items()})
    with fs.open(join(root, "results.txt"), "w") as f:
        f.write(table + "\n")
    with fs.open(join(root, "best_config.yaml"), "w") as f:
        f.write(
            f"# Best trial {rows[0]['trial']} of {directory}: "
            + ", ".join(f"{n}={_plain(rows[0][n])}" for n in names)
            + "\n"
        )
        yaml.safe_dump(best_config.to_dict(), f, sort_keys=True)
    logger.info("tune results written to %s", directory)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def _absolute_paths(config: RunConfig) -> RunConfig:
    """Make local paths absolute: Ray Tune runs trials in their own directories."""
    updates: dict[str, Any] = {}
    train, data = config.train, config.data
    candidates = {
        "output_dir": train.output_dir,
        "warm_up": train.warm_up,
        "teacher_logits": train.teacher_logits,
    }
    if data.dataset != "synthetic":
        candidates["dataset"] = data.dataset
    for key, value in candidates.items():
        if value and not is_remote(value):
            updates[key] = os.path.abspath(value)
    return config.replace(**updates) if updates else config


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``kd-dagfm tune`` options (the config flags are added separately)."""
    group = parser.add_argument_group("tune")
    group.add_argument(
        "--space",
        required=True,
        help="search space: a RecBole hyper.test file, or YAML (.yaml/.yml)",
    )
    group.add_argument("--name", default="tune", help="experiment name")
    group.add_argument(
        "--num_samples", type=int, default=1, help="grid repeats or random trials"
    )
    group.add_argument("--search", choices=SEARCHES, default="grid")
    group.add_argument("--metric", choices=list(METRICS), default="valid_auc")
    group.add_argument(
        "--cpus_per_trial", type=float, default=1.0, help="logical CPUs per trial"
    )
    group.add_argument(
        "--max_concurrent_trials",
        type=int,
        default=0,
        help="trials running at once (0: as many as the CPUs allow)",
    )
    group.add_argument(
        "--grace_period",
        type=int,
        default=1,
        help="epochs each trial runs before ASHA may stop it",
    )
    group.add_argument(
        "--reduction_factor",
        type=float,
        default=2.0,
        help="ASHA keeps 1/reduction_factor of the trials at each rung",
    )


def options_from_args(args: argparse.Namespace) -> TuneOptions:
    return TuneOptions(
        name=args.name,
        num_samples=args.num_samples,
        search=args.search,
        metric=args.metric,
        cpus_per_trial=args.cpus_per_trial,
        max_concurrent_trials=args.max_concurrent_trials,
        grace_period_epochs=args.grace_period,
        reduction_factor=args.reduction_factor,
    )


def tune_command(config: RunConfig, args: argparse.Namespace) -> TuneSummary:
    """Run ``kd-dagfm tune``: connect to Ray (or start a loopback-only head),
    search, print the table."""
    import ray

    space = load_search_space(args.space)
    options = options_from_args(args)
    if ray.is_initialized():
        summary = run_tune(config, space, options)
    else:
        from cluster.driver import ray_session

        with ray_session(config):
            summary = run_tune(config, space, options)
    print(summary.table)
    print(
        "best config: "
        + json.dumps({k: _plain(v) for k, v in summary.best_params.items()})
        + f" ({join(summary.directory, 'best_config.yaml')})"
    )
    return summary
