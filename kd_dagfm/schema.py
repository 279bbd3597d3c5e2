"""Feature schema: which columns a dataset has and how each one is embedded.

A dataset directory (local path or fsspec URL) contains one ``schema.json`` next
to its split folders. The schema is also stored in every checkpoint, so a
later phase can check that it trains on the same features.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from kd_dagfm.errors import SchemaError

SCHEMA_FILE = "schema.json"
SCHEMA_VERSION = 1


class FeatureKind(str, enum.Enum):
    """How a column is stored and embedded.

    Attributes:
        SPARSE: one integer id per row, looked up in an embedding table.
        SPARSE_LIST: a list of integer ids per row (for example movie genres),
            sum-pooled into one vector.
        DENSE: one float per row, embedded as ``value * v`` with a learned
            vector ``v`` (RecBole's treatment of numerical fields).
    """

    SPARSE = "sparse"
    SPARSE_LIST = "sparse_list"
    DENSE = "dense"


@dataclasses.dataclass(frozen=True)
class Feature:
    """One input column.

    Attributes:
        name: column name in the Parquet shards; also the embedding table key.
        kind: storage and embedding kind.
        num_embeddings: rows of the embedding table (vocabulary or hash size),
            for sparse kinds. Valid ids are ``0 .. num_embeddings - 1``.
    """

    name: str
    kind: FeatureKind
    num_embeddings: int = 0

    def __post_init__(self) -> None:
        if not self.name:
            raise SchemaError("feature name is empty: give every feature a name")
        if self.kind is not FeatureKind.DENSE and self.num_embeddings < 1:
            raise SchemaError(
                f"feature {self.name!r} of kind {self.kind.value!r} has "
                f"num_embeddings={self.num_embeddings}: a sparse feature needs a "
                "vocabulary or hash size of at least 1"
            )

    @property
    def is_sparse(self) -> bool:
        return self.kind is not FeatureKind.DENSE


@dataclasses.dataclass(frozen=True)
class FeatureSchema:
    """The label column and the ordered feature columns of a dataset.

    The feature order fixes the field order F of the embedding tensor E
    (B X F X D): sparse features first, in schema order, then dense ones.
    """

    label: str
    features: tuple[Feature, ...]

    def __post_init__(self) -> None:
        if not self.features:
            raise SchemaError("schema has no features: declare at least one")
        names = [f.name for f in self.features]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise SchemaError(f"schema declares features more than once: {duplicates}")
        if self.label in names:
            raise SchemaError(
                f"label column {self.label!r} is also declared as a feature"
            )

    @property
    def sparse_features(self) -> tuple[Feature, ...]:
        return tuple(f for f in self.features if f.is_sparse)

    @property
    def dense_features(self) -> tuple[Feature, ...]:
        return tuple(f for f in self.features if not f.is_sparse)

    @property
    def field_names(self) -> tuple[str, ...]:
        """Feature names in field order (the F axis of E)."""
        return tuple(f.name for f in self.sparse_features + self.dense_features)

    @property
    def num_fields(self) -> int:
        return len(self.features)

    @property
    def columns(self) -> tuple[str, ...]:
        """All columns a reader needs: the label, then the features."""
        return (self.label, *(f.name for f in self.features))

    def feature(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise SchemaError(
            f"feature {name!r} is not in the schema; known: {list(self.field_names)}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": SCHEMA_VERSION,
            "label": self.label,
            "features": [
                {
                    "name": f.name,
                    "kind": f.kind.value,
                    "num_embeddings": f.num_embeddings,
                }
                for f in self.features
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def fingerprint(self) -> str:
        """Return a short hash of the schema, equal for equal schemas."""
        canonical = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(canonical).hexdigest()[:16]

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], source: str = "schema"
    ) -> FeatureSchema:
        try:
            version = int(data.get("version", SCHEMA_VERSION))
            if version != SCHEMA_VERSION:
                raise SchemaError(
                    f"{source}: schema version {version} is not supported; this "
                    f"kd-dagfm reads version {SCHEMA_VERSION}. Re-run the converter."
                )
            features = tuple(
                Feature(
                    name=str(item["name"]),
                    kind=_parse_kind(item["kind"], source),
                    num_embeddings=int(item.get("num_embeddings", 0)),
                )
                for item in data["features"]
            )
            return cls(label=str(data["label"]), features=features)
        except KeyError as e:
            raise SchemaError(
                f"{source}: missing key {e.args[0]!r}; a schema needs 'label' and "
                "'features' with 'name' and 'kind' for each feature"
            ) from None

    @classmethod
    def from_json(cls, text: str, source: str = "schema") -> FeatureSchema:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SchemaError(f"{source}: invalid JSON ({e})") from None
        if not isinstance(data, dict):
            raise SchemaError(
                f"{source}: expected a JSON object, got {type(data).__name__}"
            )
        return cls.from_dict(data, source)

    def describe_difference(self, other: FeatureSchema) -> str | None:
        """Say how ``other`` differs from this schema, or None when equal."""
        if self == other:
            return None
        if self.label != other.label:
            return f"label column {other.label!r} != {self.label!r}"
        mine = {f.name: f for f in self.features}
        theirs = {f.name: f for f in other.features}
        missing = sorted(set(mine) - set(theirs))
        extra = sorted(set(theirs) - set(mine))
        if missing or extra:
            return f"features missing: {missing}, unexpected: {extra}"
        for name, f in mine.items():
            g = theirs[name]
            if f != g:
                return (
                    f"feature {name!r} is {g.kind.value} with {g.num_embeddings} "
                    f"embeddings, expected {f.kind.value} with {f.num_embeddings}"
                )
        return "feature order differs"


def _parse_kind(value: object, source: str) -> FeatureKind:
    try:
        return FeatureKind(str(value))
    except ValueError:
        valid = ", ".join(k.value for k in FeatureKind)
        raise SchemaError(
            f"{source}: invalid feature kind {value!r}; expected one of {valid}"
        ) from None


def make_schema(
    label: str,
    sparse: Mapping[str, int],
    lists: Iterable[str] = (),
    dense: Iterable[str] = (),
) -> FeatureSchema:
    """Build a schema from ``{name: num_embeddings}`` plus the list and dense names."""
    list_names = set(lists)
    features = [
        Feature(
            name,
            FeatureKind.SPARSE_LIST if name in list_names else FeatureKind.SPARSE,
            int(size),
        )
        for name, size in sparse.items()
    ]
    features += [Feature(name, FeatureKind.DENSE) for name in dense]
    return FeatureSchema(label=label, features=tuple(features))
