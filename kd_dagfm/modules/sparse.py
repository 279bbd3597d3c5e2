"""The sparse arch: feature ids to the field embedding tensor E (B X F X D)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    KeyedJaggedTensor,
    PoolingType,
)

from kd_dagfm.schema import FeatureKind, FeatureSchema


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
        self.single_valued = tuple(
            f.kind is not FeatureKind.SPARSE_LIST for f in schema.sparse_features
        )
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
        if (
            type(self.embedding_bag_collection) is EmbeddingBagCollection
            and sparse_features.weights_or_none() is None
        ):
            fields = self._lookup_unsharded(sparse_features)
        else:
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

    def _lookup_unsharded(self, features: KeyedJaggedTensor) -> list[torch.Tensor]:
        """Pool each feature from the unsharded collection's own tables.

        Gives the collection's result: a ``sparse`` feature has exactly one
        id per row (the readers build it so), and sum pooling of one row is
        that row. Read with ``index_select`` instead of ``embedding_bag``,
        its backward pass is an ``index_add`` that does not sort the ids.
        Forward and backward of one 2048-row lookup then take about a third
        of the time on a CPU (measured with PyTorch 2.13 on a 2-core AMD
        EPYC).

        Returns:
            one (B X D) tensor per sparse feature, in schema order.
        """
        batch = features.stride()
        keys = {key: index for index, key in enumerate(features.keys())}
        values = features.values()
        offset_per_key = features.offset_per_key()
        bags = self.embedding_bag_collection.embedding_bags
        fields = []
        for name, single in zip(self.sparse_names, self.single_valued):
            index = keys[name]
            ids = values[offset_per_key[index] : offset_per_key[index + 1]]
            weight = bags[table_name(name)].weight  # (num_embeddings, D)
            if single and ids.numel() == batch:
                fields.append(weight.index_select(0, ids))  # (B, D)
                continue
            lengths = features.lengths()[index * batch : (index + 1) * batch]
            offsets = torch.zeros(batch + 1, dtype=torch.int64, device=ids.device)
            torch.cumsum(lengths, dim=0, out=offsets[1:])
            fields.append(
                F.embedding_bag(
                    ids, weight, offsets, mode="sum", include_last_offset=True
                )
            )  # (B, D)
        return fields
