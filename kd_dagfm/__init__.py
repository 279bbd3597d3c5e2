"""kd-dagfm: distil high-order CTR teachers into a DAGFM student, at scale.

Shape legend used in docstrings and comments: B batch, F fields, D embedding
dimension, L student layers, H CIN layer width.
"""

from kd_dagfm.config import (
    DataConfig,
    DistributedConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    build_config,
    config_from_yaml,
)
from kd_dagfm.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    KDDAGFMError,
    SchemaError,
)
from kd_dagfm.model import KDDAGFM, STUDENTS, TEACHERS, ModelOutput
from kd_dagfm.objective import KDObjective
from kd_dagfm.phases import PIPELINE, Phase
from kd_dagfm.schema import Feature, FeatureKind, FeatureSchema

__all__ = [
    "KDDAGFM",
    "PIPELINE",
    "STUDENTS",
    "TEACHERS",
    "CheckpointError",
    "ConfigError",
    "DataConfig",
    "DataError",
    "DistributedConfig",
    "Feature",
    "FeatureKind",
    "FeatureSchema",
    "KDDAGFMError",
    "KDObjective",
    "ModelConfig",
    "ModelOutput",
    "Phase",
    "RunConfig",
    "SchemaError",
    "TrainConfig",
    "build_config",
    "config_from_yaml",
]
