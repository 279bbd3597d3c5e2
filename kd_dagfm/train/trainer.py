"""The training loop of one phase: train, evaluate, checkpoint, stop early.

A phase run is restartable: started again with the same ``output_dir`` it
continues from its newest complete checkpoint (model, optimizer, reader
cursor, early-stopping state), and a phase whose final checkpoint exists is
not trained again.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from kd_dagfm.config import RunConfig
from kd_dagfm.data.batch import Batch
from kd_dagfm.data.memory import InMemorySplit, InMemorySplitReader
from kd_dagfm.data.reader import ParquetSplit, ReaderState, SplitReader
from kd_dagfm.errors import CheckpointError, ConfigError, TrainingError
from kd_dagfm.flops import count_parameters, count_state_elements, flops_per_example
from kd_dagfm.model import KDDAGFM, STUDENT_NAMES, TEACHER_NAMES, evaluated_logits
from kd_dagfm.objective import KDObjective
from kd_dagfm.phases import Phase
from kd_dagfm.schema import FeatureSchema
from kd_dagfm.storage import join
from kd_dagfm.teacher_cache import TeacherLogitCache
from kd_dagfm.train.checkpoint import (
    CheckpointInfo,
    CheckpointManager,
    export_model_file,
    load_model_weights,
    load_state,
    resolve_warm_up,
)
from kd_dagfm.train.engine import Engine
from kd_dagfm.train.metrics import BinaryCTRMetrics, EvalResult

logger = logging.getLogger(__name__)

EngineFactory = Callable[[KDDAGFM, Phase], Engine]
# Called after each epoch's validation with (epoch, valid metrics).
EpochCallback = Callable[[int, EvalResult], None]
# The streaming Parquet reader, or the in-memory one (data.cache_in_memory).
TrainReader = SplitReader | InMemorySplitReader


@dataclasses.dataclass(frozen=True)
class PhaseResult:
    """Outcome of one phase, shown as one row of the results table."""

    phase: Phase
    model_name: str
    tower_parameters: int
    embedding_parameters: int
    flops_per_example: float
    valid: EvalResult
    test: EvalResult
    wall_time_s: float
    train_examples_per_s: float
    epochs: int
    best_epoch: int
    checkpoint: str
    # One entry per epoch trained: epoch, train_loss (mean over the rank's
    # steps), valid_auc, valid_log_loss, train_time_s, train_cpu_s,
    # examples_per_s (rank 0's wall clock, all ranks' examples).
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["phase"] = self.phase.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PhaseResult:
        values = dict(data)
        values["phase"] = Phase.parse(values["phase"])
        values["valid"] = EvalResult(**values["valid"])
        values["test"] = EvalResult(**values["test"])
        return cls(**values)


def phase_directory(config: RunConfig, phase: Phase) -> str:
    return join(config.train.output_dir, phase.value)


def model_name(config: RunConfig, phase: Phase) -> str:
    if phase is Phase.TEACHER_TRAINING:
        return TEACHER_NAMES[config.model.teacher]
    return f"{STUDENT_NAMES[config.model.student]}-{config.model.student_type}"


def check_compatible(
    meta: dict[str, Any], config: RunConfig, schema: FeatureSchema, source: str
) -> None:
    """Raise CheckpointError when a checkpoint's model or features differ from this run."""
    saved_model = meta.get("config", {}).get("model", {})
    current = config.to_dict()["model"]
    differences = [
        f"{key}={saved_model.get(key)!r} (this run: {value!r})"
        for key, value in current.items()
        if saved_model.get(key) != value
    ]
    if differences:
        raise CheckpointError(
            f"{source} was trained with a different model: "
            + ", ".join(differences)
            + ". Use the same model settings as that run, or another checkpoint"
        )
    saved_schema = FeatureSchema.from_dict(meta.get("schema", {}), source=source)
    difference = schema.describe_difference(saved_schema)
    if difference:
        raise CheckpointError(
            f"{source} was trained on other features: {difference}. Train on the "
            "dataset it was made with, or start that phase again on this dataset"
        )


# Settings that change what a phase computes. A finished or interrupted phase
# is reused or resumed only when they are unchanged; the others (paths,
# logging, worker layout, sharding) may differ between runs.
RESULT_KEYS = {
    "train": (
        "learning_rate",
        "embedding_learning_rate",
        "weight_decay",
        "embedding_optimizer",
        "train_batch_size",
        "epochs",
        "early_stopping_patience",
        "ctr_loss_weight",
        "kd_loss_weight",
        "seed",
        "max_steps_per_epoch",
        "from_scratch",
    ),
    "data": (
        "synthetic_rows",
        "synthetic_fields",
        "synthetic_vocab_size",
        "shuffle",
        "remainder",
        "bad_rows",
    ),
}


def check_same_run(
    meta: dict[str, Any],
    config: RunConfig,
    source: str,
    allowed: tuple[str, ...] = (),
) -> None:
    """Raise CheckpointError when ``config`` would train the phase differently
    from the run that wrote ``meta``; keys in ``allowed`` may differ."""
    saved = meta.get("config", {})
    current = config.to_dict()
    differences = [
        f"{key}={saved.get(section, {}).get(key)!r} (this run: {current[section][key]!r})"
        for section, keys in RESULT_KEYS.items()
        for key in keys
        if key in current[section]
        and key not in allowed
        and key in saved.get(section, {})
        and saved[section][key] != current[section][key]
    ]
    if differences:
        raise CheckpointError(
            f"{source} belongs to a run with other settings: "
            + ", ".join(differences)
            + ". Rerun with the same settings to reuse or resume it, or choose a "
            "new output_dir"
        )


class PhaseTrainer:
    """Runs one phase on one rank.

    Args:
        config: the run; ``config.train.phase`` is ignored, ``phase`` counts.
        phase: the phase to run.
        schema: the dataset's features.
        dataset: dataset directory or URL.
        make_engine: places a model and builds its optimizers.
        on_epoch_end: called with (epoch, valid metrics) after each epoch's
            validation, on every rank (Ray Tune reports from it).
    """

    def __init__(
        self,
        config: RunConfig,
        phase: Phase,
        schema: FeatureSchema,
        dataset: str,
        make_engine: EngineFactory,
        on_epoch_end: EpochCallback | None = None,
    ) -> None:
        self.config = config
        self.phase = phase
        self.schema = schema
        self.dataset = dataset
        self.make_engine = make_engine
        self.on_epoch_end = on_epoch_end
        # Distillation from cached logits: the reader attaches them to the
        # batches and the teacher does not run.
        self.teacher_cache: TeacherLogitCache | None = None
        if phase is Phase.DISTILLATION and config.train.teacher_logits:
            self.teacher_cache = TeacherLogitCache.open(config.train.teacher_logits)
        self.directory = phase_directory(config, phase)
        self._memory_splits: dict[str, InMemorySplit] = {}
        self.checkpoints = CheckpointManager(
            join(self.directory, "checkpoints"), config.train.keep_last_checkpoints
        )
        self.objective = KDObjective(
            config.train.ctr_loss_weight, config.train.kd_loss_weight
        )

    def run(self) -> PhaseResult:
        started = time.perf_counter()
        train = self.config.train
        latest = self.checkpoints.latest()
        if latest is not None and latest.kind == "final":
            check_compatible(
                latest.meta, self.config, self.schema, f"checkpoint {latest.path}"
            )
            check_same_run(
                latest.meta, self.config, f"finished checkpoint {latest.path}"
            )
            logger.info(
                "%s already finished (%s); reusing its result",
                self.phase.value,
                latest.path,
            )
            return PhaseResult.from_dict(latest.meta["result"])

        torch.manual_seed(train.seed)
        table_device = (
            "meta" if self.config.distributed.table_init == "sharded" else None
        )
        model = KDDAGFM(self.schema, self.config.model, table_device=table_device)
        self.engine = self.make_engine(model, self.phase)
        self._log_model()
        reader = self._reader("train", training=True)
        state = TrainerState()
        if latest is not None:
            state = self._resume(latest, reader)
        else:
            self._warm_start()
        if self.teacher_cache is not None:
            self.teacher_cache.check_teacher(
                self.engine.unwrapped, self.config, self.schema
            )

        state = self._train(reader, state)
        return self._finish(state, reader, time.perf_counter() - started)

    def _log_model(self) -> None:
        model = self.engine.unwrapped
        tower = model.teacher if self.phase is Phase.TEACHER_TRAINING else model.student
        logger.info(
            "%s: %s with %d tower parameters, %d embedding rows x %d; engine %s",
            self.phase.value,
            model_name(self.config, self.phase),
            count_parameters(tower),
            sum(f.num_embeddings for f in self.schema.sparse_features),
            self.config.model.embedding_size,
            self.engine.describe(),
        )

    def _reader(self, split: str, training: bool) -> TrainReader:
        data = self.config.data
        train = self.config.train
        world = self.engine.world_size
        batch_size = train.train_batch_size if training else train.eval_batch_size
        if training and batch_size % world:
            raise ConfigError(
                f"train_batch_size {batch_size} is not divisible by {world} workers; "
                f"use a multiple of {world} such as {batch_size - batch_size % world or world}"
            )
        split_type = (
            ParquetSplit
            if self.teacher_cache is None
            else self.teacher_cache.split_type
        )
        if data.cache_in_memory:
            if split not in self._memory_splits:
                self._memory_splits[split] = self._load_in_memory(
                    split_type(
                        self.dataset, split, self.schema, bad_shards=data.bad_shards
                    )
                )
            return InMemorySplitReader(
                self._memory_splits[split],
                batch_size=batch_size // world if training else batch_size,
                rank=self.engine.rank,
                world_size=world,
                seed=train.seed,
                shuffle=data.shuffle and training,
                remainder=data.remainder if training else "keep",
            )
        return SplitReader(
            split_type(self.dataset, split, self.schema, bad_shards=data.bad_shards),
            batch_size=batch_size // world if training else batch_size,
            rank=self.engine.rank,
            world_size=world,
            seed=train.seed,
            shuffle=data.shuffle and training,
            remainder=data.remainder if training else "keep",
            bad_rows=data.bad_rows,
            prefetch_batches=data.prefetch_batches,
            shuffle_block_rows=data.shuffle_block_rows,
        )

    def _load_in_memory(self, split: ParquetSplit) -> InMemorySplit:
        started = time.perf_counter()
        memory = InMemorySplit.load(split, bad_rows=self.config.data.bad_rows)
        logger.info(
            "%s: split %s kept in memory: %d rows, %.1f MiB, decoded in %.2f s",
            self.phase.value,
            split.split,
            memory.num_rows,
            memory.nbytes / 2**20,
            time.perf_counter() - started,
        )
        return memory

    def _warm_start(self) -> None:
        warm_up = self.config.train.warm_up
        previous = self.phase.previous
        if self.config.train.from_scratch:
            if self.phase is not Phase.FINETUNING:
                raise ConfigError(
                    f"from_scratch is set for {self.phase.value}; it applies to "
                    "finetuning only (the student trained without a teacher). "
                    "Unset from_scratch, or run --phase finetuning"
                )
            if warm_up:
                raise ConfigError(
                    f"from_scratch trains the student from fresh weights, but "
                    f"warm_up={warm_up!r} is also set; unset one of them"
                )
            logger.info(
                "finetuning from scratch: the student starts from fresh weights, "
                "without a teacher"
            )
            return
        if previous is None:
            if warm_up:
                raise ConfigError(
                    f"warm_up={warm_up!r} is set for teacher_training, which starts from "
                    "scratch; remove warm_up (an interrupted run resumes by itself when "
                    "started again with the same output_dir)"
                )
            return
        if not warm_up:
            raise ConfigError(
                f"{self.phase.value} needs warm_up: the {previous.value} checkpoint it starts "
                f"from, for example warm_up={join(self.config.train.output_dir, previous.value)}"
            )
        info = resolve_warm_up(warm_up, previous)
        if info.phase != previous.value:
            raise CheckpointError(
                f"warm_up {info.path!r} is a {info.phase or 'unknown'}-phase checkpoint; "
                f"{self.phase.value} starts from a {previous.value} checkpoint"
            )
        if info.kind not in ("final", ""):
            logger.warning(
                "warm_up %s is an unfinished %s checkpoint (kind %s), not the phase's final one",
                info.path,
                info.phase,
                info.kind,
            )
        check_compatible(info.meta, self.config, self.schema, f"warm_up {info.path!r}")
        load_model_weights(info, self.engine.model_state())
        logger.info("%s: warm-started from %s", self.phase.value, info.path)

    def _resume(self, latest: CheckpointInfo, reader: TrainReader) -> TrainerState:
        check_compatible(
            latest.meta, self.config, self.schema, f"checkpoint {latest.path}"
        )
        # An interrupted phase may be resumed with more (or fewer) epochs.
        check_same_run(
            latest.meta, self.config, f"checkpoint {latest.path}", allowed=("epochs",)
        )
        self.engine.check_resume(latest.meta)
        optimizer_state = self.engine.optimizer_state()
        load_state(
            latest.path,
            {"model": self.engine.model_state(), "optimizer": optimizer_state},
        )
        self.engine.load_optimizer_state(optimizer_state)
        state = TrainerState.from_dict(latest.meta["trainer"])
        if state.best_seq is None and state.best_epoch >= 0:
            # An epoch checkpoint that improved the valid AUC holds the best
            # weights itself; its seq was assigned only after it was written.
            state.best_seq = latest.seq
        cursors = latest.meta["trainer"]["reader"]
        rank = self.engine.rank
        cursor = cursors[rank] if rank < len(cursors) else cursors[0]
        reader.load_state(ReaderState.from_dict(cursor))
        logger.info(
            "%s: resumed from %s at epoch %d, step %d",
            self.phase.value,
            latest.path,
            reader.state().epoch,
            state.step,
        )
        return state

    def _train(self, reader: TrainReader, state: TrainerState) -> TrainerState:
        train = self.config.train
        model = self.engine.model
        while reader.state().epoch < train.epochs and not state.stopped_early:
            epoch = reader.state().epoch
            model.train()
            if self.phase is Phase.DISTILLATION:
                self.engine.unwrapped.teacher.eval()
            epoch_started = time.perf_counter()
            epoch_cpu_started = time.process_time()
            epoch_examples = state.examples
            # Summed on the device: no per-step synchronisation for a float.
            loss_sum = torch.zeros((), device=self.engine.device)
            steps = 0
            # A checkpoint saved at max_steps_per_epoch resumes with the epoch's
            # cap already reached: train no further batch in it.
            capped = bool(
                train.max_steps_per_epoch
                and reader.state().batches >= train.max_steps_per_epoch
            )
            batches = () if capped else self._progress(reader, epoch)
            for batch in batches:
                batch = batch.to(self.engine.device)
                output = model(
                    batch.sparse_features,
                    batch.dense_features,
                    self.phase,
                    teacher_logits=batch.teacher_logits,
                )
                loss, parts = self.objective(output, batch.labels, self.phase)
                if not torch.isfinite(loss).item():
                    raise TrainingError(
                        f"{self.phase.value} loss is {loss.item()} at step "
                        f"{state.step + 1} (epoch {epoch}): training diverged. Lower "
                        f"learning_rate (now {train.learning_rate}) or, in "
                        "distillation, kd_loss_weight, and rerun with a new output_dir"
                    )
                self.engine.optimize(loss)
                loss_sum += loss.detach()
                steps += 1
                state.step += 1
                state.examples += len(batch) * self.engine.world_size
                if train.log_every_steps and state.step % train.log_every_steps == 0:
                    logger.info(
                        "%s epoch %d step %d loss %.5f %s",
                        self.phase.value,
                        epoch,
                        state.step,
                        loss.item(),
                        " ".join(f"{k} {float(v):.5f}" for k, v in parts.items()),
                    )
                if (
                    train.checkpoint_every_steps
                    and state.step % train.checkpoint_every_steps == 0
                ):
                    self._save(state, reader, kind="step")
                if (
                    train.max_steps_per_epoch
                    and reader.state().batches >= train.max_steps_per_epoch
                ):
                    break
            if reader.state().epoch == epoch:
                # max_steps_per_epoch ended the epoch early; move on explicitly.
                reader.load_state(
                    ReaderState(
                        epoch=epoch + 1,
                        seed=train.seed,
                        world_size=self.engine.world_size,
                    )
                )
            epoch_time_s = time.perf_counter() - epoch_started
            epoch_cpu_s = time.process_time() - epoch_cpu_started
            state.train_time_s += epoch_time_s

            valid = self.evaluate("valid")
            improved = valid.auc > state.best_valid_auc
            if improved:
                state.best_valid_auc = valid.auc
                state.best_epoch = epoch
                state.epochs_without_improvement = 0
            else:
                state.epochs_without_improvement += 1
            logger.info(
                "%s epoch %d: valid AUC %.4f log loss %.4f%s (%.0f examples/s)",
                self.phase.value,
                epoch,
                valid.auc,
                valid.log_loss,
                " (best)" if improved else "",
                state.examples / max(state.train_time_s, 1e-9),
            )
            state.history.append(
                {
                    "epoch": epoch,
                    "train_loss": float(loss_sum) / max(steps, 1),
                    "valid_auc": valid.auc,
                    "valid_log_loss": valid.log_loss,
                    "train_time_s": epoch_time_s,
                    # CPU seconds of this process (all threads), which the
                    # load of other processes inflates less than wall time.
                    "train_cpu_s": epoch_cpu_s,
                    "examples_per_s": (state.examples - epoch_examples)
                    / max(epoch_time_s, 1e-9),
                }
            )
            patience = train.early_stopping_patience
            if patience and state.epochs_without_improvement >= patience:
                state.stopped_early = True
                logger.info(
                    "%s: no valid AUC gain for %d epochs, stopping",
                    self.phase.value,
                    patience,
                )
            info = self._save(
                state, reader, kind="epoch", best_is_this=improved, valid=valid
            )
            if improved:
                state.best_seq = info.seq
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch, valid)
        return state

    def _progress(self, reader: TrainReader, epoch: int) -> Iterable[Batch]:
        batches: Iterator[Batch] = reader.epoch()
        if self.engine.rank != 0 or not sys.stderr.isatty():
            return batches
        from tqdm import tqdm

        return tqdm(
            batches,
            total=reader.batches_in_epoch(),
            desc=f"{self.phase.value} epoch {epoch}",
            leave=False,
            unit="batch",
        )

    def evaluate(self, split: str) -> EvalResult:
        """AUC and log loss of the phase's evaluated model over the whole split."""
        model = self.engine.model
        model.eval()
        metrics = BinaryCTRMetrics(self.engine.device)
        batches = self._reader(split, training=False).epoch()
        steps: Iterable[tuple[Batch, int]] = ((b, len(b)) for b in batches)
        if self.engine.world_size > 1:
            # Sharded forward passes are collective: pad to equal steps.
            from kd_dagfm.distributed.alignment import aligned_batches

            steps = aligned_batches(batches, self.schema, self.engine.device)
        with torch.no_grad():
            for batch, rows in steps:
                batch = batch.to(self.engine.device)
                output = model(
                    batch.sparse_features,
                    batch.dense_features,
                    self.phase,
                    teacher_logits=batch.teacher_logits,
                )
                logits = evaluated_logits(output, self.phase)
                metrics.update(logits[:rows], batch.labels[:rows])
        return metrics.compute()

    def _save(
        self,
        state: TrainerState,
        reader: TrainReader,
        kind: str,
        best_is_this: bool = False,
        valid: EvalResult | None = None,
        result: PhaseResult | None = None,
    ) -> CheckpointInfo:
        cursors = [reader.state().to_dict()]
        if dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, cursors[0])
            cursors = gathered
        meta: dict[str, Any] = {
            "kind": kind,
            "phase": self.phase.value,
            "config": self.config.to_dict(),
            "schema": self.schema.to_dict(),
            "world_size": self.engine.world_size,
            "engine": self.engine.describe(),
            "trainer": {**state.to_dict(), "reader": cursors},
            "best": {
                "seq": None if best_is_this else state.best_seq,
                "valid_auc": state.to_dict()["best_valid_auc"],
                "epoch": state.best_epoch,
            },
        }
        if valid is not None:
            meta["metrics"] = {"valid_auc": valid.auc, "valid_log_loss": valid.log_loss}
        if result is not None:
            meta["result"] = result.to_dict()
        tensors: dict[str, Any] = {"model": self.engine.model_state()}
        if kind != "final":
            tensors["optimizer"] = self.engine.optimizer_state()
        return self.checkpoints.save(tensors, meta)

    def _finish(
        self, state: TrainerState, reader: TrainReader, wall_time_s: float
    ) -> PhaseResult:
        if state.best_seq is not None:
            best = next(
                (c for c in self.checkpoints.list() if c.seq == state.best_seq), None
            )
            if best is None:
                raise CheckpointError(
                    f"best checkpoint ckpt-{state.best_seq:08d} of {self.phase.value} is missing "
                    f"from {self.checkpoints.directory}; it may have been deleted by hand"
                )
            load_state(best.path, {"model": self.engine.model_state()})
        valid = self.evaluate("valid")
        test = self.evaluate("test")
        model = self.engine.unwrapped
        tower = model.teacher if self.phase is Phase.TEACHER_TRAINING else model.student
        result = PhaseResult(
            phase=self.phase,
            model_name=model_name(self.config, self.phase),
            tower_parameters=count_parameters(tower),
            embedding_parameters=count_state_elements(model.sparse_arch),
            flops_per_example=flops_per_example(
                tower, self.schema.num_fields, self.config.model.embedding_size
            ),
            valid=valid,
            test=test,
            wall_time_s=wall_time_s,
            train_examples_per_s=state.examples / max(state.train_time_s, 1e-9),
            epochs=state.epochs_run(self.config.train.epochs),
            best_epoch=state.best_epoch,
            checkpoint=self.directory,
            history=list(state.history),
        )
        info = self._save(state, reader, kind="final", result=result)
        if self.engine.describe().get("engine") == "local":
            export_model_file(
                join(self.directory, "model.pt"),
                self.engine.model_state(),
                {**info.meta, "kind": "final"},
            )
        logger.info(
            "%s done: valid AUC %.4f, test AUC %.4f, test log loss %.4f, %s",
            self.phase.value,
            valid.auc,
            test.auc,
            test.log_loss,
            info.path,
        )
        return result


@dataclasses.dataclass
class TrainerState:
    """Loop counters saved in every checkpoint."""

    step: int = 0
    examples: int = 0
    train_time_s: float = 0.0
    best_valid_auc: float = float("-inf")
    best_epoch: int = -1
    best_seq: int | None = None
    epochs_without_improvement: int = 0
    stopped_early: bool = False
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)

    def epochs_run(self, limit: int) -> int:
        return (
            self.best_epoch + 1 + self.epochs_without_improvement
            if self.best_epoch >= 0
            else limit
        )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["best_valid_auc"] == float("-inf"):
            data["best_valid_auc"] = None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainerState:
        values = {
            f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data
        }
        if values.get("best_valid_auc") is None:
            values["best_valid_auc"] = float("-inf")
        return cls(**values)
