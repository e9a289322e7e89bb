"""GIN encoder with edge features, a multitask PT head and an FT head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch_geometric.data import Batch
from torch_geometric.nn import GINEConv, global_add_pool, global_max_pool, global_mean_pool

from .featurize import ATOM_FEATURE_SIZES, BOND_FEATURE_SIZES

__all__ = ["CategoricalEncoder", "GINEncoder", "MoleculeModel", "POOLINGS", "make_ft_head"]

POOLINGS = {"mean": global_mean_pool, "add": global_add_pool, "max": global_max_pool}


class CategoricalEncoder(nn.Module):
    """Sum of one embedding per categorical feature column: [n, columns] int64 -> [n, dim]."""

    def __init__(self, sizes: Sequence[int], dim: int) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(size, dim) for size in sizes)
        for embedding in self.embeddings:
            nn.init.xavier_uniform_(embedding.weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        total = self.embeddings[0](features[:, 0])
        for column, embedding in enumerate(self.embeddings[1:], start=1):
            total = total + embedding(features[:, column])
        return total


class GINEncoder(nn.Module):
    """Graph isomorphism network whose messages add bond embeddings (torch_geometric GINEConv).

    Each layer: GINEConv with a two-layer MLP (hidden -> 2 * hidden -> hidden), BatchNorm,
    ReLU except after the last layer, dropout. The node embeddings are pooled per graph.
    Input: a torch_geometric Batch with `x` [nodes, 5] and `edge_attr` [edges, 3] int64.
    Output: [num_graphs, hidden].
    """

    def __init__(
        self, layers: int = 3, hidden: int = 64, dropout: float = 0.0, pooling: str = "mean"
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"a GIN needs at least 1 layer, got layers={layers}")
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}, expected one of {sorted(POOLINGS)}")
        self.hidden = hidden
        self.dropout = dropout
        self.pool = POOLINGS[pooling]
        self.atom_encoder = CategoricalEncoder(ATOM_FEATURE_SIZES, hidden)
        self.bond_encoders = nn.ModuleList(
            CategoricalEncoder(BOND_FEATURE_SIZES, hidden) for _ in range(layers)
        )
        self.convs = nn.ModuleList(GINEConv(self._mlp(hidden)) for _ in range(layers))
        self.norms = nn.ModuleList(nn.BatchNorm1d(hidden) for _ in range(layers))

    @staticmethod
    def _mlp(hidden: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, hidden)
        )

    def forward(self, batch: Batch) -> torch.Tensor:
        h = self.atom_encoder(batch.x)
        last = len(self.convs) - 1
        for index, (conv, norm, bond_encoder) in enumerate(
            zip(self.convs, self.norms, self.bond_encoders)
        ):
            h = norm(conv(h, batch.edge_index, bond_encoder(batch.edge_attr)))
            if index < last:
                h = torch.relu(h)
            h = nn.functional.dropout(h, p=self.dropout, training=self.training)
        return self.pool(h, batch.batch)


class MoleculeModel(nn.Module):
    """Encoder plus a linear PT head: batch -> PT logits [num_graphs, num_tasks]."""

    def __init__(self, encoder: GINEncoder, num_tasks: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.pt_head = nn.Linear(encoder.hidden, num_tasks)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.pt_head(self.encoder(batch))


def make_ft_head(hidden: int) -> nn.Linear:
    """Return a fresh FT head: graph embedding [n, hidden] -> one BBB logit [n, 1]."""
    return nn.Linear(hidden, 1)
