"""Run configuration: frozen dataclasses, built from YAML and command lines.

Keys are unique across sections, so a flat RecBole-style mapping
(``{"teacher": "CIN", "phase": "distillation"}``) and a nested one
(``{"model": {"teacher": "CIN"}, "train": {"phase": "distillation"}}``)
describe the same run. RecBole's names are accepted as aliases:

====================  =========================  ==============================
RecBole key           kd-dagfm key               what it sets
====================  =========================  ==============================
``alpha``             ``ctr_loss_weight``        weight of BCE(student, label)
``beta``              ``kd_loss_weight``         weight of MSE(student, teacher)
``type``              ``student_type``           DAGFM interaction: inner/outer
``stopping_step``     ``early_stopping_patience`` epochs without valid AUC gain
``embedding_size``    ``embedding_size``         D
====================  =========================  ==============================

RecBole 1.2.1's documentation says ``alpha`` weights the distillation loss;
its code (and the authors' code) multiply the click loss by ``alpha`` and the
distillation loss by ``beta``. kd-dagfm follows the code.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

from kd_dagfm.errors import ConfigError
from kd_dagfm.phases import Phase

TEACHERS = ("crossnet", "cin", "dcnv2", "xdeepfm", "autoint")
# dagfm: KD-DAGFM's student; dagfm_plus: KD-DAGFM+'s (DAGFM states and an MLP).
STUDENTS = ("dagfm", "dagfm_plus")
STUDENT_TYPES = ("inner", "outer")
DCN_STRUCTURES = ("parallel", "stacked", "stacked_parallel")
EMBEDDING_OPTIMIZERS = ("adam", "adagrad", "rowwise_adagrad", "sgd")
SHARDING_TYPES = (
    "auto",
    "table_wise",
    "row_wise",
    "column_wise",
    "table_row_wise",
    "data_parallel",
)
TABLE_INITS = ("full", "sharded")
REMAINDER_POLICIES = ("drop", "keep")
BAD_ROW_POLICIES = ("error", "skip")
BAD_SHARD_POLICIES = ("error", "skip")
JOB_ENTRYPOINTS = ("pipeline", "teacher_training", "distillation", "finetuning")
IMAGE_PULL_POLICIES = ("Always", "IfNotPresent", "Never")
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
# Kubernetes name and label syntax (RFC 1123 / RFC 1035 labels, label values).
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
# KubeRay derives longer names from the job name (the RayCluster gets a
# 5-character suffix, its head Service "-head-svc", worker pods a group name and
# another suffix); 40 characters keeps every derived name within 63.
MAX_JOB_NAME_LENGTH = 40


def _field(default: Any, help: str, **kwargs: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Teacher and student architecture. Changing any field makes checkpoints
    incompatible, so warm_up compares this section as a whole."""

    teacher: str = _field("crossnet", "teacher model: " + ", ".join(TEACHERS))
    student_type: str = _field("outer", "DAGFM interaction function: inner or outer")
    embedding_size: int = _field(16, "embedding dimension D shared by all fields")
    depth: int = _field(3, "DAGFM student layers L")
    t_depth: int = _field(3, "CrossNet teacher cross layers")
    t_cin: tuple[int, ...] = _field(
        (200, 200, 200), "CIN layer sizes of the cin and xdeepfm teachers"
    )
    student: str = _field(
        "dagfm",
        "student model: dagfm (KD-DAGFM) or dagfm_plus (KD-DAGFM+: the DAGFM "
        "layer states summed and read out by an MLP)",
    )
    student_mlp: tuple[int, ...] = _field(
        (400, 400, 400), "dagfm_plus: hidden sizes of the student's MLP"
    )
    t_mlp: tuple[int, ...] = _field(
        (400, 400, 400),
        "hidden sizes of the DNN of the dcnv2, xdeepfm and autoint teachers",
    )
    t_dcn_structure: str = _field(
        "parallel",
        "dcnv2: how the cross network and the DNN combine: parallel (both read "
        "E, outputs concatenated), stacked (DNN on the cross output) or "
        "stacked_parallel",
    )
    t_attention_layers: int = _field(3, "autoint: interacting (self-attention) layers")
    t_attention_heads: int = _field(2, "autoint: attention heads per layer")
    t_attention_dim: int = _field(
        64, "autoint: output width of each interacting layer, over all heads"
    )
    mlp_dropout: float = _field(
        0.0, "dropout probability after each hidden layer of every MLP"
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "teacher", str(self.teacher).lower())
        object.__setattr__(self, "student_type", str(self.student_type).lower())
        object.__setattr__(self, "t_cin", tuple(int(h) for h in self.t_cin))
        object.__setattr__(self, "student", str(self.student).lower())
        object.__setattr__(self, "t_dcn_structure", str(self.t_dcn_structure).lower())
        for name in ("student_mlp", "t_mlp"):
            object.__setattr__(self, name, tuple(int(h) for h in getattr(self, name)))
        _check_choice("teacher", self.teacher, TEACHERS)
        _check_choice("student_type", self.student_type, STUDENT_TYPES)
        _check_choice("student", self.student, STUDENTS)
        _check_choice("t_dcn_structure", self.t_dcn_structure, DCN_STRUCTURES)
        for name in ("student_mlp", "t_mlp"):
            sizes = getattr(self, name)
            if not sizes or any(h < 1 for h in sizes):
                raise ConfigError(
                    f"invalid {name} {list(sizes)}: expected a non-empty list of "
                    "positive hidden sizes, for example [400, 400, 400]"
                )
        for name in ("t_attention_layers", "t_attention_heads", "t_attention_dim"):
            _check_positive(name, getattr(self, name))
        if self.t_attention_dim % self.t_attention_heads:
            raise ConfigError(
                f"invalid t_attention_dim {self.t_attention_dim}: it must be "
                f"divisible by t_attention_heads {self.t_attention_heads}, since "
                "each head gets t_attention_dim / t_attention_heads columns"
            )
        if not 0.0 <= float(self.mlp_dropout) < 1.0:
            raise ConfigError(
                f"invalid mlp_dropout {self.mlp_dropout!r}: expected a probability "
                "in [0, 1)"
            )
        _check_positive("embedding_size", self.embedding_size)
        _check_positive("depth", self.depth)
        _check_positive("t_depth", self.t_depth)
        if not self.t_cin or any(int(h) < 1 for h in self.t_cin):
            raise ConfigError(
                f"invalid t_cin {list(self.t_cin)}: expected a non-empty list of "
                "positive layer sizes, for example [200, 200, 200]"
            )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation, phase selection and checkpointing."""

    phase: Phase = _field(Phase.TEACHER_TRAINING, "phase to run (single-phase runs)")
    warm_up: str | None = _field(
        None, "previous phase's checkpoint: a file, a checkpoint or a run directory"
    )
    learning_rate: float = _field(1e-3, "learning rate of the dense optimizer")
    embedding_learning_rate: float | None = _field(
        None, "learning rate of the embedding optimizer (default: learning_rate)"
    )
    weight_decay: float = _field(0.0, "L2 weight decay of the dense optimizer")
    embedding_optimizer: str = _field(
        "adam", "embedding optimizer: " + ", ".join(EMBEDDING_OPTIMIZERS)
    )
    train_batch_size: int = _field(2048, "examples per training step (global)")
    eval_batch_size: int = _field(8192, "examples per evaluation step")
    epochs: int = _field(300, "maximum epochs per phase")
    early_stopping_patience: int = _field(
        10, "stop a phase after this many epochs without valid AUC gain"
    )
    ctr_loss_weight: float = _field(
        0.1, "distillation: weight of BCE(student logit, label) (RecBole alpha)"
    )
    kd_loss_weight: float = _field(
        921.6,
        "distillation: weight of MSE(student logit, teacher logit) (RecBole beta)",
    )
    seed: int = _field(2022, "seed for initialisation and data order")
    output_dir: str = _field("runs/default", "directory for checkpoints and results")
    keep_last_checkpoints: int = _field(
        2, "checkpoints kept per phase (older are deleted)"
    )
    checkpoint_every_steps: int = _field(
        0, "also checkpoint every N steps inside an epoch (0: at epoch ends only)"
    )
    log_every_steps: int = _field(50, "steps between plain log lines")
    max_steps_per_epoch: int = _field(0, "cap on steps per epoch (0: no cap)")
    teacher_logits: str | None = _field(
        None,
        "distillation: directory of cached teacher logits written by "
        "jobs/cache_teacher_logits.py; the student learns from them and the "
        "teacher does not run",
    )
    from_scratch: bool = _field(
        False,
        "finetuning only: train the student from freshly initialised weights "
        "without warm_up, that is without a teacher (the no-distillation baseline)",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "phase", Phase.parse(self.phase))
        if self.warm_up is not None and not str(self.warm_up).strip():
            object.__setattr__(self, "warm_up", None)
        if self.teacher_logits is not None and not str(self.teacher_logits).strip():
            object.__setattr__(self, "teacher_logits", None)
        _check_choice(
            "embedding_optimizer", self.embedding_optimizer, EMBEDDING_OPTIMIZERS
        )
        for name in (
            "train_batch_size",
            "eval_batch_size",
            "epochs",
            "keep_last_checkpoints",
        ):
            _check_positive(name, getattr(self, name))
        for name in (
            "learning_rate",
            "weight_decay",
            "ctr_loss_weight",
            "kd_loss_weight",
        ):
            if not 0.0 <= float(getattr(self, name)) < float("inf"):
                raise ConfigError(
                    f"invalid {name} {getattr(self, name)!r}: expected a finite "
                    "number >= 0"
                )
        if not self.learning_rate > 0:
            raise ConfigError(
                f"invalid learning_rate {self.learning_rate!r}: expected > 0"
            )
        for name in (
            "early_stopping_patience",
            "checkpoint_every_steps",
            "max_steps_per_epoch",
        ):
            if int(getattr(self, name)) < 0:
                raise ConfigError(
                    f"invalid {name} {getattr(self, name)!r}: expected >= 0"
                )
        if self.ctr_loss_weight == 0 and self.kd_loss_weight == 0:
            raise ConfigError(
                "ctr_loss_weight and kd_loss_weight are both 0: distillation would "
                "not train; set at least one to a positive value"
            )


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Data source and streaming options."""

    dataset: str = _field(
        "synthetic",
        "'synthetic' (generated on the fly) or a dataset directory / fsspec URL "
        "with schema.json and train/valid/test Parquet shards",
    )
    synthetic_rows: int = _field(200_000, "synthetic: total rows (split 80/10/10)")
    synthetic_fields: int = _field(12, "synthetic: sparse fields")
    synthetic_vocab_size: int = _field(20, "synthetic: ids per field")
    shuffle: bool = _field(True, "shuffle shard order and rows within each row group")
    remainder: str = _field(
        "drop",
        "training rows that do not fill a last batch: drop (every rank gets equal "
        "full batches) or keep (a smaller last batch; single process only)",
    )
    bad_rows: str = _field(
        "error",
        "rows with invalid labels or ids: error (stop) or skip (count and drop)",
    )
    prefetch_batches: int = _field(4, "batches prepared ahead by a reader thread")
    bad_shards: str = _field(
        "error",
        "shards that are not readable Parquet or do not match schema.json, and row "
        "groups that fail to decode: error (stop) or skip (leave out and log)",
    )
    shuffle_block_rows: int = _field(
        256,
        "rows that stay together when a row group is shuffled each epoch; 1 "
        "permutes single rows (slower to read, see docs/BENCHMARKS.md)",
    )
    cache_in_memory: bool = _field(
        False,
        "decode each split once and serve batches from memory tensors, shuffling "
        "all rows each epoch (for datasets that fit in RAM; see kd_dagfm/data/memory.py)",
    )

    def __post_init__(self) -> None:
        if not str(self.dataset).strip():
            raise ConfigError(
                "dataset is empty: give 'synthetic' or a dataset directory"
            )
        for name in ("synthetic_rows", "synthetic_fields", "synthetic_vocab_size"):
            _check_positive(name, getattr(self, name))
        if self.synthetic_fields < 3:
            raise ConfigError(
                f"invalid synthetic_fields {self.synthetic_fields}: the synthetic "
                "labels use crosses of three fields, so at least 3 are needed"
            )
        _check_choice("remainder", self.remainder, REMAINDER_POLICIES)
        _check_choice("bad_rows", self.bad_rows, BAD_ROW_POLICIES)
        _check_choice("bad_shards", self.bad_shards, BAD_SHARD_POLICIES)
        _check_positive("shuffle_block_rows", self.shuffle_block_rows)
        if self.prefetch_batches < 0:
            raise ConfigError(
                f"invalid prefetch_batches {self.prefetch_batches}: expected >= 0"
            )


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Worker layout and embedding sharding for multi-process runs."""

    num_workers: int = _field(1, "training processes (Ray Train workers)")
    cpus_per_worker: int = _field(1, "CPUs reserved per worker")
    gpus_per_worker: int = _field(0, "GPUs per worker (0: gloo on CPU, else NCCL)")
    sharding: str = _field("auto", "embedding sharding: " + ", ".join(SHARDING_TYPES))
    ray_address: str | None = _field(
        None, "Ray cluster address; none starts a local loopback-only cluster"
    )
    storage_path: str | None = _field(
        None, "Ray Train storage path (local or s3://); default: output_dir"
    )
    max_failures: int = _field(
        2, "worker failures Ray Train restarts from a checkpoint"
    )
    table_init: str = _field(
        "full",
        "how sharded runs create the embedding tables: full (every rank builds "
        "the whole seeded tables and keeps its shards, so a sharded run starts "
        "from the same weights as a single process) or sharded (the tables are "
        "built on the meta device and each rank allocates and initialises only "
        "its shards; needed when a whole table does not fit in one process)",
    )

    def __post_init__(self) -> None:
        _check_positive("num_workers", self.num_workers)
        _check_positive("cpus_per_worker", self.cpus_per_worker)
        if self.gpus_per_worker < 0:
            raise ConfigError(
                f"invalid gpus_per_worker {self.gpus_per_worker}: expected >= 0"
            )
        if self.max_failures < 0:
            raise ConfigError(
                f"invalid max_failures {self.max_failures}: expected >= 0"
            )
        _check_choice("sharding", self.sharding, SHARDING_TYPES)
        _check_choice("table_init", self.table_init, TABLE_INITS)


@dataclasses.dataclass(frozen=True)
class DeployConfig:
    """Kubernetes deployment options, read by ``kd-dagfm render-k8s`` only.

    Workers, CPUs and GPUs per worker come from the distributed section, the
    dataset and checkpoint location from the data and train sections, so one
    config drives both the run and its manifests.
    """

    image: str = _field(
        "kd-dagfm:0.1.0-cpu", "container image (registry/name:tag) of every pod"
    )
    image_pull_policy: str = _field(
        "IfNotPresent", "image pull policy: " + ", ".join(IMAGE_PULL_POLICIES)
    )
    image_pull_secret: str | None = _field(
        None, "Secret of type docker-registry for a private registry"
    )
    namespace: str = _field("default", "Kubernetes namespace of every object")
    job_name: str = _field(
        "kd-dagfm",
        f"name of the RayJob, RayCluster and Job (at most {MAX_JOB_NAME_LENGTH} "
        "characters, lowercase letters, digits and '-')",
    )
    job_entrypoint: str = _field(
        "pipeline",
        "what the job runs: " + ", ".join(JOB_ENTRYPOINTS) + " (module jobs.<name>)",
    )
    service_account: str | None = _field(
        None, "ServiceAccount of the pods (for example one bound to an IAM role)"
    )
    s3_secret: str | None = _field(
        None,
        "Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (optional: "
        "AWS_SESSION_TOKEN, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL) for s3:// URLs",
    )
    node_selector: tuple[str, ...] = _field(
        (), "node labels every pod requires, as key=value (a list or comma-separated)"
    )
    tolerations: tuple[str, ...] = _field(
        (),
        "taints every pod tolerates, as kubectl writes them: key=value:Effect, "
        "key:Effect, key=value or key (a list or comma-separated)",
    )
    gpu_resource: str = _field(
        "nvidia.com/gpu", "extended resource name of a GPU on the nodes"
    )
    memory_headroom: float = _field(
        1.25, "factor on the estimated worker memory (>= 1)"
    )
    worker_memory_gib: float = _field(
        0.0, "memory request of a worker pod in GiB (0: estimate from the model)"
    )
    head_cpus: int = _field(2, "CPUs of the Ray head pod (it runs no training worker)")
    head_memory_gib: float = _field(4.0, "memory of the Ray head pod in GiB")
    object_store_gib: float = _field(
        1.0, "Ray object store per pod in GiB (training data does not pass through it)"
    )
    rendezvous_port: int = _field(
        29500, "MASTER_PORT of the indexed Job's rank 0 (torch.distributed TCPStore)"
    )
    backoff_limit: int = _field(
        3,
        "whole-job retries after a failure; each resumes from the newest complete "
        "checkpoint (the indexed Job gets backoff_limit x num_workers, since one "
        "lost rank fails every rank)",
    )
    active_deadline_s: int = _field(
        0, "seconds after which Kubernetes stops the job (0: no deadline)"
    )
    ttl_after_finished_s: int = _field(
        86400, "seconds a finished job and its pods are kept for inspection"
    )

    def __post_init__(self) -> None:
        if not self.image.strip() or any(c.isspace() for c in self.image):
            raise ConfigError(
                f"invalid image {self.image!r}: expected registry/name:tag without "
                "spaces, for example ghcr.io/acme/kd-dagfm:0.1.0-gpu"
            )
        _check_choice("image_pull_policy", self.image_pull_policy, IMAGE_PULL_POLICIES)
        _check_choice("job_entrypoint", self.job_entrypoint, JOB_ENTRYPOINTS)
        _check_name("namespace", self.namespace, _DNS1123_LABEL, 63)
        _check_name("job_name", self.job_name, _DNS1035_LABEL, MAX_JOB_NAME_LENGTH)
        for name in ("image_pull_secret", "service_account", "s3_secret"):
            value = getattr(self, name)
            if value is not None:
                _check_name(name, value, _DNS1123_SUBDOMAIN, 253)
        parse_node_selector(self.node_selector)
        parse_tolerations(self.tolerations)
        if "/" not in self.gpu_resource:
            raise ConfigError(
                f"invalid gpu_resource {self.gpu_resource!r}: expected an extended "
                "resource name such as nvidia.com/gpu or amd.com/gpu"
            )
        for name in (
            "backoff_limit",
            "active_deadline_s",
            "ttl_after_finished_s",
        ):
            if int(getattr(self, name)) < 0:
                raise ConfigError(
                    f"invalid {name} {getattr(self, name)!r}: expected >= 0"
                )
        if not self.memory_headroom >= 1.0:
            raise ConfigError(
                f"invalid memory_headroom {self.memory_headroom!r}: expected >= 1.0 "
                "(1.25 requests a quarter more than the estimate)"
            )
        if not self.worker_memory_gib >= 0.0:
            raise ConfigError(
                f"invalid worker_memory_gib {self.worker_memory_gib!r}: expected "
                ">= 0 (0 sizes workers from the model)"
            )
        for name in ("head_memory_gib", "object_store_gib"):
            if not float(getattr(self, name)) > 0.0:
                raise ConfigError(
                    f"invalid {name} {getattr(self, name)!r}: expected > 0"
                )
        _check_positive("head_cpus", self.head_cpus)
        if not 1 <= self.rendezvous_port <= 65535:
            raise ConfigError(
                f"invalid rendezvous_port {self.rendezvous_port}: expected 1-65535"
            )


def parse_node_selector(entries: tuple[str, ...]) -> dict[str, str]:
    """Parse ``key=value`` node labels into a nodeSelector mapping."""
    selector: dict[str, str] = {}
    for entry in entries:
        key, sep, value = entry.strip().partition("=")
        if not sep or not _is_label_key(key) or not _is_label_value(value):
            raise ConfigError(
                f"invalid node_selector entry {entry!r}: expected key=value with a "
                "Kubernetes label key and value, for example "
                "cloud.google.com/gke-accelerator=nvidia-h100-80gb"
            )
        selector[key] = value
    return selector


def parse_tolerations(entries: tuple[str, ...]) -> list[dict[str, str]]:
    """Parse taints in kubectl syntax into pod tolerations.

    ``key=value:Effect`` tolerates that taint (operator Equal), ``key:Effect``
    any value of the key (operator Exists). Without ``:Effect`` every effect
    is tolerated.
    """
    tolerations: list[dict[str, str]] = []
    for entry in entries:
        text, _, effect = entry.strip().partition(":")
        key, has_value, value = text.partition("=")
        valid = (
            _is_label_key(key)
            and (not has_value or _is_label_value(value))
            and (not effect or effect in TAINT_EFFECTS)
        )
        if not valid:
            raise ConfigError(
                f"invalid toleration {entry!r}: expected key=value:Effect, "
                f"key:Effect, key=value or key, with Effect one of "
                f"{', '.join(TAINT_EFFECTS)}; for example nvidia.com/gpu:NoSchedule"
            )
        toleration = {"key": key, "operator": "Equal" if has_value else "Exists"}
        if has_value:
            toleration["value"] = value
        if effect:
            toleration["effect"] = effect
        tolerations.append(toleration)
    return tolerations


def _is_label_key(key: str) -> bool:
    prefix, slash, name = key.rpartition("/")
    if slash and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix)):
        return False
    return len(name) <= 63 and bool(_LABEL_NAME.match(name))


def _is_label_value(value: str) -> bool:
    return value == "" or (len(value) <= 63 and bool(_LABEL_NAME.match(value)))


def _check_name(name: str, value: str, pattern: re.Pattern[str], limit: int) -> None:
    if len(value) > limit or not pattern.match(value):
        allowed = {
            _DNS1035_LABEL: "lowercase letters, digits and '-', starting with a letter",
            _DNS1123_LABEL: "lowercase letters, digits and '-'",
            _DNS1123_SUBDOMAIN: "lowercase letters, digits, '-' and '.'",
        }[pattern]
        raise ConfigError(
            f"invalid {name} {value!r}: expected at most {limit} characters of "
            f"{allowed}, ending with a letter or digit, for example kd-dagfm"
        )


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run: model, training, data, distribution and deployment."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    distributed: DistributedConfig = dataclasses.field(
        default_factory=DistributedConfig
    )
    deploy: DeployConfig = dataclasses.field(default_factory=DeployConfig)

    def replace(self, **overrides: Any) -> RunConfig:
        """Return a copy with flat keys (or aliases) replaced."""
        return build_config(overrides, base=self)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {s: _section_to_dict(getattr(self, s)) for s in SECTIONS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        return build_config(data)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "distributed": DistributedConfig,
    "deploy": DeployConfig,
}

ALIASES: dict[str, str] = {
    "alpha": "ctr_loss_weight",
    "beta": "kd_loss_weight",
    "type": "student_type",
    "stopping_step": "early_stopping_patience",
}

# Flat key -> section; keys are unique across sections by construction.
KEY_SECTIONS: dict[str, str] = {
    f.name: section
    for section, cls in SECTIONS.items()
    for f in dataclasses.fields(cls)
}


def valid_keys() -> list[str]:
    return sorted([*KEY_SECTIONS, *ALIASES])


def build_config(data: Mapping[str, Any], base: RunConfig | None = None) -> RunConfig:
    """Build a RunConfig from a flat or nested mapping, on top of ``base``.

    Raises:
        ConfigError: on an unknown key or an invalid value; the message names
            the key and lists the valid keys or values.
    """
    base = base or RunConfig()
    updates: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    sources: dict[str, str] = {}
    for key, value in _flatten(data):
        canonical = ALIASES.get(key, key)
        section = KEY_SECTIONS.get(canonical)
        if section is None:
            raise ConfigError(
                f"unknown config key {key!r}; valid keys: {', '.join(valid_keys())}"
            )
        if sources.get(canonical, key) != key:
            raise ConfigError(
                f"config sets {canonical!r} twice, as {sources[canonical]!r} and "
                f"{key!r}; keep one of them"
            )
        sources[canonical] = key
        updates[section][canonical] = value

    sections: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        current = getattr(base, section)
        if not updates[section]:
            sections[section] = current
            continue
        values = _section_to_dict(current)
        for key, value in updates[section].items():
            values[key] = _coerce(cls, key, value)
        try:
            sections[section] = cls(**values)
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"invalid {section} config: {e}") from None
    return RunConfig(**sections)


def _flatten(data: Mapping[str, Any]) -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"config key {key!r} is not a string")
        if key in SECTIONS and isinstance(value, Mapping):
            for sub_key, sub_value in value.items():
                if ALIASES.get(sub_key, sub_key) not in {
                    f.name for f in dataclasses.fields(SECTIONS[key])
                }:
                    fields = sorted(f.name for f in dataclasses.fields(SECTIONS[key]))
                    raise ConfigError(
                        f"unknown key {sub_key!r} in section {key!r}; valid keys: "
                        f"{', '.join(fields)}"
                    )
                items.append((sub_key, sub_value))
        else:
            items.append((key, value))
    return items


def _section_to_dict(section: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, Phase):
            value = value.value
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def _coerce(cls: type, key: str, value: Any) -> Any:
    """Convert ``value`` to the annotated type of ``cls.key`` or raise ConfigError."""
    hints = typing.get_type_hints(cls)
    annotation = hints[key]
    try:
        return _coerce_to(annotation, value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"invalid value {value!r} for {key!r}: expected {_type_name(annotation)}"
        ) from None


def _coerce_to(annotation: Any, value: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        is_null = value is None or (
            isinstance(value, str) and value.lower() in ("none", "null")
        )
        if is_null and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce_to(non_none[0], value)
    if origin is tuple:
        if isinstance(value, str):
            text = value.strip()
            opened, closed = text[:1] in "[(", text[-1:] in "])"
            if opened != closed:
                raise ValueError(value)  # unbalanced brackets, as in "[200,"
            value = [v for v in text.strip("[]() ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise TypeError(value)
        return tuple(_coerce_to(args[0], v) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise TypeError(value)
    if annotation is int:
        if isinstance(value, bool) or (
            isinstance(value, float) and not value.is_integer()
        ):
            raise TypeError(value)
        if isinstance(value, str):
            value = value.replace("_", "")
        return int(value)
    if annotation is float:
        if isinstance(value, bool):
            raise TypeError(value)
        return float(value)
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise TypeError(value)
        return str(value)
    if annotation is Phase:
        return Phase.parse(value)
    raise TypeError(annotation)


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + " or null"
    if origin is tuple:
        return f"a list of {_type_name(args[0])}"
    if annotation is Phase:
        return "one of " + ", ".join(p.value for p in Phase)
    return getattr(annotation, "__name__", str(annotation))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"invalid {name} {value!r}: expected one of {', '.join(choices)}"
        )


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or int(value) < 1:
        raise ConfigError(f"invalid {name} {value!r}: expected a positive integer")


def config_from_yaml(
    path: str, overrides: Mapping[str, Any] | None = None
) -> RunConfig:
    """Load a YAML file (flat or nested keys) and apply ``overrides`` on top."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path!r} must hold a mapping of keys to values, "
            f"got {type(data).__name__}"
        )
    config = build_config(data)
    return build_config(overrides or {}, base=config)
