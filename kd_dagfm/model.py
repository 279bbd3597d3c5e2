"""The KD-DAGFM model: shared sparse arch, a teacher and a DAGFM student."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from kd_dagfm.config import ModelConfig
from kd_dagfm.modules import (
    CIN,
    DAGFM,
    AutoIntPlus,
    CrossNet,
    DCNv2,
    DeepDAGFM,
    SparseArch,
    XDeepFM,
)
from kd_dagfm.phases import Phase
from kd_dagfm.schema import FeatureSchema

# Teacher factories: (model config, number of fields F) -> module mapping
# E (B X F X D) to logits (B,). Keys are the accepted ``teacher`` values.
TEACHERS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {
    "crossnet": lambda cfg, num_fields: CrossNet(
        num_fields, cfg.embedding_size, cfg.t_depth
    ),
    "cin": lambda cfg, num_fields: CIN(num_fields, cfg.t_cin),
    "dcnv2": lambda cfg, num_fields: DCNv2(
        num_fields,
        cfg.embedding_size,
        cfg.t_depth,
        cfg.t_mlp,
        cfg.t_dcn_structure,
        cfg.mlp_dropout,
    ),
    "xdeepfm": lambda cfg, num_fields: XDeepFM(
        num_fields, cfg.embedding_size, cfg.t_cin, cfg.t_mlp, cfg.mlp_dropout
    ),
    "autoint": lambda cfg, num_fields: AutoIntPlus(
        num_fields,
        cfg.embedding_size,
        cfg.t_attention_layers,
        cfg.t_attention_dim,
        cfg.t_attention_heads,
        cfg.t_mlp,
        cfg.mlp_dropout,
    ),
}

# Student factories, keyed by the ``student`` config value.
STUDENTS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {
    "dagfm": lambda cfg, num_fields: DAGFM(
        num_fields, cfg.embedding_size, cfg.depth, cfg.student_type
    ),
    "dagfm_plus": lambda cfg, num_fields: DeepDAGFM(
        num_fields,
        cfg.embedding_size,
        cfg.depth,
        cfg.student_type,
        cfg.student_mlp,
        cfg.mlp_dropout,
    ),
}

# Names in logs and results tables.
TEACHER_NAMES: dict[str, str] = {
    "crossnet": "CrossNet",
    "cin": "CIN",
    "dcnv2": "DCNv2",
    "xdeepfm": "xDeepFM",
    "autoint": "AutoInt+",
}
STUDENT_NAMES: dict[str, str] = {"dagfm": "DAGFM", "dagfm_plus": "DAGFM+"}


@dataclasses.dataclass
class ModelOutput:
    """Logits of one forward pass; a model that did not run is None."""

    teacher_logits: torch.Tensor | None
    student_logits: torch.Tensor | None


class KDDAGFM(nn.Module):
    """Teacher and student over one shared EmbeddingBagCollection.

    What runs depends on the phase:

    - teacher_training: E, then the teacher, all with autograd.
    - distillation: E and the teacher under ``torch.no_grad`` (both frozen),
      the student with autograd. Given ``teacher_logits`` (read from a
      cache), the teacher does not run and those logits are returned.
    - finetuning: E and the student with autograd; the teacher does not run.

    Args:
        schema: the dataset's features.
        config: architecture.
        device: where to allocate parameters (the trainer decides).
        table_device: where to allocate the embedding tables, if not
            ``device``; ``"meta"`` leaves them to a sharded engine.
    """

    def __init__(
        self,
        schema: FeatureSchema,
        config: ModelConfig,
        device: torch.device | str | None = None,
        table_device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        num_fields = schema.num_fields
        self.sparse_arch = SparseArch(
            schema, config.embedding_size, device=device, table_device=table_device
        )
        self.teacher = TEACHERS[config.teacher](config, num_fields).to(device)
        self.student = STUDENTS[config.student](config, num_fields).to(device)

    def forward(
        self,
        sparse_features: KeyedJaggedTensor,
        dense_features: torch.Tensor | None,
        phase: Phase,
        teacher_logits: torch.Tensor | None = None,
    ) -> ModelOutput:
        """
        Args:
            sparse_features: ids keyed by feature name.
            dense_features: (B X num_dense), or None without dense features.
            phase: decides what runs (see the class docstring).
            teacher_logits: (B,) cached teacher logits; used in distillation
                only, where they replace the teacher's forward pass.
        """
        if phase is Phase.TEACHER_TRAINING:
            embeddings = self.sparse_arch(sparse_features, dense_features)
            return ModelOutput(self.teacher(embeddings), None)

        if phase is Phase.DISTILLATION:
            with torch.no_grad():
                embeddings = self.sparse_arch(sparse_features, dense_features)
                if teacher_logits is None:
                    teacher_logits = self.teacher(embeddings)
            return ModelOutput(teacher_logits, self.student(embeddings))

        embeddings = self.sparse_arch(sparse_features, dense_features)
        return ModelOutput(None, self.student(embeddings))

    def trainable_modules(self, phase: Phase) -> list[nn.Module]:
        """The modules whose parameters the optimizer updates in ``phase``."""
        if phase is Phase.TEACHER_TRAINING:
            return [self.sparse_arch, self.teacher]
        if phase is Phase.DISTILLATION:
            return [self.student]
        return [self.sparse_arch, self.student]


def evaluated_logits(output: ModelOutput, phase: Phase) -> torch.Tensor:
    """The logits a phase is evaluated on: the teacher's in teacher_training,
    the student's afterwards."""
    logits = (
        output.teacher_logits
        if phase is Phase.TEACHER_TRAINING
        else output.student_logits
    )
    assert logits is not None, f"phase {phase.value} produced no logits to evaluate"
    return logits
