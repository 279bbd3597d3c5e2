"""The sparse arch: feature ids to the field embedding tensor E (B X F X D)."""

from __future__ import annotations

import torch
from torch import nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    KeyedJaggedTensor,
    PoolingType,
)

from kd_dagfm.schema import FeatureSchema


def table_name(feature: str) -> str:
    """Embedding table name for a feature (one table per field)."""
    return f"t_{feature}"


def embedding_bag_configs(
    schema: FeatureSchema, embedding_dim: int
) -> list[EmbeddingBagConfig]:
    """Build one sum-pooled table per sparse feature, so list features (genres) pool."""
    return [
        EmbeddingBagConfig(
            name=table_name(f.name),
            embedding_dim=embedding_dim,
            num_embeddings=f.num_embeddings,
            feature_names=[f.name],
            pooling=PoolingType.SUM,
        )
        for f in schema.sparse_features
    ]


class SparseArch(nn.Module):
    """Embeds sparse ids with an EmbeddingBagCollection and dense values with
    one learned vector per dense feature.

    Teacher and student share this module: both read the same E.

    Args:
        schema: the dataset's features; fixes the field order of E.
        embedding_dim: D.
        device: where to allocate the tables; ``"meta"`` builds them without
            memory, for sharding plans.
        table_device: where to allocate the tables only, if not ``device``;
            ``"meta"`` leaves them to a sharded engine, which allocates and
            initialises each rank's shards, while the dense embedding stays
            on ``device``.
    """

    def __init__(
        self,
        schema: FeatureSchema,
        embedding_dim: int,
        device: torch.device | str | None = None,
        table_device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.sparse_names = tuple(f.name for f in schema.sparse_features)
        self.num_dense = len(schema.dense_features)
        if table_device is None:
            table_device = device
        self.embedding_bag_collection = EmbeddingBagCollection(
            tables=embedding_bag_configs(schema, embedding_dim),
            device=torch.device(table_device) if table_device is not None else None,
        )
        # RecBole's float-field embedding: E_dense[b, j] = x[b, j] * v_j. No
        # parameter without dense features: an unused parameter never gets
        # optimizer state, which would break checkpoint loading.
        self.dense_embedding: nn.Parameter | None = None
        if self.num_dense:
            self.dense_embedding = nn.Parameter(
                torch.empty(self.num_dense, embedding_dim, device=device)
            )
            nn.init.xavier_normal_(self.dense_embedding)

    def forward(
        self,
        sparse_features: KeyedJaggedTensor,
        dense_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            sparse_features: ids keyed by feature name.
            dense_features: (B X num_dense) float values, or None without dense features.

        Returns:
            E: (B X F X D), sparse fields in schema order, then dense ones.
        """
        pooled = self.embedding_bag_collection(sparse_features).to_dict()
        # Index by name: a sharded collection may return keys in another order.
        fields = [pooled[name] for name in self.sparse_names]
        embeddings = torch.stack(fields, dim=1)  # (B, F_sparse, D)
        if self.dense_embedding is not None:
            if dense_features is None:
                raise ValueError("the schema has dense features but none were given")
            dense = (
                dense_features.unsqueeze(-1) * self.dense_embedding
            )  # (B, F_dense, D)
            embeddings = torch.cat([embeddings, dense], dim=1)
        return embeddings
