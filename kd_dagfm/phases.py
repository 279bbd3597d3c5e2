"""The three KD-DAGFM training phases."""

from __future__ import annotations

import enum

from kd_dagfm.errors import ConfigError


class Phase(str, enum.Enum):
    """Training phase, in pipeline order.

    Attributes:
        TEACHER_TRAINING: binary cross-entropy on the teacher's logits.
        DISTILLATION: the student learns from the frozen teacher; the shared
            embedding tables are frozen too.
        FINETUNING: binary cross-entropy on the student; embeddings trainable.
    """

    TEACHER_TRAINING = "teacher_training"
    DISTILLATION = "distillation"
    FINETUNING = "finetuning"

    @classmethod
    def parse(cls, value: str | Phase) -> Phase:
        if isinstance(value, Phase):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            valid = ", ".join(p.value for p in cls)
            raise ConfigError(
                f"invalid phase {value!r}: expected one of {valid}"
            ) from None

    @property
    def previous(self) -> Phase | None:
        """The phase whose checkpoint this phase warm-starts from."""
        order = list(Phase)
        index = order.index(self)
        return order[index - 1] if index > 0 else None

    @property
    def trains_teacher(self) -> bool:
        return self is Phase.TEACHER_TRAINING

    @property
    def embeddings_trainable(self) -> bool:
        return self is not Phase.DISTILLATION


PIPELINE: tuple[Phase, ...] = tuple(Phase)
